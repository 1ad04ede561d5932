"""Fuzz a running fleet: thousands of generated, adversarial messages through a real Mosquitto (issue 11).

A real aggregator and two real agents (in this process's threads, tests/integration/mqtt_fleet.py) run their
rounds while an insider login publishes ~5,000 messages from a seeded generator on the update, model, round,
presence and telemetry topics: mostly valid-looking envelopes with adversarial contents (wrong shapes and
names, NaN and inf, 1e30 values, 0 and 2^62 example counts, wrong rounds and versions, wrong kinds and
strategies, duplicate update ids, an absurd head configuration), truncated and bit-flipped envelopes, chunk
headers that lie about sizes and counts, oversized payloads, deeply nested JSON, and some random bytes.

Afterwards: no service died or hit its catch-all; the aggregator's database passes SQLite's integrity check
and its accepted set is exactly the honest updates (every round: both honest devices, nothing else); the
process's resident memory grew by less than a generous bound. Publishing is paced on what the services
have consumed (never on time), so Mosquitto's queue limits never drop an honest message.

A device id the fleet selected may only be spoofed with contents a correct aggregator must refuse on their
shape alone: with signatures off (as here), a well-formed update under an honest id is indistinguishable
from the honest one (tests/integration/test_signing.py covers that case). Ghost ids get everything.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import random
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_agent.aggregator.metrics import Metrics
from edge_agent.broker import LocalBroker
from edge_agent.codec.chunking import HEADER, MAGIC, VERSION, split_message
from edge_agent.codec.envelope import Envelope, Kind, encode_envelope
from edge_agent.data.federated import FederatedData, federate
from edge_agent.data.partition import PartitionConfig
from edge_agent.fleet import GlobalModel, RoundTask, encode_global, encode_task
from edge_agent.learning.head import HeadConfig
from edge_agent.messaging import LinkFactory, MqttError
from edge_agent.protocol import Topics

from .mqtt_fleet import FLEET, RunningFleet, running_fleet

SEED = 11
ROUNDS = 4
HONEST = ("dev-0", "dev-1")
GHOSTS = tuple(f"ghost-{i}" for i in range(40))
N_UPDATES, N_MODELS, N_TASKS, N_PRESENCE, N_TELEMETRY = 3000, 600, 600, 500, 300
SENTINEL = np.float32(1234.5)  # the codecs refuse to encode NaN and inf: they are written into the bytes
BATCH = 100  # published, then wait for the services to consume them: far below Mosquitto's 1,000-message queues
RSS_GROWTH_LIMIT = 100 << 20  # generous: a leak of a few hundred bytes a message would be ~1 MB here


@pytest.fixture(scope="module")
def fed(embedded: Any) -> FederatedData:
    return federate(embedded, PartitionConfig())


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


class CountingMetrics(Metrics):
    """How many update messages the aggregator consumed and how it judged them."""

    def __init__(self) -> None:
        self.received = 0
        self.rejected = 0
        self.duplicates = 0

    def bytes_received(self, n: int) -> None:
        self.received += 1

    def update_rejected(self, reason: str) -> None:
        self.rejected += 1

    def update_duplicate(self) -> None:
        self.duplicates += 1


class Generator:
    """Adversarial messages from one seeded random.Random: the same run every time."""

    def __init__(self, topics: Topics, model: GlobalModel, round_now: Callable[[], int]) -> None:
        self.r = random.Random(SEED)
        self.np = np.random.default_rng(SEED)
        self.topics, self.model, self.round_now = topics, model, round_now
        self.shapes = {k: v.shape for k, v in model.params.items()}
        self.sent_ids: list[str] = []

    # --- building blocks --------------------------------------------------------------------------------
    def tensors(self, how: str) -> dict[str, np.ndarray]:
        t = {k: self.np.standard_normal(s).astype(np.float32) for k, s in self.shapes.items()}
        name = self.r.choice(sorted(t))
        if how in ("nan", "inf"):  # a sentinel that `nonfinite` turns into NaN or inf after encoding
            t[name].flat[self.r.randrange(t[name].size)] = SENTINEL
        elif how == "huge":
            t[name] *= np.float32(self.r.choice([1e30, 1e37, 1e20, -1e25]))
        elif how == "shape":
            t[name] = self.np.standard_normal((self.r.randint(1, 9), self.r.randint(1, 9))).astype(np.float32)
        elif how == "missing":
            del t[name]
        elif how == "extra":
            t["evil.w"] = np.zeros((3, 3), np.float32)
        return t

    def update(self, device: str, *, honest_id: bool) -> bytes:
        r = self.r
        rnd = self.round_now()
        uid = f"fz{r.randrange(1 << 40):x}" if r.random() > 0.2 or not self.sent_ids else r.choice(self.sent_ids)
        self.sent_ids.append(uid)
        if honest_id:  # only what must be refused on its shape alone (see the module docstring)
            how = r.choice(["shape", "missing", "extra", "kind", "strategy", "count0", "round", "round"])
        else:
            how = r.choice(["ok", "nan", "inf", "huge", "huge", "shape", "count62", "count0", "round", "kind"])
        kind = Kind.GLOBAL if how == "kind" else Kind.UPDATE
        count = {"count62": 2**62, "count0": 0}.get(how, r.randint(1, 500))
        round_no = r.choice([0, max(0, rnd - 1), rnd + 1, rnd + 7, 2**32 - 1]) if how == "round" else rnd
        env = Envelope(kind=kind, device_id="aggregator" if kind is Kind.GLOBAL else device, round=round_no,
                       model_version=max(0, rnd - 1) if how != "round" else r.randrange(1 << 31),
                       strategy="ditto" if how == "strategy" else self.model.training.strategy, update_id=uid,
                       num_examples=count, tensors=self.tensors(how),
                       codec="float32" if how in ("nan", "inf") else r.choice(["int8", "float32"]))
        return self.nonfinite(encode_envelope(env), how)

    def nonfinite(self, payload: bytes, how: str) -> bytes:
        """NaN or inf where the sentinel was (the envelope's digest then disagrees: a decoder must still cope)."""
        if how not in ("nan", "inf"):
            return payload
        bad = np.float32(np.nan if how == "nan" else self.r.choice([np.inf, -np.inf])).tobytes()
        return payload.replace(SENTINEL.tobytes(), bad)

    def mangle(self, payload: bytes) -> bytes:
        r = self.r
        how = r.choice(["truncate", "flip", "random", "empty", "oversize"])
        if how == "truncate":
            return payload[:r.randrange(max(1, len(payload)))]
        if how == "flip":
            b = bytearray(payload)
            i = r.randrange(len(b))
            b[i] ^= 1 << r.randrange(8)
            return bytes(b)
        if how == "random":
            return r.randbytes(r.randint(1, 3000))
        if how == "oversize":
            return payload + r.randbytes(1 << 20)  # past fleet.max_update_bytes (1 MiB), within the broker's limit
        return b""

    def chunk(self, payload: bytes) -> bytes:
        """A chunk whose header lies: about the total, the count, the index; or the first of many halves."""
        r = self.r
        mid = r.randbytes(16)
        first = split_message(payload, message_id=mid, max_chunk_bytes=max(64, len(payload) // 3))[0]
        lie = r.choice(["first_half", "total", "count", "index", "version"])
        _, _, _, index, count, total = HEADER.unpack_from(first)
        if lie == "total":
            total = r.choice([0, 2**32 - 1, total * 1000])
        elif lie == "count":
            count = r.choice([0, 2**32 - 1, 1 << 20])
        elif lie == "index":
            index = count + r.randrange(100)
        version = 99 if lie == "version" else VERSION
        return HEADER.pack(MAGIC, version, mid, index, count, total) + first[HEADER.size:]

    # --- per topic -------------------------------------------------------------------------------------
    def update_message(self) -> tuple[str, bytes]:
        r = self.r
        honest_id = r.random() < 0.3
        device = r.choice(HONEST) if honest_id else r.choice(GHOSTS)
        topic = self.topics.update(device, self.round_now() + r.choice([0, 0, 0, 1, -1]))
        choice = r.random()
        payload = self.update(device, honest_id=honest_id) if not honest_id or choice < 0.7 else b"\x00"
        if choice < 0.1:
            return topic, self.chunk(payload)
        if choice < 0.25 or payload == b"\x00":
            return topic, self.mangle(payload)
        return topic, payload

    def model_message(self, task: bool) -> tuple[str, bytes]:
        r = self.r
        how = r.choice(["nan", "inf", "huge", "shape", "missing", "extra", "head", "lr", "strategy", "old",
                        "mangle", "kind"])
        version = self.model.version + r.randint(1, 50)
        params = self.tensors(how if how in ("nan", "inf", "huge", "shape", "missing", "extra") else "ok")
        model = dataclasses.replace(self.model, version=version, params=params)
        if how in ("nan", "inf"):  # float32 on the wire, so the sentinel's bytes are there to overwrite
            model = dataclasses.replace(model, training=dataclasses.replace(model.training, int8_updates=False))
        if how == "head":  # an absurd head a device would have to allocate
            model = dataclasses.replace(model, head=HeadConfig(r.choice([1 << 30, 0, 7]), r.choice([1 << 30, 3]),
                                                               r.choice([1 << 20, 0])))
        elif how == "lr":  # a bound announcement a device must not believe
            model = dataclasses.replace(model, max_abs=1e300, params=self.tensors("huge"))
        elif how == "strategy":
            model = dataclasses.replace(model, training=dataclasses.replace(model.training, strategy="fedper"),
                                        head=dataclasses.replace(model.head, adapter_dim=0))
        elif how == "old":  # a replay from the past: a rollback
            model = dataclasses.replace(model, version=0, params=self.tensors("huge"))
        topic = self.topics.round_current if task else self.topics.model_current
        if how == "kind":
            return topic, encode_envelope(Envelope(
                kind=Kind.UPDATE, device_id="dev-0", round=1, model_version=version, strategy="fedavg",
                update_id="fz-kind", num_examples=1, tensors=params))
        if task:
            rnd = 0 if how == "old" else self.round_now() + r.randint(1, 50)
            payload = encode_task(RoundTask(rnd, r.choice([4e9, -1.0, 1e300]), r.choice([None, ("dev-0",)]), model))
        else:
            payload = encode_global(model)
        if how in ("nan", "inf"):
            payload = self.nonfinite(payload, how)
        return topic, self.mangle(payload) if how == "mangle" else payload

    def presence_message(self) -> tuple[str, bytes]:
        r = self.r
        device = r.choice(GHOSTS + HONEST + ("a" * 200, "x/y"))
        payload = r.choice([b"offline", b"", r.randbytes(r.randint(1, 300)), b"ONLINE ", b"offline" * 1000])
        if device in HONEST:
            payload = b"online"  # a duplicate of the truth; any other value would take an honest device offline
        # Topics.presence refuses ids a device may not have: the broker (and the aggregator) get them raw
        return self.topics.presence("x").rsplit("/", 1)[0] + "/" + device, payload

    def telemetry_message(self) -> tuple[str, bytes]:
        r = self.r
        device = r.choice(GHOSTS + HONEST)
        payload = r.choice([b"[" * 100_000, b'{"device": "dev-0", "version": 1e400}', r.randbytes(200),
                            b'{"device": "%s", "refused": "x", "reason": "%s"}' % (device.encode(), b"y" * 5000),
                            b'{"device": "%s", "version": -1, "n_test": 2e62}' % device.encode()])
        return self.topics.telemetry(device), payload


def _messages(gen: Generator) -> Iterator[tuple[str, str, bytes]]:
    """(category, topic, payload), interleaved in a seeded order."""
    plan = (["update"] * N_UPDATES + ["model"] * N_MODELS + ["task"] * N_TASKS + ["presence"] * N_PRESENCE
            + ["telemetry"] * N_TELEMETRY)
    random.Random(SEED + 1).shuffle(plan)
    for what in plan:
        if what == "update":
            yield what, *gen.update_message()
        elif what in ("model", "task"):
            yield what, *gen.model_message(what == "task")
        elif what == "presence":
            yield what, *gen.presence_message()
        else:
            yield what, *gen.telemetry_message()


def _accepted(db_path: Path) -> tuple[str, list[tuple[int, str, str]]]:
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        integrity = db.execute("PRAGMA integrity_check").fetchone()[0]
        rows = db.execute("SELECT round, device_id, update_id FROM accepted ORDER BY round, device_id").fetchall()
    finally:
        db.close()
    return integrity, rows


def test_a_running_fleet_survives_thousands_of_adversarial_messages(
        broker: LocalBroker, fed: FederatedData, tmp_path: Path, make_link: LinkFactory,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.CRITICAL)  # thousands of refusals, each logged: keep the test's memory flat too
    topics = Topics(FLEET)
    insider = make_link("aggregator", "fuzzer")
    counting = CountingMetrics()
    sent = {"update": 0, "model": 0, "task": 0, "presence": 0, "telemetry": 0}
    refused_by_broker = 0
    with running_fleet(broker, fed, tmp_path, rounds=ROUNDS) as fleet:
        agg = fleet.aggregator
        agg.metrics = counting  # the service calls whatever metrics it holds; assignment is atomic
        fleet.wait_for("round 1 to open", lambda: agg.rounds_opened() >= 1)
        gc.collect()
        rss_before = rss_bytes()
        gen = Generator(topics, agg.model(), lambda: max(1, agg.rounds_opened()))
        consumed_updates = 0
        for i, (what, topic, payload) in enumerate(_messages(gen), 1):
            try:
                insider.publish(topic, payload, qos=1, retain=False, timeout=10.0)
                sent[what] += 1
                consumed_updates += what == "update"
            except MqttError:  # e.g. an oversized payload the broker refuses (PUBACK >= 0x80): also a result
                refused_by_broker += 1
            if i % BATCH == 0:
                _wait_consumed(fleet, counting, consumed_updates)
        _wait_consumed(fleet, counting, consumed_updates)
        fleet.wait_for("the last round", agg.done.is_set, timeout=90)
        gc.collect()
        rss_after = rss_bytes()
        rounds = agg.view.snapshot()["rounds"]
        alive = all(t.is_alive() for t in fleet.threads)
        errors = {a.cfg.device_id: a.refusals["error"] for a in fleet.agents}
        refusals = {a.cfg.device_id: dict(a.refusals) for a in fleet.agents}
    print(f"fuzz: sent {sent}, refused by the broker {refused_by_broker}, aggregator rejected {counting.rejected} "
          f"dup {counting.duplicates}, agents {refusals}, rss {rss_before >> 20} -> {rss_after >> 20} MiB")
    assert alive
    assert sum(sent.values()) >= 5000 - refused_by_broker and sum(sent.values()) >= 4500, sent
    assert errors == {"dev-0": 0, "dev-1": 0}, refusals  # nothing reached the agents' catch-all
    for device in HONEST:  # the agents saw, and refused, the poisoned models and tasks
        assert refusals[device].get("model", 0) + refusals[device].get("task", 0) >= 200, refusals
    assert [r["reported"] for r in rounds] == [2] * ROUNDS  # honest devices' updates still counted
    integrity, accepted = _accepted(tmp_path / "aggregator.db")
    assert integrity == "ok"
    assert [(r, d) for r, d, _ in accepted] == [(r, d) for r in range(1, ROUNDS + 1) for d in HONEST]
    assert not any(uid.startswith("fz") for _, _, uid in accepted)  # the accepted set is exactly the honest one
    assert counting.rejected + counting.duplicates >= sent["update"] // 2  # the fuzz really went through ingest
    assert rss_after - rss_before < RSS_GROWTH_LIMIT, (rss_before, rss_after)


def _wait_consumed(fleet: RunningFleet, counting: CountingMetrics, updates: int) -> None:
    """Until the aggregator consumed every update message sent so far and the agents emptied their inboxes."""
    fleet.wait_for(f"the aggregator to consume {updates} update message(s) (at {counting.received})",
                   lambda: counting.received >= updates, timeout=60)
    fleet.wait_for("the agents to consume their messages",
                   lambda: all(a.link.inbox.qsize() == 0 for a in fleet.agents), timeout=60)


