"""Which subjects build the backbone, which are federated clients, which are never seen; and the
partition regimes that decide what each client holds.

A regime decides per client, from that client's labels and its own random stream (`partition_client`): a
device can compute its share of the data alone. `partition_clients` applies it to the clients of the bundled
recordings and returns index arrays into the train and test WindowSets, so the same partition applies to raw
windows and to their cached embeddings.
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
    subject: int  # the client's number: the bundled subject, or a user's position in its dataset card (seeds its draw)
    train_idx: np.ndarray
    test_idx: np.ndarray


def partition_client(client_id: str, number: int, y_train: np.ndarray, y_test: np.ndarray, config: PartitionConfig,
                     num_classes: int) -> ClientSplit:
    """What one client keeps of its own windows under `config`: indices into `y_train` and `y_test` (the labels of
    its training and test windows, in time order). The draw is the client's alone, from `default_rng([seed,
    number])`, so adding a client reshuffles no other and a client computes its share without anyone else's data.
    label-skew and dirichlet draw over `num_classes` classes, whatever labels this client happens to hold."""
    if config.regime not in REGIMES:
        raise ValueError(f"unknown regime {config.regime!r}; choose one of {', '.join(REGIMES)}")
    tr, te = np.arange(y_train.size), np.arange(y_test.size)
    if tr.size == 0:
        raise ValueError(f"client {client_id} has no training windows")
    crng = np.random.default_rng([config.seed, number])
    if config.regime == "label-skew":
        keep = crng.choice(num_classes, size=min(config.classes_per_client, num_classes), replace=False)
        tr = tr[np.isin(y_train, keep)]
        te = te[np.isin(y_test, keep)]
    elif config.regime == "few-shot" and config.shots > 0:
        tr = np.concatenate([
            crng.choice(idx, size=min(config.shots, idx.size), replace=False)
            for c in range(num_classes) if (idx := tr[y_train == c]).size
        ])
    elif config.regime == "dirichlet":
        p = crng.dirichlet(np.full(num_classes, config.alpha))
        frac = p / p.max()  # the client's most frequent class keeps all its windows
        tr = _subsample_by_class(tr, y_train, frac, crng)
        te = _subsample_by_class(te, y_test, frac, crng)
    return ClientSplit(client_id, number, np.sort(tr), np.sort(te))


def partition_clients(train: WindowSet, test: WindowSet, config: PartitionConfig,
                      subjects: tuple[int, ...] = CLIENT_SUBJECTS, *, num_classes: int | None = None,
                      client_ids: tuple[str, ...] | None = None) -> list[ClientSplit]:
    """`partition_client` for each of `subjects` (its windows: the rows of `train` and `test` with that subject),
    as indices into `train` and `test`. Client ids: `client_ids` (one per subject), by default `subject-NN`.
    `num_classes` defaults to the largest label in `train` and `test` plus one."""
    if config.regime not in REGIMES:
        raise ValueError(f"unknown regime {config.regime!r}; choose one of {', '.join(REGIMES)}")
    if client_ids is not None and len(client_ids) != len(subjects):
        raise ValueError(f"{len(client_ids)} client ids for {len(subjects)} subjects: give one per subject")
    if num_classes is None:
        num_classes = int(max(train.y.max(initial=0), test.y.max(initial=0))) + 1
    splits = []
    for i, subject in enumerate(subjects):
        tr = np.flatnonzero(train.subject == subject)
        te = np.flatnonzero(test.subject == subject)
        if tr.size == 0:
            raise ValueError(f"subject {subject} has no training windows")
        cid = client_ids[i] if client_ids is not None else f"subject-{subject:02d}"
        own = partition_client(cid, subject, train.y[tr], test.y[te], config, num_classes)
        # A subject's rows in order, so its positions map back to the same rows, sorted.
        splits.append(ClientSplit(cid, subject, tr[own.train_idx], te[own.test_idx]))
    return splits


def _subsample_by_class(idx: np.ndarray, y: np.ndarray, frac: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    kept = []
    for c, f in enumerate(frac):
        members = idx[y[idx] == c]
        k = round(f * members.size)
        if k:
            kept.append(rng.choice(members, size=k, replace=False))
    return np.concatenate(kept) if kept else idx[:0]
