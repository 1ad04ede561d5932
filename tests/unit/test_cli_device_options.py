"""`edge-fl simulate` and `edge-fl demo` with the agents' device data options: `--augment-copies N` (what `[data]
augment_copies = N` does on an agent) and `--per-user-standardization` (`[data] per_user_standardization = true`).

simulate gives every client the very data the agent on that client's subject or user builds with those keys
(client i is device i, the rng_stream of the demo's agent i): checked, for every client, against the agent's own
data source, on the bundled recordings, on a windows dataset directory and on a features one. Without the flags
nothing changes. What cannot apply (copies of a features dataset, the few-shot curve) is refused in one line
before anything is loaded. Real data and the real backbone throughout.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_agent import sim
from edge_agent.agent.sources import dataset_source, user_dataset_source
from edge_agent.cli import build_parser, main
from edge_agent.config import MAX_AUGMENT_COPIES, AgentConfig, BackboneConfig, DataConfig
from edge_agent.data.federated import FederatedData, federate
from edge_agent.data.partition import CLIENT_SUBJECTS, PartitionConfig
from edge_agent.data.userdata import load_user_dataset
from edge_agent.demo import DemoConfig, device_options
from edge_agent.demo_data import DemoData, bundled_data
from edge_agent.learning.strategies import ClientData

FIELDS = ("x_train", "y_train", "x_test", "y_test")
OPTIONS = ["--augment-copies", "2", "--per-user-standardization"]
FEW_SHOT = ["--regime", "few-shot", "--shots", "2", "--seed", "3"]


def differences(got: ClientData, want: ClientData) -> list[str]:
    return [f for f in FIELDS if getattr(got, f).dtype != getattr(want, f).dtype
            or not np.array_equal(getattr(got, f), getattr(want, f))]


def simulate(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp: Path,
             *args: str) -> tuple[FederatedData, dict[str, Any], str]:
    """Run `edge-fl simulate` (one round) and return the data its fleet ran on, its results and its stdout."""
    seen: list[FederatedData] = []
    real = sim.run_simulation

    def watched(data: FederatedData, *a: Any, **kw: Any) -> dict[str, Any]:
        seen.append(data)
        return real(data, *a, **kw)

    monkeypatch.setattr(sim, "run_simulation", watched)
    out = tmp / "result.json"
    rc = main(["simulate", "-q", "--rounds", "1", "--cache-dir", str(tmp / "cache"), "--out", str(out), *args])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    (data,) = seen
    return data, json.loads(out.read_text()), captured.out


def user_agent(directory: Path, user: str, device: int, **data: Any) -> AgentConfig:
    return AgentConfig(device_id=user, state_dir=":memory:", rng_stream=device, backbone=BackboneConfig(),
                       data=DataConfig(source="user-dataset", dir=str(directory), user=user, **data))


# --- the flags ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["simulate", "demo"])
def test_the_flags_parse_and_default_to_the_keys_unset(command: str) -> None:
    parser = build_parser()
    given = parser.parse_args([command, "--augment-copies", str(MAX_AUGMENT_COPIES), "--per-user-standardization"])
    assert (given.augment_copies, given.per_user_standardization) == (MAX_AUGMENT_COPIES, True)
    unset = parser.parse_args([command])
    assert (unset.augment_copies, unset.per_user_standardization) == (None, False)
    assert parser.parse_args([command, "--augment-copies", "0"]).augment_copies == 0


@pytest.mark.parametrize("command", ["simulate", "demo"])
@pytest.mark.parametrize("value", ["33", "-1", "two", "2.5", ""])
def test_copies_beyond_what_an_agent_takes_are_a_usage_error(command: str, value: str,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([command, f"--augment-copies={value}"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    assert (f"argument --augment-copies: expected a whole number between 0 (no augmentation) and "
            f"{MAX_AUGMENT_COPIES}") in err and repr(value) in err, err


@pytest.mark.parametrize("command", ["simulate", "demo"])
def test_copies_of_a_features_dataset_are_refused_in_one_line_before_anything_runs(
        command: str, features_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    extra = ["--workdir", str(tmp_path / "work")] if command == "demo" else ["--out", str(tmp_path / "r.json")]
    assert main([command, "--data", str(features_dir), "--augment-copies", "4", *extra]) == 2
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [
        f"edge-fl {command}: --augment-copies 4: {features_dir} is a features dataset, with no raw sensor windows to "
        "augment (copies are made of windows before the backbone embeds them, as [data] augment_copies does on an "
        "agent); leave --augment-copies out, or import the windows themselves"]
    assert captured.out == "" and list(tmp_path.iterdir()) == []  # no work directory, no results


@pytest.mark.parametrize("flag", [["--augment-copies", "2"], ["--per-user-standardization"]])
def test_the_few_shot_curve_is_not_drawn_with_the_options(flag: list[str], tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "--plot", str(tmp_path / "c.png"), *flag]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "edge-fl simulate: --plot draws the few-shot curve without the device data options; drop --plot, or "
        "--augment-copies and --per-user-standardization"]


def test_the_demo_resolves_the_options_as_its_agents_do() -> None:
    bundled = bundled_data(2)
    assert device_options(DemoConfig(), bundled) is None
    assert device_options(DemoConfig(augment_copies=0), bundled) is None
    assert device_options(DemoConfig(augment_copies=3, per_user_standardization=True), bundled) == {
        "augment_copies": 3, "per_user_standardization": True}
    features = DemoData(bundled.agents, "users", report={"kind": "features"})
    assert device_options(DemoConfig(per_user_standardization=True), features) == {
        "augment_copies": 0, "per_user_standardization": True}
    with pytest.raises(ValueError) as refused:  # a DemoConfig built in code: refused before anything starts
        device_options(DemoConfig(data=Path("d"), augment_copies=3), features)
    assert str(refused.value) == ("augment_copies = 3: d is a features dataset, with no raw sensor windows to "
                                  "augment; leave augment_copies out")


# --- simulate's clients are the agents' -----------------------------------------------------------------------------


def test_simulate_gives_each_client_what_the_agent_on_its_subject_builds(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path, embedded: Any) -> None:
    data, doc, out = simulate(monkeypatch, capsys, tmp_path, *FEW_SHOT, *OPTIONS)
    assert data.client_ids == tuple(f"subject-{s:02d}" for s in CLIENT_SUBJECTS)
    for device, subject in enumerate(CLIENT_SUBJECTS):
        cfg = AgentConfig(device_id=f"subject-{subject:02d}", state_dir=":memory:", rng_stream=device,
                          data=DataConfig(subject=subject, regime="few-shot", seed=3, shots=2, augment_copies=2,
                                          per_user_standardization=True))
        agent = dataset_source(cfg).client_data()
        assert agent is not None and differences(data.clients[device], agent) == [], subject
        assert agent.y_train.size == 3 * 2 * 7  # the 14 labelled windows and 2 copies of each
    assert doc["data_options"] == {"augment_copies": 2, "per_user_standardization": True}
    assert [c["n_train"] for c in doc["clients"]] == [42] * len(CLIENT_SUBJECTS)
    assert out.splitlines()[0] == ("regime=few-shot rounds=1 seed=3 clients=6 shots=2 augment_copies=2 "
                                   "per_user_standardization=true")
    # Without the flags: the data, results and header of before.
    plain, plain_doc, plain_out = simulate(monkeypatch, capsys, tmp_path, *FEW_SHOT)
    want = federate(embedded, PartitionConfig("few-shot", seed=3, shots=2))
    assert all(differences(got, ref) == [] for got, ref in zip(plain.clients, want.clients, strict=True))
    assert "data_options" not in plain_doc
    assert plain_out.splitlines()[0] == "regime=few-shot rounds=1 seed=3 clients=6 shots=2"


def test_simulate_data_gives_each_client_what_the_agent_on_its_user_builds(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path,
        watch_dir: Path) -> None:
    data, doc, _ = simulate(monkeypatch, capsys, tmp_path, "--data", str(watch_dir), "--regime", "dirichlet",
                            "--seed", "4", *OPTIONS)
    users = load_user_dataset(watch_dir).card.roles.federate
    assert data.client_ids == users
    for device, user in enumerate(users):
        agent = user_dataset_source(user_agent(watch_dir, user, device, regime="dirichlet", seed=4, augment_copies=2,
                                               per_user_standardization=True)).client_data()
        assert agent is not None and differences(data.clients[device], agent) == [], user
    assert doc["data_options"] == {"augment_copies": 2, "per_user_standardization": True}


def test_simulate_standardizes_a_features_dataset_per_user_as_its_agents_do(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path,
        features_dir: Path) -> None:
    data, doc, _ = simulate(monkeypatch, capsys, tmp_path, "--data", str(features_dir), *FEW_SHOT,
                            "--per-user-standardization")
    for device, user in enumerate(data.client_ids):
        agent = user_dataset_source(user_agent(features_dir, user, device, regime="few-shot", seed=3, shots=2,
                                               per_user_standardization=True)).client_data()
        assert agent is not None and differences(data.clients[device], agent) == [], user
    assert doc["data_options"] == {"augment_copies": 0, "per_user_standardization": True}
