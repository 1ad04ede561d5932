"""Where a device's local data comes from: one interface, chosen in one place (`open_source`).

- the bundled recordings of one subject (the demo), through the real backbone;
- one federated user of a per-user dataset directory (`edge-fl demo --data`), through the real backbone;
- fixed data handed over in process (`edge-fl simulate` runs real agents on data it already embedded);
- the microcontrollers attached on serial lines (bridge_source.py), whose data grows as windows arrive
  and which run every new personalized head;
- the files a device application writes in a directory (file_source.py), taken in as they arrive.

The agent service only asks `client_data()` before training and hands each new personalized head to
`push()`; it never knows which kind it has.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol

import numpy as np

from ..config import AgentConfig
from ..data.device_client import OFF, DataOptions, device_client_data
from ..learning.strategies import ClientData
from .data_options import data_options
from .store import AgentStore

if TYPE_CHECKING:
    from ..backbone import FrozenBackbone, RuntimeName
    from ..data.partition import PartitionConfig
    from ..data.watch import WatchDataset


class DataSource(Protocol):
    description: str  # for the log: "subject 4", "the MCU on /dev/ttyACM0"
    runs_heads: bool  # push() takes each new personalized head (worth computing only then)

    def client_data(self) -> ClientData | None:
        """The device's data now, or None while there is too little to train on."""
        ...

    def push(self, params: Mapping[str, np.ndarray]) -> object:
        """The device's new personalized head (float params), trained on what the last `client_data()` returned:
        run it where the data comes from (with that data's standardization)."""
        ...

    def close(self) -> None: ...


class FixedSource:
    """Data that does not change: nothing to push back to."""

    runs_heads = False

    def __init__(self, data: ClientData, description: str) -> None:
        self.data, self.description = data, description

    def client_data(self) -> ClientData | None:
        return self.data

    def push(self, params: Mapping[str, np.ndarray]) -> object:
        return None

    def close(self) -> None:
        pass


def dataset_source(cfg: AgentConfig) -> FixedSource:
    """The demo's local data: this subject's windows of the bundled recordings, through the real backbone.

    The same ClientData `federate()` gives this subject in `edge-fl simulate` (tested), built from the
    recordings this agent needs and no others: its own subject's, and the backbone subjects' training
    windows for the standardization statistics. The rest of the dataset is dropped as soon as it is read,
    and every window, the dataset and the backbone are released before the agent starts its rounds.
    """
    from ..data.partition import CLIENT_SUBJECTS, PartitionConfig
    from ..data.watch import load_watch_dataset

    d = cfg.data
    if d.subject not in CLIENT_SUBJECTS:
        raise ValueError(f"subject {d.subject} is not a federated client (clients: "
                         f"{', '.join(f'subject-{s:02d}' for s in CLIENT_SUBJECTS)})")
    partition = PartitionConfig(regime=d.regime, seed=d.seed, shots=d.shots,
                                classes_per_client=d.classes_per_client, alpha=d.alpha)
    # Only this client's recordings outlive the read; the rest of the dataset (one pickle, read whole) is
    # freed and its pages handed back before the interpreter loads, so the two are never resident together.
    recordings = subject_recordings(load_watch_dataset(d.dataset), d.subject)
    release_freed_memory()
    options = data_options(d, cfg.rng_stream, windows=True, population=True, channel_names=recordings.channel_names,
                           what=f"subject {d.subject} of the bundled recordings")
    data = watch_client_data(recordings, open_backbone(cfg), d.subject, partition, options)
    del recordings
    release_freed_memory()  # the recordings, windows and the interpreter's buffers are gone: hand their pages back
    return FixedSource(data, f"subject {d.subject}")


def subject_recordings(dataset: WatchDataset, subject: int) -> WatchDataset:
    """Only the recordings one client's data is made of: its own and the backbone subjects'."""
    from dataclasses import replace

    from ..data.partition import BACKBONE_SUBJECTS

    keep = {subject, *BACKBONE_SUBJECTS}
    return replace(dataset, recordings=tuple(r for r in dataset.recordings if r.subject in keep))


def watch_client_data(dataset: WatchDataset, backbone: FrozenBackbone, subject: int,
                      partition: PartitionConfig, options: DataOptions = OFF) -> ClientData:
    """`federate(embed_dataset(dataset, backbone), partition)`'s ClientData of `subject`, computed from
    `dataset` (which must hold that subject's and the backbone subjects' recordings) one recording at a
    time, so that only this subject's windows and the backbone subjects' embeddings are ever held.

    Equal, not close (tested): a window's embedding does not depend on the windows batched with it; the
    statistics come from the same backbone-subject windows in the same order (windows are cut per
    recording, in dataset order); and a partition draws per client from `default_rng([seed, subject])`
    by position among the client's own windows.

    `options` (`[data] augment_copies`, `per_user_standardization`): per-user statistics from every training
    window of the subject (the time split's training part, labels unread), copies of its labelled training
    windows after the partition (edge_agent/data/device_client.py). Off (the default), `federate()`'s exactly.
    """
    from dataclasses import replace

    from ..data.partition import BACKBONE_SUBJECTS, partition_clients
    from ..data.windows import WindowSet, split_and_window
    from ..learning.features import EmbeddingStandardizer

    reference: list[np.ndarray] = []  # embeddings of the backbone subjects' training windows
    parts: dict[str, list[WindowSet]] = {"train": [], "test": []}
    for rec in dataset.recordings:
        if rec.subject not in BACKBONE_SUBJECTS and rec.subject != subject:
            continue
        train, test = split_and_window(replace(dataset, recordings=(rec,)))
        if rec.subject in BACKBONE_SUBJECTS:
            reference.append(backbone.embed(train.x))  # a recording's windows at a time: ~100 KB, not MBs
        if rec.subject == subject:
            parts["train"].append(train)
            parts["test"].append(test)
    if not reference or not parts["train"]:
        raise ValueError(f"the recordings hold no windows of subject {subject} or of the backbone subjects")
    standardize = EmbeddingStandardizer.fit(np.concatenate(reference))
    del reference
    train, test = (WindowSet(*(np.concatenate(cols) for cols in zip(*(
        (w.x, w.y, w.subject, w.recording, w.start, w.stop) for w in parts[name]), strict=True)))
        for name in ("train", "test"))
    (split,) = partition_clients(train, test, partition, (subject,), num_classes=len(dataset.class_names))
    if options.off:
        return ClientData(standardize(backbone.embed(train.x[split.train_idx])), train.y[split.train_idx],
                          standardize(backbone.embed(test.x[split.test_idx])), test.y[split.test_idx])
    labelled = train.x[split.train_idx]
    # The whole training period is embedded only for its statistics; a window's embedding is the same either way.
    period = backbone.embed(train.x) if options.per_user_standardization else None
    return device_client_data(backbone.embed(labelled) if period is None else period[split.train_idx],
                              train.y[split.train_idx], backbone.embed(test.x[split.test_idx]), test.y[split.test_idx],
                              standardize, options, period=period, train_windows=labelled, embed=backbone.embed)


def user_dataset_source(cfg: AgentConfig) -> FixedSource:
    """`[data] source = "user-dataset"`: one federated user of a per-user dataset directory (docs/data-format.md),
    the ClientData `edge-fl simulate --data DIR` gives that user (`user_client_data`, tested equal).

    The directory is read and checked whole (the time split "auto" picks one rule for every federated user);
    then only the pretrain users' windows (the standardization statistics) and this user's are kept, the rest
    freed before the backbone loads, and only those are embedded. Every window, the dataset and the backbone are
    released before the agent starts its rounds.
    """
    from pathlib import Path

    from ..data.from_userdata import (
        TEST_FRACTION,
        BackboneMismatchError,
        check_backbone_input,
        check_federated_user,
        choose_split,
        client_users,
        only_users,
        user_client_data,
    )
    from ..data.partition import PartitionConfig
    from ..data.userdata import load_user_dataset

    d = cfg.data
    if not d.dir or not d.user:
        raise ValueError("data.source = 'user-dataset' needs data.dir (a dataset directory, docs/data-format.md) "
                         "and data.user (one of its federated users)")
    if not Path(d.dir).is_dir():
        raise ValueError(f"[data] dir {d.dir}: no such directory; give the directory that holds dataset.json and "
                         "users/ (write one with `edge-fl data import ...`, docs/data-format.md)")
    partition = PartitionConfig(regime=d.regime, seed=d.seed, shots=d.shots,
                                classes_per_client=d.classes_per_client, alpha=d.alpha)
    dataset = load_user_dataset(d.dir)
    try:
        check_federated_user(dataset, d.user)
    except ValueError as exc:
        raise ValueError(f"[data] user: {exc}") from None
    kind = dataset.card.kind
    options = data_options(d, cfg.rng_stream, windows=kind == "windows", population=True,
                           channel_names=dataset.card.channel_names, what=f"the {kind} dataset {d.dir}")
    split = choose_split(dataset, d.split, TEST_FRACTION)  # on every federated user, as simulate chooses it
    # Only the windows this client is made of outlive the read; the other users' are freed, and their pages
    # handed back, before the interpreter loads.
    dataset = only_users(dataset, client_users(dataset.card, d.user))
    release_freed_memory()
    backbone = None
    if dataset.card.kind == "windows":
        backbone = open_backbone(cfg)
        try:
            check_backbone_input(dataset, backbone.input_shape, str(backbone.path))
        except BackboneMismatchError as exc:
            raise BackboneMismatchError(f"{exc} (an agent's backbone is [backbone] model)") from None
    data = user_client_data(dataset, d.user, partition, embed=backbone.embed if backbone else None,
                            sidecar_standardizer=backbone.embedding_standardizer() if backbone else None,
                            split=split, options=options)
    del dataset, backbone
    release_freed_memory()  # the windows, the interpreter and its buffers are gone: hand their pages back
    return FixedSource(data, f"user {d.user} of {d.dir}")


def release_freed_memory() -> None:
    """Give the pages of freed objects back to the system (glibc keeps them in its heap otherwise), so the
    agent's resident size after start-up is what it holds, not what start-up once needed."""
    import gc

    gc.collect()
    try:
        import ctypes

        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl, Termux's bionic): nothing to trim with
        pass


_RUNTIMES: dict[str, RuntimeName] = {"auto": "auto", "litert": "ai-edge-litert", "ai-edge-litert": "ai-edge-litert",
                                     "tflite-runtime": "tflite-runtime"}


def open_backbone(cfg: AgentConfig) -> FrozenBackbone:
    """The backbone `[backbone]` names: its model (default: the bundled one), runtime and threads."""
    from ..backbone import DEFAULT_MODEL, FrozenBackbone

    b = cfg.backbone
    return FrozenBackbone(b.model or DEFAULT_MODEL, runtime=_RUNTIMES[b.runtime], num_threads=b.num_threads,
                          feature_output=b.feature_output)


def open_source(cfg: AgentConfig, store: AgentStore) -> DataSource:
    """The one place that turns `[data] source` into a data source."""
    d = cfg.data
    if d.source == "watch-dataset":
        return dataset_source(cfg)
    if d.source == "serial":
        from .bridge_source import BridgeSource  # pyserial only where a bridge is configured

        if not d.port:
            raise ValueError("data.source = 'serial' needs data.port (a pyserial URL such as /dev/ttyACM0)")
        options = data_options(d, cfg.rng_stream, windows=False, population=True, what="an MCU on a serial line")
        return BridgeSource([d.port, *d.more_ports], store, open_backbone(cfg), baudrate=d.baudrate,
                            min_windows=d.min_windows, max_windows=d.max_windows,
                            per_user_standardization=options.per_user_standardization)
    if d.source == "files":
        from .file_source import FileSource, read_card

        if not d.dir:
            raise ValueError("data.source = 'files' needs data.dir (the directory the application writes in)")
        card = read_card(d.dir)  # first: a missing or broken card is said before the backbone loads
        windows = card.kind == "windows"
        options = data_options(d, cfg.rng_stream, windows=windows, population=windows,
                               channel_names=card.channel_names, what=f"the {card.kind} card of {d.dir}")
        return FileSource(d.dir, card, store, open_backbone(cfg) if windows else None, keep_files=d.keep_files,
                          min_windows=d.min_windows, max_windows=d.max_windows, options=options)
    if d.source == "user-dataset":
        return user_dataset_source(cfg)
    raise ValueError(f"unknown data source {d.source!r}; choose 'watch-dataset', 'serial', 'files' or 'user-dataset'")
