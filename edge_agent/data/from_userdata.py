"""A per-user dataset directory (docs/data-format.md) as the federation's view: `FederatedData`.

What `edge-fl simulate --data DIR` trains on. Every window is turned into one feature vector once: a `features`
dataset's x is used as it is, a `windows` dataset's x is embedded by the frozen backbone. Then, as for the
bundled recordings (edge_agent/data/federated.py):

- the feature standardization is fitted on the PRETRAIN users only (clients and new users never inform it);
- each FEDERATED user is a client, its windows split in time (`UserDataset.time_splits`: train earlier, test
  later, no shared sample), and the partition regimes of edge_agent/data/partition.py decide what it holds;
- the HOLDOUT users are the never-seen users: all of their windows are test windows;
- the number of classes is the card's, whatever labels happen to be present.

`prepare_users` does the expensive part once (embedding, the split); `federate_users` builds the clients for a
partition regime from it, cheaply, as often as asked. `user_client_data` builds one federated user's client alone,
equal to its client in `federate_users`, from the pretrain users' windows and its own: what a device of `edge-fl
demo --data` (an agent with `[data] source = "user-dataset"`) trains on.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ..learning.features import EmbeddingStandardizer
from ..learning.strategies import ClientData
from .device_client import OFF, DataOptions, device_client_data
from .federated import FederatedData
from .partition import PartitionConfig, partition_client
from .userdata import SPLIT_RULES, DatasetCard, TimeSplit, UserDataError, UserDataset
from .windows import WindowConfig

__all__ = ["TEST_FRACTION", "SESSION_SHARE_TOLERANCE", "BackboneMismatchError", "SplitChoice", "UserFeatures",
           "check_backbone_input", "backbone_notes", "choose_split", "prepare_users", "federate_users", "user_number",
           "check_federated_user", "client_users", "only_users", "user_client_data"]

# The later 30 % of each federated user's windows are test windows, as the bundled recordings are cut today.
TEST_FRACTION = WindowConfig().test_fraction
# "auto" holds whole sessions out only if that keeps each user's test share this close to TEST_FRACTION: two
# sessions per user would otherwise make half of every user's data test data.
SESSION_SHARE_TOLERANCE = 0.1

Embed = Callable[[np.ndarray], np.ndarray]


class BackboneMismatchError(ValueError):
    """The backbone cannot embed this dataset's windows (another window shape)."""


def check_backbone_input(dataset: UserDataset, input_shape: tuple[int, ...], backbone_name: str) -> None:
    """Refuse a windows dataset whose windows the backbone cannot take, naming both shapes and the way out."""
    card = dataset.card
    if card.kind != "windows":
        return
    have = card.sample_shape()
    if tuple(input_shape) == have:
        return
    where = dataset.path if dataset.path is not None else card.name
    raise BackboneMismatchError(
        f"backbone {backbone_name} takes windows of shape {tuple(input_shape)} (samples, channels), but the "
        f"windows of {where} have shape {have} (window_length {card.window_length}, "
        f"{len(card.channel_names or ())} channels in dataset.json); build a backbone for this dataset with "
        f"`python models/build_backbone.py --data {where}` (needs TensorFlow) and pass it with --backbone, or "
        "import the data with windows of the backbone's shape")


def backbone_notes(dataset: UserDataset, sidecar: Mapping[str, Any]) -> list[str]:
    """What the backbone's sidecar says it was built for, where it differs from the dataset (same shape, other
    rate or channels): legal, but the embeddings may mean little. One line each."""
    card, built = dataset.card, sidecar.get("input", {})
    notes = []
    rate = built.get("sample_rate_hz")
    if card.kind == "windows" and rate is not None and card.sample_rate_hz is not None \
            and abs(float(rate) - card.sample_rate_hz) > 1e-9:
        notes.append(f"the backbone was built for {float(rate):g} Hz windows, the dataset's are "
                     f"{card.sample_rate_hz:g} Hz")
    channels = built.get("channel_names")
    if card.kind == "windows" and channels is not None and tuple(channels) != card.channel_names:
        notes.append(f"the backbone was built for channels {', '.join(channels)}, the dataset has "
                     f"{', '.join(card.channel_names or ())}: check they measure the same things in the same order")
    return notes


@dataclass(frozen=True)
class SplitChoice:
    rule: str  # "session" or "segment"
    why: str
    splits: Mapping[str, TimeSplit]  # user -> indices into its windows


def _session_shares(dataset: UserDataset, splits: Mapping[str, TimeSplit]) -> dict[str, float]:
    return {uid: s.test.size / len(dataset.users[uid]) for uid, s in splits.items()}


def choose_split(dataset: UserDataset, rule: str = "auto", test_fraction: float = TEST_FRACTION,
                 users: tuple[str, ...] | None = None) -> SplitChoice:
    """The time split of `users` (default: the federated ones), one rule for all. "auto": whole sessions when
    every one of them can hold sessions out with every class on both sides AND that leaves each one's test share
    within SESSION_SHARE_TOLERANCE of `test_fraction`; otherwise every run of one label cut at the fraction
    ("segment", as the bundled recordings are cut). models/build_backbone.py splits the pretrain users by it."""
    if rule not in SPLIT_RULES:
        raise ValueError(f"unknown split rule {rule!r}; choose one of {', '.join(SPLIT_RULES)}")
    if rule != "auto":
        return SplitChoice(rule, f"asked for ({rule})",
                           dataset.time_splits(users, test_fraction=test_fraction, rule=rule))
    splits = dataset.time_splits(users, test_fraction=test_fraction, rule="auto")
    first = next(iter(splits.values()))
    if first.rule == "segment":
        return SplitChoice("segment", "auto: not every user has sessions enough to hold whole ones out "
                                      "with every class on both sides", splits)
    shares = _session_shares(dataset, splits)
    off = {u: s for u, s in shares.items() if abs(s - test_fraction) > SESSION_SHARE_TOLERANCE}
    if off:
        uid, share = next(iter(off.items()))
        return SplitChoice("segment", f"auto: whole sessions would make {share:.0%} of the windows of user {uid!r} "
                                      f"test windows (wanted {test_fraction:.0%})",
                           dataset.time_splits(users, test_fraction=test_fraction, rule="segment"))
    return SplitChoice("session", "auto: every user holds whole sessions out with every class on both "
                                  f"sides, test shares {min(shares.values()):.0%}-{max(shares.values()):.0%}", splits)


def _refuse_unscorable(dataset: UserDataset, choice: SplitChoice, test_fraction: float) -> None:
    for uid, split in choice.splits.items():
        for part in ("train", "test"):
            if getattr(split, part).size == 0:
                raise UserDataError(
                    f"{dataset.path or dataset.card.name}: user {uid!r} (federate, users/{uid}.npz) has no {part} "
                    f"windows after the time split (rule {choice.rule}, test fraction {test_fraction}; "
                    f"{len(dataset.users[uid])} windows): it cannot be scored; give it more windows or move it "
                    "to the pretrain or holdout role in dataset.json")


@dataclass(frozen=True)
class UserFeatures:
    """Every window of a dataset as one (unstandardized) feature vector, the statistics that standardize them
    and the federated users' time split: what every partition regime is built from."""

    dataset: UserDataset
    features: Mapping[str, np.ndarray]  # user id -> float32 [n, dim], the windows' order
    standardizer: EmbeddingStandardizer
    standardization: str  # where its statistics come from
    split: SplitChoice
    test_fraction: float

    @property
    def dim(self) -> int:
        return int(next(iter(self.features.values())).shape[1])

    def report(self) -> dict[str, Any]:
        """The data section of a results document."""
        card, roles = self.dataset.card, self.dataset.card.roles
        return {
            "path": None if self.dataset.path is None else str(self.dataset.path),
            "name": card.name, "kind": card.kind, "num_classes": card.num_classes,
            "class_names": list(card.class_names), "feature_dim": self.dim,
            "users": {role: list(getattr(roles, role)) for role in ("pretrain", "federate", "holdout")},
            "split": {"rule": self.split.rule, "why": self.split.why, "test_fraction": self.test_fraction,
                      "dropped_windows": int(sum(s.dropped for s in self.split.splits.values()))},
            "standardization": self.standardization,
            "new_user_windows": int(sum(len(u) for u in self.dataset.in_role("holdout"))),
        }


def _features(dataset: UserDataset, embed: Embed | None) -> dict[str, np.ndarray]:
    users = dataset.users
    if dataset.card.kind == "features":
        return {uid: u.x for uid, u in users.items()}
    if embed is None:
        raise ValueError(f"{dataset.path or dataset.card.name}: a windows dataset needs a backbone to embed it")
    ids = list(users)
    # One call over every window: one embedding-cache entry per (backbone, dataset).
    emb = np.asarray(embed(np.concatenate([users[u].x for u in ids])), np.float32)
    bounds = np.cumsum([0] + [len(users[u]) for u in ids])
    return {u: emb[bounds[i]:bounds[i + 1]] for i, u in enumerate(ids)}


def _standardizer(dataset: UserDataset, features: Mapping[str, np.ndarray], split: SplitChoice,
                  sidecar: EmbeddingStandardizer | None) -> tuple[EmbeddingStandardizer, str]:
    pretrain = dataset.card.roles.pretrain
    if pretrain:
        ref = np.concatenate([features[u] for u in pretrain])
        return EmbeddingStandardizer.fit(ref), f"fitted on the {len(ref)} windows of the pretrain users"
    if sidecar is not None:
        return sidecar, "the backbone's sidecar (no pretrain users in the dataset)"
    # Nothing else to go on: the clients' TRAINING windows (never a test window nor a new user's).
    ref = np.concatenate([features[u][s.train] for u, s in split.splits.items()])
    return (EmbeddingStandardizer.fit(ref), f"fitted on the {len(ref)} training windows of the federated users "
                                            "(no pretrain users, no backbone statistics)")


def prepare_users(dataset: UserDataset, *, embed: Embed | None = None,
                  sidecar_standardizer: EmbeddingStandardizer | None = None, rule: str = "auto",
                  test_fraction: float = TEST_FRACTION) -> UserFeatures:
    """Embed (windows datasets; `embed` maps float32 [n, *window] to [n, dim]), choose the time split, fit the
    standardization. Refuses (UserDataError) a federated user the split leaves without training or test
    windows: it could not be scored."""
    split = choose_split(dataset, rule, test_fraction)
    _refuse_unscorable(dataset, split, test_fraction)
    features = _features(dataset, embed)
    std, source = _standardizer(dataset, features, split, sidecar_standardizer)
    return UserFeatures(dataset, features, std, source, split, test_fraction)


def user_number(card: DatasetCard, user_id: str) -> int:
    """A user's number: its position in the card's roles (pretrain, federate, holdout) from 1. It seeds that
    client's partition, so the bundled recordings' import (subject-01 .. subject-10 in that order) draws the very
    partitions the bundled simulation draws."""
    return card.roles.all().index(user_id) + 1


def partitioned_client(dataset: UserDataset, user_id: str, features: np.ndarray, period: np.ndarray,
                       scored: np.ndarray, standardize: EmbeddingStandardizer, partition: PartitionConfig,
                       options: DataOptions = OFF, embed: Embed | None = None,
                       ) -> tuple[ClientData, np.ndarray, np.ndarray]:
    """One federated user's ClientData, as its device builds it: the partition's share of its training `period`
    and of its `scored` windows (indices into its windows, `features` unstandardized), under `options`
    (per-user statistics from the whole period, copies embedded by `embed`). Also the indices of the windows it
    trains on and is scored on. What `federate_users`, `user_client_data` and the evaluation protocol share."""
    user = dataset.users[user_id]
    own = partition_client(user_id, user_number(dataset.card, user_id), user.y[period], user.y[scored], partition,
                           dataset.card.num_classes)
    train, test = period[own.train_idx], scored[own.test_idx]
    windows = user.x[train] if options.augment is not None and dataset.card.kind == "windows" else None
    client = device_client_data(features[train], user.y[train], features[test], user.y[test], standardize, options,
                                period=features[period], train_windows=windows, embed=embed)
    return client, train, test


def federate_users(prepared: UserFeatures, partition: PartitionConfig | None = None, options: DataOptions = OFF,
                   embed: Embed | None = None) -> FederatedData:
    """One client per federated user (client id = user id) under a partition regime (default: natural), and the
    new users. The heads get the card's number of classes, and label-skew and dirichlet draw over them.
    `options` (a device's `[data] augment_copies` / `per_user_standardization`): each client's data built as the
    agent on that user builds it (`user_client_data`): the same windows, statistics and copies, embedded by
    `embed`; client i draws its copies from device stream i, the rng_stream of the demo's agent i."""
    partition = partition or PartitionConfig()
    std, dataset = prepared.standardizer, prepared.dataset
    card = dataset.card
    ids = tuple(prepared.split.splits)
    clients = tuple(partitioned_client(dataset, uid, prepared.features[uid], split.train, split.test, std, partition,
                                       replace(options, device=device), embed)[0]
                    for device, (uid, split) in enumerate(prepared.split.splits.items()))
    holdout = dataset.in_role("holdout")
    dim = prepared.dim
    new_x = np.concatenate([prepared.features[u.user_id] for u in holdout]) if holdout else np.zeros((0, dim),
                                                                                                   np.float32)
    new_y = np.concatenate([u.y for u in holdout]) if holdout else np.zeros(0, np.int64)
    return FederatedData(ids, clients, std(new_x), new_y, card.num_classes, dim, card.class_names, partition)


# --- one federated user alone (a device of `edge-fl demo --data`, [data] source = "user-dataset") -------------


def check_federated_user(dataset: UserDataset, user_id: str) -> None:
    """Refuse (UserDataError) a user who is not a federated client of `dataset`: only those have a ClientData."""
    roles, where = dataset.card.roles, dataset.path or dataset.card.name
    if user_id in roles.federate:
        return
    choose = f"choose one of the federated users (roles.federate): {', '.join(roles.federate)}"
    if user_id in roles.all():
        role = roles.of(user_id)
        raise UserDataError(f"{where}: user {user_id!r} is a {role} user (roles.{role} in dataset.json), not a "
                            f"federated one, so it is no client: {choose}")
    raise UserDataError(f"{where}: no user {user_id!r} in dataset.json; {choose}")


def client_users(card: DatasetCard, user_id: str) -> tuple[str, ...]:
    """The users whose windows one federated user's ClientData is made of, in the card's order: the pretrain
    users (the standardization statistics) and the user itself. Without pretrain users the statistics are the
    backbone sidecar's, failing that the federated users' training windows: then every federated user."""
    roles = card.roles
    if roles.pretrain:
        return (*roles.pretrain, user_id)
    return roles.federate


def only_users(dataset: UserDataset, user_ids: tuple[str, ...]) -> UserDataset:
    """`dataset` holding only `user_ids` (the card unchanged): what one client needs, the rest left to be freed."""
    keep = set(user_ids)
    return replace(dataset, users={uid: u for uid, u in dataset.users.items() if uid in keep})


def user_client_data(dataset: UserDataset, user_id: str, partition: PartitionConfig | None = None, *,
                     embed: Embed | None = None, sidecar_standardizer: EmbeddingStandardizer | None = None,
                     split: SplitChoice | None = None, rule: str = "auto",
                     test_fraction: float = TEST_FRACTION, options: DataOptions = OFF) -> ClientData:
    """`federate_users(prepare_users(dataset, embed=embed, sidecar_standardizer=..., rule=rule), partition)`'s
    ClientData of `user_id`, embedding only the windows it is made of: the pretrain users' (the standardization
    statistics, fitted on the same windows in the same order) and this user's (`client_users`). Equal, not close
    (tested): a window's embedding does not depend on the windows embedded with it, and the partition draws
    per client (`partition_client`).

    `split`: the time split `choose_split(full dataset, rule, test_fraction)` chose, which lets `dataset` hold
    only the users `client_users` names (`only_users`); without it, it is chosen here from `dataset`, which must
    then hold every federated user ("auto" picks one rule for all of them). Refuses (UserDataError) a user who is
    not federated, or whom the split leaves without training or test windows.

    `options` (a device's `[data] augment_copies` and `per_user_standardization`, edge_agent/data/device_client.py):
    per-user statistics from the user's whole training period (its windows of the time split's training part,
    unlabelled), copies of its labelled training windows after the partition, embedded by `embed`. Off (the
    default), the ClientData is `federate_users`' exactly."""
    check_federated_user(dataset, user_id)
    needed = (*client_users(dataset.card, user_id), *(dataset.card.roles.federate if split is None else ()))
    missing = [u for u in dict.fromkeys(needed) if u not in dataset.users]
    if missing:
        raise ValueError(f"{dataset.path or dataset.card.name}: the data of user {user_id!r} needs the windows of "
                         f"{', '.join(missing)}, which were left out; keep every user client_users() names and "
                         "pass the split chosen on the whole dataset")
    if split is None:
        split = choose_split(dataset, rule, test_fraction)
    own = SplitChoice(split.rule, split.why, {user_id: split.splits[user_id]})
    _refuse_unscorable(dataset, own, test_fraction)
    standardizing = dataset.card.roles.pretrain if dataset.card.roles.pretrain else (
        () if sidecar_standardizer is not None else tuple(split.splits))
    features = {uid: _user_features(dataset, uid, embed) for uid in dict.fromkeys((*standardizing, user_id))}
    std, _ = _standardizer(dataset, features, split, sidecar_standardizer)
    own_split = split.splits[user_id]
    return partitioned_client(dataset, user_id, features[user_id], own_split.train, own_split.test, std,
                              partition or PartitionConfig(), options, embed)[0]


def _user_features(dataset: UserDataset, user_id: str, embed: Embed | None) -> np.ndarray:
    """One user's windows as feature vectors: a features dataset's x as it is, a windows dataset's embedded."""
    x = dataset.users[user_id].x
    if dataset.card.kind == "features":
        return x
    if embed is None:
        raise ValueError(f"{dataset.path or dataset.card.name}: a windows dataset needs a backbone to embed it")
    return np.asarray(embed(x), np.float32)
