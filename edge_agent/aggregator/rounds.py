"""The round state machine, as pure code: no clock (time is an argument), no I/O, no MQTT.

A round opens with a set of selected devices and a deadline, collects updates until enough have
arrived or the deadline passes, then closes. Every incoming update gets a `Verdict`: accepted, a
duplicate (the same update again: MQTT QoS 1 redelivers), or rejected with a reason a person can read.
Stragglers (selected devices that did not report by the close) become `ClientFailure`s: data for
the strategy, not exceptions.
"""

from __future__ import annotations

import enum
import itertools
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol, cast

import numpy as np

from ..fleet import SelectionRule, selection_key
from ..learning.strategies import ClientFailure


class UpdateLike(Protocol):
    """What the state machine needs to know about an incoming update (an Envelope has it).

    Read-only properties, not plain attributes: the state machine never assigns them, and a frozen
    dataclass (Envelope) only satisfies a protocol whose members are read-only.
    """

    @property
    def device_id(self) -> str: ...
    @property
    def round(self) -> int: ...
    @property
    def model_version(self) -> int: ...
    @property
    def strategy(self) -> str: ...
    @property
    def update_id(self) -> str: ...
    @property
    def num_examples(self) -> int: ...
    @property
    def tensors(self) -> Mapping[str, np.ndarray]: ...


@dataclass(frozen=True)
class RoundConfig:
    min_clients: int = 1  # fewer accepted updates than this at the deadline: the round fails, the global head stays
    fraction: float = 1.0  # share of the online devices selected for a round
    deadline_s: float = 60.0
    rounds: int = 30  # total rounds; the aggregator stops opening new ones after this
    # False for a strategy that shares nothing (local): devices train and upload nothing, so a round is
    # complete as soon as it opens, with no stragglers and nothing to wait for.
    expects_updates: bool = True
    # Close as soon as this share of the selected devices reported (and at least min_clients did): devices that
    # never train (ghosts) then cannot hold a round until its deadline. 1.0: wait for all, or the deadline.
    min_reported_fraction: float = 1.0

    def __post_init__(self) -> None:
        if (self.min_clients < 1 or not 0.0 < self.fraction <= 1.0 or self.deadline_s <= 0 or self.rounds < 1
                or not 0.0 < self.min_reported_fraction <= 1.0):
            raise ValueError(f"invalid round config {self}")


class Phase(str, enum.Enum):
    COLLECTING = "collecting"
    CLOSED = "closed"


class AcceptedUpdates(Mapping[str, str]):
    """The updates a round counted (device id -> update id), knowing the round's selected devices: membership,
    `plus` and the count of selected devices that reported are O(1), whatever the fleet's size.

    Read-only to its readers, as a frozen state's member must be. `plus` returns a new version without copying:
    versions share one append-only dict, and an entry belongs to every version made after it (its sequence
    number is below the version's size). Adding to a version that is no longer the newest (a branch) copies
    it first, O(n); the service never branches.
    """

    __slots__ = ("selected", "selected_set", "_entries", "_size", "_reported")

    def __init__(self, selected: tuple[str, ...], items: Mapping[str, str] | None = None) -> None:
        self.selected = selected  # the very tuple of the state it serves (RoundState checks identity)
        self.selected_set = frozenset(selected)
        self._entries: dict[str, tuple[str, int]] = {}  # device -> (update id, sequence number), append-only
        self._size = 0
        self._reported = 0
        for device, update_id in (items or {}).items():
            self._append(device, update_id)

    def _append(self, device: str, update_id: str) -> None:
        self._entries[device] = (update_id, self._size)
        self._size += 1
        self._reported += device in self.selected_set

    def plus(self, device: str, update_id: str) -> AcceptedUpdates:
        """These updates and `device`'s; this version is unchanged."""
        if device in self:
            raise ValueError(f"device {device!r} already has update {self[device]} counted this round")
        base = self if self._size == len(self._entries) else AcceptedUpdates(self.selected, dict(self.items()))
        new = AcceptedUpdates.__new__(AcceptedUpdates)
        new.selected, new.selected_set, new._entries = base.selected, base.selected_set, base._entries
        new._size, new._reported = base._size, base._reported
        new._append(device, update_id)
        return new

    @property
    def reported(self) -> int:
        """How many of the counted updates come from selected devices."""
        return self._reported

    def __getitem__(self, device: str) -> str:
        update_id, seq = self._entries[device]
        if seq >= self._size:  # added by a later version
            raise KeyError(device)
        return update_id

    def __contains__(self, device: object) -> bool:
        entry = self._entries.get(device) if isinstance(device, str) else None
        return entry is not None and entry[1] < self._size

    def __iter__(self) -> Iterator[str]:
        return itertools.islice(self._entries, self._size)  # insertion order: this version's entries come first

    def __len__(self) -> int:
        return self._size

    def __repr__(self) -> str:
        return f"AcceptedUpdates({dict(self.items())!r})"


@dataclass(frozen=True)
class RoundState:
    round: int  # 1-based round number
    model_version: int  # the global version this round trains from (= rounds completed before it)
    selected: tuple[str, ...]
    opened_at: float
    deadline: float
    # device id -> update id; given as any mapping, held as AcceptedUpdates (O(1) accept and membership)
    accepted: Mapping[str, str] = field(default_factory=dict)
    phase: Phase = Phase.COLLECTING
    # A sampled round's rule as announced in its task: a device it selects may contribute even if the
    # aggregator did not expect it (it came online after the round opened, or was on probation).
    rule: SelectionRule | None = None

    def __post_init__(self) -> None:
        # `replace` passes the AcceptedUpdates on with the same selected tuple: kept as it is, O(1). Built (O(n))
        # only when a round opens or resumes, or when `selected` itself is replaced.
        given = self.accepted
        if not (isinstance(given, AcceptedUpdates) and given.selected is self.selected):
            object.__setattr__(self, "accepted", AcceptedUpdates(self.selected, given))

    @property
    def counted(self) -> AcceptedUpdates:
        return cast(AcceptedUpdates, self.accepted)

    def is_selected(self, device_id: str) -> bool:
        return device_id in self.counted.selected_set

    @property
    def stragglers(self) -> tuple[str, ...]:
        return tuple(d for d in self.selected if d not in self.accepted)

    @property
    def reported(self) -> int:
        """Selected (expected) devices that delivered; others the rule admits count toward success, not quorum."""
        return self.counted.reported


class Outcome(str, enum.Enum):
    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"
    REJECTED = "rejected"


@dataclass(frozen=True)
class Verdict:
    outcome: Outcome
    reason: str = ""


# Reliability: a durable per-device score in [0, 1] (the store keeps it), an exponential average of
# "reported when selected". Unknown devices start at 1. Below MIN_RELIABILITY a device is left out of
# the draw, except on probation (a seeded PROBATION share of rounds), so a device that recovers earns
# its place back. With DECAY 0.7 two missed rounds in a row (1 -> 0.7 -> 0.49) leave a device out.
RELIABILITY_DECAY = 0.7
MIN_RELIABILITY = 0.5
PROBATION = 0.1


def updated_reliability(score: float, reported: bool) -> float:
    return RELIABILITY_DECAY * score + (1.0 - RELIABILITY_DECAY) * (1.0 if reported else 0.0)


def round_salt(rng: np.random.Generator) -> bytes:
    """The round's selection salt: the first thing a round's selection generator draws."""
    return rng.bytes(16)


def rule_for(selected: Sequence[str], salt: bytes) -> SelectionRule:
    """The constant-size rule that selects every device of `selected` (and whoever else hashes below them)."""
    return SelectionRule(salt, max(selection_key(salt, d) for d in selected))


def draw(online: Sequence[str], fraction: float, rng: np.random.Generator,
         reliability: Mapping[str, float] | None = None) -> tuple[tuple[str, ...], SelectionRule | None]:
    """Who round takes: (the selected devices in sorted order, the rule that announces them or None).

    At fraction 1 every online device in the pool is taken and the rule is None. Otherwise the
    round takes the k = round(fraction * pool) devices of the pool with the smallest selection keys,
    and the rule's threshold is the k-th smallest key: a device evaluates it from the task alone, and
    exactly the devices the aggregator expects (of those online) are below it. The pool is the online
    devices, less those whose reliability fell below MIN_RELIABILITY and are not on probation this round.
    """
    ids = sorted(set(online))
    if not ids:
        return (), None
    salt = round_salt(rng)
    scores = reliability or {}
    probation = int(PROBATION * 2**64)
    pool = [d for d in ids if scores.get(d, 1.0) >= MIN_RELIABILITY
            or selection_key(salt, "probation:" + d) < probation] or ids  # never an empty round
    k = max(1, round(fraction * len(pool)))
    if k >= len(pool):
        return tuple(pool), None
    keyed = sorted((selection_key(salt, d), d) for d in pool)
    threshold = keyed[k - 1][0]
    return tuple(sorted(d for key, d in keyed if key <= threshold)), SelectionRule(salt, threshold)


def select_devices(online: Sequence[str], fraction: float, rng: np.random.Generator) -> tuple[str, ...]:
    """A seeded sample of the online devices (all of them at fraction 1), in sorted order (see `draw`)."""
    return draw(online, fraction, rng)[0]


def open_round(round_no: int, model_version: int, selected: Sequence[str], now: float,
               config: RoundConfig, rule: SelectionRule | None = None) -> RoundState:
    if not selected:
        raise ValueError("cannot open a round with no selected device")
    return RoundState(round_no, model_version, tuple(selected), now, now + config.deadline_s, rule=rule)


def quorum(state: RoundState, config: RoundConfig) -> int:
    """How many selected devices must report for the round to close before its deadline."""
    n = len(state.selected)
    return min(n, max(config.min_clients, math.ceil(config.min_reported_fraction * n - 1e-9)))


def judge(state: RoundState | None, update: UpdateLike, *, strategy: str,
          expected: Mapping[str, tuple[int, ...]]) -> Verdict:
    """Decide what to do with an update. `expected` maps each tensor name this round may carry to its shape."""
    who = f"update {update.update_id} from {update.device_id} for round {update.round}"
    if state is None:
        return Verdict(Outcome.REJECTED, f"{who}: no round is open")
    if update.round != state.round or state.phase is Phase.CLOSED:
        when = "closed" if update.round < state.round or state.phase is Phase.CLOSED else "not opened yet"
        return Verdict(Outcome.REJECTED, f"{who}: late or early, round {update.round} is {when} "
                                         f"(current round {state.round}, {state.phase.value})")
    if update.model_version != state.model_version:
        return Verdict(Outcome.REJECTED, f"{who}: trained from model version {update.model_version}, "
                                         f"this round trains from version {state.model_version}")
    known = state.accepted.get(update.device_id)
    if known == update.update_id:
        return Verdict(Outcome.DUPLICATE, f"{who}: already counted")
    if known is not None:
        return Verdict(Outcome.REJECTED, f"{who}: device already delivered update {known} this round")
    if not state.is_selected(update.device_id) and (state.rule is None or not state.rule.selects(update.device_id)):
        return Verdict(Outcome.REJECTED, f"{who}: device was not selected for this round")
    if update.strategy != strategy:
        return Verdict(Outcome.REJECTED, f"{who}: strategy {update.strategy!r}, the fleet runs {strategy!r}")
    if update.num_examples <= 0:
        return Verdict(Outcome.REJECTED, f"{who}: num_examples must be positive, got {update.num_examples}")
    names = set(update.tensors)
    if names != set(expected):
        return Verdict(Outcome.REJECTED, f"{who}: tensors {sorted(names)}, expected {sorted(expected)}")
    for name, shape in expected.items():
        got = tuple(update.tensors[name].shape)
        if got != tuple(shape):
            return Verdict(Outcome.REJECTED, f"{who}: tensor {name} has shape {got}, expected {tuple(shape)}")
    return Verdict(Outcome.ACCEPTED)


def accept(state: RoundState, update: UpdateLike) -> RoundState:
    """The state with `update` counted: O(1), the old state is unchanged (AcceptedUpdates shares storage)."""
    return replace(state, accepted=state.counted.plus(update.device_id, update.update_id))


def should_close(state: RoundState, now: float, config: RoundConfig, reported: int | None = None) -> bool:
    """Close when the quorum of selected devices reported (all of them by default), at the deadline, or at once
    when no update is expected. `reported`: the selected devices that reported, when `state` does not hold
    them all (several aggregator workers count them; the store knows the total)."""
    seen = state.reported if reported is None else reported
    return state.phase is Phase.COLLECTING and (
        not config.expects_updates or seen >= quorum(state, config) or now >= state.deadline)


def close(state: RoundState, config: RoundConfig) -> tuple[RoundState, list[ClientFailure], bool]:
    """Returns (closed state, failures, whether the round succeeded, i.e. had at least min_clients)."""
    closed = replace(state, phase=Phase.CLOSED)
    if not config.expects_updates:
        return closed, [], True
    failures = [ClientFailure(d, "no update before the deadline") for d in state.stragglers]
    return closed, failures, len(state.accepted) >= config.min_clients
