"""What the agents of `edge-fl demo` train on, and how the demo scores the users it never federates.

Without `--data`: the bundled recordings, one agent per federated subject (each agent's `[data] subject`). With
`--data DIR`: a per-user dataset directory (docs/data-format.md), one agent per federated user of its card, each
with `[data] source = "user-dataset"` naming the directory and the user. The demo process reads the dataset once,
before any process starts, so that what would stop every agent (a broken file, a backbone of another window
shape, a user the time split leaves without test windows) is said once, in one line; and it embeds it as
`edge-fl simulate --data` does, for the results' `data` section and the held-out users' windows: the new users,
scored with each global version's new-user head, as `edge-fl simulate` scores them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .data.partition import CLIENT_SUBJECTS, PartitionConfig

if TYPE_CHECKING:
    from .fleet import GlobalModel

#: Names of the demo's own processes (demo_pki.AGGREGATOR and MONITOR, acl.example's read-only "operator") and of
#: its work directory's entries: no device may take one (a user of that name gets the prefix `user-`).
RESERVED_NAMES = frozenset({"aggregator", "demo-monitor", "operator", "broker", "pki"})
MAX_DEVICE_ID = 64  # protocol.check_name: device ids are 1-64 characters of [A-Za-z0-9._-], like user ids


@dataclass(frozen=True)
class DemoAgent:
    device: str  # its device id (and certificate, config, log and state directory name)
    owner: str  # whose data it trains on: "subject-04", or the user id
    data: Mapping[str, Any]  # the keys of its [data] table that name that data (the partition keys come on top)


@dataclass(frozen=True)
class DemoData:
    agents: tuple[DemoAgent, ...]
    owners: str  # what an owner is, for the start line: "subjects" or "users"
    embedding_dim: int | None = None  # the aggregator's; None: its defaults (the bundled backbone, 7 exercises)
    num_classes: int | None = None
    backbone: str | None = None  # the agents' [backbone] model; None: theirs by default (the bundled one)
    report: dict[str, Any] | None = None  # the results' `data` section (None: the bundled recordings)
    backbone_doc: dict[str, Any] | None = None  # the results' `backbone` section, as simulate writes it
    new_user_x: np.ndarray | None = None  # the held-out users' windows, standardized; None: not scored
    new_user_y: np.ndarray | None = None

    @property
    def reports_new_users(self) -> bool:
        """Whether the results carry a new-user accuracy (--data: a number, or null without held-out users)."""
        return self.report is not None


def agent_ids(count: int) -> list[tuple[str, int]]:
    """(device id, subject) of `count` agents: the federated subjects in turn, `subject-04`, ..., `subject-09`,
    then `subject-04-2` (the second agent on subject 4's recordings), and so on."""
    if count < 1:
        raise ValueError(f"the demo needs at least one agent, got {count}")
    ids = []
    for i in range(count):
        copy, subject = divmod(i, len(CLIENT_SUBJECTS))
        s = CLIENT_SUBJECTS[subject]
        ids.append((f"subject-{s:02d}" if copy == 0 else f"subject-{s:02d}-{copy + 1}", s))
    return ids


def bundled_data(count: int | None) -> DemoData:
    """The bundled recordings: `count` agents (default one per federated subject) on the subjects in turn."""
    return DemoData(tuple(DemoAgent(device, f"subject-{s:02d}", {"subject": s})
                          for device, s in agent_ids(len(CLIENT_SUBJECTS) if count is None else count)), "subjects")


def _device_name(user_id: str, copy: int) -> str:
    base = f"user-{user_id}" if user_id in RESERVED_NAMES else user_id
    suffix = "" if copy == 1 else f"-{copy}"
    return base[:MAX_DEVICE_ID - len(suffix)] + suffix


def user_device_ids(users: Sequence[str], count: int) -> list[tuple[str, str]]:
    """(device id, user id) of `count` agents on `users` in turn: the user id itself (a user id is a valid device id,
    docs/data-format.md), then `<user>-2` for the second agent on that user's data, and so on. A user named like one
    of the demo's own processes or directories (RESERVED_NAMES) is `user-<id>`; a copy's suffix shortens a user id
    too long for it to 64 characters; a name already given (users `a` and `a-2`) takes the next free copy number."""
    if count < 1:
        raise ValueError(f"the demo needs at least one agent, got {count}")
    if not users:
        raise ValueError("the demo needs at least one federated user")
    given: set[str] = set()
    out = []
    for i in range(count):
        copy, k = divmod(i, len(users))
        copy += 1
        while (name := _device_name(users[k], copy)) in given:
            copy += 1
        given.add(name)
        out.append((name, users[k]))
    return out


def user_dataset_data(directory: Path, count: int | None, partition: PartitionConfig, *, backbone: Path | None,
                      split: str, warn: Callable[[str], None]) -> DemoData:
    """A per-user dataset directory as the demo runs it: `count` agents (default one per federated user) on the
    federated users in turn, the aggregator sized for its classes and features, and its held-out users embedded and
    standardized as `edge-fl simulate --data` does (the same functions), to score each global version on them.
    Raises ValueError (UserDataError, BackboneMismatchError) naming the directory, user, file and what to do."""
    from .backbone import DEFAULT_MODEL, FrozenBackbone
    from .data.from_userdata import backbone_notes, check_backbone_input, federate_users, prepare_users
    from .data.userdata import load_user_dataset

    directory = directory.absolute()  # the agents' configs live elsewhere: a relative path would mean another place
    dataset = load_user_dataset(directory)
    for problem in dataset.problems():
        warn(f"{directory}: {problem}")
    model: FrozenBackbone | None = None
    if dataset.card.kind == "features":
        if backbone is not None:
            warn(f"{directory} holds features: --backbone {backbone} is not used")
        prepared = prepare_users(dataset, rule=split)
    else:
        model = FrozenBackbone(backbone.absolute() if backbone is not None else DEFAULT_MODEL)
        check_backbone_input(dataset, model.input_shape, str(model.path))
        for note in backbone_notes(dataset, model.metadata):
            warn(f"{directory}: {note}")
        prepared = prepare_users(dataset, embed=model.embed, sidecar_standardizer=model.embedding_standardizer(),
                                 rule=split)
    fed = federate_users(prepared, partition)
    users = dataset.card.roles.federate
    pairs = user_device_ids(users, len(users) if count is None else count)
    agents = tuple(DemoAgent(device, uid, {"source": "user-dataset", "dir": str(directory), "user": uid,
                                           "split": prepared.split.rule}) for device, uid in pairs)
    report = {**prepared.report(), "devices": {device: uid for device, uid in pairs}}
    backbone_doc = None if model is None else {"path": str(model.path), "sha256": model.sha256,
                                               "runtime": model.runtime}
    return DemoData(agents, "users", fed.embedding_dim, fed.num_classes,
                    None if model is None else str(model.path.absolute()), report, backbone_doc,
                    fed.new_user_x, fed.new_user_y)


def new_user_accuracy(model: GlobalModel, data: DemoData) -> float | None:
    """The accuracy of `model`'s new-user head (int8, as devices run it) on the held-out users' windows, as
    `edge-fl simulate` scores it; None without held-out users or when the strategy has no new-user head."""
    from .learning.head import quantize_head
    from .learning.metrics import accuracy

    x, y = data.new_user_x, data.new_user_y
    if x is None or y is None or y.size == 0:
        return None
    head = model.strategy().new_user_head(model.server())
    return None if head is None else accuracy(quantize_head(head).predict(x), y)
