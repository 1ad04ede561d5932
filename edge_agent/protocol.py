"""Topic layout of an edge-fl fleet, in one place. Pure: names only, no MQTT.

| message | topic | QoS | retain | payload |
|---|---|---|---|---|
| global model (latest) | `edgefl/<fleet>/model/current` | 1 | yes | envelope kind GLOBAL; version = rounds done |
| round task | `edgefl/<fleet>/round/current` | 1 | yes | envelope kind GLOBAL: the tensors to train from (1) |
| update upload | `edgefl/<fleet>/update/<device>/<round>` | 1 | no | envelope kind UPDATE, or its chunks (2) |
| presence | `edgefl/<fleet>/presence/<device>` | 1 | yes | `online` on connect; `offline` as the last will |
| telemetry | `edgefl/<fleet>/telemetry/<device>` | 1 | no | JSON: the device's head accuracies per global version |
| aggregator status | `edgefl/<fleet>/status` | 1 | yes | JSON: the last closed round (reporting, rejected, bytes) |

Envelopes are `codec.envelope.Envelope`. (1) Its meta holds the round, deadline, selected devices and
training configuration. (2) Chunks (`codec.chunking`) when the envelope is larger than the broker's packet limit.

Telemetry is QoS 1 rather than 0 here because `edge-fl demo` builds its per-round table from it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


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

    def device_of(self, topic: str, kind: str) -> str | None:
        """The device level of a `<prefix>/<kind>/<device>[/...]` topic, or None if it is not one."""
        parts = topic.split("/")
        head = self.prefix.split("/")
        if parts[: len(head)] != head or len(parts) < len(head) + 2 or parts[len(head)] != kind:
            return None
        return parts[len(head) + 1]
