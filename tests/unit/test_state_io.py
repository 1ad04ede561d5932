import numpy as np
import pytest

from edge_agent.state_io import StateError, load_head_state, save_head_state


def test_round_trip_keeps_values_and_metadata(tmp_path) -> None:  # type: ignore[no-untyped-def]
    params = {"classifier.w": np.arange(6, dtype=np.float32).reshape(2, 3), "classifier.b": np.ones(3, np.float32)}
    save_head_state(tmp_path / "head.npz", params, {"round": 4, "strategy": "ditto"})
    got, meta = load_head_state(tmp_path / "head.npz")
    assert meta["round"] == 4 and meta["strategy"] == "ditto"
    for k in params:
        np.testing.assert_array_equal(got[k], params[k])
    assert [p.name for p in tmp_path.iterdir()] == ["head.npz"]  # no temp file left behind


def test_overwrite_is_all_or_nothing_when_the_writer_fails(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "head.npz"
    save_head_state(path, {"a": np.zeros(2, np.float32)}, {"round": 1})
    import edge_agent.state_io as sio

    def boom(*_a, **_k):  # the disk fills up mid-write: a fault we cannot cause for real here
        raise OSError("No space left on device")

    monkeypatch.setattr(sio.np, "savez", boom)
    with pytest.raises(OSError):
        save_head_state(path, {"a": np.ones(2, np.float32)}, {"round": 2})
    got, meta = load_head_state(path)
    assert meta["round"] == 1 and got["a"].tolist() == [0, 0]
    assert [p.name for p in tmp_path.iterdir()] == ["head.npz"]


def test_missing_damaged_and_foreign_files_raise_state_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(StateError, match="not found"):
        load_head_state(tmp_path / "nope.npz")
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(StateError, match="not a readable"):
        load_head_state(tmp_path / "junk.npz")
    np.savez(tmp_path / "plain.npz", a=np.zeros(1))
    with pytest.raises(StateError, match="no metadata"):
        load_head_state(tmp_path / "plain.npz")


def test_pickled_object_arrays_are_not_loaded(tmp_path) -> None:  # type: ignore[no-untyped-def]
    np.savez(tmp_path / "evil.npz", __meta__=np.array([{"x": 1}], dtype=object))
    with pytest.raises(StateError):
        load_head_state(tmp_path / "evil.npz")
