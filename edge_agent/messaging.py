"""The broker link's vocabulary, without paho: messages, events, errors, limits and the link protocol.

:mod:`edge_agent.transport` (the real MQTT v5 link, :class:`~edge_agent.transport.MqttLink`) and
:mod:`edge_agent.memory_broker` (its in-memory twin, :class:`~edge_agent.memory_broker.MemoryLink`)
both speak in these types, and the services depend only on :class:`BrokerLink` and
:class:`LinkFactory`, so either can be plugged in. ``edge_agent.transport`` re-exports everything
the services import from it, so ``from edge_agent.transport import Message`` keeps working.

This module imports no paho (tests/unit/test_dependency_rule.py checks it).
"""

from __future__ import annotations

import queue
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

__all__ = [
    "MqttError", "ConnectError", "TlsError", "TlsOptions", "NotConnected", "PublishError", "PublishTimeout",
    "PayloadTooLarge", "SubscribeError", "Message", "ConnectionEvent", "BrokerLink", "LinkFactory",
    "BROKER_MAX_PACKET_SIZE", "DEFAULT_MAX_PAYLOAD", "BROKER_MAX_INFLIGHT", "NO_MATCHING_SUBSCRIBERS",
    "AUTH_REASON_CODES", "publish_packet_size", "encode_publish_properties", "check_publish_size",
    "check_topic_name", "check_topic_filter", "check_qos", "unreachable_message", "refused_message",
]

#: ``max_packet_size`` in broker_config/mosquitto-*.conf, announced to clients in the CONNACK.
BROKER_MAX_PACKET_SIZE = 262144

#: The broker_config limit (max_packet_size 262144) less 1 KiB for topic and properties.
DEFAULT_MAX_PAYLOAD = BROKER_MAX_PACKET_SIZE - 1024

#: ``max_inflight_messages`` in broker_config: unacknowledged QoS 1 messages the broker sends a client
#: that announced no Receive-Maximum of its own.
BROKER_MAX_INFLIGHT = 20

#: PUBACK reason code 0x10: accepted, but no subscription matched (not an error).
NO_MATCHING_SUBSCRIBERS = 0x10

#: CONNACK 0x84: what paho reports when a broker that does not speak MQTT 5 answers our CONNECT.
UNSUPPORTED_PROTOCOL_VERSION = 0x84

#: Reason codes with which a broker refuses a CONNECT because of credentials.
AUTH_REASON_CODES = frozenset({0x86, 0x87, 0x8C})


class MqttError(RuntimeError):
    """Base class of every error raised by a broker link."""


class ConnectError(MqttError):
    """The broker refused the connection, or could not be reached in time."""


class TlsError(ConnectError):
    """The TLS connection to the broker failed: the message says what (and what to do).

    Attributes
    ----------
    kind
        What failed, for programs: ``"unknown-ca"`` (the broker's certificate is not signed by our
        CA), ``"expired"`` (the broker's certificate), ``"name-mismatch"``, ``"server-revoked"``,
        ``"refused-certificate"`` (the broker's TLS alert: our certificate is missing, unknown,
        expired or revoked; ``alert`` says which), ``"not-tls"`` (the listener does not speak TLS),
        ``"handshake"`` (anything else, e.g. no common TLS version), ``"local"`` (our own CA file,
        certificate or key cannot be loaded).
    alert
        The broker's TLS alert when ``kind`` is ``"refused-certificate"`` (e.g.
        ``"certificate revoked"``), else ``""``.
    """

    def __init__(self, message: str, kind: str, alert: str = "") -> None:
        super().__init__(message)
        self.kind = kind
        self.alert = alert


class NotConnected(MqttError):
    """There is no connection to the broker (or it was lost while waiting for an answer)."""


class PublishError(MqttError):
    """The broker answered a publish with a failure reason code (>= 0x80).

    Attributes
    ----------
    reason_code
        The PUBACK reason code, e.g. ``0x87`` when an ACL denies the topic.
    reason
        Its name in the MQTT v5 specification, e.g. ``"Not authorized"``.
    """

    def __init__(self, message: str, reason_code: int, reason: str) -> None:
        super().__init__(message)
        self.reason_code = reason_code
        self.reason = reason


class SubscribeError(MqttError):
    """The broker refused a subscription (SUBACK reason code >= 0x80).

    Attributes
    ----------
    reason_code
        The SUBACK reason code, e.g. ``0x87`` when an ACL denies the filter.
    reason
        Its name in the MQTT v5 specification.
    """

    def __init__(self, message: str, reason_code: int, reason: str) -> None:
        super().__init__(message)
        self.reason_code = reason_code
        self.reason = reason


class PublishTimeout(MqttError):
    """No PUBACK arrived in time (the message may still be delivered later)."""


class PayloadTooLarge(MqttError):
    """A message was refused before sending because it exceeds our or the broker's limit."""


@dataclass(frozen=True)
class Message:
    """A message received on a subscription.

    Attributes
    ----------
    topic, payload, qos, retain
        As delivered by the broker (``retain`` is True for a retained message sent at
        subscription time).
    user_properties
        MQTT v5 user properties, in order, as ``(name, value)`` pairs.
    """

    topic: str
    payload: bytes
    qos: int
    retain: bool
    user_properties: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class ConnectionEvent:
    """The link connected (``connected=True``, subscriptions restored) or lost its connection.

    ``reason`` wording (both links): ``"connected to HOST:PORT, new session"`` or ``"..., session
    resumed"`` (the broker kept the session: its subscriptions and queued messages);
    ``"connection lost"`` (network drop, broker gone, client id taken over by another connection);
    ``"closed by this client"`` (after ``close()``); ``"broker sent DISCONNECT: NAME (0xNN)"``.
    """

    connected: bool
    reason: str


@dataclass(frozen=True)
class TlsOptions:
    """Client TLS for a broker link (MqttLink; the in-memory twin ignores it).

    The broker's certificate is always verified against ``ca_file``, and its name against the
    host the link connects to: there is no switch to turn that off.

    Attributes
    ----------
    ca_file
        PEM file of the CA(s) that sign the broker's certificate (the fleet CA).
    cert_file, key_file
        PEM client certificate and its private key (mutual TLS): the certificate's CN is the
        device identity. Both or neither.
    key_password_file
        File holding the passphrase of an encrypted ``key_file``.
    min_version
        Oldest TLS version accepted: ``"1.2"`` or ``"1.3"``.
    """

    ca_file: str
    cert_file: str | None = None
    key_file: str | None = None
    key_password_file: str | None = None
    min_version: str = "1.2"


class BrokerLink(Protocol):
    """What the aggregator and agent services use of a link: met by MqttLink and MemoryLink.

    ``publish`` waits for the PUBACK of a QoS 1 message and returns its reason code (0, or 0x10
    when nobody subscribes); ``expiry_s`` is the MQTT v5 Message-Expiry-Interval (the broker drops
    the message, also a retained one, once it is older); ``inbox`` receives :class:`Message` s and
    :class:`ConnectionEvent` s in order; ``ack`` acknowledges a message received with
    ``manual_ack=True``.
    """

    @property
    def inbox(self) -> queue.Queue[Message | ConnectionEvent]: ...

    @property
    def connected(self) -> bool: ...

    def connect(self, timeout: float = 10.0) -> None: ...

    def subscribe(self, topic: str, qos: int = 1, *, timeout: float = 10.0) -> None: ...

    def unsubscribe(self, topic: str, *, timeout: float = 10.0) -> None: ...

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                expiry_s: int | None = None, timeout: float = 10.0) -> int: ...

    def publish_nowait(self, topic: str, payload: bytes, *, qos: int = 0, retain: bool = False,
                       expiry_s: int | None = None) -> None: ...

    def ack(self, message: Message) -> None: ...

    def socket_traffic(self) -> tuple[int, int] | None: ...

    def close(self) -> None: ...


class LinkFactory(Protocol):
    """The constructor call the services make: ``MqttLink`` itself, or ``MemoryBroker.link_factory``."""

    def __call__(self, client_id: str, host: str, port: int, *, username: str | None = None,
                 password: str | None = None, will: tuple[str, bytes, bool] | None = None,
                 clean_start: bool = False, max_payload_bytes: int = DEFAULT_MAX_PAYLOAD,
                 manual_ack: bool = False, receive_maximum: int | None = None, keepalive_s: int = 30,
                 tls: TlsOptions | None = None, max_qos0_backlog: int | None = None,
                 max_inbox: int | None = None, topic_aliases: bool = False) -> BrokerLink: ...


# -- sizes -------------------------------------------------------------------------------------

def _varint_len(n: int) -> int:
    size = 1
    while n >= 128:
        n //= 128
        size += 1
    return size


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def publish_packet_size(topic: str, payload_len: int, qos: int, properties: bytes) -> int:
    """Size in bytes of the MQTT v5 PUBLISH packet, as brokers compare with Maximum-Packet-Size.

    Parameters
    ----------
    topic
        Topic name.
    payload_len
        Payload size in bytes.
    qos
        0, 1 or 2 (QoS > 0 adds a 2-byte packet identifier).
    properties
        The encoded property block, including its own length prefix (``b"\\x00"`` if none).
    """
    remaining = 2 + len(topic.encode()) + (2 if qos else 0) + len(properties) + payload_len
    return 1 + _varint_len(remaining) + remaining


def encode_publish_properties(expiry_s: int | None, user_properties: Sequence[tuple[str, str]]) -> bytes:
    """The property block of a PUBLISH as we send it, length prefix included (as paho encodes it).

    Message-Expiry-Interval (0x02, four bytes) when ``expiry_s`` is given, then one User-Property
    (0x26, two length-prefixed UTF-8 strings) per pair.
    """
    body = bytearray()
    if expiry_s is not None:
        body += b"\x02" + int(expiry_s).to_bytes(4, "big")
    for name, value in user_properties:
        body.append(0x26)
        for text in (str(name).encode(), str(value).encode()):
            body += len(text).to_bytes(2, "big") + text
    return _varint(len(body)) + bytes(body)


def check_publish_size(topic: str, payload_len: int, qos: int, *, max_payload_bytes: int,
                       broker_max_packet: int | None, properties: Callable[[], bytes]) -> None:
    """Refuse a message before sending it, as both links do (same messages).

    Parameters
    ----------
    max_payload_bytes
        The link's own payload limit.
    broker_max_packet
        The broker's CONNACK Maximum-Packet-Size, None when it announced none (or before the
        first connection).
    properties
        Returns the encoded property block (only called when ``broker_max_packet`` is set).

    Raises
    ------
    PayloadTooLarge
        Over either limit.
    """
    if payload_len > max_payload_bytes:
        raise PayloadTooLarge(
            f"payload for {topic!r} is {payload_len} bytes, over the limit of "
            f"{max_payload_bytes} bytes: chunk it")
    if broker_max_packet is not None:
        size = publish_packet_size(topic, payload_len, qos, properties())
        if size > broker_max_packet:
            raise PayloadTooLarge(
                f"message for {topic!r} ({payload_len} bytes of payload) makes a "
                f"{size}-byte packet, over the broker's Maximum-Packet-Size of {broker_max_packet} "
                f"bytes: chunk it")


# -- validation --------------------------------------------------------------------------------

def check_qos(qos: int) -> None:
    """Raise ValueError unless ``qos`` is 0 or 1 (edge-fl uses no QoS 2)."""
    if qos not in (0, 1):
        raise ValueError(f"qos must be 0 or 1 (edge-fl uses no QoS 2), not {qos!r}")


def check_topic_name(topic: str) -> None:
    """Raise ValueError for a topic a PUBLISH may not carry (empty, or with a wildcard).

    The wildcard message is paho's; an empty topic is not caught by paho, and Mosquitto answers it
    by disconnecting the client (Protocol error).
    """
    if not topic:
        raise ValueError("Invalid topic: a publish needs a non-empty topic name.")
    if "+" in topic or "#" in topic:
        raise ValueError("Publish topic cannot contain wildcards.")


def check_topic_filter(topic_filter: str) -> None:
    """Raise ValueError (paho's message) for an invalid subscription filter.

    ``+`` must fill a whole level, ``#`` must be the whole last level.
    """
    levels = topic_filter.split("/")
    valid = bool(topic_filter) and all(
        level in ("+", "#") or ("+" not in level and "#" not in level) for level in levels
    ) and "#" not in levels[:-1]
    if not valid:
        raise ValueError("Invalid subscription filter.")


# -- connection errors -------------------------------------------------------------------------

def unreachable_message(host: str, port: int, timeout: float) -> str:
    """The ConnectError text for a broker that did not answer."""
    return (f"no MQTT broker answered at {host}:{port} within {timeout:g} s: check "
            f"that the broker is running and listening there (scripts/setup installs "
            f"mosquitto; `edge-fl demo` starts its own), and the host and port settings")


def refused_message(host: str, port: int, client_id: str, username: str | None, code: int, name: str) -> str:
    """The ConnectError text for a CONNACK with a failure reason code."""
    hint = (" (check the username and password: Mosquitto answers 'Not authorized' to an "
            "unknown user, a wrong password and a client without credentials alike)"
            if code in AUTH_REASON_CODES else "")
    if code == UNSUPPORTED_PROTOCOL_VERSION:
        hint = (": edge-fl needs MQTT 5 and this broker speaks only MQTT 3.1.1 or older; upgrade it "
                "(Mosquitto >= 1.6; scripts/setup installs 2.0) or point the host and port at one that does")
    user = f"user {username!r}" if username is not None else "no username"
    return (f"broker {host}:{port} refused client "
            f"{client_id!r} ({user}): {name} (0x{code:02X}){hint}")
