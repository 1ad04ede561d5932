"""The evaluation protocol: which of a user's windows train, which choose settings, which are read once for the
report.

Every federated user's windows are cut in time (never at random: overlapping windows of one stretch of signal
are near-copies) into three parts:

- TEST, by `Protocol.test_by`:
  - "session": whole sessions (recordings) held out, chosen by the seed: for each class, one of the sessions
    holding it (a HAPT session holds every activity, so one session is held out; a watch recording holds one
    exercise, so one recording per exercise is). The test set varies with the seed; but with two sessions per
    user, settings tuned at one seed have then read windows that test at another (tested), so the benchmarks
    use it only as a robustness check, never to report settings chosen on its validation.
  - "segment": the later `test_fraction` of every run of one activity; the same windows for every seed.
  - "next-session": the user's first session trains, the next one tests (adaptation over time).
- VALIDATION, by `Protocol.validation_by`, from the training period only:
  - "run": the last bout (run of consecutive windows) of every activity that has two or more bouts in the
    training period; an activity with one bout gives its later `validation_fraction`. A HAPT session holds two
    or three bouts of each activity, minutes apart: validation then resembles a held-out session, where windows
    next to the training ones would flatter whatever memorises a bout (measured: on the watch data, scored on
    the later part of each recording, local training ranks first; on a held-out recording it ranks last).
  - "segment": the later `validation_fraction` of every run (windows straddling the cut are dropped, as
    `split_in_time` does). Matches a "segment" test split.
- TRAIN: the rest.

Phase "validation" trains on TRAIN and scores on VALIDATION: every choice (hyperparameters, the default strategy,
augmentation) is made there. Phase "test" trains on TRAIN and VALIDATION together (all the labelled data a
device has) and scores on TEST, read once for the report. The test windows are the same in both phases, and
no window of a user ever scores in the phase that trained on it.

The partition regime (natural, few-shot, label-skew, dirichlet) then decides which of the training windows a
client holds, exactly as in `edge-fl simulate`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from ..data.augment import AugmentConfig, ChannelGroup
from ..data.device_client import DataOptions
from ..data.embedded_copies import device_augment_config
from ..data.federated import FederatedData
from ..data.from_userdata import UserFeatures, partitioned_client, user_number
from ..data.partition import PartitionConfig
from ..data.userdata import DatasetCard, UserData, split_in_time, window_positions, without_overlap

TEST_BY = {
    "session": "whole sessions held out, one per class, chosen by the seed",
    "segment": "the later part of every activity run, the same for every seed",
    "next-session": "the first session trains, the next one tests",
}
PHASES = ("validation", "test")

Embed = Callable[[np.ndarray], np.ndarray]


VALIDATION_BY = {
    "run": "the last bout of every activity in the training period",
    "segment": "the later part of every activity run of the training period",
}


@dataclass(frozen=True)
class Protocol:
    test_by: str = "session"
    validation_by: str = "run"
    test_fraction: float = 0.3  # "segment" only: the later share of every run
    validation_fraction: float = 0.25  # "segment" (or an activity with one bout): the later share of a run

    def __post_init__(self) -> None:
        if self.test_by not in TEST_BY:
            raise ValueError(f"unknown test split {self.test_by!r}; choose one of {', '.join(TEST_BY)}")
        if self.validation_by not in VALIDATION_BY:
            raise ValueError(f"unknown validation split {self.validation_by!r}; choose one of "
                             f"{', '.join(VALIDATION_BY)}")
        if not 0 < self.validation_fraction < 1 or not 0 < self.test_fraction < 1:
            raise ValueError(f"fractions must lie in (0, 1): test {self.test_fraction}, "
                             f"validation {self.validation_fraction}")


@dataclass(frozen=True)
class UserParts:
    """Indices into one user's windows (time order)."""

    train: np.ndarray
    validation: np.ndarray
    test: np.ndarray

    def phase(self, phase: str) -> tuple[np.ndarray, np.ndarray]:
        """(training windows, scored windows) of a phase."""
        if phase == "validation":
            return self.train, self.validation
        if phase == "test":
            return np.sort(np.concatenate([self.train, self.validation])), self.test
        raise ValueError(f"unknown phase {phase!r}; choose one of {', '.join(PHASES)}")


def _held_out_sessions(user: UserData, seed: int, number: int) -> np.ndarray:
    """The sessions that test: for each class in turn, one session holding it (unless one already chosen
    does), drawn with the user's own generator so that a user's choice does not depend on the others."""
    if user.session is None:
        raise ValueError(f"user {user.user_id!r} has no session ids: hold out by 'segment' instead")
    rng = np.random.default_rng([seed, number, 0x5E55])
    chosen: list[int] = []
    for label in np.unique(user.y):
        holding = np.unique(user.session[user.y == label])
        if np.isin(holding, chosen).any():
            continue
        if holding.size < 2:
            raise ValueError(f"user {user.user_id!r}: class {int(label)} is in one session only, so holding a "
                             "session out would leave no window of it to train on; hold out by 'segment'")
        chosen.append(int(rng.choice(holding)))
    if np.unique(user.y[~np.isin(user.session, chosen)]).size != np.unique(user.y).size:
        raise ValueError(f"user {user.user_id!r}: the held-out sessions {chosen} hold every window of some class")
    return np.asarray(chosen, np.int64)


def bouts(user: UserData, card: DatasetCard, period: np.ndarray) -> list[np.ndarray]:
    """`period` (sorted indices) as runs of consecutive windows of one label and session with no gap in time
    (consecutive windows further apart than 1.5 strides, when start times are known)."""
    if period.size == 0:
        return []
    y = user.y[period]
    change = y[1:] != y[:-1]
    if user.session is not None:
        s = user.session[period]
        change |= s[1:] != s[:-1]
    if user.t is not None and card.window_stride is not None and card.sample_rate_hz is not None:
        change |= np.diff(user.t[period]) > 1.5 * card.window_stride / card.sample_rate_hz
    return np.split(period, np.flatnonzero(change) + 1)


def _cut_training_period(user: UserData, card: DatasetCard, period: np.ndarray,
                         protocol: Protocol) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) indices of `period`, by `protocol.validation_by`."""
    fraction = protocol.validation_fraction
    if protocol.validation_by == "segment":
        sub = split_in_time(user.select(period), card, test_fraction=fraction, rule="segment")
        return period[sub.train], period[sub.test]
    by_label: dict[int, list[np.ndarray]] = {}
    for run in bouts(user, card, period):
        by_label.setdefault(int(user.y[run[0]]), []).append(run)
    train, validation = [], []
    for runs in by_label.values():
        if len(runs) >= 2:
            train += runs[:-1]
            validation.append(runs[-1])
        else:
            sub = split_in_time(user.select(runs[0]), card, test_fraction=fraction, rule="segment")
            train.append(runs[0][sub.train])
            validation.append(runs[0][sub.test])
    if not train:
        raise ValueError(f"user {user.user_id!r}: no window in the training period to validate on; give the user "
                         "more data or hold out by 'segment'")
    train_idx, val_idx = np.sort(np.concatenate(train)), np.sort(np.concatenate(validation))
    # Bouts back to back (no pause between activities) may share samples across the cut: such training windows go.
    start, length = window_positions(user, card)
    return without_overlap(train_idx, val_idx, start, length, user.session), val_idx


def user_parts(user: UserData, card: DatasetCard, protocol: Protocol, seed: int, number: int) -> UserParts:
    """Cut one user's windows; `number` (the user's position in the card, from 1) seeds its own choice."""
    if protocol.test_by == "segment":
        whole = split_in_time(user, card, test_fraction=protocol.test_fraction, rule="segment")
        period = np.sort(np.concatenate([whole.train, whole.validation]))
        test = whole.test
    else:
        if user.session is None or user.sessions().size < 2:
            raise ValueError(f"user {user.user_id!r} has fewer than two sessions: test by 'segment' instead")
        if protocol.test_by == "next-session":
            first, second = user.sessions()[:2]
            period, test = np.flatnonzero(user.session == first), np.flatnonzero(user.session == second)
            for part, which in ((period, "first"), (test, "second")):
                missing = np.setdiff1d(np.unique(user.y), user.y[part])
                if missing.size:
                    raise ValueError(f"user {user.user_id!r}: its {which} session has no window of class(es) "
                                     f"{missing.tolist()}, so it cannot train and test on consecutive sessions; "
                                     "test by 'segment' instead")
        else:
            held = np.isin(user.session, _held_out_sessions(user, seed, number))
            period, test = np.flatnonzero(~held), np.flatnonzero(held)
    train, validation = _cut_training_period(user, card, period, protocol)
    return UserParts(train, validation, test)


@dataclass(frozen=True)
class DeviceOptions:
    """What a device does with its data before training, beside the strategy."""

    # Statistics of the user's own unlabelled windows, shrunk towards the population's (fit_user_standardizer).
    per_user_standardization: bool = False
    augment: AugmentConfig | None = None  # copies of each labelled window, embedded by the frozen backbone


@dataclass(frozen=True)
class PhaseData:
    """The federation of one (phase, seed, regime): what run_simulation takes, plus per client the indices of
    its training and scored windows among its user's windows (for augmentation and for the report)."""

    federated: FederatedData
    train_index: Mapping[str, np.ndarray]
    score_index: Mapping[str, np.ndarray]


def federate_phase(prepared: UserFeatures, protocol: Protocol, phase: str, partition: PartitionConfig,
                   options: DeviceOptions = DeviceOptions(), *, embed: Embed | None = None) -> PhaseData:
    """One client per federated user: its phase's training windows under the partition regime, its phase's
    scored windows; in the test phase the holdout users are the never-seen users, scored on every window, and in
    the validation phase every federated user's validation part stands in for them (see below)."""
    dataset, card = prepared.dataset, prepared.dataset.card
    numbers = {uid: user_number(card, uid) for uid in card.roles.all()}
    fed = card.roles.federate
    parts = {u: user_parts(dataset.users[u], card, protocol, partition.seed, numbers[u]) for u in fed}
    std = prepared.standardizer
    augment: AugmentConfig | None = None
    groups: tuple[ChannelGroup, ...] = ()
    if options.augment is not None and options.augment.enabled:
        if card.kind != "windows" or embed is None:
            raise ValueError(f"augmentation perturbs sensor windows: {card.name} holds {card.kind}"
                             + (", and no backbone was given to embed the copies" if embed is None else ""))
        # As an agent configures it (no rotation when the channels name no xyz triplet).
        augment, groups = device_augment_config(options.augment.copies, card.channel_names, card.name)
    clients, train_index, score_index = [], {}, {}
    for device, u in enumerate(fed):
        period, scored = parts[u].phase(phase)
        # Exactly what an agent does with [data] augment_copies / per_user_standardization (the simulated device
        # `device` draws its copies from its own stream, as agent rng_stream `device` would).
        opts = DataOptions(augment=augment, channel_groups=groups, seed=partition.seed, device=device,
                           per_user_standardization=options.per_user_standardization)
        client, tr, sc = partitioned_client(dataset, u, prepared.features[u], period, scored, std, partition, opts,
                                            embed)
        clients.append(client)
        train_index[u], score_index[u] = tr, sc
    # The new users are test users: the validation phase does not even load them. There, the head a strategy gives
    # a new user is scored on a stand-in: every federated user's whole validation part, whatever the partition
    # drew, standardized as a new user's windows are (the population's statistics, never the user's own).
    holdout = dataset.in_role("holdout") if phase == "test" else ()
    if holdout:
        new_x = std(np.concatenate([prepared.features[h.user_id] for h in holdout]))
        new_y = np.concatenate([h.y for h in holdout])
    elif phase == "validation":
        new_x = std(np.concatenate([prepared.features[u][parts[u].validation] for u in fed]))
        new_y = np.concatenate([dataset.users[u].y[parts[u].validation] for u in fed])
    else:
        new_x, new_y = np.zeros((0, prepared.dim), np.float32), np.zeros(0, np.int64)
    data = FederatedData(tuple(fed), tuple(clients), new_x, new_y, card.num_classes, prepared.dim,
                         card.class_names, partition)
    return PhaseData(data, train_index, score_index)
