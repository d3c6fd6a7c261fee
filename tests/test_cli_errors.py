"""Every bad input a user can plausibly give: one line on stderr, exit code 2, no traceback, nothing half-written."""
import os
import subprocess
import sys

import numpy as np
import pytest

from minivq import backend
from minivq.cli import main
from minivq.io import TEMP_PREFIX

TINY = ["--num-hiddens", "8", "--residual-hiddens", "4", "--residual-layers", "1", "--embedding-dim", "4",
        "--num-embeddings", "16"]


def write_data(folder):
    """The inputs of every case below, and one good 2-step run (folder/run), written into ``folder``."""
    rng = np.random.default_rng(0)
    np.savez(folder / "gray.npz", x_train=rng.integers(0, 256, (40, 16, 16), dtype=np.uint8),
             x_test=rng.integers(0, 256, (8, 16, 16), dtype=np.uint8))
    np.savez(folder / "rgb.npz", x_train=rng.integers(0, 256, (40, 16, 16, 3), dtype=np.uint8),
             x_test=rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8))
    np.savez(folder / "odd.npz", x_train=rng.integers(0, 256, (40, 18, 18), dtype=np.uint8),
             x_test=rng.integers(0, 256, (8, 18, 18), dtype=np.uint8))
    (folder / "junk").mkdir()
    (folder / "junk" / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03garbage")
    (folder / "empty").mkdir()
    out = folder / "run"
    assert main(["train", "--data", str(folder / "gray.npz"), "--out", str(out), "--steps", "2", "--batch", "8",
                 "--plan-steps", "4", "--no-progress", *TINY]) == 0
    np.savez(folder / "foreign.npz", weights=np.zeros(3))
    (folder / "corrupt.npz").write_bytes((out / "checkpoint.npz").read_bytes()[:200])
    (folder / "a_file").write_text("x")
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("cli-data"))


def one_line_error(capsys, code, argv, expect):
    got = main(argv)
    err = capsys.readouterr().err
    assert got == code, err
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert expect in lines[0], lines[0]
    return lines[0]


def cases(d):
    """(name, argv, expected words) of each bad input, over the folder ``write_data`` made."""
    ckpt = str(d / "run" / "checkpoint.npz")
    train = ["train", "--no-progress", "--steps", "2", "--batch", "8", *TINY]
    yield "missing dataset", train + ["--data", str(d / "nope"), "--out", str(d / "o1")], "nope"
    yield "empty dataset folder", train + ["--data", str(d / "empty"), "--out", str(d / "o2")], "empty"
    yield "malformed dataset", train + ["--data", str(d / "junk"), "--out", str(d / "o3")], "junk"
    yield "image size the model cannot take", train + ["--data", str(d / "odd.npz"), "--out", str(d / "o4")], \
        "multiples of 4"
    yield "batch larger than the data", ["train", "--no-progress", "--steps", "2", "--batch", "4000", *TINY,
                                         "--data", str(d / "gray.npz"), "--out", str(d / "o5")], "larger than"
    yield "unwritable output folder", train + ["--data", str(d / "gray.npz"), "--out", str(d / "a_file" / "x")], \
        "not writable"
    yield "resume with no checkpoint", train + ["--data", str(d / "gray.npz"), "--out", str(d / "o6"), "--resume"], \
        "no checkpoint"
    yield "resume with another architecture", ["train", "--no-progress", "--steps", "4", "--resume",
                                               "--out", str(d / "run"), "--num-hiddens", "16"], "num_hiddens=8"
    yield "resume past the end of the learning-rate plan", ["train", "--no-progress", "--steps", "5", "--resume",
                                                            "--out", str(d / "run")], "--plan-steps 5"
    yield "a plan shorter than the run", train + ["--data", str(d / "gray.npz"), "--out", str(d / "o7"),
                                                  "--plan-steps", "1"], "shorter than --steps 2"
    yield "eval of a missing checkpoint", ["eval", str(d / "none.npz")], "no such file"
    yield "eval of another program's file", ["eval", str(d / "foreign.npz")], "not a minivq checkpoint"
    yield "eval of a truncated checkpoint", ["eval", ckpt.replace("run/checkpoint", "corrupt")], "corrupt"
    yield "eval on images of another channel count", ["eval", ckpt, "--data", str(d / "rgb.npz")], "3"
    yield "a prior checkpoint where a VQ-VAE is expected", ["train-prior", str(d / "foreign.npz")], "minivq"
    yield "sample from a VQ-VAE checkpoint", ["sample", ckpt, "--out", str(d / "s.png")], "expected 'minivq-prior'"
    yield "reconstruct into a missing folder", ["reconstruct", ckpt, "--out", str(d / "no" / "r.png")], \
        "does not exist"
    if not backend.cuda_available():
        yield "cuda where there is none", train + ["--data", str(d / "gray.npz"), "--out", str(d / "o7"),
                                                   "--device", "cuda"], "--device cpu"
    yield "unknown device", train + ["--data", str(d / "gray.npz"), "--out", str(d / "o8"), "--device", "tpu"], \
        "unknown device"
    yield "unknown kernel", train + ["--data", str(d / "gray.npz"), "--out", str(d / "o9"), "--kernel", "fast"], \
        "fast"


def test_each_bad_input_is_one_line_and_exit_2(data, capsys):
    for name, argv, expect in cases(data):
        try:
            one_line_error(capsys, 2, argv, expect)
        except AssertionError as exc:
            raise AssertionError(f"case '{name}': {exc}") from None


@pytest.mark.parametrize("argv", [["train", "--steps", "0"], ["train", "--batch", "-3"], ["train", "--lr", "nan"],
                                  ["train", "--seed", "x"], ["sample", "p.npz"], ["bogus"]])
def test_argument_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "Traceback" not in capsys.readouterr().err


def snapshot(folder):
    """{relative path: bytes} of every file under ``folder``."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_nothing_half_written_after_failures(tmp_path, capsys):
    """Every failing case, in a folder of its own: afterwards no temporary file is left, nothing that was
    there changed (the run folder a resume was refused on included), and no failed run wrote output."""
    d = write_data(tmp_path)
    files_before = snapshot(d)
    names = []
    for name, argv, _ in cases(d):
        assert main(argv) == 2, f"case '{name}': {capsys.readouterr().err}"
        names.append(name)
    capsys.readouterr()
    assert len(names) >= 15
    files_after = snapshot(d)
    assert [p for p in files_after if TEMP_PREFIX in p] == []
    assert [p for p in files_before if files_after.get(p) != files_before[p]] == []
    # a run that fails on its first batch may have opened its metrics log, but wrote nothing into it
    # (today: the image-size case leaves an empty o4/metrics.jsonl); no checkpoint, record or image
    assert {p: files_after[p] for p in set(files_after) - set(files_before) if files_after[p]} == {}


def test_python_dash_m_entry_point(data):
    proc = subprocess.run([sys.executable, "-m", "minivq", "eval", str(data / "foreign.npz")],
                          capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "not a minivq checkpoint" in proc.stderr
