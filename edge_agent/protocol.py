"""Topic layout of an edge-fl fleet, in one place. Pure: names only, no MQTT.

`TOPIC_TABLE` below is the one truth; this table, and the one in broker_config/README.md, are tested
against it (tests/unit/test_docs.py). Every topic lives under `edgefl/<fleet>/`:

| message | topic | QoS | retained | written by | payload |
|---|---|---|---|---|---|
| global model (latest) | `model/current` | 1 | yes | aggregator | envelope kind GLOBAL; version = rounds done |
| global model change | `model/delta/<version>` | 1 | yes | aggregator | frame: the change from `<version>` - 1 (5) |
| round task | `round/current` | 1 | yes | aggregator | envelope kind GLOBAL (1) |
| update upload | `update/<device>/<round>` | 1 | no | device | envelope kind UPDATE, or its chunks (2) |
| presence | `presence/<device>` | 1 | yes | device | `online` on connect; `offline` as its last will (3) |
| telemetry | `telemetry/<device>` | 1 | no | device | JSON: the device's head accuracies per global version |
| aggregator status | `status` | 1 | yes | aggregator | JSON: the last closed round (reporting, rejected, bytes) |
| update receipt | `receipt/<device>` | 0 | no | aggregator | JSON: update id, round, counted or refused, reason (4) |

Envelopes are `codec.envelope.Envelope`. (1) The tensors to train from; its meta holds the round, deadline,
selected devices and training configuration. The broker drops it at the deadline (message expiry); the aggregator
empties it once the last round closed. (2) Chunks (`codec.chunking`), all on the same topic, when the
envelope is larger than the broker's packet limit. (3) Published by the broker when the device's connection
is lost, and by the device itself on a clean exit. (4) `receipts.encode_receipt`: the aggregator's answer to
each update it read (every copy of it), readable only by that device; the device keeps the update in its outbox
and sends it again until one arrives (edge_agent/receipts.py). (5) Only with `[train] downlink_codec`
(codec/downlink.py): the aggregator keeps the last `[fleet] downlink_keep` versions' changes retained (older ones
are emptied), devices apply them to the version they hold and read `model/current` only to start or resync.

Telemetry is QoS 1 rather than 0 because `edge-fl demo` builds its per-round table from it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")

#: Every topic of a fleet starts with this, `<fleet>` being the fleet's name.
PREFIX_PATTERN = "edgefl/<fleet>"


@dataclass(frozen=True)
class TopicSpec:
    """One row of the topic table: what travels where, with which QoS and retain flag, sent by whom."""

    message: str
    topic: str  # below `edgefl/<fleet>/`; `<device>` and `<round>` stand for a device id and a round number
    qos: int
    retained: bool
    writer: str
    payload: str
    attr: str  # the `Topics` member that builds this topic


TOPIC_TABLE: tuple[TopicSpec, ...] = (
    TopicSpec("global model (latest)", "model/current", 1, True, "aggregator",
              "envelope kind GLOBAL; version = rounds done", "model_current"),
    TopicSpec("global model change", "model/delta/<version>", 1, True, "aggregator",
              "frame: the change from `<version>` - 1 (5)", "model_delta"),
    TopicSpec("round task", "round/current", 1, True, "aggregator",
              "envelope kind GLOBAL (1)",
              "round_current"),
    TopicSpec("update upload", "update/<device>/<round>", 1, False, "device",
              "envelope kind UPDATE, or its chunks (2)", "update"),
    TopicSpec("presence", "presence/<device>", 1, True, "device",
              "`online` on connect; `offline` as its last will (3)", "presence"),
    TopicSpec("telemetry", "telemetry/<device>", 1, False, "device",
              "JSON: the device's head accuracies per global version", "telemetry"),
    TopicSpec("aggregator status", "status", 1, True, "aggregator",
              "JSON: the last closed round (reporting, rejected, bytes)", "status"),
    TopicSpec("update receipt", "receipt/<device>", 0, False, "aggregator",
              "JSON: update id, round, counted or refused, reason (4)", "receipt"),
)


def topic_table_markdown() -> str:
    """`TOPIC_TABLE` as the Markdown table this module's docstring and broker_config/README.md show."""
    lines = ["| message | topic | QoS | retained | written by | payload |", "|---|---|---|---|---|---|"]
    lines += [f"| {t.message} | `{t.topic}` | {t.qos} | {'yes' if t.retained else 'no'} | {t.writer} | {t.payload} |"
              for t in TOPIC_TABLE]
    return "\n".join(lines)


def check_name(kind: str, value: str) -> str:
    """Fleet and device names become topic levels: no '/', '+', '#' or spaces."""
    if not _NAME.match(value):
        raise ValueError(f"{kind} {value!r} must be 1-64 characters of letters, digits, '.', '_' or '-'")
    return value


@dataclass(frozen=True)
class Topics:
    fleet: str

    def __post_init__(self) -> None:
        check_name("fleet name", self.fleet)

    @property
    def prefix(self) -> str:
        return f"edgefl/{self.fleet}"

    @property
    def model_current(self) -> str:
        return f"{self.prefix}/model/current"

    def model_delta(self, version: int) -> str:
        return f"{self.prefix}/model/delta/{int(version)}"

    @property
    def model_delta_filter(self) -> str:
        return f"{self.prefix}/model/delta/+"

    def version_of_delta(self, topic: str) -> int | None:
        """The version of a `model/delta/<version>` topic, or None if it is not one."""
        head, _, tail = topic.rpartition("/")
        return int(tail) if head == f"{self.prefix}/model/delta" and tail.isdigit() else None

    @property
    def round_current(self) -> str:
        return f"{self.prefix}/round/current"

    @property
    def status(self) -> str:
        return f"{self.prefix}/status"

    def update(self, device: str, round_no: int) -> str:
        return f"{self.prefix}/update/{check_name('device id', device)}/{round_no}"

    @property
    def update_filter(self) -> str:
        return f"{self.prefix}/update/+/+"

    def presence(self, device: str) -> str:
        return f"{self.prefix}/presence/{check_name('device id', device)}"

    @property
    def presence_filter(self) -> str:
        return f"{self.prefix}/presence/+"

    def telemetry(self, device: str) -> str:
        return f"{self.prefix}/telemetry/{check_name('device id', device)}"

    @property
    def telemetry_filter(self) -> str:
        return f"{self.prefix}/telemetry/+"

    def receipt(self, device: str) -> str:
        return f"{self.prefix}/receipt/{check_name('device id', device)}"

    @property
    def receipt_filter(self) -> str:
        return f"{self.prefix}/receipt/+"

    def shared(self, topic_filter: str) -> str:
        """`topic_filter` as the MQTT v5 shared subscription of this fleet's aggregator workers: the broker hands
        each matching message to ONE of them (docs/scale-out.md)."""
        return f"$share/aggregators-{self.fleet}/{topic_filter}"

    def device_of(self, topic: str, kind: str) -> str | None:
        """The device level of a `<prefix>/<kind>/<device>[/...]` topic, or None if it is not one."""
        parts = topic.split("/")
        head = self.prefix.split("/")
        if parts[: len(head)] != head or len(parts) < len(head) + 2 or parts[len(head)] != kind:
            return None
        return parts[len(head) + 1]
