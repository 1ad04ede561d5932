"""Which subjects build the backbone, which are federated clients, which are never seen; and the
partition regimes that decide what each client holds.

All regimes return index arrays into the train and test WindowSets, so the same partition applies to
raw windows and to their cached embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .windows import WindowSet

# Reserved for training the frozen backbone (and its standardization statistics); never a client.
BACKBONE_SUBJECTS: tuple[int, ...] = (1, 2, 3)
# Never seen by the backbone nor by the federation: "new user, day one".
NEW_USER_SUBJECTS: tuple[int, ...] = (10,)
# Everyone else is a federated client, one per subject in the `natural` regime.
CLIENT_SUBJECTS: tuple[int, ...] = (4, 5, 6, 7, 8, 9)

REGIMES: dict[str, str] = {
    "natural": "one client per subject, all of that subject's windows",
    "label-skew": "each client keeps a seeded subset of classes (train and test alike)",
    "few-shot": "k labelled training windows per class per client; the test set is unchanged",
    "dirichlet": "per client, class proportions drawn from Dirichlet(alpha); windows subsampled to match",
}


@dataclass(frozen=True)
class PartitionConfig:
    regime: str = "natural"
    seed: int = 0
    shots: int = 5  # few-shot: labelled windows per class per client (0 = all)
    classes_per_client: int = 3  # label-skew
    alpha: float = 0.5  # dirichlet


@dataclass(frozen=True)
class ClientSplit:
    client_id: str
    subject: int
    train_idx: np.ndarray
    test_idx: np.ndarray


def partition_clients(train: WindowSet, test: WindowSet, config: PartitionConfig,
                      subjects: tuple[int, ...] = CLIENT_SUBJECTS) -> list[ClientSplit]:
    if config.regime not in REGIMES:
        raise ValueError(f"unknown regime {config.regime!r}; choose one of {', '.join(REGIMES)}")
    num_classes = int(max(train.y.max(initial=0), test.y.max(initial=0))) + 1
    splits = []
    for subject in subjects:
        tr = np.flatnonzero(train.subject == subject)
        te = np.flatnonzero(test.subject == subject)
        if tr.size == 0:
            raise ValueError(f"subject {subject} has no training windows")
        # One child generator per client, so adding a client does not reshuffle the others.
        crng = np.random.default_rng([config.seed, subject])
        if config.regime == "label-skew":
            keep = crng.choice(num_classes, size=min(config.classes_per_client, num_classes), replace=False)
            tr = tr[np.isin(train.y[tr], keep)]
            te = te[np.isin(test.y[te], keep)]
        elif config.regime == "few-shot" and config.shots > 0:
            tr = np.concatenate([
                crng.choice(idx, size=min(config.shots, idx.size), replace=False)
                for c in range(num_classes) if (idx := tr[train.y[tr] == c]).size
            ])
        elif config.regime == "dirichlet":
            p = crng.dirichlet(np.full(num_classes, config.alpha))
            frac = p / p.max()  # the client's most frequent class keeps all its windows
            tr = _subsample_by_class(tr, train.y, frac, crng)
            te = _subsample_by_class(te, test.y, frac, crng)
        splits.append(ClientSplit(f"subject-{subject:02d}", subject, np.sort(tr), np.sort(te)))
    return splits


def _subsample_by_class(idx: np.ndarray, y: np.ndarray, frac: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    kept = []
    for c, f in enumerate(frac):
        members = idx[y[idx] == c]
        k = round(f * members.size)
        if k:
            kept.append(rng.choice(members, size=k, replace=False))
    return np.concatenate(kept) if kept else idx[:0]
