"""An in-memory MQTT v5 broker and link: a deterministic, single-threaded twin of Mosquitto + MqttLink.

``edge-fl simulate`` runs the real AggregatorService and AgentServices on it, with a fake clock.
:class:`MemoryLink` has MqttLink's constructor and methods (it is a
:class:`~edge_agent.messaging.BrokerLink`) and :meth:`MemoryBroker.link_factory` is a
:class:`~edge_agent.messaging.LinkFactory`::

    broker = MemoryBroker(clock=fake_clock)
    aggregator = AggregatorService(cfg, link_factory=broker.link_factory, clock=fake_clock)
    link = broker.link_factory("dev-1", "memory", 1883, will=("edgefl/f1/presence/dev-1", b"offline", True))
    link.connect()           # ConnectionEvent(True, "connected to memory:1883, new session") in link.inbox
    link.subscribe("edgefl/f1/round/current")   # the retained message is in link.inbox on return
    link.publish("edgefl/f1/update/dev-1/1", b"...")   # 0x00: already in every subscriber's inbox

No threads, no sockets, no waiting: everything happens inside the call that causes it, under one
re-entrant lock (so a threaded driver works too). A publish is delivered synchronously into the
inbox of every matching subscription, in the order the subscriptions were first made, before
``publish`` returns with its PUBACK reason code.

Reconnecting. Nothing reconnects by itself (MqttLink has paho's backoff thread for that). A link
whose connection went away (:meth:`MemoryLink.drop`, :meth:`MemoryBroker.disconnect`, a takeover by
another link with its client id, :meth:`MemoryBroker.restart`) stays disconnected, its operations
raising NotConnected, until the driver calls :meth:`MemoryLink.reconnect` (the same as
``connect()``). A reconnection resumes the link's session (``clean_start`` only applies to the
first connection, as with MqttLink) and restores the subscriptions the link made, exactly as
MqttLink does after paho reconnects. A driver that simulates paho simply calls ``reconnect()`` on
every disconnected link when its simulated backoff has elapsed (it raises ConnectError while the
broker is stopped). A crashed *process* is modelled by ``drop()`` on its link and a new link with
the same client id (``clean_start=False`` resumes the session).

Faults for tests and simulations:

- ``link.drop()`` / ``broker.disconnect(client_id)``: the network connection breaks (or the client
  process dies): the last will is published, the link gets ``ConnectionEvent(False, "connection
  lost")``; its session (subscriptions, unacknowledged and queued messages) stays.
- A second connection with a client id that is connected takes the id over: the first link gets
  ``ConnectionEvent(False, "connection lost")`` and stays disconnected.
- ``broker.restart()`` (``stop()`` + ``start()``): a clean restart (Mosquitto on SIGTERM, LocalBroker.
  restart()): the wills of the connected clients are published, every link loses its connection,
  sessions and retained messages survive. ``broker.restart(lose_queued=True)``: a crash (SIGKILL,
  LocalBroker.kill() + start()): no wills, and the broker comes back with what it had at its last
  :meth:`~MemoryBroker.save` (Mosquitto's persistence autosave) or clean stop: sessions, their
  queued messages and retained messages since then are lost. While stopped, ``connect()`` raises
  ConnectError.

Semantics (measured against Mosquitto 2.0.11 with broker_config/mosquitto-dev.conf; the cases in
tests/integration/test_link_contract.py run against both):

- Topic filters with ``+`` and ``#`` (``a/#`` also matches ``a``; wildcards at the first level do
  not match ``$`` topics); invalid filters and topic names raise ValueError before anything is sent.
- QoS 0 and 1; delivered QoS = min(publish, subscription). A QoS 1 publish returns 0x00, or 0x10
  (No matching subscribers) when no subscription matches (a disconnected persistent session's
  subscription matches). A client gets one copy per matching subscription when its subscriptions
  overlap (Mosquitto 2.0 does).
- Retained messages: kept per topic, sent (``retain=True``) on every SUBSCRIBE (retain handling 0)
  and at a reconnection only for subscriptions the session did not have (handling 1, as MqttLink
  restores them); live deliveries have ``retain=False``; an empty retained payload clears the topic
  and is delivered to current subscribers as an empty message.
- Last will (QoS 1, the link's ``will``): published on drop/disconnect, on a clean broker stop, and on
  a takeover when the session ends there (the new connection has ``clean_start=True`` or the old one
  ``session_expiry_s=0``, as Mosquitto's handle__connect); never on ``close()``.
- Sizes: :func:`~edge_agent.messaging.check_publish_size`, the same check and messages as MqttLink:
  the link's ``max_payload_bytes``, then the broker's Maximum-Packet-Size (262144) from the CONNACK.
- Sessions: ``clean_start=False`` resumes the session of the client id ("session resumed"), True
  discards it ("new session"); a session lives ``session_expiry_s`` (measured with ``clock``) after
  its disconnection (0: it ends with the connection). While disconnected, QoS 1 messages are queued
  (QoS 0 dropped: ``queue_qos0_messages false``), up to ``max_queued_messages`` / ``max_queued_bytes``
  (further ones are dropped, as Mosquitto does). On reconnection the broker first sends again all
  the messages delivered but not acknowledged (``manual_ack=True``, in their order, even more than
  the window), then from the queue what the window allows.
- Manual acknowledgement: with ``manual_ack=True`` a QoS 1 message stays in flight until
  ``link.ack(message)``; at most ``receive_maximum`` (default: the broker's
  ``max_inflight_messages``, 20) are in flight, later ones wait in the session queue. ``ack`` is
  idempotent and ignores messages of another connection, as MqttLink's.
- Inbox order on a (re)connection, as MqttLink's with Mosquitto: a link without subscriptions of its
  own gets its ConnectionEvent first, then the session's messages; a link with subscriptions (which
  it restores after the CONNACK) gets the session's messages, then the ConnectionEvent (it follows
  the SUBACK), then the retained messages of subscriptions new to the session.
- ConnectionEvent reasons as MqttLink's: ``"connected to HOST:PORT, new session"`` / ``"...,
  session resumed"``, ``"connection lost"``, ``"closed by this client"`` (after ``close()``).
- Message expiry (``expiry_s``, MQTT v5 Message-Expiry-Interval, on the broker's ``clock``): a
  queued or retained message older than that is dropped instead of delivered; 0 or None: never.
- Credentials: checked only when the broker is given ``users``; a refusal is the ConnectError
  MqttLink raises for Mosquitto's 0x87 Not authorized.

Differences from the real broker and link (by design, or untestable there):

- Synchronous: ``publish`` returns after delivery (over TCP the PUBACK may come first, and other
  clients see the message a little later); PublishTimeout is never raised and ``timeout`` arguments
  are ignored; ``keepalive_s`` and ``reconnect_min_s``/``reconnect_max_s`` are accepted and ignored.
- No automatic reconnection (see above): a link that was taken over stays off, where paho would
  reconnect and take the id back ("two clients with one id keep kicking each other off").
- On a takeover Mosquitto 2.0.11 sends DISCONNECT 0x8E (Session taken over) but closes the socket
  before paho reads it, so MqttLink reports "connection lost"; the twin reports the same.
- Order of several copies or retained messages delivered for one event: the twin uses subscription
  order and the order in which topics were first retained; Mosquitto uses its topic tree's order.
- Receive-Maximum: the twin keeps at most ``receive_maximum`` messages unacknowledged, as MQTT v5
  says. Mosquitto 2.0.11 only bounds its first burst: every PUBACK then releases up to
  ``receive_maximum`` further queued messages (measured with a window of 3: after five acknowledgements
  13 messages were unacknowledged), so over TCP more may be outstanding than the twin allows.
- Duplicates: Mosquitto may deliver a message again after a reconnection when its acknowledgement
  was still in transit (e.g. at a clean broker restart); the twin duplicates only unacknowledged
  manual-ack messages.
- Expiry: the twin compares ``clock()`` exactly; Mosquitto counts whole seconds (a message may live
  up to a second longer or shorter).
- Persistence is a snapshot taken by ``save()`` or a clean stop (Mosquitto: ``autosave_interval``
  60 s and SIGTERM).
- Not modelled: ACLs (PublishError/SubscribeError are never raised), unsubscribing, QoS 2, $SYS,
  shared subscriptions, Will-Delay, topic aliases, the broker's in-flight bytes limits.

This module imports no paho (tests/unit/test_dependency_rule.py checks it).
"""

from __future__ import annotations

import functools
import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from .messaging import (
    BROKER_MAX_INFLIGHT,
    BROKER_MAX_PACKET_SIZE,
    DEFAULT_MAX_PAYLOAD,
    NO_MATCHING_SUBSCRIBERS,
    ConnectError,
    ConnectionEvent,
    LinkFactory,
    Message,
    MqttError,
    NotConnected,
    TlsOptions,
    check_publish_size,
    check_qos,
    check_topic_filter,
    check_topic_name,
    encode_publish_properties,
    refused_message,
    unreachable_message,
)

__all__ = ["MemoryBroker", "MemoryLink", "topic_matches"]

log = logging.getLogger(__name__)

#: Mosquitto's ``max_queued_messages`` and ``max_queued_bytes`` in broker_config.
MAX_QUEUED_MESSAGES = 1000
MAX_QUEUED_BYTES = 8388608

_LOST = "connection lost"
_CLOSED = "closed by this client"


@functools.lru_cache(maxsize=8192)  # a simulation routes the same few topics through the same filters
def topic_matches(topic_filter: str, topic: str) -> bool:
    """True if ``topic`` matches ``topic_filter`` (MQTT rules: ``+`` one level, ``#`` the rest).

    ``a/#`` matches ``a`` as well; a filter starting with a wildcard does not match a ``$`` topic.
    """
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    filter_levels = topic_filter.split("/")
    topic_levels = topic.split("/")
    for i, level in enumerate(filter_levels):
        if level == "#":
            return True
        if i >= len(topic_levels) or (level != "+" and level != topic_levels[i]):
            return False
    return len(filter_levels) == len(topic_levels)


@dataclass(frozen=True)
class _Pub:
    """One copy of a message as the broker holds it (retained, queued or in flight)."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    user_properties: tuple[tuple[str, str], ...]
    expires_at: float | None  # broker clock; None: never

    def message(self) -> Message:
        return Message(self.topic, self.payload, self.qos, self.retain, self.user_properties)


@dataclass
class _Session:
    """The broker-side state of one client id; ``link`` is its current connection, if any."""

    client_id: str
    expiry_s: int
    link: MemoryLink | None = None
    disconnected_at: float | None = None
    inflight: dict[int, _Pub] = field(default_factory=dict)  # delivery token -> message, unacknowledged
    queued: deque[_Pub] = field(default_factory=deque)
    queued_bytes: int = 0

    def copy(self) -> _Session:
        return _Session(self.client_id, self.expiry_s, None, self.disconnected_at, dict(self.inflight),
                        deque(self.queued), self.queued_bytes)


@dataclass
class _State:
    """What the broker knows, i.e. what its persistence would save."""

    sessions: dict[str, _Session] = field(default_factory=dict)
    # (client id, filter) -> QoS, in the order the subscriptions were made: the delivery order.
    subscriptions: dict[tuple[str, str], int] = field(default_factory=dict)
    retained: dict[str, _Pub] = field(default_factory=dict)

    def copy(self) -> _State:
        return _State({cid: s.copy() for cid, s in self.sessions.items()}, dict(self.subscriptions),
                      dict(self.retained))


class MemoryBroker:
    """An MQTT v5 broker in memory with Mosquitto's semantics (see the module docstring).

    Parameters
    ----------
    clock
        Seconds, for session and message expiry (a simulation passes its fake clock).
    users
        ``{username: password}`` to check at connection; None (default) accepts every client.
    max_packet_size
        Maximum-Packet-Size announced in the CONNACK (None: no limit announced).
    max_inflight_messages
        Unacknowledged QoS 1 messages per client without a Receive-Maximum of its own.
    max_queued_messages, max_queued_bytes
        Per session queue limits; messages beyond them are dropped.
    """

    def __init__(self, *, clock: Callable[[], float] = time.monotonic, users: Mapping[str, str] | None = None,
                 max_packet_size: int | None = BROKER_MAX_PACKET_SIZE,
                 max_inflight_messages: int = BROKER_MAX_INFLIGHT,
                 max_queued_messages: int = MAX_QUEUED_MESSAGES, max_queued_bytes: int = MAX_QUEUED_BYTES) -> None:
        self.clock = clock
        self.users = dict(users) if users is not None else None
        self.max_packet_size = max_packet_size
        self.max_inflight_messages = max_inflight_messages
        self.max_queued_messages = max_queued_messages
        self.max_queued_bytes = max_queued_bytes
        self._lock = threading.RLock()
        self._state = _State()
        self._saved = _State()  # what a crash comes back with
        self._running = True
        self._tokens = itertools.count(1)

    # -- public API --------------------------------------------------------------------------

    def link_factory(self, client_id: str, host: str = "memory", port: int = 1883, *, username: str | None = None,
                     password: str | None = None, will: tuple[str, bytes, bool] | None = None,
                     clean_start: bool = False, session_expiry_s: int = 3600, keepalive_s: int = 30,
                     max_payload_bytes: int = DEFAULT_MAX_PAYLOAD, reconnect_min_s: float = 0.5,
                     reconnect_max_s: float = 30.0, manual_ack: bool = False,
                     receive_maximum: int | None = None, tls: TlsOptions | None = None,
                     max_qos0_backlog: int | None = None, max_inbox: int | None = None,
                     topic_aliases: bool = False) -> MemoryLink:
        """A new, unconnected :class:`MemoryLink` to this broker: MqttLink's constructor signature.

        ``tls``, ``max_qos0_backlog``, ``max_inbox`` and ``topic_aliases`` are accepted and ignored: nothing
        crosses a network here, and the simulation delivers each message as it is published."""
        return MemoryLink(self, client_id, host, port, username=username, password=password, will=will,
                          clean_start=clean_start, session_expiry_s=session_expiry_s, keepalive_s=keepalive_s,
                          max_payload_bytes=max_payload_bytes, reconnect_min_s=reconnect_min_s,
                          reconnect_max_s=reconnect_max_s, manual_ack=manual_ack, receive_maximum=receive_maximum)

    @property
    def running(self) -> bool:
        """False between :meth:`stop` and :meth:`start`."""
        return self._running

    def disconnect(self, client_id: str) -> bool:
        """Break the network connection of ``client_id`` (its will is published).

        Returns
        -------
        bool
            Whether that client was connected.
        """
        with self._lock:
            session = self._state.sessions.get(client_id)
            if session is None or session.link is None:
                return False
            self._detach(session, _LOST, will=True)
            return True

    def save(self) -> None:
        """Snapshot the state a crash comes back with (Mosquitto's persistence autosave)."""
        with self._lock:
            self._saved = self._state.copy()

    def stop(self, *, lose_queued: bool = False) -> None:
        """Stop the broker: every link loses its connection. Idempotent.

        Parameters
        ----------
        lose_queued
            False: a clean shutdown (SIGTERM): the wills of connected clients are published, then
            everything is saved. True: a crash (SIGKILL): no wills, and the state reverts to the last
            :meth:`save` or clean stop (initially empty): later sessions, queued and retained
            messages are lost.
        """
        with self._lock:
            if not self._running:
                return
            connected = [s for s in self._state.sessions.values() if s.link is not None]
            if not lose_queued:  # Mosquitto 2.0 sends the wills of connected clients when it shuts down
                for session in connected:
                    assert session.link is not None
                    if session.link.will is not None:
                        self._publish_will(session.link.will)
            for session in connected:
                self._detach(session, _LOST, will=False)
            if lose_queued:
                self._state = self._saved.copy()
                now = self.clock()
                for session in self._state.sessions.values():
                    if session.disconnected_at is None:
                        session.disconnected_at = now
            else:
                self._saved = self._state.copy()
            self._running = False
            log.debug("broker stopped (%s)", "crash" if lose_queued else "clean")

    def start(self) -> None:
        """Start a stopped broker (links reconnect with :meth:`MemoryLink.reconnect`)."""
        with self._lock:
            self._running = True

    def restart(self, *, lose_queued: bool = False) -> None:
        """:meth:`stop` then :meth:`start`: every link is disconnected and must reconnect."""
        self.stop(lose_queued=lose_queued)
        self.start()

    def connected_clients(self) -> list[str]:
        """Client ids with a connection, in the order their sessions were created."""
        with self._lock:
            return [cid for cid, s in self._state.sessions.items() if s.link is not None]

    def sessions(self) -> list[str]:
        """Client ids the broker keeps a session for (connected or not)."""
        with self._lock:
            self._expire_sessions()
            return list(self._state.sessions)

    def pending(self, client_id: str) -> int:
        """Messages the session of ``client_id`` holds: unacknowledged plus queued."""
        with self._lock:
            session = self._state.sessions.get(client_id)
            return 0 if session is None else len(session.inflight) + len(session.queued)

    def retained_messages(self) -> dict[str, Message]:
        """The retained messages by topic (unexpired)."""
        with self._lock:
            return {topic: pub.message() for topic, pub in self._state.retained.items() if not self._expired(pub)}

    def __repr__(self) -> str:
        with self._lock:
            state = "running" if self._running else "stopped"
            return (f"MemoryBroker({state}, {len(self.connected_clients())} connected, "
                    f"{len(self._state.sessions)} sessions, {len(self._state.retained)} retained)")

    # -- called by MemoryLink (under self._lock) ---------------------------------------------

    def _connect(self, link: MemoryLink, *, clean_start: bool, timeout: float) -> None:
        if not self._running:
            raise ConnectError(unreachable_message(link.host, link.port, timeout))
        if self.users is not None and (link.username is None or self.users.get(link.username) != link._password):
            raise ConnectError(refused_message(link.host, link.port, link.client_id, link.username, 0x87,
                                               "Not authorized"))
        state = self._state
        cid = link.client_id
        old = state.sessions.get(cid)
        if old is not None and old.link is not None:
            # A takeover (Mosquitto 2.0 handle__connect): the old connection is closed; its will is
            # published only if its session ends here.
            self._detach(old, _LOST, will=clean_start or old.expiry_s == 0)
        elif old is not None and self._session_expired(old):
            self._discard(cid)
        old = state.sessions.get(cid)
        present = old is not None and not clean_start
        if old is not None and not present:
            self._discard(cid)
        session = old if old is not None and present else _Session(cid, link.session_expiry_s)
        state.sessions[cid] = session
        session.expiry_s = link.session_expiry_s
        session.link = link
        session.disconnected_at = None
        link._on_connack(self.max_packet_size)
        log.debug("%s connected (%s)", cid, "session resumed" if present else "new session")
        if not link._subscriptions:
            link._announce(present)  # MqttLink announces in on_connect, before reading further packets
            self._resume(session)
            return
        # The broker sends the session's messages right after the CONNACK; MqttLink resubscribes
        # and announces the connection at the SUBACK; retained messages follow the SUBACK.
        self._resume(session)
        new_subscriptions = []
        for topic_filter, qos in link._subscriptions.items():
            key = (cid, topic_filter)
            if not (present and key in state.subscriptions):
                new_subscriptions.append((topic_filter, qos))
            state.subscriptions[key] = qos
        link._announce(present)
        for topic_filter, qos in new_subscriptions:
            self._send_retained(session, topic_filter, qos)

    def _subscribe(self, link: MemoryLink, topic_filter: str, qos: int) -> None:
        session = self._session_of(link)
        self._state.subscriptions[(link.client_id, topic_filter)] = qos
        self._send_retained(session, topic_filter, qos)  # retain handling 0: on every SUBSCRIBE

    def _unsubscribe(self, link: MemoryLink, topic_filter: str) -> None:
        self._state.subscriptions.pop((link.client_id, topic_filter), None)

    def _publish(self, link: MemoryLink, topic: str, payload: bytes, qos: int, retain: bool,
                 expiry_s: int | None, user_properties: tuple[tuple[str, str], ...]) -> int:
        self._session_of(link)
        expires_at = self.clock() + expiry_s if expiry_s else None
        return self._route(topic, payload, qos, retain, user_properties, expires_at)

    def _ack(self, link: MemoryLink, token: int) -> None:
        session = self._state.sessions.get(link.client_id)
        if session is None or session.link is not link:
            return
        if session.inflight.pop(token, None) is not None:
            self._pump(session)

    def _disconnect(self, link: MemoryLink, why: str, *, will: bool) -> None:
        session = self._state.sessions.get(link.client_id)
        if session is not None and session.link is link:
            self._detach(session, why, will=will)

    # -- internals ---------------------------------------------------------------------------

    def _session_of(self, link: MemoryLink) -> _Session:
        session = self._state.sessions.get(link.client_id)
        if session is None or session.link is not link:  # the link's own state says connected: a bug here
            raise NotConnected(f"{link.client_id!r} has no connection to the memory broker")
        return session

    def _detach(self, session: _Session, why: str, *, will: bool) -> None:
        link = session.link
        assert link is not None
        session.link = None
        session.disconnected_at = self.clock()
        if session.expiry_s == 0:
            self._discard(session.client_id)
        link._on_disconnect(why)
        log.debug("%s disconnected (%s)%s", session.client_id, why,
                  ", will published" if will and link.will is not None else "")
        if will and link.will is not None:
            self._publish_will(link.will)

    def _publish_will(self, will: tuple[str, bytes, bool]) -> None:
        topic, payload, retain = will
        self._route(topic, bytes(payload), 1, retain, (), None)

    def _discard(self, client_id: str) -> None:
        state = self._state
        state.sessions.pop(client_id, None)
        state.subscriptions = {key: qos for key, qos in state.subscriptions.items() if key[0] != client_id}

    def _session_expired(self, session: _Session) -> bool:
        return (session.link is None and session.disconnected_at is not None
                and self.clock() - session.disconnected_at >= session.expiry_s)

    def _expire_sessions(self) -> None:
        for cid, session in list(self._state.sessions.items()):
            if self._session_expired(session):
                self._discard(cid)

    def _expired(self, pub: _Pub) -> bool:
        return pub.expires_at is not None and self.clock() > pub.expires_at

    def _route(self, topic: str, payload: bytes, qos: int, retain: bool,
               user_properties: tuple[tuple[str, str], ...], expires_at: float | None) -> int:
        state = self._state
        if retain:
            if payload:
                state.retained[topic] = _Pub(topic, payload, qos, True, user_properties, expires_at)
            else:
                state.retained.pop(topic, None)
        matched = False
        for key, sub_qos in list(state.subscriptions.items()):
            if key not in state.subscriptions or not topic_matches(key[1], topic):
                continue
            session = state.sessions[key[0]]
            if self._session_expired(session):
                self._discard(key[0])
                continue
            matched = True
            self._offer(session, _Pub(topic, payload, min(qos, sub_qos), False, user_properties, expires_at))
        return 0 if matched else NO_MATCHING_SUBSCRIBERS

    def _send_retained(self, session: _Session, topic_filter: str, qos: int) -> None:
        retained = self._state.retained
        for topic, pub in list(retained.items()):
            if not topic_matches(topic_filter, topic):
                continue
            if self._expired(pub):
                del retained[topic]
                continue
            self._offer(session, replace(pub, qos=min(pub.qos, qos), retain=True))

    def _window(self, link: MemoryLink) -> int:
        return link.receive_maximum if link.receive_maximum is not None else self.max_inflight_messages

    def _offer(self, session: _Session, pub: _Pub) -> None:
        """Deliver one copy now if the connection may take it, else queue it (QoS 1 only)."""
        link = session.link
        if link is not None and (pub.qos == 0 or not link.manual_ack
                                 or (not session.queued and len(session.inflight) < self._window(link))):
            self._hand_over(session, link, pub)
            return
        if pub.qos == 0:
            return  # queue_qos0_messages false: QoS 0 is only delivered live
        if (len(session.queued) >= self.max_queued_messages
                or session.queued_bytes + len(pub.payload) > self.max_queued_bytes):
            log.warning("%s: session queue full, dropped a message for %s", session.client_id, pub.topic)
            return
        session.queued.append(pub)
        session.queued_bytes += len(pub.payload)

    def _hand_over(self, session: _Session, link: MemoryLink, pub: _Pub) -> None:
        token = None
        if pub.qos == 1 and link.manual_ack:
            token = next(self._tokens)
            session.inflight[token] = pub
        link._on_message(pub.message(), token)

    def _pump(self, session: _Session) -> None:
        """Move queued messages into the connection while its Receive-Maximum allows."""
        link = session.link
        while link is not None and session.queued and (
                not link.manual_ack or len(session.inflight) < self._window(link)):
            pub = session.queued.popleft()
            session.queued_bytes -= len(pub.payload)
            if not self._expired(pub):
                self._hand_over(session, link, pub)

    def _resume(self, session: _Session) -> None:
        """A new connection of the session: resend what is in flight, then the queue."""
        link = session.link
        assert link is not None
        for token, pub in list(session.inflight.items()):
            del session.inflight[token]
            self._hand_over(session, link, pub)
        self._pump(session)


class MemoryLink:
    """A client connection to a :class:`MemoryBroker`, with MqttLink's API (a BrokerLink).

    Made by :meth:`MemoryBroker.link_factory` (same parameters as MqttLink). Differences from
    MqttLink: it does not reconnect by itself (call :meth:`reconnect`), it can be made to fail
    (:meth:`drop`), and it never waits (``timeout`` arguments are ignored).

    Attributes
    ----------
    inbox
        Received :class:`Message` s and :class:`ConnectionEvent` s, in arrival order.
    """

    inbox: queue.Queue[Message | ConnectionEvent]

    def __init__(self, broker: MemoryBroker, client_id: str, host: str = "memory", port: int = 1883, *,
                 username: str | None = None, password: str | None = None,
                 will: tuple[str, bytes, bool] | None = None, clean_start: bool = False,
                 session_expiry_s: int = 3600, keepalive_s: int = 30, max_payload_bytes: int = DEFAULT_MAX_PAYLOAD,
                 reconnect_min_s: float = 0.5, reconnect_max_s: float = 30.0, manual_ack: bool = False,
                 receive_maximum: int | None = None) -> None:
        if receive_maximum is not None and not 1 <= receive_maximum <= 65535:
            raise ValueError(f"receive_maximum must be 1..65535, not {receive_maximum}")
        self.broker = broker
        self.client_id = client_id
        self.host = host
        self.port = port
        self.username = username
        self._password = password
        self.will = will
        self.clean_start = clean_start
        self.session_expiry_s = session_expiry_s
        self.max_payload_bytes = max_payload_bytes
        self.manual_ack = manual_ack
        self.receive_maximum = receive_maximum
        self.inbox = queue.Queue()
        # Accepted for MqttLink compatibility; nothing here times out or reconnects by itself.
        self.keepalive_s = keepalive_s
        self.reconnect_min_s = reconnect_min_s
        self.reconnect_max_s = reconnect_max_s
        self._subscriptions: dict[str, int] = {}  # restored at every connection
        self._up = False
        self._announced = False
        self._ever_connected = False
        self._closed = False
        self._session_present = False
        self._last_reason = "never connected"
        self._broker_max_packet: int | None = None
        self._connection_no = 0
        # Delivered, not yet acknowledged (manual_ack): id(message) -> (message, token, connection number).
        self._unacked: dict[int, tuple[Message, int, int]] = {}
        # Called with every message delivered to this client, as it is delivered (edge-fl simulate counts what
        # each device downloads, and in which round).
        self.on_delivery: Callable[[Message], None] | None = None

    # -- public API (MqttLink's) -------------------------------------------------------------

    def connect(self, timeout: float = 10.0) -> None:
        """Connect, restore the subscriptions made so far, and put ``ConnectionEvent(True, ...)``.

        A no-op when connected. Unlike MqttLink's, also the way to reconnect (see :meth:`reconnect`).

        Raises
        ------
        ConnectError
            The broker is stopped, or refused the credentials.
        MqttError
            The link was closed.
        """
        with self.broker._lock:
            if self._closed:
                raise MqttError("this link was closed; make a new link")
            if self._up:
                return
            # clean_start applies to the first connection only (MqttLink: MQTT_CLEAN_START_FIRST_ONLY).
            self.broker._connect(self, clean_start=self.clean_start and not self._ever_connected, timeout=timeout)

    def reconnect(self, timeout: float = 10.0) -> None:
        """Connect again after the connection was lost (what paho's loop does for MqttLink).

        Resumes the session; the ConnectionEvent and the messages follow as described in the module
        docstring. A no-op when connected.
        """
        self.connect(timeout)

    @property
    def connected(self) -> bool:
        """True while the connection is up."""
        return self._up

    @property
    def session_present(self) -> bool:
        """Whether the last connection resumed a session."""
        return self._session_present

    @property
    def broker_max_packet_size(self) -> int | None:
        """Maximum-Packet-Size announced by the broker in its last CONNACK, if any."""
        return self._broker_max_packet

    def subscribe(self, topic: str, qos: int = 1, *, timeout: float = 10.0) -> None:
        """Subscribe and remember the subscription (restored at every connection).

        Retained messages matching ``topic`` are in the inbox when this returns. When not connected,
        the subscription is made at the next connection.
        """
        check_qos(qos)
        check_topic_filter(topic)
        with self.broker._lock:
            self._subscriptions[topic] = qos
            if self._up:
                self.broker._subscribe(self, topic, qos)

    def socket_traffic(self) -> tuple[int, int] | None:
        """No sockets here: None (MqttLink's counts what crossed its TCP connections)."""
        return None

    def unsubscribe(self, topic: str, *, timeout: float = 10.0) -> None:
        """Forget the subscription: no message published afterwards is delivered for it, connected or not."""
        check_topic_filter(topic)
        with self.broker._lock:
            self._subscriptions.pop(topic, None)
            self.broker._unsubscribe(self, topic)

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                expiry_s: int | None = None, timeout: float = 10.0,
                user_properties: Sequence[tuple[str, str]] = ()) -> int:
        """Publish; returns the PUBACK reason code (0, or 0x10 when no subscription matched; 0 for QoS 0).

        The message is in every matching subscriber's inbox (or session queue) on return.

        Raises
        ------
        PayloadTooLarge
            Before anything is sent (same limits and messages as MqttLink).
        NotConnected
            Not connected.
        """
        with self.broker._lock:
            return self._send(topic, payload, qos, retain, expiry_s, user_properties)

    def publish_nowait(self, topic: str, payload: bytes, *, qos: int = 0, retain: bool = False,
                       expiry_s: int | None = None) -> None:
        """Publish without looking at the acknowledgement (same checks and errors as :meth:`publish`)."""
        with self.broker._lock:
            self._send(topic, payload, qos, retain, expiry_s, ())

    def ack(self, message: Message) -> None:
        """Acknowledge a QoS 1 message received with ``manual_ack=True``.

        Idempotent; does nothing for QoS 0 messages, without ``manual_ack``, or for a message that
        arrived on an earlier connection (the broker delivers it again on the current one).
        """
        with self.broker._lock:
            entry = self._unacked.get(id(message))
            if entry is None or entry[0] is not message:
                return
            del self._unacked[id(message)]
            _, token, connection_no = entry
            if connection_no == self._connection_no and self._up:
                self.broker._ack(self, token)

    def close(self) -> None:
        """Disconnect cleanly (the will is NOT published); the broker keeps the session. Idempotent."""
        with self.broker._lock:
            if self._closed:
                return
            self._closed = True
            if self._up:
                self.broker._disconnect(self, _CLOSED, will=False)

    def drop(self) -> None:
        """Simulate a network failure or a crash of this client: the will is published.

        The link gets ``ConnectionEvent(False, "connection lost")`` and stays disconnected until
        :meth:`reconnect`. A no-op when not connected.
        """
        with self.broker._lock:
            if self._up:
                self.broker._disconnect(self, _LOST, will=True)

    def __enter__(self) -> MemoryLink:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "connected" if self._up else self._last_reason
        return f"MemoryLink({self.client_id!r} -> {self.host}:{self.port}, {state})"

    # -- internals ---------------------------------------------------------------------------

    def _send(self, topic: str, payload: bytes, qos: int, retain: bool, expiry_s: int | None,
              user_properties: Sequence[tuple[str, str]]) -> int:
        check_qos(qos)
        check_topic_name(topic)
        payload = bytes(payload)
        props = tuple((str(k), str(v)) for k, v in user_properties)
        check_publish_size(topic, len(payload), qos, max_payload_bytes=self.max_payload_bytes,
                           broker_max_packet=self._broker_max_packet,
                           properties=lambda: encode_publish_properties(expiry_s, props))
        if not self._up:
            raise NotConnected(f"not connected to {self.host}:{self.port} ({self._last_reason}): "
                               f"nothing sent to {topic!r}")
        code = self.broker._publish(self, topic, payload, qos, retain, expiry_s, props)
        return code if qos else 0

    # Called by the broker, under its lock.

    def _on_connack(self, max_packet_size: int | None) -> None:
        self._up = True
        self._ever_connected = True
        self._connection_no += 1
        self._broker_max_packet = max_packet_size

    def _announce(self, session_present: bool) -> None:
        self._session_present = session_present
        session = "session resumed" if session_present else "new session"
        self._last_reason = f"connected to {self.host}:{self.port}, {session}"
        self._announced = True
        self.inbox.put(ConnectionEvent(True, self._last_reason))

    def _on_disconnect(self, why: str) -> None:
        self._up = False
        self._unacked.clear()  # their delivery tokens die with the connection
        self._last_reason = why
        if self._announced:
            self._announced = False
            self.inbox.put(ConnectionEvent(False, why))

    def _on_message(self, message: Message, token: int | None) -> None:
        if token is not None:
            self._unacked[id(message)] = (message, token, self._connection_no)
        if self.on_delivery is not None:
            self.on_delivery(message)
        self.inbox.put(message)


if TYPE_CHECKING:  # mypy checks that MemoryLink is a BrokerLink and link_factory a LinkFactory
    _factory: LinkFactory = MemoryBroker().link_factory
