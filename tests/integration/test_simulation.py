"""Learning on the real per-user recordings through the real int8 backbone."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest

from edge_agent.codec.envelope import decode_envelope
from edge_agent.data.partition import PartitionConfig
from edge_agent.learning.head import FitConfig, HeadConfig, PersonalizationHead
from edge_agent.learning.strategies import STRATEGIES, make_strategy
from edge_agent.learning.training import TrainingConfig
from edge_agent.data.federated import federate
from edge_agent.sim import run_simulation

from ..conftest import ROOT


@pytest.fixture(scope="module")
def natural(embedded):  # type: ignore[no-untyped-def]
    return federate(embedded, PartitionConfig("natural", seed=0))


def test_standardizer_comes_from_backbone_subjects_and_floors_the_spread(embedded) -> None:  # type: ignore[no-untyped-def]
    std = embedded.standardizer.std
    assert np.all(std >= 0.1 * np.median(std) - 1e-6)
    from edge_agent.data.partition import BACKBONE_SUBJECTS

    ref = embedded.train_emb[np.isin(embedded.train.subject, BACKBONE_SUBJECTS)]
    np.testing.assert_allclose(embedded.standardizer.mean, ref.mean(axis=0), rtol=1e-5, atol=1e-5)


def test_a_head_learns_one_users_habits_and_its_int8_twin_agrees(natural) -> None:  # type: ignore[no-untyped-def]
    agree, accs = [], []
    for i, cd in enumerate(natural.clients):
        head = PersonalizationHead.initial(HeadConfig(natural.embedding_dim, 7, 32), np.random.default_rng(i))
        head = head.fit(cd.x_train, cd.y_train, FitConfig(epochs=20), np.random.default_rng(i))
        float_pred, int8_pred = head.predict(cd.x_test), head.quantized().predict(cd.x_test)
        agree.append(np.mean(float_pred == int8_pred))
        accs.append(np.mean(int8_pred == cd.y_test))
    assert min(agree) >= 0.99, f"int8/float agreement per client: {agree}"
    assert np.mean(accs) > 0.75, f"per-client accuracy: {accs}"  # chance is 1/7


def test_personal_tensors_never_leave_the_device(natural) -> None:  # type: ignore[no-untyped-def]
    head = HeadConfig(natural.embedding_dim, 7, 32)
    for name in STRATEGIES:
        strategy = make_strategy(name, head)
        seen: list[set[str]] = []
        run_simulation(natural, TrainingConfig(strategy=name, rounds=2),
                       watch_uplink=lambda cid, rnd, payload: seen.append(set(decode_envelope(payload).tensors)))
        if not strategy.shared_keys:
            assert seen == [], name
            continue
        assert len(seen) == 2 * len(natural.clients), name
        for names in seen:
            assert names <= strategy.shared_keys, (name, names)
            assert not names & strategy.personal_keys, (name, names)


def test_results_document_and_new_user_far_above_chance(natural) -> None:  # type: ignore[no-untyped-def]
    res = run_simulation(natural, TrainingConfig(strategy="ditto", rounds=10, seed=1))
    assert len(res["rounds"]) == 10
    assert set(res["rounds"][0]["client_acc"]) == set(natural.client_ids)
    s = res["summary"]
    assert {"mean_acc", "p10_acc", "worst_acc", "new_user_acc", "uplink_bytes_per_client_round"} <= set(s)
    assert s["worst_acc"] <= s["p10_acc"] <= s["mean_acc"]
    assert s["new_user_acc"] > 0.4  # chance is 0.14
    assert s["uplink_bytes_per_client_round"] > 0
    json.dumps(res, allow_nan=False)


def test_same_seed_same_result_other_seed_other_result(natural) -> None:  # type: ignore[no-untyped-def]
    a = run_simulation(natural, TrainingConfig(strategy="fedavg", rounds=3, seed=5))["summary"]
    b = run_simulation(natural, TrainingConfig(strategy="fedavg", rounds=3, seed=5))["summary"]
    c = run_simulation(natural, TrainingConfig(strategy="fedavg", rounds=3, seed=6))["summary"]
    assert a == b and a != c


def test_int8_updates_are_four_times_smaller_than_float(natural) -> None:  # type: ignore[no-untyped-def]
    i8 = run_simulation(natural, TrainingConfig(strategy="fedavg", rounds=2))["summary"]
    f32 = run_simulation(natural, TrainingConfig(strategy="fedavg", rounds=2, int8_updates=False))["summary"]
    assert i8["uplink_bytes_per_client_round"] < 0.4 * f32["uplink_bytes_per_client_round"]


def _cli(*args: str, cwd=None):  # type: ignore[no-untyped-def]
    return subprocess.run([sys.executable, "-m", "edge_agent.cli", *args], capture_output=True, text=True,
                          cwd=cwd or ROOT, timeout=300)


def test_cli_simulate_writes_results_and_prints_a_table(tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "r.json"
    p = _cli("simulate", "--strategy", "fedper", "--regime", "label-skew", "--rounds", "3", "--out", str(out),
             "--cache-dir", str(tmp_path / "cache"))
    assert p.returncode == 0, p.stderr
    assert "fedper" in p.stdout and "mean" in p.stdout
    doc = json.loads(out.read_text())
    assert doc["config"]["strategy"] == "fedper" and doc["partition"]["regime"] == "label-skew"
    assert len(doc["rounds"]) == 3 and doc["summary"]["new_user_acc"] is None  # fedper has no global classifier


def test_cli_all_strategies_and_plot(tmp_path) -> None:  # type: ignore[no-untyped-def]
    png = tmp_path / "curve.png"
    p = _cli("simulate", "--strategy", "all", "--rounds", "2", "--plot", str(png), "--cache-dir", str(tmp_path))
    assert p.returncode == 0, p.stderr
    for name in STRATEGIES:
        assert f"\n{name} " in p.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_cli_errors_are_one_clear_line_and_exit_1(tmp_path) -> None:  # type: ignore[no-untyped-def]
    p = _cli("simulate", "--model", str(tmp_path / "missing.tflite"))
    assert p.returncode == 1
    assert p.stderr.startswith("edge-fl: error: backbone model not found") and "Traceback" not in p.stderr
    p = _cli("simulate", "--regime", "iid")
    assert p.returncode == 2 and "invalid choice" in p.stderr


def test_sidecar_ships_the_same_embedding_statistics_the_simulation_fits(embedded, backbone) -> None:  # type: ignore[no-untyped-def]
    shipped = backbone.embedding_standardizer()
    assert shipped is not None
    np.testing.assert_allclose(shipped.mean, embedded.standardizer.mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(shipped.std, embedded.standardizer.std, rtol=1e-6, atol=1e-6)


def _with(data, index: int, **change):  # type: ignore[no-untyped-def]
    from dataclasses import replace

    clients = list(data.clients)
    clients[index] = replace(clients[index], **change)
    return replace(data, clients=tuple(clients))


def test_bad_client_data_is_a_clear_error_before_any_training(natural) -> None:  # type: ignore[no-untyped-def]
    from edge_agent.learning.strategies import ClientDataError

    c = natural.clients[2]
    cid = natural.client_ids[2]
    nan_x = c.x_train.copy()
    nan_x[17, 3] = np.nan  # one feature of one window: before the check, the whole fleet fell to chance
    cases = {
        "NaN or infinite features (first at index 17)": dict(x_train=nan_x),
        "outside 0..6 (first at index 0: -1)": dict(y_train=np.where(np.arange(c.y_train.size) == 0, -1, c.y_train)),
        "outside 0..6 (first at index 5: 7)": dict(y_test=np.where(np.arange(c.y_test.size) == 5, 7, c.y_test)),
        "no training examples": dict(x_train=c.x_train[:0], y_train=c.y_train[:0]),
        "labels are float64": dict(y_train=c.y_train.astype(np.float64)),
    }
    trained: list[int] = []
    for expected, change in cases.items():
        with pytest.raises(ClientDataError, match=re.escape(expected)) as info:
            run_simulation(_with(natural, 2, **change), TrainingConfig(rounds=1),
                           progress=lambda r, n, rec: trained.append(r))
        assert repr(cid) in str(info.value)
    assert trained == []  # refused before round 1, not after a collapse
