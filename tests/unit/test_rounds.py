"""The aggregator's round state machine and its durable store, without a broker."""

from dataclasses import dataclass, field

import numpy as np
import pytest

from edge_agent.aggregator.rounds import (
    Outcome,
    Phase,
    RoundConfig,
    accept,
    close,
    judge,
    open_round,
    select_devices,
    should_close,
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

    from edge_agent.aggregator.store import arrays_to_bytes, bytes_to_arrays

    arrays = {"sum:adapter.w": np.random.default_rng(0).standard_normal((64, 32)).T,  # not C-contiguous
              "__total_weight__": np.array(1234.5), "__count__": np.array(6), "sum:empty": np.zeros((0, 7))}
    back = bytes_to_arrays(arrays_to_bytes(arrays))
    assert set(back) == set(arrays)
    for k, v in arrays.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape and np.array_equal(back[k], v), k
    old = io.BytesIO()
    np.savez(old, **arrays)
    assert all(np.array_equal(bytes_to_arrays(old.getvalue())[k], v) for k, v in arrays.items())


# --- selection that scales, quorum, reliability ------------------------------------------------------

def _task(rule):  # type: ignore[no-untyped-def]
    from edge_agent.codec.envelope import decode_envelope
    from edge_agent.fleet import GlobalModel, RoundTask, decode_task, encode_task
    from edge_agent.learning.head import HeadConfig
    from edge_agent.learning.training import TrainingConfig

    head = HeadConfig(4, 2, 0)
    model = GlobalModel(0, TrainingConfig(strategy="fedavg"), head, {"head.w": np.zeros((4, 2), np.float32),
                                                                      "head.b": np.zeros(2, np.float32)})
    payload = encode_task(RoundTask(1, 100.0, None, model, rule=rule, quorum=3))
    return payload, decode_task(decode_envelope(payload))


@pytest.mark.parametrize("fraction", [0.01, 0.3])
def test_a_sampled_round_of_100000_devices_is_announced_in_constant_size(fraction: float) -> None:
    from edge_agent.aggregator.rounds import draw

    ids = [f"device-{i:06d}" for i in range(100_000)]
    selected, rule = draw(ids, fraction, np.random.default_rng(7))
    assert rule is not None and len(selected) == round(fraction * len(ids))  # exactly the expected count
    payload, task = _task(rule)
    assert task.rule == rule and task.selected is None and task.quorum == 3
    small, _ = _task(draw(ids[:10], 0.5, np.random.default_rng(7))[1])
    assert len(payload) <= len(small) + 20  # the task does not grow with the fleet (the threshold's digits vary)
    # Every device decides from the task alone, and agrees with the aggregator.
    chosen = set(selected)
    assert all(task.selects(d) == (d in chosen) for d in ids)


def test_selection_is_seeded_and_spreads_evenly() -> None:
    from edge_agent.aggregator.rounds import draw

    ids = [f"d{i}" for i in range(2000)]
    a = draw(ids, 0.25, np.random.default_rng(1))
    assert a == draw(ids[::-1], 0.25, np.random.default_rng(1))
    b = draw(ids, 0.25, np.random.default_rng(2))
    overlap = len(set(a[0]) & set(b[0])) / len(a[0])
    assert 0.15 < overlap < 0.35  # independent draws: about a quarter in common
    assert draw(ids, 1.0, np.random.default_rng(1)) == (tuple(sorted(ids)), None)


def test_a_round_closes_at_its_quorum_and_counts_only_selected_devices_toward_it() -> None:
    from edge_agent.aggregator.rounds import quorum
    from edge_agent.fleet import SelectionRule

    cfg = RoundConfig(min_clients=1, deadline_s=30, min_reported_fraction=0.5)
    rule = SelectionRule(b"s" * 16, 2**64 - 1)  # admits anyone
    s = open_round(1, 0, [f"d{i}" for i in range(6)], 0.0, cfg, rule)
    assert quorum(s, cfg) == 3
    s = accept(s, Upd("late-joiner", "u0"))  # admitted by the rule, not expected: counted, not toward the quorum
    assert judge(s, Upd("other", "u9"), strategy="fedper", expected=SHAPES).outcome is Outcome.ACCEPTED
    for i in range(2):
        s = accept(s, Upd(f"d{i}", f"u{i + 1}"))
    assert not should_close(s, 1.0, cfg)
    s = accept(s, Upd("d2", "u3"))
    assert should_close(s, 1.0, cfg)
    _, failures, ok = close(s, cfg)
    assert ok and len(failures) == 3
    assert quorum(s, RoundConfig(min_clients=4, min_reported_fraction=0.1)) == 4  # never below min_clients


def test_devices_that_keep_missing_rounds_are_left_out_but_for_probation(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from edge_agent.aggregator.rounds import MIN_RELIABILITY, draw, updated_reliability

    once = updated_reliability(1.0, False)
    assert updated_reliability(once, False) < MIN_RELIABILITY < once
    store = AggregatorStore(tmp_path / "agg.db")
    ids = [f"d{i}" for i in range(200)]
    for _ in range(2):
        store.record_reliability({d: not d.endswith("7") for d in ids}, 1.0)  # every tenth id is a ghost
    scores = store.reliability()
    selected, _ = draw(ids, 1.0, np.random.default_rng(3), scores)
    ghosts_in = [d for d in selected if d.endswith("7")]
    assert len(selected) - len(ghosts_in) == 180 and len(ghosts_in) <= 8  # ~10 % probation of 20
    assert draw(["g"], 1.0, np.random.default_rng(3), {"g": 0.0})[0] == ("g",)  # never an empty round


def test_accept_is_o1_and_leaves_the_old_state_unchanged() -> None:
    s0 = _round()
    s1 = accept(s0, Upd("a", "u1"))
    s2 = accept(s1, Upd("z", "u9"))  # not selected (a rule admitted it): counted, but not toward the quorum
    assert dict(s0.accepted) == {} and dict(s1.accepted) == {"a": "u1"} and s2.accepted == {"a": "u1", "z": "u9"}
    assert "z" not in s1.accepted and s1.accepted.get("z") is None and list(s2.accepted) == ["a", "z"]
    assert (s0.reported, s1.reported, s2.reported) == (0, 1, 1)
    assert s2.counted._entries is s0.counted._entries  # one shared append-only store: no copy per accept
    branch = accept(s1, Upd("b", "u2"))  # from an older version: copies, and neither version sees the other's
    assert branch.accepted == {"a": "u1", "b": "u2"} and s2.accepted == {"a": "u1", "z": "u9"}
    assert branch.reported == 2 and judge(branch, Upd("b", "u2"), strategy="fedper",
                                          expected=SHAPES).outcome is Outcome.DUPLICATE
    with pytest.raises(ValueError, match="already has update u1"):
        accept(s1, Upd("a", "u3"))
    closed, failures, _ = close(branch, CFG)
    assert closed.accepted is branch.accepted and [f.client_id for f in failures] == ["c"]


def test_membership_needs_no_scan_of_the_selected_devices() -> None:
    many = [f"d{i:05d}" for i in range(30_000)]
    s = open_round(1, 0, many, now=100.0, config=CFG)
    assert s.is_selected("d29999") and not s.is_selected("x")
    assert judge(s, Upd("d29999", "u"), strategy="fedper", expected=SHAPES).outcome is Outcome.ACCEPTED
    for d in many[:1000]:
        s = accept(s, Upd(d, "u"))
    assert s.reported == 1000 and len(s.accepted) == 1000 and s.stragglers[0] == "d01000"
