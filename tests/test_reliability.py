"""Crash safety and hostile files: SIGKILL at random moments never leaves a corrupt checkpoint, and
resuming after each kill gives the run an uninterrupted one would have had; checkpoint readers meet
random, truncated and bit-flipped bytes with a ValueError only."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import minivq as mv
from minivq.checkpoint import read_checkpoint

TINY = ["--num-hiddens", "8", "--residual-hiddens", "4", "--residual-layers", "1", "--embedding-dim", "4",
        "--num-embeddings", "16", "--kernel", "numpy"]


def _data(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "d.npz"
    np.savez(path, x_train=rng.integers(0, 256, (64, 16, 16), dtype=np.uint8),
             x_test=rng.integers(0, 256, (8, 16, 16), dtype=np.uint8))
    return str(path)


def _argv(data, out, steps):
    return [sys.executable, "-m", "minivq", "train", "--data", data, "--out", str(out), "--steps", str(steps),
            "--batch", "8", "--log-every", "1", "--checkpoint-every", "1", "--eval-every", "1000",
            "--no-progress", *TINY]


def _env():
    return dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))


def _losses(folder):
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return [(r["step"], r["loss"]) for r in map(json.loads, f) if r["split"] == "train"]


def _logged_steps(folder):
    try:
        with open(os.path.join(folder, "metrics.jsonl")) as f:
            return sum(1 for _ in f)
    except OSError:
        return 0


def test_sigkill_at_random_moments_then_resume(tmp_path):
    data, steps = _data(tmp_path), 200
    full = tmp_path / "full"
    subprocess.run(_argv(data, full, steps), check=True, env=_env(), capture_output=True, timeout=300)
    out = tmp_path / "killed"
    rng = np.random.default_rng(7)
    kills = 0
    for attempt in range(6):
        resume = ["--resume"] if (out / "checkpoint.npz").exists() else []
        done = _logged_steps(out)
        target = done + int(rng.integers(5, 30))          # kill somewhere after this many more steps
        proc = subprocess.Popen(_argv(data, out, steps) + resume, env=_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while proc.poll() is None and _logged_steps(out) < target and time.time() < deadline:
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.05))                  # a random moment: mid-step, mid-write
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        if (out / "checkpoint.npz").exists():
            meta, sections = read_checkpoint(str(out / "checkpoint.npz"), "minivq-vqvae")   # never corrupt
            assert 1 <= meta["step"] <= steps and sections["model"]
    assert kills >= 4
    resume = ["--resume"] if (out / "checkpoint.npz").exists() else []
    subprocess.run(_argv(data, out, steps) + resume, check=True, env=_env(), capture_output=True, timeout=300)
    assert _losses(out) == _losses(full)
    # a kill may leave a temporary file behind (never a half-written checkpoint); the next run clears it
    assert sorted(os.listdir(out)) == ["checkpoint.npz", "metrics.jsonl", "reconstructions.png"]


def test_checkpoint_reader_meets_damaged_bytes_with_value_error_only(tmp_path):
    """300 damaged copies of a real checkpoint: random bytes and truncations are all refused with a
    ValueError; a bit flip is refused, or (where it hit bytes nothing reads, such as a zip timestamp)
    loads exactly the original. Any other exception fails the test."""
    data, run = _data(tmp_path), tmp_path / "run"
    subprocess.run(_argv(data, run, 1), check=True, env=_env(), capture_output=True, timeout=300)
    path = run / "checkpoint.npz"
    good = path.read_bytes()
    meta, sections = read_checkpoint(str(path), "minivq-vqvae")           # the undamaged file loads
    assert meta["step"] == 1 and sections["model"] and sections["optim"]

    def same_as_the_original(got_meta, got_sections):
        assert got_meta == meta
        assert {k: sorted(v) for k, v in got_sections.items()} == {k: sorted(v) for k, v in sections.items()}
        for prefix, arrays in sections.items():
            for name, value in arrays.items():
                np.testing.assert_array_equal(got_sections[prefix][name], value, err_msg=f"{prefix}.{name}")

    rng = np.random.default_rng(0)
    bad = tmp_path / "bad.npz"
    rejected = {"random bytes": 0, "truncated": 0, "bit-flipped": 0}
    for case in range(300):
        kind = list(rejected)[case % 3]
        if kind == "random bytes":
            blob = rng.integers(0, 256, int(rng.integers(0, 2000)), dtype=np.uint8).tobytes()
        elif kind == "truncated":
            blob = good[:int(rng.integers(0, len(good)))]
        else:
            arr = bytearray(good)
            for _ in range(int(rng.integers(1, 8))):
                arr[int(rng.integers(0, len(arr)))] ^= 1 << int(rng.integers(0, 8))
            blob = bytes(arr)
        assert blob != good
        bad.write_bytes(blob)
        try:
            loaded = read_checkpoint(str(bad), "minivq-vqvae")
        except ValueError:
            rejected[kind] += 1
            continue
        # loaded: only a harmless flip may get here, and it must give back the original content
        assert kind == "bit-flipped", f"case {case}: a {kind} file was accepted"
        same_as_the_original(*loaded)
    assert rejected["random bytes"] == 100 and rejected["truncated"] == 100, rejected
    assert rejected["bit-flipped"] >= 90, rejected


def test_foreign_meta_is_refused(tmp_path):
    path = tmp_path / "x.npz"
    mv.save({"meta": np.array("[1, 2]")}, path)
    with pytest.raises(ValueError, match="damaged"):
        read_checkpoint(str(path), "minivq-vqvae")
    mv.save({"meta": np.array('{"format": "minivq-prior"}')}, path)
    with pytest.raises(ValueError, match="expected 'minivq-vqvae'"):
        read_checkpoint(str(path), "minivq-vqvae")
