"""`edge-fl demo --data DIR`: the fleet of the demo on a per-user dataset directory, through a real Mosquitto.

A small dataset written from the bundled recordings' import (one pretrain user, two federated, one held out) keeps
the run short. Every device's accuracy and the new users' accuracy are those `edge-fl simulate --data` computes
for the same options, round by round, a third agent on the first user's data included.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from edge_agent.data.federated import FederatedData
from edge_agent.data.from_userdata import federate_users, prepare_users
from edge_agent.data.importers import import_watch
from edge_agent.data.partition import PartitionConfig
from edge_agent.data.userdata import Roles, load_user_dataset, write_user_dataset
from edge_agent.learning.training import TrainingConfig
from edge_agent.sim import run_simulation

from ..conftest import ROOT
from .test_demo import DemoProcess, _logs_dir, _processes_mentioning

pytestmark = pytest.mark.fleet
ROUNDS = 3
ROLES = Roles(pretrain=("subject-01",), federate=("subject-04", "subject-05"), holdout=("subject-10",))


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled recordings' import cut down to four users: subject-01 pretrains, 4 and 5 federate, 10 is new."""
    whole = tmp_path_factory.mktemp("demodata") / "watch"
    ds = import_watch(whole)
    out = tmp_path_factory.mktemp("demodata") / "small"
    write_user_dataset(out, replace(ds.card, name="watch-four-users", roles=ROLES), [ds.users[u] for u in ROLES.all()])
    return out


def with_copy(data: FederatedData, device: str, of: str) -> FederatedData:
    """`data` with one more client, `device`, holding `of`'s data: the demo's agent beyond the users."""
    i = data.client_ids.index(of)
    return FederatedData((*data.client_ids, device), (*data.clients, data.clients[i]), data.new_user_x,
                         data.new_user_y, data.num_classes, data.embedding_dim, data.class_names, data.partition)


def test_demo_on_a_dataset_directory_matches_simulate_and_scores_the_new_users(
        tmp_path: Path, small_dir: Path, backbone: Any) -> None:
    out = tmp_path / "demo.json"
    args = ["--data", str(small_dir), "--agents", "3", "--strategy", "ditto", "--rounds", str(ROUNDS), "--seed", "1",
            "--local-epochs", "2", "--out", str(out)]
    code, stdout, stderr = DemoProcess(args, tmp_path).finish(timeout=170)
    assert code == 0, stdout + stderr
    assert f"data: watch-four-users in {small_dir} (windows, 7 classes, 2 federated users, 1 held out" in stdout
    assert "started the aggregator and 3 agents on the data of 2 users (ditto" in stdout, stdout
    assert "; new users " in stdout.splitlines()[-1], stdout
    doc = json.loads(out.read_text())

    ds = load_user_dataset(small_dir)
    data = federate_users(prepare_users(ds, embed=backbone.embed,
                                        sidecar_standardizer=backbone.embedding_standardizer()),
                          PartitionConfig("natural", seed=1))
    sim = run_simulation(with_copy(data, "subject-04-2", "subject-04"),
                         TrainingConfig(strategy="ditto", rounds=ROUNDS, seed=1, local_epochs=2))
    assert [r["round"] for r in doc["rounds"]] == list(range(1, ROUNDS + 1))
    for d_round, s_round in zip(doc["rounds"], sim["rounds"], strict=True):
        assert d_round["clients_reporting"] == 3 and d_round["rejected"] == 0, d_round
        assert set(d_round["client_acc"]) == set(s_round["client_acc"]) == {"subject-04", "subject-05",
                                                                             "subject-04-2"}
        for device, acc in s_round["client_acc"].items():
            # Only the order in which the real aggregator sums updates can move a last float bit.
            assert abs(d_round["client_acc"][device] - acc) <= 0.01, (d_round["round"], device)
        assert s_round["new_user_acc"] is not None
        assert abs(d_round["new_user_acc"] - s_round["new_user_acc"]) <= 0.01, d_round["round"]
    assert doc["summary"]["new_user_acc"] == doc["rounds"][-1]["new_user_acc"]
    # The results name the dataset as simulate's do, and which device ran on whose data.
    section = doc["data"]
    assert section["name"] == "watch-four-users" and section["path"] == str(small_dir)
    assert section["users"] == {"pretrain": ["subject-01"], "federate": ["subject-04", "subject-05"],
                                "holdout": ["subject-10"]}
    assert section["devices"] == {"subject-04": "subject-04", "subject-05": "subject-05",
                                  "subject-04-2": "subject-04"}
    assert section["new_user_windows"] == len(ds.users["subject-10"]) and section["split"]["rule"] == "segment"
    assert doc["config"]["data"] == str(small_dir) and doc["config"]["agents"] == 3
    assert doc["backbone"]["sha256"] == backbone.sha256
    assert _processes_mentioning(str(_logs_dir(stdout))) == []


def test_a_dataset_the_backbone_cannot_embed_is_refused_before_anything_starts(tmp_path: Path,
                                                                               small_dir: Path) -> None:
    hapt_model = ROOT / "models" / "backbone_hapt_int8.tflite"  # 128 x 6 windows; the dataset's are 100 x 6
    p = subprocess.run([sys.executable, "-m", "edge_agent.cli", "demo", "--data", str(small_dir), "--backbone",
                        str(hapt_model), "--workdir", str(tmp_path / "work")], capture_output=True, text=True,
                       cwd=ROOT, timeout=60)
    errors = [line for line in p.stderr.splitlines() if line.startswith("edge-fl: error:")]
    assert p.returncode == 1 and len(errors) == 1 and "Traceback" not in p.stderr, p.stderr
    assert "(128, 6)" in errors[0] and "(100, 6)" in errors[0] and str(small_dir) in errors[0], errors
    assert p.stdout == "" and not (tmp_path / "work").exists()  # no broker, no process, no work directory


@pytest.mark.parametrize("option", [["--backbone", "m.tflite"], ["--split", "session"]])
def test_backbone_and_split_without_data_are_a_usage_error(option: list[str],
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    from edge_agent.cli import main

    assert main(["demo", *option]) == 2
    err = capsys.readouterr().err
    assert "--data" in err and option[0] in err, err
