"""The aggregator's round state machine and its durable store, without a broker."""

from dataclasses import dataclass, field

import numpy as np
import pytest

from edge_agent.aggregator.rounds import (
    Outcome, Phase, RoundConfig, accept, close, judge, open_round, select_devices, should_close,
)
from edge_agent.aggregator.store import AggregatorStore, StoreError
from edge_agent.learning.aggregate import WeightedMean

SHAPES = {"adapter.w": (4, 2), "adapter.b": (2,)}


@dataclass(frozen=True)
class Upd:
    device_id: str
    update_id: str
    round: int = 1
    model_version: int = 0
    strategy: str = "fedper"
    num_examples: int = 10
    tensors: dict = field(default_factory=lambda: {k: np.ones(s, np.float32) for k, s in SHAPES.items()})


CFG = RoundConfig(min_clients=2, deadline_s=30)


def _round():  # type: ignore[no-untyped-def]
    return open_round(1, 0, ["a", "b", "c"], now=100.0, config=CFG)


def test_accept_then_duplicate_then_second_update_rejected() -> None:
    s = _round()
    assert judge(s, Upd("a", "u1"), strategy="fedper", expected=SHAPES).outcome is Outcome.ACCEPTED
    s = accept(s, Upd("a", "u1"))
    assert judge(s, Upd("a", "u1"), strategy="fedper", expected=SHAPES).outcome is Outcome.DUPLICATE
    v = judge(s, Upd("a", "u2"), strategy="fedper", expected=SHAPES)
    assert v.outcome is Outcome.REJECTED and "already delivered update u1" in v.reason


@pytest.mark.parametrize("upd, reason", [
    (Upd("a", "u", round=0), "late or early, round 0 is closed"),
    (Upd("a", "u", round=2), "round 2 is not opened yet"),
    (Upd("a", "u", model_version=7), "trained from model version 7, this round trains from version 0"),
    (Upd("z", "u"), "z for round 1: device was not selected"),
    (Upd("a", "u", strategy="fedavg"), "strategy 'fedavg', the fleet runs 'fedper'"),
    (Upd("a", "u", num_examples=0), "num_examples must be positive"),
    (Upd("a", "u", tensors={"adapter.w": np.ones((4, 2))}), "expected ['adapter.b', 'adapter.w']"),
    (Upd("a", "u", tensors={"adapter.w": np.ones((4, 3)), "adapter.b": np.ones(2)}), "adapter.w has shape (4, 3)"),
])
def test_rejections_say_why(upd: Upd, reason: str) -> None:
    v = judge(_round(), upd, strategy="fedper", expected=SHAPES)
    assert v.outcome is Outcome.REJECTED and reason in v.reason, v.reason


def test_update_after_close_is_late() -> None:
    s, _, _ = close(_round(), CFG)
    v = judge(s, Upd("a", "u"), strategy="fedper", expected=SHAPES)
    assert v.outcome is Outcome.REJECTED and "closed" in v.reason


def test_closes_when_all_reported_or_at_deadline_and_lists_stragglers() -> None:
    s = _round()
    assert not should_close(s, 110.0, CFG) and should_close(s, 130.0, CFG)
    for d in "abc":
        s = accept(s, Upd(d, "u"))
    assert should_close(s, 101.0, CFG)
    s = accept(accept(_round(), Upd("a", "u")), Upd("b", "u"))
    closed, failures, ok = close(s, CFG)
    assert closed.phase is Phase.CLOSED and ok
    assert [f.client_id for f in failures] == ["c"]
    _, _, ok = close(accept(_round(), Upd("a", "u")), CFG)
    assert not ok  # one update < min_clients=2


def test_selection_is_seeded_and_sorted() -> None:
    online = [f"d{i}" for i in range(10)]
    a = select_devices(online, 0.3, np.random.default_rng(1))
    assert a == select_devices(online[::-1], 0.3, np.random.default_rng(1))
    assert len(a) == 3 and list(a) == sorted(a)
    assert select_devices(online, 1.0, np.random.default_rng(0)) == tuple(sorted(online))
    assert select_devices([], 1.0, np.random.default_rng(0)) == ()


def test_store_resumes_an_open_round_with_its_accumulator(tmp_path) -> None:  # type: ignore[no-untyped-def]
    store = AggregatorStore(tmp_path / "agg.db")
    store.check_fingerprint({"strategy": "fedper"})
    store.save_global(0, {"adapter.w": np.zeros((4, 2), np.float32)})
    s = _round()
    store.open_round(s)
    acc = WeightedMean()
    u = Upd("a", "u1")
    acc.add(u.tensors, u.num_examples)
    store.accept(s, u, acc.to_arrays(), now=101.0)
    store.close()
    # "restart"
    store = AggregatorStore(tmp_path / "agg.db")
    store.check_fingerprint({"strategy": "fedper"})
    resumed = store.current_round()
    assert resumed is not None and resumed.accepted == {"a": "u1"} and resumed.phase is Phase.COLLECTING
    restored = WeightedMean.from_arrays(store.accumulator(1))
    assert restored.count == 1 and restored.total_weight == 10
    np.testing.assert_array_equal(restored.result()["adapter.w"], np.ones((4, 2)))
    import sqlite3

    with pytest.raises(sqlite3.IntegrityError):  # the same device cannot be counted twice in one round
        store.accept(resumed, u, acc.to_arrays(), now=102.0)
    assert store.accepted_count(1) == 1
    version, params = store.latest_global()
    assert version == 0 and params["adapter.w"].shape == (4, 2)


def test_store_refuses_another_configuration(tmp_path) -> None:  # type: ignore[no-untyped-def]
    AggregatorStore(tmp_path / "agg.db").check_fingerprint({"strategy": "fedper"})
    with pytest.raises(StoreError, match="another configuration"):
        AggregatorStore(tmp_path / "agg.db").check_fingerprint({"strategy": "ditto"})


def test_close_round_stores_the_new_global_atomically(tmp_path) -> None:  # type: ignore[no-untyped-def]
    store = AggregatorStore(tmp_path / "agg.db")
    s = accept(accept(_round(), Upd("a", "u")), Upd("b", "u"))
    store.open_round(s)
    closed, failures, ok = close(s, CFG)
    store.close_round(closed, failures, ok, 1, {"adapter.w": np.full((4, 2), 3.0, np.float32)}, now=120.0)
    assert store.latest_global()[0] == 1
    assert store.current_round().phase is Phase.CLOSED
    assert store.round_history()[0]["failed"] == 1 and store.accumulator(1) is None


def test_a_round_of_a_strategy_that_shares_nothing_closes_at_once_and_succeeds() -> None:
    from dataclasses import replace

    local = replace(CFG, expects_updates=False)
    s = _round()
    assert should_close(s, 100.0, local) and not should_close(s, 100.0, CFG)
    closed, failures, ok = close(s, local)
    assert ok and failures == [] and closed.phase.value == "closed"


def test_accumulator_snapshots_round_trip_exactly_and_old_npz_snapshots_still_load() -> None:
    import io

    from edge_agent.aggregator.store import _arrays_to_bytes, _bytes_to_arrays

    arrays = {"sum:adapter.w": np.random.default_rng(0).standard_normal((64, 32)).T,  # not C-contiguous
              "__total_weight__": np.array(1234.5), "__count__": np.array(6), "sum:empty": np.zeros((0, 7))}
    back = _bytes_to_arrays(_arrays_to_bytes(arrays))
    assert set(back) == set(arrays)
    for k, v in arrays.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape and np.array_equal(back[k], v), k
    old = io.BytesIO()
    np.savez(old, **arrays)
    assert all(np.array_equal(_bytes_to_arrays(old.getvalue())[k], v) for k, v in arrays.items())
