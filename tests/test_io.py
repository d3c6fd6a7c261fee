"""Atomic .npz save/load, no pickle, clear errors on bad files."""
import os

import numpy as np
import pytest

import minivq as mv


def test_round_trip(tmp_path):
    state = {"a.weight": np.arange(6, dtype=np.float32).reshape(2, 3), "step": np.int64(7),
             "meta": np.array('{"x": 1}'), "t": mv.tensor(np.ones(2))}
    path = tmp_path / "ckpt.npz"
    mv.save(state, path)
    back = mv.load(path)
    assert set(back) == set(state)
    np.testing.assert_array_equal(back["a.weight"], state["a.weight"])
    assert back["a.weight"].dtype == np.float32
    assert back["step"] == 7 and str(back["meta"]) == '{"x": 1}'
    assert [p for p in os.listdir(tmp_path) if p.startswith(".minivq-tmp")] == []


def test_overwrite_is_atomic_when_writing_fails(tmp_path):
    path = tmp_path / "ckpt.npz"
    mv.save({"a": np.zeros(3)}, path)
    with pytest.raises(TypeError, match="object array"):
        mv.save({"a": np.ones(3), "bad": np.array([{}], dtype=object)}, path)
    np.testing.assert_array_equal(mv.load(path)["a"], np.zeros(3))   # old file intact
    assert sorted(os.listdir(tmp_path)) == ["ckpt.npz"]              # no temp file left


def test_missing_truncated_and_foreign_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        mv.load(tmp_path / "nope.npz")
    path = tmp_path / "ckpt.npz"
    mv.save({"a": np.arange(1000.0)}, path)
    data = path.read_bytes()
    for cut in (10, len(data) // 2, len(data) - 5):
        (tmp_path / "cut.npz").write_bytes(data[:cut])
        with pytest.raises(ValueError):
            mv.load(tmp_path / "cut.npz")
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(ValueError, match="not a readable minivq state file"):
        mv.load(tmp_path / "text.npz")
    np.save(tmp_path / "single.npy", np.zeros(2))
    with pytest.raises(ValueError, match="single array"):
        mv.load(tmp_path / "single.npy")


def test_pickled_payload_is_refused(tmp_path):
    path = tmp_path / "evil.npz"
    np.savez(path, a=np.array([{"x": 1}], dtype=object))
    with pytest.raises(ValueError):
        mv.load(path)


def test_save_into_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        mv.save({"a": np.zeros(1)}, tmp_path / "no" / "x.npz")


@pytest.mark.parametrize("copy", ["local", "central"])
def test_a_damaged_member_name_is_refused(tmp_path, copy):
    """The CRC covers a member's data, not its name: a name that differs between the local header and the
    central directory (one flipped bit) is refused, never loaded as another key."""
    path = tmp_path / "s.npz"
    mv.save({"optim.0.step": np.arange(3), "model.w": np.ones(2)}, path)
    blob = bytearray(path.read_bytes())
    name = b"optim.0.step.npy"
    at = blob.find(name) if copy == "local" else blob.rfind(name)
    assert at >= 0 and blob.find(name) != blob.rfind(name)          # two copies: local header, central directory
    blob[at] ^= 0x80                                                 # "o" -> "\xef"
    path.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="corrupt"):
        mv.load(path)
