"""MQTT v5 link to the broker: the one module of edge-fl that imports paho-mqtt.

A small, typed, blocking wrapper in the spirit of aiomqtt: paho's network thread does the I/O
and paho's callbacks only hand results over (queue puts, events), never block. Callers see our
own :class:`Message`, :class:`ConnectionEvent` and exception tree, never paho types.

Delivery contract (see DESIGN.md section 4)

- :meth:`MqttLink.publish` with QoS 1 returns only when the broker's PUBACK arrived, with its
  reason code; a code >= 0x80 raises :class:`PublishError`. Until then the caller must keep
  the message (the agent's on-disk outbox): if the connection drops first, ``publish`` raises
  :class:`NotConnected` and paho may still deliver the message after reconnecting, so QoS 1 is
  at-least-once and receivers deduplicate.
- Sizes are checked before sending. Mosquitto answers an oversized PUBLISH by DISCONNECTing the
  client (reason 0x95), and paho would resend the same message after every reconnect.
- Connection losses and reconnects are reported as :class:`ConnectionEvent` on the same inbox
  as messages, so a service loop sees them in order. Reconnection itself is paho's loop with
  exponential backoff; subscriptions are restored after every reconnect.
- With :class:`TlsOptions` the link speaks TLS (mutual TLS when a client certificate is given):
  the broker's certificate is always checked against the CA file and its name against ``host``.
  A failed handshake raises :class:`TlsError` at once, saying what failed (unknown CA, expired,
  revoked, name mismatch, the broker refusing our certificate), instead of waiting for the
  connect timeout. Without TLS the link logs a warning once: fine on loopback, not on a network.
- Incoming QoS 1 messages are acknowledged when they reach the inbox, or with
  ``manual_ack=True`` only when the application calls :meth:`MqttLink.ack` (after committing
  them), so that a crash in between makes the broker deliver them again.
- With ``topic_aliases=True`` a topic published on (QoS 1) more than once gets an MQTT v5 Topic Alias, up to the
  broker's Topic-Alias-Maximum, and later messages on it travel without their topic: see :class:`_TopicAliases`
  and docs/topic-aliases.md. Subscribers still see the full topic.
"""

from __future__ import annotations

import logging
import queue
import socket
import ssl
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from .messaging import (
    DEFAULT_MAX_PAYLOAD,
    BrokerLink,
    ConnectError,
    ConnectionEvent,
    LinkFactory,
    Message,
    MqttError,
    NotConnected,
    PayloadTooLarge,
    PublishError,
    PublishTimeout,
    SubscribeError,
    TlsError,
    TlsOptions,
    check_publish_size,
    check_qos,
    check_topic_filter,
    check_topic_name,
    publish_packet_size,
    refused_message,
    unreachable_message,
)

# The exceptions, Message, ConnectionEvent and the limits live in the paho-free edge_agent.messaging
# (shared with the in-memory twin, edge_agent.memory_broker); importing them from here keeps working.
__all__ = [
    "MqttError", "ConnectError", "NotConnected", "PublishError", "PublishTimeout",
    "PayloadTooLarge", "SubscribeError", "Message", "ConnectionEvent", "MqttLink", "TlsError", "TlsOptions",
    "tls_context", "describe_tls_failure",
    "DEFAULT_MAX_PAYLOAD", "publish_packet_size", "BrokerLink", "LinkFactory",
]

log = logging.getLogger(__name__)


class _Waiter:
    """One publish or subscribe waiting for its acknowledgement (set from paho's thread)."""

    __slots__ = ("done", "codes", "names", "lost")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.codes: list[int] = []
        self.names: list[str] = []
        self.lost: str | None = None  # why the connection went away before the answer

    def resolve(self, codes: list[int], names: list[str]) -> None:
        self.codes, self.names = codes, names
        self.done.set()

    def fail(self, why: str) -> None:
        self.lost = why
        self.done.set()


class _TopicAliases:
    """The outgoing topic aliases of one link: which topic has which alias on the current connection.

    paho only encodes what it is given (a TopicAlias property, an empty topic): choosing aliases is ours. Aliases
    live as long as one connection, so the table is emptied at every CONNACK. Rules that keep the broker from ever
    seeing an alias it does not know (Mosquitto DISCONNECTs the client for that, "protocol error", and paho would
    then send the same message after every reconnection, for ever):

    - Only QoS 1 messages use aliases: paho sends those in publish order (a message beyond its in-flight window
      waits in order), while a QoS 0 one goes straight to the socket and could overtake the message that
      introduces its alias.
    - An alias, once given, is never given to another topic during the connection (no remapping to race with).
    - A topic gets one only when it is published a second time (a topic used once, like an update's
      ``update/<device>/<round>``, would only cost the 3 bytes of the property), and while the broker has slots.
    - QoS 1 messages still in paho's hands when a new connection starts are given back their full topic and lose
      their alias before paho sends them again (:meth:`forget_connection`).

    Guarded by ``lock``, which a publishing thread holds from the choice of alias until paho has queued the message,
    and the network thread takes at every connection and disconnection: so no message chosen for one connection is
    handed to paho once the next one has started.
    """

    #: How many recently published topics are remembered to recognise a second publish (bounds memory: update
    #: topics change every round).
    RECENT = 64

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.maximum = 0  # the broker's Topic-Alias-Maximum on the current connection; 0 while disconnected
        self.assigned: dict[str, int] = {}
        self.recent: OrderedDict[str, None] = OrderedDict()
        self.sent_with_alias = 0  # messages sent without their topic (for tests and metrics)

    def choose(self, topic: str, qos: int) -> tuple[int | None, bool]:
        """``(alias, topic_omitted)`` for a message on ``topic``; nothing is recorded until :meth:`commit`."""
        if qos != 1 or self.maximum == 0:
            return None, False
        alias = self.assigned.get(topic)
        if alias is not None:
            return alias, True
        if topic in self.recent and len(self.assigned) < self.maximum:
            return len(self.assigned) + 1, False  # this message carries the topic and introduces the alias
        return None, False

    def commit(self, topic: str, alias: int | None, omitted: bool) -> None:
        """Record what was handed to paho: the alias it introduced, or one more message sent without its topic."""
        self.recent[topic] = None
        self.recent.move_to_end(topic)
        while len(self.recent) > self.RECENT:
            self.recent.popitem(last=False)
        if alias is not None and not omitted:
            self.assigned[topic] = alias
        elif omitted:
            self.sent_with_alias += 1

    @staticmethod
    def supported(client: paho.Client) -> bool:
        """Whether ``client`` keeps its unacknowledged messages where :meth:`forget_connection` fixes them (paho
        1.x and 2.x do; a version that does not must get no alias, or reconnections would fail for ever)."""
        return hasattr(client, "_out_messages") and hasattr(client, "_out_message_mutex")

    def forget_connection(self, client: paho.Client, maximum: int) -> None:
        """A new connection (from paho's thread, before paho sends its unacknowledged messages again): empty the
        table and give every message still waiting in paho its full topic back, without the alias."""
        topics = {alias: topic for topic, alias in self.assigned.items()}
        self.assigned = {}
        self.maximum = maximum
        # paho keeps unacknowledged QoS 1 messages in _out_messages and sends them again after a reconnection as
        # they were built (topic and properties): an alias from the last connection would be unknown on this one.
        with client._out_message_mutex:
            for mid, message in list(client._out_messages.items()):
                props = message.properties
                alias = getattr(props, "TopicAlias", None) if props is not None else None
                if alias is None:
                    continue
                if not message.topic:
                    topic = topics.get(alias)
                    if topic is None:  # cannot happen: every alias sent on the last connection is in the table
                        log.error("dropped message %d: its topic alias %d is unknown", mid, alias)
                        del client._out_messages[mid]  # sent as it is, it would end every connection
                        continue
                    message.topic = topic.encode()
                delattr(props, "TopicAlias")


_TCP_INFO_BYTES = struct.Struct("<QQ")  # struct tcp_info: tcpi_bytes_acked, tcpi_bytes_received (Linux >= 4.2)
_TCP_INFO_BYTES_AT = 120


def tcp_bytes(sock: socket.socket) -> tuple[int, int] | None:
    """(bytes sent and acknowledged by the peer, bytes received) of a TCP connection so far, from Linux's TCP_INFO:
    the TCP payload, so MQTT headers and TLS records included, IP and TCP headers not. None where unavailable."""
    option = getattr(socket, "TCP_INFO", None)
    if option is None:
        return None
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, option, 256)
    except OSError:
        return None
    if len(raw) < _TCP_INFO_BYTES_AT + _TCP_INFO_BYTES.size:
        return None
    acked, received = _TCP_INFO_BYTES.unpack_from(raw, _TCP_INFO_BYTES_AT)
    return max(0, acked - 1), received  # the SYN counts as one acknowledged byte


def _rc(reason: ReasonCode | int) -> tuple[int, str]:
    if isinstance(reason, ReasonCode):
        return reason.value, reason.getName()
    return int(reason), paho.error_string(reason)


class MqttLink:
    """One client connection (MQTT v5) with acknowledged publishes and automatic reconnects.

    Parameters
    ----------
    client_id
        Unique per device: two clients with one id keep kicking each other off.
    host, port
        The broker.
    username, password
        Credentials (Mosquitto refuses anonymous clients in our configs).
    will
        ``(topic, payload, retain)`` published by the broker with QoS 1 if this client
        disappears without a clean DISCONNECT: at once when its process dies (the OS closes
        the socket), after 1.5 x ``keepalive_s`` when the network goes away.
    clean_start
        False (default) resumes the broker-side session of ``client_id``: its subscriptions and
        the QoS 1 messages queued while it was away. True discards that session at the first
        connection only; reconnects of this link always resume the session.
    session_expiry_s
        How long the broker keeps the session after a disconnection.
    keepalive_s
        Ping interval; the broker declares the client gone after 1.5x this without traffic.
    max_payload_bytes
        Our own payload limit, checked before sending; the broker's CONNACK
        Maximum-Packet-Size, when it sends one, is checked as well.
    reconnect_min_s, reconnect_max_s
        Backoff between reconnection attempts: doubles from min to max, reset by a successful
        connection.
    manual_ack
        False: a QoS 1 message is acknowledged to the broker as soon as it is in ``inbox``.
        True: only when the application calls :meth:`ack` (e.g. after committing it to disk),
        so a crash before that makes the broker deliver it again (to a persistent session).
    tls
        Client TLS (CA file, client certificate and key, TLS floor); None: plain TCP, with a
        warning at connect time. Files are loaded here: a missing or unreadable one raises
        :class:`TlsError` (kind ``"local"``) at once.
    receive_maximum
        How many QoS 1 messages the broker may send us before we acknowledge them (MQTT v5
        Receive-Maximum). Default: the broker's choice (Mosquitto: ``max_inflight_messages``,
        20 in our configs). With ``manual_ack`` this should bound how many messages the application
        may hold unacknowledged; Mosquitto 2.0.11 does not keep to it (see ``max_inbox``).
    max_inbox
        Past this many items waiting in ``inbox``, stop reading from the broker until the application
        takes some (TCP flow control then holds the broker back, whatever its version); None: never.
        Only for a consumer that never waits on this link while its inbox is full, except in
        publish() / subscribe() (they are let through).
    topic_aliases
        Send a topic that is published on more than once (QoS 1) as an MQTT v5 Topic Alias from its
        third message on, up to the broker's Topic-Alias-Maximum (Mosquitto: ``max_topic_alias``, 10):
        ``len(topic) - 3`` bytes less per message. Default off; see docs/topic-aliases.md.

    Attributes
    ----------
    inbox
        Received :class:`Message` s and :class:`ConnectionEvent` s, in arrival order.
    """

    inbox: queue.Queue[Message | ConnectionEvent]

    def __init__(self, client_id: str, host: str, port: int, *, username: str | None = None,
                 password: str | None = None, will: tuple[str, bytes, bool] | None = None,
                 clean_start: bool = False, session_expiry_s: int = 3600, keepalive_s: int = 30,
                 max_payload_bytes: int = DEFAULT_MAX_PAYLOAD, reconnect_min_s: float = 0.5,
                 reconnect_max_s: float = 30.0, manual_ack: bool = False,
                 receive_maximum: int | None = None, tls: TlsOptions | None = None,
                 max_qos0_backlog: int | None = None, max_inbox: int | None = None,
                 topic_aliases: bool = False) -> None:
        if max_qos0_backlog is not None and max_qos0_backlog < 1:
            raise ValueError(f"max_qos0_backlog must be at least 1, not {max_qos0_backlog}")
        if max_inbox is not None and max_inbox < 1:
            raise ValueError(f"max_inbox must be at least 1, not {max_inbox}")
        self.client_id = client_id
        self.host = host
        self.port = port
        self.max_payload_bytes = max_payload_bytes
        self.inbox = queue.Queue()
        self._clean_start = clean_start
        self._session_expiry_s = session_expiry_s
        self._keepalive_s = keepalive_s
        self._username = username

        # Guards the state below. Never held while calling into paho, except for ack() (see
        # there), because paho holds its own locks while it runs our callbacks.
        self._lock = threading.Lock()
        self._waiters: dict[int, _Waiter] = {}
        self._early: dict[int, tuple[list[int], list[str]]] = {}  # acks that beat registration
        self._ignored: set[int] = set()  # mids whose ack nobody waits for any more
        self._nowait_topics: dict[int, str] = {}  # QoS 1 publish_nowait() mids -> topic, until their PUBACK
        self._subscriptions: dict[str, int] = {}
        self._resubscribe_mid: int | None = None
        self._resubscribe_topics: list[str] = []  # the topic filters of that SUBSCRIBE, in order
        self._session_present = False
        self._broker_max_packet: int | None = None
        self._ever_connected = False
        self._up = False  # a CONNACK accepted us and no disconnection since (under _lock)
        self._announced = False  # ConnectionEvent(True) was put for the current connection
        self._last_reason = "never connected"
        self._ready = threading.Event()  # first CONNACK (and its resubscription) handled
        self._refused: tuple[int, str] | None = None
        self._started = False
        self._closed = False
        self._manual_ack = manual_ack
        self._receive_maximum = receive_maximum
        # QoS 0 messages are outside Receive-Maximum's window: the broker sends them as fast as they come. Past
        # this many items waiting in the inbox a QoS 0 message is dropped (counted, logged at most every 10 s),
        # so a device flooding a QoS 0 topic cannot grow the process's memory.
        self._max_qos0_backlog = max_qos0_backlog
        # Past this many items waiting in the inbox, paho's network thread stops reading the connection until the
        # application takes some (`_hold_back`): TCP then holds the broker back. Receive-Maximum alone does not:
        # Mosquitto 2.0.11 (Debian 12) sends its queued messages past it once acknowledgements flow (its 2.0.13
        # fixed the "inflight quota management", eclipse/mosquitto#2306); measured here, a client acknowledging
        # slowly held ~1,000 unacknowledged messages with Receive-Maximum 20, 64 or 256 alike.
        self._max_inbox = max_inbox
        self.held_back_s = 0.0  # time the network thread waited for room in the inbox (for tests and metrics)
        self.qos0_dropped = 0
        self._qos0_drop_logged_at: float | None = None
        self._qos0_dropped_since_log = 0
        # Messages delivered but not yet acknowledged (manual_ack): id(message) -> (message,
        # packet id, connection number). A packet id means nothing on another connection.
        self._unacked: dict[int, tuple[Message, int, int]] = {}
        self._connection_no = 0
        self._tls = tls
        self._tls_failure: TlsError | None = None  # the last failed handshake (set from paho's thread)
        self._closed_before_connack = 0  # connections the broker closed before any CONNACK
        self._aliases = _TopicAliases() if topic_aliases else None
        # socket_traffic(): the connections before the current one, the current socket and its last reading
        self._traffic_lock = threading.Lock()
        self._traffic_before = (0, 0)
        self._traffic_socket: object = None
        self._traffic_last = (0, 0)

        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                             protocol=paho.MQTTv5, reconnect_on_failure=True,
                             manual_ack=manual_ack)
        if username is not None:
            client.username_pw_set(username, password)
        if will is not None:
            will_topic, will_payload, will_retain = will
            client.will_set(will_topic, will_payload, qos=1, retain=will_retain)
        # paho only does arithmetic and time.sleep() with these, so sub-second floats work
        # (its annotations say int).
        client.reconnect_delay_set(reconnect_min_s, reconnect_max_s)  # type: ignore[arg-type]
        if tls is not None:
            client.tls_set_context(tls_context(tls, self._on_tls_failure))
        client.enable_logger(logging.getLogger(__name__ + ".paho"))
        # An exception in one of our callbacks must be logged, not end paho's network thread.
        client.suppress_exceptions = True
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        client.on_unsubscribe = self._on_unsubscribe
        self._client = client
        if self._aliases is not None and not _TopicAliases.supported(client):
            log.warning("%s: topic aliases stay off: this paho-mqtt does not keep its unacknowledged messages where "
                        "edge-fl looks for them (see _TopicAliases)", client_id)
            self._aliases = None

    # -- public API --------------------------------------------------------------------------

    def connect(self, timeout: float = 10.0) -> None:
        """Connect, wait for the CONNACK, and keep reconnecting by itself afterwards.

        Returns once the broker accepted the connection and the subscriptions made before
        (see :meth:`subscribe`) are in place. A :class:`ConnectionEvent` ``(True, ...)`` is put
        on the inbox then and after every reconnection.

        Raises
        ------
        TlsError
            The TLS handshake failed (raised as soon as it does, not after ``timeout``).
        ConnectError
            The broker refused (e.g. bad credentials or not MQTT 5) or was not reachable within
            ``timeout``.
        """
        if self._closed:
            raise MqttError("this link was closed; make a new MqttLink")
        if self._started:
            return
        if self._tls is None:
            log.warning("%s: the connection to %s:%d is NOT encrypted and the broker does not authenticate "
                        "this client by certificate (password over plain TCP): fine on loopback for "
                        "development, never on a network; configure [broker.tls] (see SECURITY.md)",
                        self.client_id, self.host, self.port)
        self._ready.clear()
        self._refused = None
        self._tls_failure = None
        props = _properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self._session_expiry_s
        if self._receive_maximum is not None:
            props.ReceiveMaximum = self._receive_maximum
        # clean_start=True means "do not inherit a previous process's session"; once connected,
        # reconnects of this link resume its own session (FIRST_ONLY).
        clean = paho.MQTT_CLEAN_START_FIRST_ONLY if self._clean_start else False
        self._client.connect_async(self.host, self.port, keepalive=self._keepalive_s,
                                   clean_start=clean, properties=props)
        self._client.loop_start()  # retries the first connection too, with backoff
        self._started = True
        if not self._ready.wait(timeout):
            self._shutdown()
            if self._closed_before_connack:
                raise ConnectError(
                    f"the broker at {self.host}:{self.port} closed the connection before answering "
                    f"({self._closed_before_connack} attempts in {timeout:g} s): "
                    + ("check its log; if that listener wants TLS, configure [broker.tls]" if self._tls is None
                       else "check its log (a client certificate it rejects, or a listener that is not TLS)"))
            raise ConnectError(unreachable_message(self.host, self.port, timeout))
        if self._tls_failure is not None and not self._up:
            self._shutdown()
            raise self._tls_failure
        if self._refused is not None:
            self._shutdown()
            code, name = self._refused
            raise ConnectError(refused_message(self.host, self.port, self.client_id, self._username, code, name))

    @property
    def connected(self) -> bool:
        """True while the connection is up (paho's state)."""
        return self._client.is_connected()

    @property
    def broker_max_packet_size(self) -> int | None:
        """Maximum-Packet-Size announced by the broker in its last CONNACK, if any."""
        return self._broker_max_packet

    def socket_traffic(self) -> tuple[int, int] | None:
        """(bytes sent, bytes received) over this link's TCP connections so far (`tcp_bytes`), or None where the
        system does not tell. What a connection carried after its last reading is not counted once it is gone:
        read this regularly (the agent does with every telemetry report)."""
        sock = self._client.socket()
        with self._traffic_lock:
            if sock is not self._traffic_socket:
                before, last = self._traffic_before, self._traffic_last
                self._traffic_before = (before[0] + last[0], before[1] + last[1])
                self._traffic_socket, self._traffic_last = sock, (0, 0)
            if isinstance(sock, socket.socket):
                now = tcp_bytes(sock)
                if now is None:
                    return None
                self._traffic_last = now
            before, last = self._traffic_before, self._traffic_last
            return before[0] + last[0], before[1] + last[1]

    @property
    def sent_with_alias(self) -> int:
        """How many messages went out as a topic alias, without their topic (0 without ``topic_aliases``)."""
        return 0 if self._aliases is None else self._aliases.sent_with_alias

    def subscribe(self, topic: str, qos: int = 1, *, timeout: float = 10.0) -> None:
        """Subscribe and remember the subscription (restored after every reconnection).

        When connected, waits for the SUBACK so that messages published afterwards (by anyone)
        are delivered. When not connected, the subscription is made at the next connection.

        Raises
        ------
        SubscribeError
            The broker refused (e.g. the ACL denies the filter).
        MqttError
            No SUBACK within ``timeout``.
        NotConnected
            The connection dropped before the SUBACK (the subscription stays remembered).
        """
        check_qos(qos)
        check_topic_filter(topic)  # before remembering it: an invalid filter would fail every reconnection
        with self._lock:
            self._subscriptions[topic] = qos
        if not self.connected:
            return
        rc, mid = self._client.subscribe(topic, options=SubscribeOptions(qos=qos))
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            return  # dropped meanwhile: on_connect will subscribe
        codes, names = self._await(mid, timeout, f"SUBACK for {topic!r}", MqttError)
        if codes and codes[0] >= 0x80:
            with self._lock:
                self._subscriptions.pop(topic, None)
            raise SubscribeError(f"broker refused subscription to {topic!r}: {names[0]} "
                                 f"(0x{codes[0]:02X})", codes[0], names[0])

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                expiry_s: int | None = None, timeout: float = 10.0,
                user_properties: Sequence[tuple[str, str]] = ()) -> int:
        """Publish and, for QoS 1, wait for the broker's PUBACK.

        Parameters
        ----------
        topic, payload, qos, retain
            The message; ``qos`` is 0 or 1.
        expiry_s
            MQTT v5 Message-Expiry-Interval: the broker drops the message (also a retained
            one) after this many seconds, e.g. a round announcement after its deadline.
        timeout
            Seconds to wait for the PUBACK.
        user_properties
            MQTT v5 user properties sent with the message.

        Returns
        -------
        int
            The PUBACK reason code, < 0x80: ``0`` (success) or ``0x10`` (accepted, no matching
            subscribers). ``0`` for QoS 0 (handed to the socket).

        Raises
        ------
        PayloadTooLarge
            Before anything is sent.
        NotConnected
            Not connected at call time, or the connection dropped before the PUBACK (the
            message may still be delivered after reconnecting).
        PublishError
            The broker answered with a reason code >= 0x80.
        PublishTimeout
            No PUBACK within ``timeout``.
        """
        info = self._send(topic, payload, qos, retain, expiry_s, user_properties)
        if qos == 0:
            self._forget(info.mid)
            return 0
        codes, names = self._await(info.mid, timeout, f"PUBACK for {topic!r}", PublishTimeout)
        code, name = codes[0], names[0]
        if code >= 0x80:
            hint = _NOT_AUTHORIZED_HINT if code == 0x87 else ""
            raise PublishError(f"broker refused publish to {topic!r}: {name} (0x{code:02X}){hint}",
                               code, name)
        return code

    def unsubscribe(self, topic: str, *, timeout: float = 10.0) -> None:
        """Forget a subscription (not restored any more) and, when connected, wait for the broker's UNSUBACK.

        Raises
        ------
        MqttError
            No UNSUBACK within ``timeout``.
        NotConnected
            Not connected, or the connection dropped before the UNSUBACK: a persistent session may still hold
            the subscription on the broker, so messages for it can keep arriving; call again later.
        """
        check_topic_filter(topic)
        with self._lock:
            self._subscriptions.pop(topic, None)
        if not self.connected:
            raise NotConnected(f"not connected to {self.host}:{self.port}: the broker's session may still "
                               f"subscribe {topic!r}")
        rc, mid = self._client.unsubscribe(topic)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            raise NotConnected(f"connection to {self.host}:{self.port} lost before unsubscribing {topic!r}")
        self._await(mid, timeout, f"UNSUBACK for {topic!r}", MqttError)

    def publish_nowait(self, topic: str, payload: bytes, *, qos: int = 0,
                       retain: bool = False, expiry_s: int | None = None) -> None:
        """Publish without waiting for an acknowledgement (telemetry, receipts, and the aggregator's retained
        state: a caller that waits for a PUBACK needs the network thread to read it, past whatever the broker
        queued in front of it). A QoS 1 refusal is logged when its PUBACK comes; paho sends an unacknowledged
        QoS 1 message again after a reconnection.

        Raises
        ------
        PayloadTooLarge
            Before anything is sent.
        NotConnected
            Not connected: the message is dropped (QoS 0 is only worth anything live).
        """
        info = self._send(topic, payload, qos, retain, expiry_s, ())
        if qos:
            with self._lock:
                self._nowait_topics[info.mid] = topic  # so that a refusal is logged, not lost
        self._forget(info.mid)

    def ack(self, message: Message) -> None:
        """Acknowledge a QoS 1 message received with ``manual_ack=True``.

        Idempotent; does nothing for QoS 0 messages, without ``manual_ack``, or for a message
        that arrived on an earlier connection (the broker delivers it again, with the same
        content, on the current one: receivers deduplicate anyway).
        """
        with self._lock:
            entry = self._unacked.get(id(message))
            if entry is None or entry[0] is not message:
                return
            del self._unacked[id(message)]
            _, mid, connection_no = entry
            # Under the lock, so no reconnection can slip in between the check and the PUBACK
            # (the same packet id on a new connection is another message). paho's ack() only
            # appends to its output queue: it takes no lock of paho's.
            if connection_no == self._connection_no and self._up:
                self._client.ack(mid, 1)

    def close(self) -> None:
        """Disconnect cleanly (the will is NOT published) and stop the network thread.

        The broker keeps the session for ``session_expiry_s``. Idempotent.
        """
        if self._closed:
            return
        self._closed = True
        self._shutdown()
        self._fail_waiters("the link was closed")

    def __enter__(self) -> MqttLink:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "connected" if self.connected else self._last_reason
        return f"MqttLink({self.client_id!r} -> {self.host}:{self.port}, {state})"

    # -- internals (caller's thread) ---------------------------------------------------------

    def _send(self, topic: str, payload: bytes, qos: int, retain: bool, expiry_s: int | None,
              user_properties: Sequence[tuple[str, str]]) -> paho.MQTTMessageInfo:
        check_qos(qos)
        check_topic_name(topic)
        payload = bytes(payload)
        props = _properties(PacketTypes.PUBLISH)
        if expiry_s is not None:
            props.MessageExpiryInterval = expiry_s
        if user_properties:
            props.UserProperty = [(str(k), str(v)) for k, v in user_properties]
        if self._aliases is None:
            info = self._publish(topic, payload, qos, retain, props)
        else:
            with self._aliases.lock:  # see _TopicAliases
                alias, omitted = self._aliases.choose(topic, qos)
                if alias is not None:
                    props.TopicAlias = alias
                # The size is checked with the full topic: an upper bound when it is omitted.
                info = self._publish(topic, payload, qos, retain, props, omit_topic=omitted)
                if info.rc in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
                    self._aliases.commit(topic, alias, omitted)  # paho holds it: it goes out, or is resent
        if info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN:
            # Lost between our check and paho's send. paho keeps a QoS 1 message and sends it
            # after reconnecting; nobody will wait for that acknowledgement.
            self._forget(info.mid)
            raise NotConnected(f"connection to {self.host}:{self.port} lost while publishing to "
                               f"{topic!r}")
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._forget(info.mid)
            raise MqttError(f"paho could not queue the message for {topic!r}: "
                            f"{paho.error_string(info.rc)}")
        return info

    def _publish(self, topic: str, payload: bytes, qos: int, retain: bool, props: Properties, *,
                 omit_topic: bool = False) -> paho.MQTTMessageInfo:
        check_publish_size(topic, len(payload), qos, max_payload_bytes=self.max_payload_bytes,
                           broker_max_packet=self._broker_max_packet, properties=lambda: _pack(props))
        if not self.connected:
            raise NotConnected(f"not connected to {self.host}:{self.port} ({self._last_reason}): "
                               f"nothing sent to {topic!r}")
        return self._client.publish("" if omit_topic else topic, payload, qos=qos, retain=retain,
                                    properties=props)

    def _await(self, mid: int, timeout: float, what: str,
               timeout_error: type[MqttError]) -> tuple[list[int], list[str]]:
        waiter = _Waiter()
        with self._lock:
            early = self._early.pop(mid, None)
            up = self._up
            if early is None:
                if up:
                    self._waiters[mid] = waiter
                else:  # dropped after sending: _on_disconnect already failed the waiters
                    self._ignored.add(mid)
        if early is not None:  # the acknowledgement arrived before we registered
            return early
        if not up:
            raise NotConnected(f"connection to {self.host}:{self.port} lost before the {what} "
                               f"arrived (it may still be delivered after reconnecting)")
        if not waiter.done.wait(timeout):
            with self._lock:
                if self._waiters.pop(mid, None) is not None:
                    self._ignored.add(mid)
            if not waiter.done.is_set():
                raise timeout_error(f"no {what} from {self.host}:{self.port} within "
                                     f"{timeout:g} s (it may still be delivered)")
        if waiter.lost is not None:
            raise NotConnected(f"{waiter.lost} before the {what} arrived "
                               f"(it may still be delivered after reconnecting)")
        return waiter.codes, waiter.names

    def _forget(self, mid: int) -> None:
        with self._lock:
            early = self._early.pop(mid, None)
            if early is None:
                self._ignored.add(mid)
                return
            topic = self._nowait_topics.pop(mid, None)
        self._log_refused(topic, *early)

    def _log_refused(self, topic: str | None, codes: list[int], names: list[str]) -> None:
        if topic is not None and codes and codes[0] >= 0x80:
            # Nobody waits for this answer (publish_nowait): without this line an ACL refusal would go unnoticed.
            log.error("%s: broker refused publish to %r: %s (0x%02X)%s", self.client_id, topic, names[0],
                      codes[0], _NOT_AUTHORIZED_HINT if codes[0] == 0x87 else "")

    def _fail_waiters(self, why: str) -> None:
        with self._lock:
            waiters = list(self._waiters.items())
            self._waiters.clear()
            self._ignored.update(mid for mid, _ in waiters)
        for _, waiter in waiters:
            waiter.fail(why)

    def _shutdown(self) -> None:
        try:
            self._client.disconnect()
        except OSError as exc:
            # paho's disconnect() wakes its network thread through a socket pair that thread may already have
            # closed (eclipse-paho/paho.mqtt.python#673): EBADF here only means the connection is gone already.
            # Closing must still stop the thread, and a caller's clean-up (the demo after a stop signal) must
            # not end in this error.
            log.debug("disconnect while closing %s: %s", self.client_id, exc)
        finally:
            self._client.loop_stop()
            self._started = False

    # -- paho callbacks (network thread: hand over, never block) -----------------------------

    def _resolve(self, mid: int, codes: list[int], names: list[str]) -> None:
        with self._lock:
            if mid in self._ignored:
                self._ignored.discard(mid)
                topic = self._nowait_topics.pop(mid, None)
                waiter: _Waiter | None = None
            else:
                topic = None
                waiter = self._waiters.pop(mid, None)
                if waiter is None:
                    self._early[mid] = (codes, names)
                    return
        if waiter is None:
            self._log_refused(topic, codes, names)
        else:
            waiter.resolve(codes, names)

    def _on_publish(self, client: paho.Client, userdata: object, mid: int,
                    reason_code: ReasonCode, properties: Properties | None) -> None:
        code, name = _rc(reason_code)
        self._resolve(mid, [code], [name])

    def _on_unsubscribe(self, client: paho.Client, userdata: object, mid: int,
                        reason_codes: list[ReasonCode], properties: Properties | None) -> None:
        pairs = [_rc(rc) for rc in reason_codes]
        self._resolve(mid, [c for c, _ in pairs], [n for _, n in pairs])

    def _on_subscribe(self, client: paho.Client, userdata: object, mid: int,
                      reason_codes: list[ReasonCode], properties: Properties | None) -> None:
        pairs = [_rc(rc) for rc in reason_codes]
        codes, names = [c for c, _ in pairs], [n for _, n in pairs]
        with self._lock:
            is_resubscribe = mid == self._resubscribe_mid
            if is_resubscribe:
                self._resubscribe_mid = None
                topics = self._resubscribe_topics  # not the current list: it may have changed since
        if not is_resubscribe:
            self._resolve(mid, codes, names)
            return
        # Not strict: a broker that answers with the wrong number of codes must not stop the
        # connection from being announced (the SUBACK is only read for this warning).
        refused = [f"{t}: {n}" for t, c, n in zip(topics, codes, names, strict=False) if c >= 0x80]
        if refused:
            log.warning("%s: broker refused restored subscriptions: %s", self.client_id, refused)
        self._announce_connected(refused)

    def _on_connect(self, client: paho.Client, userdata: object, flags: paho.ConnectFlags,
                    reason_code: ReasonCode, properties: Properties | None) -> None:
        code, name = _rc(reason_code)
        if code >= 0x80:
            why = f"refused: {name} (0x{code:02X})"
            # After a reconnection refused this way paho keeps retrying: report it once.
            if self._ever_connected and why != self._last_reason:
                self.inbox.put(ConnectionEvent(False, why))
            self._last_reason = why
            if not self._ever_connected:
                self._refused = (code, name)
                self._ready.set()
            return
        self._ever_connected = True
        self.socket_traffic()  # a new socket: what the last one carried, as last read, is kept
        if self._aliases is not None:
            maximum = getattr(properties, "TopicAliasMaximum", None)
            with self._aliases.lock:
                self._aliases.forget_connection(client, int(maximum) if maximum is not None else 0)
        sock = client.socket()
        if sock is not None and hasattr(sock, "setsockopt"):
            # paho leaves Nagle on: a small QoS 1 publish then waits ~40 ms for the previous ACK.
            # Measured: a 10-device round closes in 15 ms instead of 50 (bench/aggregator_throughput).
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass  # not a TCP socket (e.g. a unix socket): nothing to tune
        with self._lock:
            self._up = True
            self._connection_no += 1
        self._session_present = bool(flags.session_present)
        max_packet = getattr(properties, "MaximumPacketSize", None)
        self._broker_max_packet = int(max_packet) if max_packet is not None else None
        with self._lock:
            subscriptions = list(self._subscriptions.items())
        if not subscriptions:
            self._announce_connected([])
            return
        # Restore subscriptions in one SUBSCRIBE. If the broker kept our session it still has
        # them: then only subscriptions it does not know deliver retained messages (handling 1),
        # otherwise we missed updates while away and want the retained state again (0).
        handling = (SubscribeOptions.RETAIN_SEND_IF_NEW_SUB if self._session_present
                    else SubscribeOptions.RETAIN_SEND_ON_SUBSCRIBE)
        rc, mid = client.subscribe(
            [(t, SubscribeOptions(qos=q, retainHandling=handling)) for t, q in subscriptions])
        if rc == MQTTErrorCode.MQTT_ERR_SUCCESS and mid is not None:
            with self._lock:
                self._resubscribe_mid = mid  # ConnectionEvent(True) follows its SUBACK
                self._resubscribe_topics = [t for t, _ in subscriptions]
        else:
            self._announce_connected([f"resubscribe failed: {paho.error_string(rc)}"])

    def _on_tls_failure(self, exc: OSError) -> None:
        """A TLS handshake or read failed (paho's thread, from inside its socket call)."""
        if self._ever_connected and isinstance(exc, (ssl.SSLZeroReturnError, ssl.SSLEOFError)):
            return  # the broker closed an established connection: reported as "connection lost" already
        failure = describe_tls_failure(exc, self.host, self.port)
        if not self._ever_connected:
            self._tls_failure = failure  # connect() raises it
            self._ready.set()
        elif str(failure) != self._last_reason:
            # Reconnecting after e.g. a certificate expired or was revoked: paho keeps retrying with
            # backoff; say why once per distinct reason rather than stay silent.
            log.error("%s: %s (paho keeps retrying with backoff)", self.client_id, failure)
        self._last_reason = str(failure)

    def _announce_connected(self, problems: list[str]) -> None:
        session = "session resumed" if self._session_present else "new session"
        reason = f"connected to {self.host}:{self.port}, {session}"
        if problems:
            reason += "; " + "; ".join(problems)
        self._last_reason = reason
        self._announced = True
        self.inbox.put(ConnectionEvent(True, reason))
        self._ready.set()

    def _on_disconnect(self, client: paho.Client, userdata: object,
                       flags: paho.DisconnectFlags, reason_code: ReasonCode,
                       properties: Properties | None) -> None:
        code, name = _rc(reason_code)
        if self._aliases is not None:
            # Waits for a publish() between choosing an alias and handing the message to paho: paho then still
            # holds this connection's state, so the message is sent again after reconnecting, without its alias.
            with self._aliases.lock:
                self._aliases.maximum = 0
        with self._lock:
            was_up, self._up = self._up, False
            self._resubscribe_mid = None
            self._unacked.clear()  # their packet ids die with the connection
        if not was_up:
            if not self._ever_connected and self._refused is None:
                self._closed_before_connack += 1
            return  # paho reports a refused CONNACK a second time, as "Protocol error"
        if self._closed:
            why = "closed by this client"
        elif flags.is_disconnect_packet_from_server:
            why = f"broker sent DISCONNECT: {name} (0x{code:02X})"
        else:
            # paho maps every socket-level loss (EOF, reset, keepalive) to 0x80 "Unspecified".
            why = "connection lost" + (f": {name} (0x{code:02X})" if code != 0x80 else "")
        self._last_reason = why
        self._fail_waiters(f"connection to {self.host}:{self.port} lost ({why})")
        # Events come in pairs: no "lost" for a connection that was never announced (it
        # dropped between CONNACK and the SUBACK restoring its subscriptions).
        if self._announced:
            self._announced = False
            self.inbox.put(ConnectionEvent(False, why))

    def _on_message(self, client: paho.Client, userdata: object,
                    message: paho.MQTTMessage) -> None:
        props = getattr(message, "properties", None)
        user_props = tuple((str(k), str(v)) for k, v in getattr(props, "UserProperty", ()) or ())
        if message.qos == 0 and self._max_qos0_backlog is not None and self.inbox.qsize() >= self._max_qos0_backlog:
            self._drop_qos0(message.topic)
            return
        if message.qos > 0 and self._max_inbox is not None:
            self._hold_back(self._max_inbox)
        msg = Message(topic=message.topic, payload=bytes(message.payload), qos=message.qos,
                      retain=bool(message.retain), user_properties=user_props)
        if self._manual_ack and message.qos > 0:
            with self._lock:
                self._unacked[id(msg)] = (msg, message.mid, self._connection_no)
        self.inbox.put(msg)


    def _hold_back(self, limit: int) -> None:
        """Wait (in paho's network thread, so nothing more is read from the broker) while the inbox holds `limit`
        items, the link is open and nobody waits for an acknowledgement: a caller blocked in publish() or
        subscribe() needs this thread to read its answer, so it is let through (a bounded overshoot, a few
        messages per such call). Never holds our lock: ack() from the application must go on."""
        started = None
        while self.inbox.qsize() >= limit and not self._closed and not self._waiters:
            if started is None:
                started = time.monotonic()
            time.sleep(0.002)
        if started is not None:
            self.held_back_s += time.monotonic() - started

    def _drop_qos0(self, topic: str) -> None:
        self.qos0_dropped += 1
        self._qos0_dropped_since_log += 1
        now = time.monotonic()
        if self._qos0_drop_logged_at is None or now - self._qos0_drop_logged_at >= 10.0:
            log.warning("%s: %d QoS 0 message(s) dropped (the last on %s): %d items already wait in the inbox "
                        "(max_qos0_backlog); the process is not keeping up with what is sent to it",
                        self.client_id, self._qos0_dropped_since_log, topic, self.inbox.qsize())
            self._qos0_drop_logged_at, self._qos0_dropped_since_log = now, 0


#: Why a broker answers 0x87 to our own topics, in the production setup.
_NOT_AUTHORIZED_HINT = (": the broker's ACL denies this client that topic; with broker_config/acl.example a device may "
                        "write only topics named after its own identity (the certificate's CN, or the username): "
                        "it must equal device_id")

# -- TLS -------------------------------------------------------------------------------------------

_TLS_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


class _ReportingSocket(ssl.SSLSocket):
    """An SSLSocket that reports why a handshake or read failed to its context's ``on_failure``.

    paho catches these errors itself (and only retries), so this is where the reason is still known.
    With TLS 1.3 the broker checks our certificate after the handshake completed on our side: its
    refusal (an alert) then arrives with the first read.
    """

    def do_handshake(self, block: bool = False) -> None:
        try:
            super().do_handshake(block)
        except OSError as exc:
            _report(self.context, exc)
            raise

    def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
        try:
            return super().recv(buflen, flags)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise
        except ssl.SSLError as exc:
            _report(self.context, exc)
            raise


class _ReportingContext(ssl.SSLContext):
    on_failure: Callable[[OSError], None] | None = None


def _report(context: ssl.SSLContext, exc: OSError) -> None:
    callback = getattr(context, "on_failure", None)
    if callback is not None:
        callback(exc)


def tls_context(options: TlsOptions, on_failure: Callable[[OSError], None] | None = None) -> ssl.SSLContext:
    """The client SSLContext for ``options``: broker certificate and name always verified.

    Parameters
    ----------
    options
        CA file, client certificate and key, key password file, TLS floor.
    on_failure
        Called (from the thread doing the I/O) with the exception of every failed handshake or read.

    Raises
    ------
    TlsError
        kind ``"local"``: a file is missing or unreadable, the key does not match the certificate
        or its password is wrong, or ``min_version`` is not "1.2" or "1.3".
    """
    version = _TLS_VERSIONS.get(options.min_version)
    if version is None:
        raise TlsError(f"TLS min_version {options.min_version!r} is not supported: use \"1.2\" or \"1.3\"", "local")
    if (options.cert_file is None) != (options.key_file is None):
        raise TlsError("TLS needs both cert_file and key_file (or neither): got only one", "local")
    # PROTOCOL_TLS_CLIENT: CERT_REQUIRED and check_hostname=True, which nothing here turns off.
    context = _ReportingContext(ssl.PROTOCOL_TLS_CLIENT)
    context.sslsocket_class = _ReportingSocket
    context.on_failure = on_failure
    context.minimum_version = version
    try:
        context.load_verify_locations(cafile=options.ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise TlsError(f"cannot load the CA file {options.ca_file} ({_why(exc)}): it must be the fleet CA's "
                       f"certificate in PEM (scripts/fleet-ca writes ca.crt)", "local") from None
    if options.cert_file is not None and options.key_file is not None:
        password: str | None = None
        if options.key_password_file is not None:
            try:
                password = open(options.key_password_file).read().rstrip("\r\n")
            except OSError as exc:
                raise TlsError(f"cannot read the key password file {options.key_password_file} ({_why(exc)})",
                               "local") from None
        try:
            context.load_cert_chain(options.cert_file, options.key_file, password=password)
        except (OSError, ssl.SSLError) as exc:
            raise TlsError(f"cannot load the client certificate {options.cert_file} with key {options.key_file} "
                           f"({_why(exc)}): check both paths, that the key belongs to the certificate, and "
                           f"key_password_file for an encrypted key", "local") from None
    return context


def _why(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)


# X509_V_ERR_* codes (openssl/x509_vfy.h) that ssl.SSLCertVerificationError.verify_code carries.
_UNKNOWN_CA_CODES = {2, 18, 19, 20, 21}
_NOT_YET_VALID, _EXPIRED, _REVOKED = 9, 10, 23
_NAME_MISMATCH_CODES = {62, 63, 64}  # host name, email, IP address mismatch


def describe_tls_failure(exc: OSError, host: str, port: int) -> TlsError:
    """A :class:`TlsError` that says what failed in a TLS handshake with the broker, and what to do."""
    where = f"TLS with the broker at {host}:{port} failed"
    if isinstance(exc, ssl.SSLCertVerificationError):
        code, detail = exc.verify_code, exc.verify_message
        if code in _UNKNOWN_CA_CODES:
            return TlsError(f"{where}: the broker's certificate is not signed by our CA ({detail}): ca_file must be "
                            f"the fleet CA that signed the broker certificate", "unknown-ca")
        if code in (_EXPIRED, _NOT_YET_VALID):
            return TlsError(f"{where}: the broker's certificate {detail}: renew it (scripts/fleet-ca broker), "
                            f"or fix this device's clock if it is wrong", "expired")
        if code in _NAME_MISMATCH_CODES:
            return TlsError(f"{where}: the broker's certificate is not valid for {host!r} ({detail}): set host to a "
                            f"name or address its subjectAltName lists, or reissue it (scripts/fleet-ca broker "
                            f"{host})", "name-mismatch")
        if code == _REVOKED:
            return TlsError(f"{where}: the broker's certificate is revoked", "server-revoked")
        return TlsError(f"{where}: the broker's certificate was rejected: {detail} (X509 error {code})", "handshake")
    if isinstance(exc, ssl.SSLError):
        reason = str(exc.reason or "")
        if "ALERT_" in reason:
            alert = reason.split("ALERT_", 1)[1].replace("_", " ").lower()
            if alert == "protocol version":
                return TlsError(f"{where}: the broker refused our TLS version (alert {alert!r}): it and min_version "
                                f"must share a version (1.2 or 1.3)", "handshake", alert)
            whose = {"certificate required": "it needs a client certificate: set cert_file and key_file",
                     "handshake failure": "no client certificate it accepts (or no common cipher)",
                     "unknown ca": "our certificate is not signed by the CA it trusts",
                     "certificate expired": "our certificate has expired (or is not valid yet): renew it "
                                            "(edge-fl enrol, then scripts/fleet-ca sign)",
                     "certificate revoked": "our certificate is revoked: this device must be enrolled again",
                     "bad certificate": "it rejected our certificate",
                     "certificate unknown": "it rejected our certificate"}.get(alert, "see the broker's log")
            return TlsError(f"{where}: the broker refused our certificate (TLS alert {alert!r}): {whose}",
                            "refused-certificate", alert)
        if reason in ("WRONG_VERSION_NUMBER", "UNEXPECTED_EOF_WHILE_READING", "RECORD_LAYER_FAILURE",
                      "PACKET_LENGTH_TOO_LONG") or isinstance(exc, ssl.SSLEOFError):
            return TlsError(f"{where}: the other end does not speak TLS ({reason or exc}): is {host}:{port} the "
                            f"broker's TLS listener (usually 8883; 1883 is plain MQTT)?", "not-tls")
        return TlsError(f"{where}: {reason or exc}", "handshake")
    return TlsError(f"{where}: the connection broke during the handshake ({_why(exc)}): is {host}:{port} the "
                    f"broker's TLS listener (usually 8883; 1883 is plain MQTT)? If it is, see its log", "not-tls")


# paho's Properties class carries no annotations.
def _properties(packet_type: int) -> Properties:
    return Properties(packet_type)  # type: ignore[no-untyped-call]


def _pack(props: Properties) -> bytes:
    return bytes(props.pack())  # type: ignore[no-untyped-call]


if TYPE_CHECKING:  # mypy checks that MqttLink is a BrokerLink and its constructor a LinkFactory
    _factory: LinkFactory = MqttLink
