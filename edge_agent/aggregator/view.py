"""What the aggregator's status page and `/api/status` show, kept up to date by the service loop.

The service thread reports small facts (a device came online, a round opened, an update was counted,
a device's accuracy for a version); the HTTP thread asks for a snapshot. Every call takes one lock
for O(1) work, except the snapshot, which copies: the HTTP thread never touches the service's state.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from typing import Any


class FleetView:
    def __init__(self, fleet: str, clock: Callable[[], float], *, history: Iterable[Mapping[str, Any]] = (),
                 max_rounds: int = 200) -> None:
        self.fleet, self.clock, self.max_rounds = fleet, clock, max_rounds
        self._lock = threading.Lock()
        self._devices: dict[str, dict[str, Any]] = {}
        self._current: dict[str, Any] | None = None
        self._rounds: OrderedDict[int, dict[str, Any]] = OrderedDict()
        self._acc: dict[int, dict[str, tuple[float | None, float | None, int]]] = {}
        self._version = 0
        for record in history:
            self._add_round(dict(record))

    # --- facts from the service ------------------------------------------------------------------
    def seen(self, device: str, online: bool | None = None) -> None:
        """Heard from `device` now; `online` when its presence changed."""
        now = self.clock()
        with self._lock:
            d = self._devices.setdefault(device, {"online": False, "since": now, "last_seen": now})
            d["last_seen"] = now
            if online is not None and online != d["online"]:
                d["online"], d["since"] = online, now

    def model_version(self, version: int) -> None:
        with self._lock:
            self._version = version

    def round_opened(self, round_no: int, model_version: int, selected: int, opened_at: float, deadline: float,
                     reported: int = 0) -> None:
        with self._lock:
            self._current = {"round": round_no, "phase": "collecting", "model_version": model_version,
                             "selected": selected, "reported": reported, "opened_at": opened_at, "deadline": deadline}

    def update_accepted(self, reported: int) -> None:
        with self._lock:
            if self._current is not None:
                self._current["reported"] = reported

    def round_closed(self, record: Mapping[str, Any]) -> None:
        with self._lock:
            if self._current is not None and self._current["round"] == record["round"]:
                self._current = {**self._current, "phase": "closed", "reported": record.get("reported")}
            self._add_round(dict(record))

    def telemetry(self, version: int, device: str, personal_acc: float | None, global_acc: float | None,
                  n_test: int) -> None:
        with self._lock:
            self._acc.setdefault(version, {})[device] = (personal_acc, global_acc, n_test)

    def _add_round(self, record: dict[str, Any]) -> None:
        self._rounds[int(record["round"])] = record
        self._rounds.move_to_end(int(record["round"]))
        while len(self._rounds) > self.max_rounds:
            self._rounds.popitem(last=False)
        keep = {r.get("result_version") for r in self._rounds.values()} | {self._version}
        if len(self._acc) > self.max_rounds + 1:  # accuracies of versions no longer shown
            for v in [v for v in self._acc if v not in keep]:
                del self._acc[v]

    # --- for the HTTP thread -----------------------------------------------------------------------
    def _accuracy(self, version: int | None) -> tuple[float | None, float | None, int]:
        reports = self._acc.get(version, {}) if version is not None else {}

        def mean(i: int) -> float | None:
            pairs = [(float(a), r[2]) for r in reports.values() if (a := r[i]) is not None and r[2] > 0]
            total = sum(n for _, n in pairs)
            return None if total == 0 else sum(a * n for a, n in pairs) / total

        return mean(0), mean(1), len(reports)

    def snapshot(self) -> dict[str, Any]:
        """A JSON-ready copy: fleet, devices, the current round and the rounds (oldest first) with accuracies."""
        with self._lock:
            rounds = []
            for record in self._rounds.values():
                r = dict(record)
                personal, glob, n = self._accuracy(r.get("result_version"))
                if n:  # live telemetry beats what the history held when it was loaded
                    r["personal_acc"], r["global_acc"], r["devices_reporting_acc"] = personal, glob, n
                rounds.append(r)
            devices = [{"device": k, **v} for k, v in sorted(self._devices.items())]
            current = None if self._current is None else dict(self._current)
            version = self._version
        return {"fleet": self.fleet, "time": self.clock(), "model_version": version,
                "online": sum(1 for d in devices if d["online"]), "devices": devices, "current": current,
                "rounds": rounds}
