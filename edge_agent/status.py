"""`edge-fl status`: what a fleet is doing, read from what its aggregator publishes and (optionally) stores.

Over MQTT (retained messages, so the answer is immediate): the global model (`model/current`: version and
strategy), the open round's task (`round/current`: round, deadline, selected devices), the last closed
round (`status`: reported, selected, rejected, bytes) and every device's presence (`presence/+`). Given the
aggregator's state database, it adds how many devices have reported in the open round and the history of
rounds with the devices' mean accuracy; the database is opened read-only, so a running aggregator is never
disturbed. The MQTT user needs read access to the fleet's tree (the aggregator's, or an operator user).
"""

from __future__ import annotations

import json
import queue
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from .codec.envelope import EnvelopeError, decode_envelope
from .fleet import FleetMessageError, decode_global, decode_task
from .messaging import BrokerLink, LinkFactory, Message, MqttError
from .protocol import Topics


class StatusError(RuntimeError):
    """No broker or no aggregator answered: the one line `edge-fl status` prints before exiting 1."""


@dataclass
class FleetState:
    """What the retained messages of one fleet say, updated message by message."""

    fleet: str
    devices: dict[str, bool] = field(default_factory=dict)  # device -> online
    model: dict[str, Any] | None = None
    task: dict[str, Any] | None = None
    last: dict[str, Any] | None = None  # the aggregator's status document: the last closed round
    task_cleared: bool = False  # saw the task cleared live (a retained clear itself is never delivered)
    problems: list[str] = field(default_factory=list)

    def see(self, msg: Message, topics: Topics) -> None:
        try:
            if (device := topics.device_of(msg.topic, "presence")) is not None:
                self.devices[device] = msg.payload == b"online"
            elif msg.topic == topics.status and msg.payload:
                self.last = json.loads(msg.payload)
            elif msg.topic == topics.round_current:
                self.task, self.task_cleared = None, not msg.payload
                if msg.payload:
                    task = decode_task(decode_envelope(msg.payload))
                    self.task = {"round": task.round, "deadline": task.deadline,
                                 "selected": None if task.selected is None else len(task.selected),
                                 "model_version": task.model.version}
            elif msg.topic == topics.model_current and msg.payload:
                model = decode_global(decode_envelope(msg.payload))
                self.model = {"version": model.version, "strategy": model.training.strategy,
                              "rounds": model.training.rounds}
        except (EnvelopeError, FleetMessageError, ValueError) as exc:
            self.problems.append(f"unreadable message on {msg.topic}: {exc}")

    @property
    def heard_from_aggregator(self) -> bool:
        return self.model is not None or self.task is not None or self.last is not None or self.task_cleared


class FleetWatcher:
    """A read-only MQTT client that keeps a :class:`FleetState` of one fleet."""

    def __init__(self, fleet: str, host: str, port: int, *, username: str | None, password: str | None,
                 link_factory: LinkFactory) -> None:
        self.topics = Topics(fleet)
        self.state = FleetState(fleet)
        self.where = f"{host}:{port}"
        self.link: BrokerLink = link_factory(f"edge-fl-status-{uuid.uuid4().hex[:12]}", host, port,
                                             username=username, password=password, clean_start=True)

    def start(self, timeout: float) -> None:
        """Connect and take in every retained message; StatusError when the broker does not answer."""
        try:
            self.link.connect(timeout=timeout)
        except MqttError as exc:  # its message names the address and what to check
            raise StatusError(str(exc)) from None
        try:
            t = self.topics
            # QoS 0: retained messages go out at once, in order, never held back by the broker's
            # inflight window; the last SUBACK therefore follows every retained message before it.
            for topic in (t.presence_filter, t.model_current, t.round_current, t.status):
                self.link.subscribe(topic, qos=0, timeout=timeout)
            self.link.subscribe(t.status, qos=0, timeout=timeout)  # the barrier (its status again is harmless)
        except MqttError as exc:
            raise StatusError(f"the broker at {self.where} did not let us read fleet {self.topics.fleet!r}: "
                              f"{exc}") from None
        self.poll()

    def poll(self) -> None:
        """Take in whatever arrived since (presence changes, new rounds)."""
        while True:
            try:
                item = self.link.inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, Message):
                self.state.see(item, self.topics)

    def close(self) -> None:
        self.link.close()


def read_database(path: str | Path, rounds: int) -> list[dict[str, Any]]:
    """The round history of an aggregator's state: a SQLite file, or the PostgreSQL URL workers share."""
    from .aggregator.store import SCHEMA_VERSION, is_postgres_url, open_read_only, read_history

    if is_postgres_url(str(path)):
        from .aggregator.pgstore import read_only_connection

        pg = read_only_connection(str(path))
        try:
            return read_history(pg, rounds, SCHEMA_VERSION)
        finally:
            pg.close()
    db = open_read_only(path)
    try:
        return read_history(db, rounds)
    finally:
        db.close()


def summarize(state: FleetState, history: list[dict[str, Any]] | None, now: float) -> dict[str, Any]:
    """The JSON `edge-fl status --json` prints (and the text view is drawn from)."""
    online = sorted(d for d, up in state.devices.items() if up)
    current: dict[str, Any] | None = None
    if state.task is not None:
        t = state.task
        current = {"round": t["round"], "deadline_in_s": round(t["deadline"] - now, 1),
                   "selected": t["selected"] if t["selected"] is not None else "all online",
                   "reported": None, "model_version": t["model_version"]}
        if history:
            row = next((r for r in history if r["round"] == t["round"]), None)
            if row is not None:
                current["reported"], current["selected"] = row["reported"], row["selected"]
    return {"fleet": state.fleet, "model": state.model, "devices_online": len(online),
            "devices_offline": len(state.devices) - len(online), "online": online, "current_round": current,
            "finished": state.task is None and (state.task_cleared or bool(state.last and state.last.get("last"))),
            "last_round": state.last, "history": history,
            "problems": state.problems}


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def render(s: dict[str, Any]) -> str:
    lines = [f"fleet {s['fleet']}"]
    m = s["model"]
    lines.append("global model: " + ("unknown" if m is None else
                                     f"version {m['version']}, strategy {m['strategy']}, {m['rounds']} rounds planned"))
    lines.append(f"devices: {s['devices_online']} online, {s['devices_offline']} offline")
    c = s["current_round"]
    if c is not None:
        reported = "?" if c["reported"] is None else c["reported"]
        lines.append(f"current round {c['round']}: {reported} reported of {c['selected']} selected, "
                     f"deadline in {c['deadline_in_s']:.0f} s")
    elif s["finished"]:
        lines.append("current round: none, all rounds done")
    else:
        lines.append("current round: none open (waiting for devices)")
    last = s["last_round"]
    if last is not None:
        lines.append(f"last closed round {last['round']}: {'succeeded' if last['succeeded'] else 'FAILED'}, "
                     f"{last['reporting']}/{last['selected']} reported, {last['rejected']} rejected, "
                     f"{last['bytes_in']} B in, {last['duration_s']:.1f} s")
    if s["history"]:
        lines.append(f"{'round':>5} {'outcome':<9} {'reported':>9} {'rejected':>8} {'bytes in':>9} "
                     f"{'personal %':>10} {'global %':>8}")
        for r in s["history"]:
            outcome = r["phase"] if r["phase"] != "closed" else ("ok" if r["succeeded"] else "failed")
            known = {k: "-" if r[k] is None else r[k] for k in ("reported", "rejected", "bytes_in")}
            reported = f"{known['reported']}/{r['selected']}"
            lines.append(f"{r['round']:>5} {outcome:<9} {reported:>9} {known['rejected']:>8} {known['bytes_in']:>9} "
                         f"{_pct(r['personal_acc']):>10} {_pct(r['global_acc']):>8}")
    lines.extend(f"warning: {p}" for p in s["problems"])
    return "\n".join(lines)


@dataclass(frozen=True)
class StatusQuery:
    fleet: str
    host: str
    port: int
    username: str | None = None
    password: str | None = None
    state_db: str | None = None
    rounds: int = 10
    timeout_s: float = 5.0


def run_status(q: StatusQuery, out: TextIO, *, as_json: bool = False, watch_s: float | None = None,
               link_factory: LinkFactory | None = None, clock: Callable[[], float] = time.time,
               stop: Callable[[], bool] = lambda: False) -> int:
    """Print the fleet's status once, or every `watch_s` seconds until `stop()`; StatusError if nobody answers."""
    if link_factory is None:
        from .transport import MqttLink

        link_factory = MqttLink
    if q.state_db is not None and "://" not in q.state_db and not Path(q.state_db).is_file():
        raise StatusError(f"aggregator state database not found: {q.state_db} (the `state` key of its config)")
    watcher = FleetWatcher(q.fleet, q.host, q.port, username=q.username, password=q.password,
                           link_factory=link_factory)
    try:
        watcher.start(q.timeout_s)
        if not watcher.state.heard_from_aggregator and q.state_db is None:
            raise StatusError(f"the broker at {watcher.where} holds nothing from an aggregator of fleet "
                              f"{q.fleet!r}: is the aggregator running, and is the fleet name right?")
        while True:
            watcher.poll()
            history = read_database(q.state_db, q.rounds) if q.state_db is not None else None
            summary = summarize(watcher.state, history, clock())
            out.write((json.dumps(summary) if as_json else render(summary)) + "\n")
            out.flush()
            if watch_s is None:
                return 0
            deadline = time.monotonic() + watch_s
            while time.monotonic() < deadline:
                if stop():
                    return 0
                time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
            if not as_json:
                out.write("\n")
    finally:
        watcher.close()
