"""One federated user of a per-user dataset directory, alone: what an agent with `[data] source = "user-dataset"`
(a device of `edge-fl demo --data DIR`) trains on. It must be exactly that user's client in `edge-fl simulate
--data DIR`, built from the pretrain users' windows and its own, and it refuses what it cannot use, saying what
to do. Real data throughout: the bundled recordings imported into the format, the real backbone."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_agent.agent.sources import open_source, user_dataset_source
from edge_agent.config import AgentConfig, BackboneConfig, DataConfig
from edge_agent.data.federated import FederatedData
from edge_agent.data.from_userdata import (
    BackboneMismatchError,
    choose_split,
    client_users,
    federate_users,
    only_users,
    prepare_users,
    user_client_data,
    user_number,
)
from edge_agent.data.partition import PartitionConfig, partition_client
from edge_agent.data.userdata import UserDataError, load_user_dataset, write_user_dataset
from edge_agent.demo_data import RESERVED_NAMES, user_device_ids
from edge_agent.learning.strategies import ClientData

from ..conftest import ROOT

HAPT_MODEL = ROOT / "models" / "backbone_hapt_int8.tflite"  # takes 128 x 6 windows, the watch import's are 100 x 6
FIELDS = ("x_train", "y_train", "x_test", "y_test")
REGIMES = [PartitionConfig("natural"), PartitionConfig("label-skew", seed=3), PartitionConfig("few-shot", seed=3),
           PartitionConfig("dirichlet", seed=3), PartitionConfig("dirichlet", seed=5, alpha=0.2)]


def differences(got: ClientData, want: ClientData) -> list[str]:
    """The fields in which two clients' data differ (dtype or any value): empty when they are equal."""
    return [f for f in FIELDS if getattr(got, f).dtype != getattr(want, f).dtype
            or not np.array_equal(getattr(got, f), getattr(want, f))]


def client_of(fed: FederatedData, user: str) -> ClientData:
    return fed.clients[fed.client_ids.index(user)]


class RecordingEmbed:
    """The real backbone's embed, counting the windows it was asked to embed."""

    def __init__(self, backbone: Any) -> None:
        self.backbone, self.windows = backbone, 0

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.windows += len(x)
        return np.asarray(self.backbone.embed(x))


def agent_config(directory: Path, user: str, model: Path | None = None, **data: Any) -> AgentConfig:
    return AgentConfig(device_id=user, state_dir=":memory:",
                       backbone=BackboneConfig(model=str(model) if model else None),
                       data=DataConfig(source="user-dataset", dir=str(directory), user=user, **data))


# --- the same data as simulate gives that user ---------------------------------------------------------------


def test_each_users_data_equals_its_client_in_simulate_for_every_regime(watch_dir: Path, backbone: Any) -> None:
    ds = load_user_dataset(watch_dir)
    prepared = prepare_users(ds, embed=backbone.embed)
    split = choose_split(ds)
    for partition in REGIMES:
        fed = federate_users(prepared, partition)
        for user in ds.card.roles.federate:
            alone = only_users(ds, client_users(ds.card, user))
            got = user_client_data(alone, user, partition, embed=backbone.embed, split=split)
            assert differences(got, client_of(fed, user)) == [], (partition, user)
            assert got.y_train.size > 0 and got.y_test.size > 0


def test_only_the_pretrain_users_and_the_users_own_windows_are_embedded(watch_dir: Path, backbone: Any) -> None:
    ds = load_user_dataset(watch_dir)
    embed = RecordingEmbed(backbone)
    got = user_client_data(ds, "subject-06", embed=embed)  # the split chosen here, on the whole dataset
    assert embed.windows == sum(len(ds.users[u]) for u in ("subject-01", "subject-02", "subject-03", "subject-06"))
    assert client_users(ds.card, "subject-06") == ("subject-01", "subject-02", "subject-03", "subject-06")
    want = client_of(federate_users(prepare_users(ds, embed=backbone.embed)), "subject-06")
    assert differences(got, want) == []


def test_the_agent_source_gives_simulates_data_for_its_user(watch_dir: Path, backbone: Any, tmp_path: Path) -> None:
    from edge_agent.agent.store import AgentStore

    ds = load_user_dataset(watch_dir)
    partition = PartitionConfig("few-shot", seed=2, shots=3)
    want = client_of(federate_users(prepare_users(ds, embed=backbone.embed,
                                                  sidecar_standardizer=backbone.embedding_standardizer()), partition),
                     "subject-08")
    store = AgentStore(tmp_path / "agent.db")
    try:
        source = open_source(agent_config(watch_dir, "subject-08", regime="few-shot", seed=2, shots=3), store)
        got = source.client_data()
    finally:
        store.close()
    assert got is not None and differences(got, want) == []
    assert source.description == f"user subject-08 of {watch_dir}" and not source.runs_heads


def test_an_explicit_split_rule_is_simulates_split_rule(watch_dir: Path, backbone: Any) -> None:
    ds = load_user_dataset(watch_dir)
    want = client_of(federate_users(prepare_users(ds, embed=backbone.embed, rule="session")), "subject-05")
    got = user_dataset_source(agent_config(watch_dir, "subject-05", split="session")).client_data()
    assert got is not None and differences(got, want) == []


def test_a_features_dataset_is_used_as_it_is(features_dir: Path, watch_dir: Path, backbone: Any) -> None:
    ds = load_user_dataset(features_dir)
    want = client_of(federate_users(prepare_users(ds), PartitionConfig("label-skew", seed=1)), "subject-07")
    # no backbone: a model file that cannot even be opened is never touched
    cfg = agent_config(features_dir, "subject-07", model=features_dir / "no-such-model.tflite", regime="label-skew",
                       seed=1)
    got = user_dataset_source(cfg).client_data()
    assert got is not None and differences(got, want) == []
    # and the features are the embedded windows: the windows dataset gives the same client
    windows = client_of(federate_users(prepare_users(load_user_dataset(watch_dir), embed=backbone.embed),
                                       PartitionConfig("label-skew", seed=1)), "subject-07")
    assert differences(got, windows) == []


def test_without_pretrain_users_the_statistics_are_the_sidecars_or_the_clients_training_windows(
        features_dir: Path, tmp_path: Path, backbone: Any) -> None:
    ds = load_user_dataset(features_dir)
    roles = replace(ds.card.roles, pretrain=())
    write_user_dataset(tmp_path / "nopretrain", replace(ds.card, roles=roles),
                       [u for uid, u in ds.users.items() if uid in roles.all()])
    alone = load_user_dataset(tmp_path / "nopretrain")
    assert client_users(alone.card, "subject-04") == alone.card.roles.federate
    sidecar = backbone.embedding_standardizer()
    assert sidecar is not None
    for given in (None, sidecar):
        want = client_of(federate_users(prepare_users(alone, sidecar_standardizer=given)), "subject-04")
        got = user_client_data(alone, "subject-04", sidecar_standardizer=given)
        assert differences(got, want) == [], given


# --- the partition draws over the card's classes, per user ---------------------------------------------------


def test_label_skew_and_dirichlet_draw_over_the_cards_classes(features_dir: Path, tmp_path: Path) -> None:
    """Class ROW (label 6) left only to the pretrain and holdout users: the clients still draw over 7 classes."""
    ds = load_user_dataset(features_dir)
    users = []
    for uid, u in ds.users.items():
        keep = (u.y != 6) if uid in ds.card.roles.federate else np.ones(len(u), bool)
        users.append(u.select(np.flatnonzero(keep)))
    write_user_dataset(tmp_path / "six", ds.card, users)
    six = load_user_dataset(tmp_path / "six")
    prepared = prepare_users(six)
    for seed in range(4):
        fed = federate_users(prepared, PartitionConfig("label-skew", seed=seed, classes_per_client=3))
        assert fed.num_classes == 7
        for uid, client in zip(fed.client_ids, fed.clients, strict=True):
            drawn = np.random.default_rng([seed, user_number(six.card, uid)]).choice(7, size=3, replace=False)
            assert set(client.y_train.tolist()) == set(drawn.tolist()) - {6}, (seed, uid)
    # dirichlet: the proportions come from 7 concentrations (6 would draw other ones)
    y_train = prepared.dataset.users["subject-04"].y[prepared.split.splits["subject-04"].train]
    y_test = prepared.dataset.users["subject-04"].y[prepared.split.splits["subject-04"].test]
    config = PartitionConfig("dirichlet", seed=1, alpha=0.3)
    seven, six_only = (partition_client("subject-04", 4, y_train, y_test, config, n) for n in (7, 6))
    assert not np.array_equal(seven.train_idx, six_only.train_idx)
    got = client_of(federate_users(prepared, config), "subject-04")
    assert np.array_equal(got.y_train, y_train[seven.train_idx])


def test_partition_clients_takes_client_ids_and_the_number_of_classes(windows: Any) -> None:
    from edge_agent.data.partition import CLIENT_SUBJECTS, partition_clients

    train, test = windows
    config = PartitionConfig("label-skew", seed=4)
    default = partition_clients(train, test, config)
    named = partition_clients(train, test, config, client_ids=tuple(f"c{s}" for s in CLIENT_SUBJECTS), num_classes=7)
    assert [s.client_id for s in named] == [f"c{s}" for s in CLIENT_SUBJECTS]
    assert all(np.array_equal(a.train_idx, b.train_idx) and np.array_equal(a.test_idx, b.test_idx)
               for a, b in zip(default, named, strict=True))  # 7 is what the labels say: the same draw
    wider = partition_clients(train, test, config, num_classes=12)  # classes 7-11: drawn, never held
    assert any(not np.array_equal(a.train_idx, b.train_idx) for a, b in zip(default, wider, strict=True))
    with pytest.raises(ValueError, match="2 client ids for 6 subjects"):
        partition_clients(train, test, config, client_ids=("a", "b"))


def test_a_users_number_is_its_place_in_the_card(watch_dir: Path) -> None:
    card = load_user_dataset(watch_dir).card
    assert [user_number(card, f"subject-{s:02d}") for s in range(1, 11)] == list(range(1, 11))


# --- what it refuses ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("user", "expected"), [
    ("subject-02", ["'subject-02' is a pretrain user", "roles.pretrain", "choose one of the federated users",
                    "subject-04, subject-05"]),
    ("subject-10", ["'subject-10' is a holdout user", "roles.holdout", "choose one of the federated users"]),
    ("subject-11", ["no user 'subject-11' in dataset.json", "choose one of the federated users"]),
])
def test_a_user_who_is_not_federated_is_refused_naming_the_roles(watch_dir: Path, user: str,
                                                                  expected: list[str]) -> None:
    with pytest.raises(ValueError) as refused:
        user_dataset_source(agent_config(watch_dir, user))
    message = str(refused.value)
    assert message.startswith(f"[data] user: {watch_dir}: ")
    assert [text for text in expected if text not in message] == [], message


def test_a_missing_directory_is_refused_saying_what_to_give(tmp_path: Path) -> None:
    with pytest.raises(ValueError) as refused:
        user_dataset_source(agent_config(tmp_path / "nowhere", "u1"))
    message = str(refused.value)
    missing = [t for t in (f"[data] dir {tmp_path / 'nowhere'}: no such directory", "dataset.json",
                           "edge-fl data import") if t not in message]
    assert missing == [], message


def test_a_backbone_of_another_window_shape_is_refused_naming_both_shapes(watch_dir: Path) -> None:
    with pytest.raises(BackboneMismatchError) as refused:
        user_dataset_source(agent_config(watch_dir, "subject-04", model=HAPT_MODEL))
    message = str(refused.value)
    missing = [t for t in ("(128, 6)", "(100, 6)", str(watch_dir), "build_backbone.py", "[backbone] model")
               if t not in message]
    assert missing == [], message


def test_a_user_the_split_leaves_without_test_windows_is_refused(watch_dir: Path, tmp_path: Path) -> None:
    ds = load_user_dataset(watch_dir)
    users = [u.select(np.arange(1)) if uid == "subject-05" else u for uid, u in ds.users.items()]
    write_user_dataset(tmp_path / "one", ds.card, users)
    with pytest.raises(UserDataError) as refused:
        user_dataset_source(agent_config(tmp_path / "one", "subject-05"))
    message = str(refused.value)
    assert "'subject-05'" in message and "cannot be scored" in message and "dataset.json" in message, message


def test_the_config_needs_both_dir_and_user() -> None:
    with pytest.raises(ValueError, match=r"needs dir .* and user"):
        DataConfig(source="user-dataset", dir="/data")
    with pytest.raises(ValueError, match=r"needs dir .* and user"):
        DataConfig(source="user-dataset", user="u1")


def test_check_config_describes_the_source_and_names_a_user_who_is_not_federated(watch_dir: Path,
                                                                                  tmp_path: Path) -> None:
    from edge_agent.config_tools import check_config

    def write(name: str, user: str, split: str = "auto") -> Path:
        path = tmp_path / f"{name}.toml"
        path.write_text(f'device_id = "{user}"\nstate_dir = "state"\n\n[data]\nsource = "user-dataset"\n'
                        f'dir = "{watch_dir}"\nuser = "{user}"\nsplit = "{split}"\n')
        return path

    good = check_config(write("good", "subject-04"))
    assert good.problems == [] and f"data from user subject-04 of the dataset in {watch_dir}" in good.summary
    pretrain = check_config(write("pretrain", "subject-01")).problems
    assert len(pretrain) == 1 and "'subject-01' is a pretrain user" in pretrain[0], pretrain
    bad_split = check_config(write("split", "subject-04", split="random")).problems
    assert any("split must be one of 'auto', 'session', 'segment'" in p for p in bad_split), bad_split


# --- the demo's device ids ---------------------------------------------------------------------------------------


def test_device_ids_are_the_user_ids_then_copies_in_turn() -> None:
    assert user_device_ids(["hapt-16", "hapt-17"], 5) == [
        ("hapt-16", "hapt-16"), ("hapt-17", "hapt-17"), ("hapt-16-2", "hapt-16"), ("hapt-17-2", "hapt-17"),
        ("hapt-16-3", "hapt-16")]
    assert user_device_ids(["u1", "u2", "u3"], 2) == [("u1", "u1"), ("u2", "u2")]


def test_device_ids_stay_valid_and_distinct() -> None:
    from edge_agent.demo_pki import AGGREGATOR, MONITOR
    from edge_agent.protocol import check_name

    assert {AGGREGATOR, MONITOR} <= RESERVED_NAMES
    long = "x" * 64
    pairs = user_device_ids([long, "aggregator", "a", "a-2"], 8)
    devices = [d for d, _ in pairs]
    assert len(set(devices)) == len(devices) and not set(devices) & RESERVED_NAMES
    for device in devices:
        check_name("device id", device)  # raises on an invalid one
    assert pairs[:4] == [(long, long), ("user-aggregator", "aggregator"), ("a", "a"), ("a-2", "a-2")]
    assert pairs[4][0] == "x" * 62 + "-2" and pairs[5] == ("user-aggregator-2", "aggregator")
    assert pairs[6] == ("a-3", "a")  # "a-2" is a user's own name already
    with pytest.raises(ValueError, match="at least one agent"):
        user_device_ids(["u1"], 0)



# --- what the demo reads before it starts anything ---------------------------------------------------------------


def test_the_demo_sizes_the_aggregator_and_names_each_agents_user(watch_dir: Path, backbone: Any) -> None:
    from edge_agent.demo_data import user_dataset_data

    warnings: list[str] = []
    data = user_dataset_data(watch_dir, 8, PartitionConfig(), backbone=None, split="auto", warn=warnings.append)
    assert warnings == [] and (data.embedding_dim, data.num_classes) == (backbone.embedding_dim, 7)
    assert data.backbone == str(backbone.path.absolute()) and data.backbone_doc is not None
    assert [a.device for a in data.agents] == [f"subject-{s:02d}" for s in range(4, 10)] + ["subject-04-2",
                                                                                          "subject-05-2"]
    assert data.agents[6].data == {"source": "user-dataset", "dir": str(watch_dir), "user": "subject-04",
                                   "split": "segment"}
    assert data.report is not None and data.report["devices"]["subject-05-2"] == "subject-05"
    assert data.new_user_y is not None and data.new_user_y.size == len(load_user_dataset(watch_dir).users["subject-10"])


def test_without_held_out_users_the_demo_scores_no_new_user(features_dir: Path, tmp_path: Path, backbone: Any) -> None:
    from edge_agent.cli import _demo_new_users
    from edge_agent.demo_data import new_user_accuracy, user_dataset_data
    from edge_agent.fleet import GlobalModel
    from edge_agent.learning.head import HeadConfig
    from edge_agent.learning.strategies import make_strategy
    from edge_agent.learning.training import TrainingConfig

    ds = load_user_dataset(features_dir)
    roles = replace(ds.card.roles, holdout=())
    write_user_dataset(tmp_path / "noholdout", replace(ds.card, roles=roles),
                       [u for uid, u in ds.users.items() if uid in roles.all()])
    warnings: list[str] = []
    data = user_dataset_data(tmp_path / "noholdout", None, PartitionConfig(), backbone=Path("unused.tflite"),
                             split="auto", warn=warnings.append)
    assert warnings == [f"{tmp_path / 'noholdout'} holds features: --backbone unused.tflite is not used"]
    assert data.backbone is None and data.backbone_doc is None and data.embedding_dim == backbone.embedding_dim
    assert len(data.agents) == 6 and data.reports_new_users
    assert data.new_user_y is not None and data.new_user_y.size == 0
    train, head = TrainingConfig(strategy="fedavg"), HeadConfig(backbone.embedding_dim, 7)
    server = make_strategy("fedavg", head, train.strategy_config()).init_server(np.random.default_rng(0))
    assert new_user_accuracy(GlobalModel(1, train, head, server.params), data) is None
    result = {"data": data.report, "summary": {"new_user_acc": None}}
    assert _demo_new_users(result) == "; no held-out users in the dataset: no new-user accuracy"


def test_a_dataset_cut_down_too_far_is_refused_naming_the_users_it_lacks(watch_dir: Path, backbone: Any) -> None:
    ds = load_user_dataset(watch_dir)
    alone = only_users(ds, ("subject-01", "subject-04"))  # no subject-02, 03 (pretrain) nor 05-09 (the split)
    with pytest.raises(ValueError) as without_split:
        user_client_data(alone, "subject-04", embed=backbone.embed)
    with pytest.raises(ValueError) as with_split:
        user_client_data(alone, "subject-04", embed=backbone.embed, split=choose_split(ds))
    assert "subject-02, subject-03, subject-05, subject-06" in str(without_split.value), without_split.value
    assert "needs the windows of subject-02, subject-03, which were left out" in str(with_split.value)
