"""The aggregator's PostgreSQL store, on a private PostgreSQL server: the same contract as the SQLite store,
plus what several workers need (exactly-once across workers, a round that stops taking updates at its close,
one coordinator, one process per worker name)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

import numpy as np
import pytest

from edge_agent.aggregator import rounds
from edge_agent.aggregator.rounds import Phase, RoundConfig
from edge_agent.aggregator.store import AlreadyCounted, RoundNotCollecting, StoreError, open_store

pytest.importorskip("psycopg")
pg = pytest.importorskip("edge_agent.aggregator.pgstore")

FLEET = "pgtest"


@dataclass(frozen=True)
class Update:
    device_id: str
    round: int = 1
    model_version: int = 0
    strategy: str = "fedavg"
    update_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    num_examples: int = 5
    tensors: dict[str, np.ndarray] = field(default_factory=dict)


def _snapshot(total: float) -> dict[str, np.ndarray]:
    return {"sum:w": np.full(3, total), "__total_weight__": np.array(total), "__count__": np.array(1),
            "__norms__": np.array([total]), "__counts__": np.array([int(total)], np.int64)}


def _open(store, devices: tuple[str, ...] = ("a", "b", "c")):  # type: ignore[no-untyped-def]
    state = rounds.open_round(1, 0, devices, 100.0, RoundConfig())
    store.open_round(state)
    return state


def test_a_postgresql_url_opens_the_shared_store_with_the_sqlite_contract(pg_dsn: str) -> None:
    store = open_store(pg_dsn, FLEET, "w1")
    try:
        assert store.shared and isinstance(store, pg.PostgresStore)
        store.check_fingerprint({"strategy": "fedavg"})
        store.check_fingerprint({"strategy": "fedavg"})  # the same: accepted again
        with pytest.raises(StoreError, match="another configuration"):
            store.check_fingerprint({"strategy": "ditto"})
        store.save_global(0, {"w": np.ones(3, np.float32)})
        store.save_global(0, {"w": np.full(3, 2, np.float32)})  # an upsert, as SQLite's
        version, params = store.latest_global() or (None, {})
        assert version == 0 and params["w"].tolist() == [2, 2, 2]
        state = _open(store)
        u = Update("a")
        store.accept_many(state, [u], _snapshot(5.0), 101.0)
        resumed = store.current_round()
        assert resumed is not None and resumed.phase is Phase.COLLECTING
        assert dict(resumed.accepted) == {"a": u.update_id}
        saved = store.accumulator(1)
        assert saved is not None and saved["sum:w"].tolist() == [5, 5, 5]
        closed = rounds.accept(state, u)
        store.close_round(rounds.close(closed, RoundConfig())[0], [], True, 1, {"w": np.zeros(3, np.float32)}, 102.0,
                          {"bytes_in": 10, "bytes_out": 20, "rejected": 0, "duplicates": 0}, {"dp_rounds": "1"})
        store.record_reliability({"a": True, "b": False}, 103.0)
        store.record_reliability({"a": True, "b": False}, 104.0)
        store.record_telemetry(1, "a", 0.5, 0.4, 10, 105.0)
        store.record_telemetry(1, "a", 0.9, 0.8, 10, 106.0)  # the latest report wins
        history = store.history()
        assert history[-1]["round"] == 1 and history[-1]["succeeded"] and history[-1]["personal_acc"] == 0.9
        assert store.reliability()["b"] < store.reliability()["a"] == 1.0
        assert store.read_meta("dp_rounds") == "1" and store.accumulator(1) is None
    finally:
        store.close()


def test_workers_count_a_device_once_and_the_close_merges_their_parts(pg_dsn: str) -> None:
    w1, w2 = pg.PostgresStore(pg_dsn, FLEET, "w1"), pg.PostgresStore(pg_dsn, FLEET, "w2")
    try:
        state = _open(w1)
        first = Update("a")
        w1.accept_many(state, [first], _snapshot(1.0), 101.0)
        w2.accept_many(state, [Update("b")], _snapshot(2.0), 101.0)
        # w2 does not know w1 counted `a`: its whole batch (c too) is refused, nothing of it stored
        with pytest.raises(AlreadyCounted):
            w2.accept_many(state, [Update("c"), first], _snapshot(9.0), 102.0)
        assert w2.round_progress(1) == (2, 2)
        assert w2.counted_among(1, ["a", "c"]) == {"a": first.update_id}
        assert w2.accumulator(1)["sum:w"].tolist() == [2, 2, 2]  # type: ignore[index]
        with w1.closing(1) as (accepted, merged):
            assert set(accepted) == {"a", "b"}
            assert merged is not None and merged["sum:w"].tolist() == [3, 3, 3]
            assert sorted(merged["__norms__"].tolist()) == [1.0, 2.0]
            w1.close_round(rounds.close(state, RoundConfig())[0], [], True, 1, {"w": np.zeros(3, np.float32)},
                           103.0)
        with pytest.raises(RoundNotCollecting):  # a batch after the close is refused: the result is final
            w2.accept_many(state, [Update("c")], _snapshot(4.0), 104.0)
        with pytest.raises(RoundNotCollecting), w1.closing(1):
            pass
        assert w1.round_progress(1) == (2, 2) and w1.round_head() == (1, "closed")
    finally:
        w1.close()
        w2.close()


def test_one_coordinator_and_a_successor_when_it_goes(pg_dsn: str) -> None:
    w1, w2 = pg.PostgresStore(pg_dsn, FLEET, "w1"), pg.PostgresStore(pg_dsn, FLEET, "w2")
    try:
        assert w1.try_lead() and not w2.try_lead()
        assert w1.try_lead()  # held
        w1.close()  # its connection ends (a killed process's does too): PostgreSQL frees the lock
        assert w2.try_lead()
    finally:
        w2.close()


def test_two_processes_under_one_worker_name_are_refused(pg_dsn: str) -> None:
    w1 = pg.PostgresStore(pg_dsn, FLEET, "w1")
    try:
        with pytest.raises(StoreError, match="another aggregator worker named 'w1'"):
            pg.PostgresStore(pg_dsn, FLEET, "w1")
    finally:
        w1.close()


def test_an_unreachable_server_names_the_state_and_what_to_check() -> None:
    with pytest.raises(StoreError, match=r"cannot connect to the PostgreSQL state at 127\.0\.0\.1:9/x.*`state`") as err:
        pg.PostgresStore("postgresql://nobody:secret@127.0.0.1:9/x", FLEET, "w1")
    assert "secret" not in str(err.value)
