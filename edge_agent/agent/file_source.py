"""The agent's local data from files a device application drops in a directory (docs/data-format.md, "Feeding an
agent from files").

The application writes `<anything>.npz.tmp` and renames it to `<anything>.npz` (a rename within one directory
is atomic on POSIX), so a name ending in `.npz` is always a whole file. Each holds `x`, `y` and optionally
`t` and `session`, exactly as a user file of the per-user format, and is checked against the directory's
`dataset.json` card by the format's own loader (edge_agent/data/userdata.py): shapes, dtypes, label range,
finite values. The card is read once, when the source opens; a windows card must describe the backbone's
input, a features card's `feature_dim` is the fleet's embedding size.

At every `client_data()` the files that arrived since are taken in arrival order (modification time, then
name). Each valid file's windows are embedded once (windows kind; a features file is used as it is) and kept
in the agent's store like the MCU's windows (bridge_source.py): as codes in the embeddings table, at most
`max_windows`, the oldest dropped first. The file's SHA-256 is recorded in the same transaction, so a file
already stored (the agent was killed between storing it and moving it away, or the application wrote the same
content twice) is never counted again. Then the file moves to `processed/` (or is deleted: `keep_files =
false`). A file that breaks the format moves to `rejected/`, with `<name>.why` beside it and one log line;
nothing a file holds stops the agent.

Per label, the earlier windows train and the later ones test, as for the MCU's windows.

`[data] augment_copies = N` (a windows card): each new file's labelled windows get N augmented copies at arrival
(edge_agent/data/augment.py), embedded by the backbone and stored beside them, marked as copies of the window they
were made from, in the same transaction as the windows and the file's SHA-256 (a kill between the two stores
neither). The copies' perturbations come from the device's own stream for that file's content (`rng.augment`).
Copies are no windows: they never count towards `min_windows` or `max_windows`, go when their window goes (so at
most max_windows * (1 + N) rows are kept), train only when their window trains and never test. Switching
augmentation off drops the stored copies when the source opens; switching it on augments the files that arrive
from then on (the windows already stored are embeddings, no longer windows). `[data] per_user_standardization`:
the statistics are refitted from the stored training windows (not the copies) whenever the data is rebuilt.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..backbone import BackboneError, FrozenBackbone
from ..data.device_client import OFF, DataOptions
from ..data.userdata import CARD_FILE, DatasetCard, UserData, UserDataError, read_user_file
from ..data.userdata import read_card as read_dataset_card
from ..faults import crash_point
from ..fsutil import file_sha256
from ..learning.features import EmbeddingStandardizer
from ..learning.strategies import ClientData
from .bridge_source import DEFAULT_MAX_WINDOWS, Codes, EmbeddingCodes, StoredWindows
from .bridge_source import split_in_arrival_order as split_in_arrival_order  # public here too (tests, docs)
from .store import AgentStore, Copies

log = logging.getLogger("edge_fl.agent.files")

SUFFIX = ".npz"  # only complete files: the application writes <name>.npz.tmp and renames it to <name>.npz
PROCESSED, REJECTED = "processed", "rejected"
# Refused unread: a file is loaded whole, and the agent has a small memory budget. 16 MiB is ~7,000 windows of
# 100 x 6 float32, more than the default max_windows keeps.
MAX_FILE_BYTES = 16 << 20


class FeatureCodes:
    """A features card's vectors, kept as float32: they are the application's own numbers, exactly."""

    dtype: np.dtype[Any] = np.dtype(np.float32)

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.space = json.dumps({"features": dim, "dtype": self.dtype.name})

    def encode(self, embeddings: np.ndarray) -> np.ndarray:
        return np.asarray(embeddings, self.dtype)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        return np.asarray(codes, np.float32)


def read_card(directory: str | os.PathLike[str]) -> DatasetCard:
    """The directory's dataset.json, checked as the format's loader checks it (UserDataError if it is not)."""
    root = Path(directory)
    if not root.is_dir():
        raise UserDataError(f"{root}: not a directory; [data] dir must name the directory the application writes "
                            f"its files and {CARD_FILE} in")
    return read_dataset_card(root)


class FileSource:
    """Labelled windows from the files an application drops in `directory`, kept in the agent's store."""

    runs_heads = False  # the application runs no head the agent could push to

    def __init__(self, directory: str | os.PathLike[str], card: DatasetCard, store: AgentStore,
                 backbone: FrozenBackbone | None, *, keep_files: bool = True, test_fraction: float = 0.3,
                 min_windows: int = 14, max_windows: int = DEFAULT_MAX_WINDOWS, options: DataOptions = OFF) -> None:
        if max_windows < min_windows:
            raise ValueError(f"max_windows ({max_windows}) must be at least min_windows ({min_windows})")
        if options.augment is not None and card.kind != "windows":
            raise ValueError(f"{Path(directory) / CARD_FILE}: a {card.kind} card holds no sensor windows to augment; "
                             "set [data] augment_copies = 0")
        self.options = options
        self.directory, self.card, self.store, self.backbone = Path(directory), card, store, backbone
        self.keep_files, self.test_fraction = keep_files, test_fraction
        self.min_windows, self.max_windows = min_windows, max_windows
        self.description = f"files in {self.directory}"
        self.codes, self.standardize = self._representation()
        # Stored labels mean the card's classes: another class list (or another backbone) makes them meaningless.
        space = json.dumps({"codes": json.loads(self.codes.space), "kind": card.kind,
                            "class_names": list(card.class_names)})
        dropped = store.use_embedding_space(space)
        if dropped:
            log.warning("%d stored window(s) came from another backbone, card kind or class list and were dropped "
                        "(a file is read once, when it arrives); collecting anew", dropped)
        # A lowered max_windows holds from the start; the store forgets the files none of whose windows is kept.
        store.keep_newest_embeddings(max_windows)
        if options.augment is None:
            copies = store.drop_copies()
            if copies:
                log.info("augmentation is off ([data] augment_copies = 0): the %d stored augmented copies were "
                         "dropped", copies)
        self.stored = StoredWindows(store, self.codes, self.standardize, min_windows=min_windows,
                                    test_fraction=test_fraction, what=self.description,
                                    per_user_standardization=options.per_user_standardization)
        self._stuck: set[str] = set()  # files that could not be moved away: left alone until a restart
        self._listing_error: str | None = None
        log.info("reading labelled %s from %s (card %r: %d classes, %s)", card.kind, self.description, card.name,
                 card.num_classes, ", ".join(card.class_names))

    def _representation(self) -> tuple[Codes, EmbeddingStandardizer | None]:
        """How this card's rows become the head's inputs: the backbone and its shipped statistics for windows,
        the rows themselves for features."""
        card = self.card
        if card.kind == "features":
            assert card.feature_dim is not None
            return FeatureCodes(card.feature_dim), None
        backbone = self.backbone
        if backbone is None:
            raise ValueError(f"{self.directory / CARD_FILE}: a windows card needs the backbone to embed its windows")
        if tuple(backbone.input_shape) != card.sample_shape():
            raise ValueError(
                f"{self.directory / CARD_FILE}: windows of shape {card.sample_shape()} (window_length "
                f"{card.window_length}, {len(card.channel_names or ())} channels), but the backbone {backbone.path} "
                f"takes {tuple(backbone.input_shape)}; write windows of the backbone's shape, or set [backbone] model "
                "to a backbone built for these windows (models/build_backbone.py --data)")
        standardizer = backbone.embedding_standardizer()
        if standardizer is None:
            raise ValueError(f"{backbone.path}: its sidecar has no embedding_standardization; rebuild it with "
                             "models/build_backbone.py (a device cannot compute these statistics itself)")
        built = backbone.metadata.get("input", {})
        rate, channels = built.get("sample_rate_hz"), built.get("channel_names")
        if rate is not None and card.sample_rate_hz is not None and abs(float(rate) - card.sample_rate_hz) > 1e-9:
            log.warning("the backbone was built for %g Hz windows, %s says %g Hz", float(rate), CARD_FILE,
                        card.sample_rate_hz)
        if channels is not None and tuple(channels) != card.channel_names:
            log.warning("the backbone was built for channels %s, %s names %s: check they measure the same things "
                        "in the same order", ", ".join(channels), CARD_FILE, ", ".join(card.channel_names or ()))
        return EmbeddingCodes(backbone), standardizer

    # --- taking files in ------------------------------------------------------------------------------------

    def arrived(self) -> list[Path]:
        """The complete files waiting in the directory, in arrival order (modification time, then name)."""
        found: list[tuple[int, str]] = []
        try:
            with os.scandir(self.directory) as entries:
                for entry in entries:
                    if not entry.name.endswith(SUFFIX) or entry.name.startswith("."):
                        continue
                    try:
                        if entry.is_file(follow_symlinks=False):
                            found.append((entry.stat(follow_symlinks=False).st_mtime_ns, entry.name))
                    except FileNotFoundError:  # taken back by the application while the directory was read
                        continue
        except OSError as exc:  # the directory went away or became unreadable: train on what is stored
            if str(exc) != self._listing_error:
                log.error("cannot read %s (%s); training goes on with the windows already stored", self.directory,
                          exc)
                self._listing_error = str(exc)
            return []
        self._listing_error = None
        return [self.directory / name for _, name in sorted(found)]

    def take_new_files(self) -> int:
        """Store every file that arrived (each once), moving it out of the way; returns how many were stored."""
        stored = 0
        for path in self.arrived():
            if path.name in self._stuck:
                continue
            if self._take(path):
                stored += 1
                # The n-th file of this call is stored, not moved yet: where the tests kill the agent (SIGKILL).
                crash_point("agent.after_file_stored", stored)
                self._done(path)
        return stored

    def _take(self, path: Path) -> bool:
        """Store one file's windows; False if it was not stored now (gone, stored before, or rejected)."""
        try:
            size = path.stat().st_size
            if size > MAX_FILE_BYTES:
                return self._reject(path, f"{path}: {size} bytes, more than the {MAX_FILE_BYTES >> 20} MiB a file "
                                          "may hold; write the windows in smaller files")
            digest = file_sha256(path)
        except FileNotFoundError:
            return False  # the application took it back
        except OSError as exc:
            return self._reject(path, f"{path}: cannot be read ({exc}); the agent must be able to read and move "
                                      "the files the application writes")
        known = self.store.stored_file(digest)
        if known is not None:
            log.info("%s: its windows are stored already (as %s, before a restart or under another name); not "
                     "counted again", path.name, known)
            self._done(path)
            return False
        try:
            user = read_user_file(self.card, path, where=str(path))
        except UserDataError as exc:
            return self._reject(path, str(exc))
        try:
            codes = self._embed(user)
            copies = self._copies(user, digest)
        except BackboneError as exc:  # the interpreter refused these windows: they would be refused every time
            return self._reject(path, f"{path}: the backbone cannot embed its windows ({exc})")
        # The windows, their copies and the file's SHA-256 in one transaction: stored and recorded, or none.
        self.store.add_file_embeddings(digest, path.name, user.y, codes, cap=self.max_windows, copies=copies)
        made = f" and {copies.labels.size} augmented cop{'y' if copies.labels.size == 1 else 'ies'}" if copies else ""
        log.info("stored %d labelled window(s)%s from %s", len(user), made, path.name)
        return True

    def _copies(self, user: UserData, digest: str) -> Copies | None:
        """The file's augmented copies as stored codes (None: augmentation is off), drawn from the device's stream
        for this content: the same file always gets the same copies."""
        augment = self.options.augment
        if augment is None or self.backbone is None:
            return None
        from ..data.embedded_copies import embedded_copies

        rng = self.options.rng(int(digest[:16], 16))
        embeddings, labels = embedded_copies(user.x, user.y, augment, rng, self.options.channel_groups,
                                             self.backbone.embed)
        return Copies(self.codes.encode(embeddings), labels, np.repeat(np.arange(len(user)), augment.copies))

    def _embed(self, user: UserData) -> np.ndarray:
        """The file's rows as stored codes: embedded once (windows), or as they are (features)."""
        rows = user.x if self.backbone is None or self.card.kind == "features" else self.backbone.embed(user.x)
        return self.codes.encode(rows)

    def _done(self, path: Path) -> None:
        """A stored file leaves the directory: to processed/, or deleted."""
        try:
            if self.keep_files:
                self._move(path, PROCESSED)
            else:
                path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:  # stored already and recorded: it will not be counted again, only moved again
            self._say_stuck(path, exc)

    def _reject(self, path: Path, why: str) -> bool:
        log.warning("rejected %s, moved to %s/ with the reason in %s.why: %s", path.name, REJECTED, path.name, why)
        try:
            moved = self._move(path, REJECTED)
            moved.with_name(moved.name + ".why").write_text(why + "\n", encoding="utf-8")
        except FileNotFoundError:
            pass
        except OSError as exc:
            self._say_stuck(path, exc)
        return False

    def _move(self, path: Path, to: str) -> Path:
        target = self.directory / to / path.name
        target.parent.mkdir(exist_ok=True)
        os.replace(path, target)  # same file system: atomic, and a name seen before is replaced
        return target

    def _say_stuck(self, path: Path, exc: OSError) -> None:
        if path.name not in self._stuck:
            self._stuck.add(path.name)
            log.error("%s cannot be moved out of %s (%s); it is left there, untouched, until the agent restarts "
                      "(and is never counted twice)", path.name, self.directory, exc)

    # --- the data source --------------------------------------------------------------------------------------

    def client_data(self) -> ClientData | None:
        """Everything kept so far (after taking in the files that arrived), or None while it is too little."""
        self.take_new_files()
        return self.stored.client_data()

    def push(self, params: Mapping[str, np.ndarray]) -> object:
        return None

    def close(self) -> None:
        pass
