"""Reliability, round 2 (issue 18): special output paths and planted links, compression bombs, divergence,
shared run folders, memory from plausible input, flags, and the one-line promise everywhere.

The promise under test: bad input -> one line on stderr and exit 2, nothing of the user's overwritten;
a non-finite value in training -> exit 3 naming the step and where, claiming only what is true."""
import bz2
import json
import lzma
import os
import socket
import stat
import subprocess
import sys
import tracemalloc
import zipfile

import numpy as np
import pytest

import minivq as mv
from minivq import functional as F
from minivq.checkpoint import read_checkpoint
from minivq.cli import main
from minivq.config import ModelConfig, PriorConfig, TrainConfig, cli_fields
from minivq.data import load_dataset
from minivq.io import TEMP_PREFIX, atomic_write, open_regular, remove_stale_temporaries
from minivq.runlog import LOCK, MetricsLog, RunFolder, check_output_folder

TINY = ["--num-hiddens", "8", "--residual-hiddens", "4", "--residual-layers", "1", "--embedding-dim", "4",
        "--num-embeddings", "16", "--kernel", "numpy", "--no-progress"]
PRIOR = ["--steps", "2", "--batch", "8", "--channels", "4", "--layers", "1", "--kernel-size", "3", "--no-progress"]


def _images(rng, n):
    return rng.integers(0, 256, (n, 16, 16), dtype=np.uint8)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny dataset with labels, a 2-step VQ-VAE run and a 2-step conditional prior on it."""
    d = tmp_path_factory.mktemp("world")
    rng = np.random.default_rng(0)
    np.savez(d / "gray.npz", x_train=_images(rng, 40), x_test=_images(rng, 8),
             y_train=rng.integers(0, 3, 40), y_test=rng.integers(0, 3, 8))
    assert main(["train", "--data", str(d / "gray.npz"), "--out", str(d / "run"), "--steps", "2", "--batch", "8",
                 *TINY]) == 0
    assert main(["train-prior", str(d / "run" / "checkpoint.npz"), *PRIOR, "--conditional"]) == 0
    return d


def one_line(capsys, code, argv, *expect):
    """Run ``minivq argv`` in this process: exit ``code``, exactly one line on stderr holding each of ``expect``."""
    got = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert got == code and len(lines) == 1 and "Traceback" not in err, (got, err)
    for words in expect:
        assert words in lines[0], lines[0]
    return lines[0]


def train_argv(data, out, steps=2, *extra):
    return ["train", "--data", str(data), "--out", str(out), "--steps", str(steps), "--batch", "8", *TINY, *extra]


# ---------------------------------------------------------------- 1. special output paths, planted links
def test_png_targets_that_are_fifos_links_or_folders_are_refused_and_left_alone(world, tmp_path, capsys):
    ckpt, prior = str(world / "run" / "checkpoint.npz"), str(world / "run" / "prior" / "checkpoint.npz")
    target = tmp_path / "target.txt"
    target.write_text("keep me")
    os.mkfifo(tmp_path / "fifo.png")
    os.symlink(target, tmp_path / "link.png")
    (tmp_path / "folder.png").mkdir()
    for name, kind in (("fifo.png", "FIFO"), ("link.png", "symbolic link"), ("folder.png", "folder")):
        out = str(tmp_path / name)
        one_line(capsys, 2, ["reconstruct", ckpt, "--out", out, "--n", "4"], out, kind)
        one_line(capsys, 2, ["sample", prior, "--class", "0", "--n", "2", "--out", out], out, kind)
        one_line(capsys, 2, ["plot", str(world / "run" / "metrics.jsonl"), "--out", out], out, kind)
    assert stat.S_ISFIFO(os.lstat(tmp_path / "fifo.png").st_mode)
    assert os.path.islink(tmp_path / "link.png") and target.read_text() == "keep me"
    assert [p for p in os.listdir(tmp_path) if p.startswith(TEMP_PREFIX)] == []


def test_atomic_write_and_the_log_never_write_through_links_or_into_fifos_or_sockets(tmp_path):
    target = tmp_path / "target.txt"
    target.write_text("keep me")
    os.symlink(target, tmp_path / "link")
    os.mkfifo(tmp_path / "fifo")
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(tmp_path / "sock"))
    for name in ("link", "fifo", "sock"):
        with pytest.raises(ValueError, match="not a regular file"):
            atomic_write(tmp_path / name, lambda f: f.write(b"x"))
        for mode in ("r", "w", "a"):        # O_NONBLOCK: a FIFO without a reader does not hang the test
            with pytest.raises(ValueError, match="not a regular file"):
                open_regular(str(tmp_path / name), mode)
        with pytest.raises(ValueError):
            MetricsLog(str(tmp_path / name))
        with pytest.raises(ValueError):
            MetricsLog(str(tmp_path / name), resume_step=3)
        with pytest.raises(ValueError):
            MetricsLog(str(tmp_path / name), append=True).write({"step": 1})
    assert target.read_text() == "keep me" and os.path.islink(tmp_path / "link")
    assert stat.S_ISSOCK(os.lstat(tmp_path / "sock").st_mode)
    server.close()


@pytest.mark.parametrize("planted", ["metrics.jsonl", "checkpoint.npz", "reconstructions.png", LOCK])
def test_a_link_planted_in_the_run_folder_is_refused_and_its_target_untouched(world, tmp_path, capsys, planted):
    target = tmp_path / "target.txt"
    target.write_text("keep me")
    out = tmp_path / "run"
    out.mkdir()
    os.symlink(target, out / planted)
    one_line(capsys, 2, train_argv(world / "gray.npz", out), planted, "symbolic link")
    assert target.read_text() == "keep me" and os.path.islink(out / planted)


def test_the_write_probe_never_follows_a_planted_link(tmp_path):
    target = tmp_path / "target.txt"
    target.write_text("keep me")
    out = tmp_path / "run"
    out.mkdir()
    for name in (".minivq-write-test", f"{TEMP_PREFIX}p{os.getpid()}-x.write-test"):
        os.symlink(target, out / name)
    check_output_folder(str(out))
    assert target.read_text() == "keep me"


def test_an_out_folder_that_is_a_fifo_or_a_link_to_a_file_is_refused(world, tmp_path, capsys):
    os.mkfifo(tmp_path / "fifo")
    one_line(capsys, 2, train_argv(world / "gray.npz", tmp_path / "fifo"), "fifo", "not a folder")
    (tmp_path / "file").write_text("x")
    os.symlink(tmp_path / "file", tmp_path / "link")
    one_line(capsys, 2, train_argv(world / "gray.npz", tmp_path / "link"), "link", "not a folder")
    assert (tmp_path / "file").read_text() == "x"


# ---------------------------------------------------------------- 2. compression bombs
def _zeros_member(path, method, size, key="x_test.npy"):
    """An honest .npz whose member is ``size`` zero bytes of uint8, compressed by ``method`` as it is written."""
    with zipfile.ZipFile(path, "w", compression=method) as zf, zf.open(key, "w") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": (size,)})
        block = bytes(1 << 20)
        for _ in range(size >> 20):
            f.write(block)
    return path


def _declare(path, size):
    """Make every member of the zip at ``path`` declare ``size`` inflated bytes (local and central headers)."""
    blob = bytearray(path.read_bytes())
    for magic, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        at = blob.find(magic)
        while at >= 0:
            blob[at + offset:at + offset + 4] = size.to_bytes(4, "little")
            at = blob.find(magic, at + 4)
    path.write_bytes(bytes(blob))


BOMB_METHODS = [zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA, zipfile.ZIP_DEFLATED]


@pytest.mark.parametrize("method", BOMB_METHODS)
def test_a_bomb_that_declares_its_size_is_refused_by_its_ratio(tmp_path, method):
    path = _zeros_member(tmp_path / "bomb.npz", method, 16 << 20)
    if method == zipfile.ZIP_DEFLATED:          # deflate cannot go past 1032:1: make it declare more than it holds
        _declare(path, 2 << 30)
    for read in (mv.load, lambda p: load_dataset(p, "test")):
        with pytest.raises(ValueError, match="claims .* bytes from|past the end"):
            read(path)


@pytest.mark.parametrize("method", BOMB_METHODS)
def test_a_bomb_that_lies_about_its_size_is_cut_off_at_the_size_it_declares(tmp_path, method):
    """The headers declare 64 KiB (a plausible ratio); the stream inflates to 16 MiB: the reader stops
    past 64 KiB, and its memory stays far below what the stream would give."""
    path = _zeros_member(tmp_path / "bomb.npz", method, 16 << 20)
    _declare(path, 64 << 10)
    for read in (mv.load, lambda p: load_dataset(p, "test")):
        tracemalloc.start()
        try:
            with pytest.raises(ValueError, match="more than the 65536 bytes it declares"):
                read(path)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 12 << 20, peak


@pytest.mark.parametrize("method", [zipfile.ZIP_STORED, *BOMB_METHODS])
def test_every_method_still_reads_honest_files(tmp_path, method):
    rng = np.random.default_rng(1)
    arrays = {"x_train": _images(rng, 6), "x_test": _images(rng, 4), "model.w": rng.standard_normal((3, 5))}
    path = tmp_path / "honest.npz"
    with zipfile.ZipFile(path, "w", compression=method) as zf:
        for key, value in arrays.items():
            with zf.open(key + ".npy", "w") as f:
                np.lib.format.write_array(f, value)
    back = mv.load(path)
    for key, value in arrays.items():
        np.testing.assert_array_equal(back[key], value)
    np.testing.assert_array_equal(load_dataset(path, "test").images[:, 0], arrays["x_test"])


def test_bombs_in_a_dataset_or_a_checkpoint_exit_2_through_the_cli(world, tmp_path, capsys):
    bomb = _zeros_member(tmp_path / "bomb.npz", zipfile.ZIP_BZIP2, 16 << 20)
    one_line(capsys, 2, ["eval", str(world / "run" / "checkpoint.npz"), "--data", str(bomb)], "bomb.npz", "1100:1")
    ckpt = tmp_path / "checkpoint.npz"
    ckpt.write_bytes((world / "run" / "checkpoint.npz").read_bytes())
    with zipfile.ZipFile(ckpt, "a", compression=zipfile.ZIP_LZMA) as zf, zf.open("extra.npy", "w") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": (16 << 20,)})
        for _ in range(16):
            f.write(bytes(1 << 20))
    one_line(capsys, 2, ["eval", str(ckpt)], "extra.npy", "compression bomb")


# ---------------------------------------------------------------- 4. divergence
def test_a_huge_learning_rate_exits_3_naming_the_step_and_where(world, tmp_path, capsys):
    out = tmp_path / "run"
    line = one_line(capsys, 3, train_argv(world / "gray.npz", out, 6, "--lr", "1e6", "--checkpoint-every", "50"),
                    "step ", "non-finite", "no checkpoint was written")
    assert "kept" not in line and not (out / "checkpoint.npz").exists()


def test_non_finite_quantiser_input_is_skipped_and_counted_under_skip_nonfinite(world, tmp_path, capsys,
                                                                                monkeypatch):
    from minivq.kernels import NonFiniteError
    import minivq.kernels as kernels
    real, calls = kernels.nearest_code, {"n": 0}

    def flaky(x, codebook, *args, **kwargs):     # the quantiser's input check fires on step 2's forward pass
        calls["n"] += 1                         # (call 1 is the forward that centres the output, before step 1)
        if calls["n"] == 3:
            raise NonFiniteError("x (128, 4) contains NaN or inf: first at row 0, column 0 (nan)")
        return real(x, codebook, *args, **kwargs)

    for module in (kernels, __import__("minivq.functional.quantize", fromlist=["x"])):
        if hasattr(module, "nearest_code"):
            monkeypatch.setattr(module, "nearest_code", flaky)
    one_line(capsys, 3, train_argv(world / "gray.npz", tmp_path / "a", 4), "step 2", "quantiser's input",
             "no checkpoint was written")
    calls["n"] = 0
    assert main(train_argv(world / "gray.npz", tmp_path / "b", 4, "--skip-nonfinite", "--log-every", "1")) == 0
    log = [json.loads(line) for line in open(tmp_path / "b" / "metrics.jsonl")]
    assert [r["skipped_nonfinite"] for r in log if r["split"] == "train"] == [0, 1, 1, 1]


def test_non_finite_gradients_with_a_finite_loss_are_a_divergence(world, tmp_path, capsys, monkeypatch):
    real, calls = F.mse_loss, {"n": 0}

    def sharp(a, b):        # d/dz sqrt(z) at z = 0 is infinite: a finite loss with a NaN gradient, at step 3
        out = real(a, b)
        calls["n"] += 1
        if calls["n"] == 3 and mv.is_grad_enabled():
            out = out + F.sum((a - a) ** 0.5)
        return out

    monkeypatch.setattr(F, "mse_loss", sharp)
    one_line(capsys, 3, train_argv(world / "gray.npz", tmp_path, 4, "--checkpoint-every", "2"),
             "step 3", "gradients", "the checkpoint of step 2 is kept")


def test_constant_images_are_bad_data_before_any_training(tmp_path, capsys):
    np.savez(tmp_path / "flat.npz", x_train=np.full((40, 16, 16), 7, np.uint8), x_test=np.full((8, 16, 16), 7, np.uint8))
    for extra in ([], ["--skip-nonfinite"]):
        out = tmp_path / f"run{len(extra)}"
        one_line(capsys, 2, train_argv(tmp_path / "flat.npz", out, 3, *extra), "pixel variance 0")
        assert not (out / "checkpoint.npz").exists()


# ---------------------------------------------------------------- 5. one run per folder
def test_a_second_run_on_a_held_folder_is_refused_naming_the_holder(world, tmp_path, capsys):
    with RunFolder(str(tmp_path / "run")):
        one_line(capsys, 2, train_argv(world / "gray.npz", tmp_path / "run"), "in use", f"pid {os.getpid()}")
        assert not (tmp_path / "run" / "checkpoint.npz").exists()
    assert main(train_argv(world / "gray.npz", tmp_path / "run")) == 0
    assert sorted(os.listdir(tmp_path / "run")) == ["checkpoint.npz", "metrics.jsonl", "reconstructions.png"]


def test_the_lock_holds_across_processes(world, tmp_path, capsys):
    code = ("import sys, time; from minivq.runlog import RunFolder; f = RunFolder(sys.argv[1]); "
            "print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "run")], stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    try:
        assert holder.stdout.readline().strip() == "held"
        one_line(capsys, 2, train_argv(world / "gray.npz", tmp_path / "run"), f"pid {holder.pid}")
    finally:
        holder.kill()
        holder.wait()
    assert main(train_argv(world / "gray.npz", tmp_path / "run")) == 0    # the lock died with its holder


def test_cleanup_removes_only_temporaries_no_live_process_owns(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    names = {"live": f"{TEMP_PREFIX}p{os.getpid()}-abc.npz", "dead": f"{TEMP_PREFIX}p{dead.stdout.strip()}-abc.npz",
             "legacy": f"{TEMP_PREFIX}abc123.npz", "other": "keep.npz"}
    for name in names.values():
        (tmp_path / name).write_bytes(b"x")
    assert remove_stale_temporaries(str(tmp_path)) == 2
    assert sorted(os.listdir(tmp_path)) == sorted([names["live"], names["other"]])


def test_a_finished_run_is_kept_unless_resume_or_overwrite(world, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_argv(world / "gray.npz", out, 2, "--plan-steps", "4")) == 0
    before = (out / "checkpoint.npz").read_bytes()
    capsys.readouterr()
    one_line(capsys, 2, train_argv(world / "gray.npz", out), "already holds a run", "--overwrite")
    one_line(capsys, 2, train_argv(world / "gray.npz", out, 4, "--resume", "--overwrite"), "give one of them")
    assert (out / "checkpoint.npz").read_bytes() == before
    assert main(train_argv(world / "gray.npz", out, 4, "--resume")) == 0
    assert main(train_argv(world / "gray.npz", out, 3, "--overwrite", "--log-every", "1")) == 0
    meta, _ = read_checkpoint(str(out / "checkpoint.npz"), "minivq-vqvae")
    log = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert meta["step"] == 3 and [r["step"] for r in log if r["split"] == "train"] == [1, 2, 3]
    capsys.readouterr()
    prior = ["train-prior", str(out / "checkpoint.npz"), *PRIOR]
    assert main(prior) == 0
    capsys.readouterr()
    one_line(capsys, 2, prior, "already holds a run")
    assert main(prior + ["--overwrite"]) == 0


# ---------------------------------------------------------------- 6. memory
@pytest.mark.parametrize("n", ["5000", "3000000", "1000000000"])
def test_an_absurd_sample_count_is_refused_up_front(world, tmp_path, capsys, n):
    prior = str(world / "run" / "prior" / "checkpoint.npz")
    one_line(capsys, 2, ["sample", prior, "--class", "0", "--n", n, "--out", str(tmp_path / "s.png")], "--n", "4096")


def test_samples_are_drawn_in_chunks(world, tmp_path, monkeypatch):
    from minivq import prior as prior_module
    monkeypatch.setattr(prior_module, "SAMPLE_CHUNK", 3)
    images = prior_module.sample_images(str(world / "run" / "prior" / "checkpoint.npz"), n=7, label=1)
    assert images.shape == (7, 1, 16, 16) and np.isfinite(images).all()


def test_conditional_labels_out_of_range_are_refused_when_the_data_loads(tmp_path, capsys):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "wild.npz", x_train=_images(rng, 40), x_test=_images(rng, 8),
             y_train=rng.integers(0, 10 ** 9, 40), y_test=rng.integers(0, 3, 8))
    assert main(train_argv(tmp_path / "wild.npz", tmp_path / "run")) == 0
    capsys.readouterr()
    ckpt = str(tmp_path / "run" / "checkpoint.npz")
    one_line(capsys, 2, ["train-prior", ckpt, *PRIOR, "--conditional"], "labels", "0..999")
    assert main(["train-prior", ckpt, *PRIOR]) == 0      # the unconditional prior does not need them


def test_memory_error_anywhere_is_one_line_and_exit_2(world, tmp_path, capsys, monkeypatch):
    import minivq.train as train_module

    def exhausted(*args, **kwargs):
        raise MemoryError("Unable to allocate 2.30 TiB for an array with shape (200000, 200000, 4, 4)")

    monkeypatch.setattr(train_module, "load_dataset", exhausted)
    one_line(capsys, 2, train_argv(world / "gray.npz", tmp_path / "run"), "out of memory", "2.30 TiB")


# ---------------------------------------------------------------- 7. flags
def _numeric_flags():
    for cls in (TrainConfig, ModelConfig, PriorConfig):
        command = "train-prior" if cls is PriorConfig else "train"
        for f in cli_fields(cls):
            if f.type in (int, float):
                yield command, f.metadata["flag"], f.type


@pytest.mark.parametrize("command, flag, kind", sorted(set(_numeric_flags())))
def test_every_numeric_flag_is_checked_finite_and_in_range(command, flag, kind, capsys):
    bad = ["nan", "inf", "-inf", "-1"] if kind is float else ["-1", str(2 ** 64), "1.5", "nan"]
    for value in bad:
        with pytest.raises(SystemExit) as info:
            main([command, *(["x.npz"] if command == "train-prior" else []), flag, value])
        err = capsys.readouterr().err
        assert info.value.code == 2 and flag in err and len(err.strip().splitlines()) == 2, (value, err)


@pytest.mark.parametrize("argv", [["--temperature", "nan"], ["--temperature", "inf"], ["--n", "0"], ["--seed", "-2"]])
def test_sample_flags_are_checked(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(["sample", "p.npz", "--out", "s.png", *argv])
    assert info.value.code == 2 and argv[0] in capsys.readouterr().err


def test_resume_refuses_a_changed_setting_and_a_step_count_it_has_passed(world, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_argv(world / "gray.npz", out, 2, "--plan-steps", "4")) == 0
    capsys.readouterr()
    for flag, value in (("--lr", "0.01"), ("--batch", "4"), ("--seed", "3"), ("--dtype", "float64"),
                        ("--lr-anneal", "0")):
        one_line(capsys, 2, ["train", "--out", str(out), "--steps", "4", "--resume", flag, value, "--no-progress"],
                 "--resume", flag, value)
    for steps in ("1", "2"):
        one_line(capsys, 2, ["train", "--out", str(out), "--steps", steps, "--resume", "--no-progress"],
                 "at step 2", "--steps")
    # the same values as the checkpoint's are honoured, not refused
    assert main(["train", "--out", str(out), "--steps", "3", "--resume", "--lr", "0.001", "--batch", "8",
                 "--seed", "0", "--dtype", "float32", "--no-progress"]) == 0
    meta, _ = read_checkpoint(str(out / "checkpoint.npz"), "minivq-vqvae")
    assert meta["step"] == 3 and meta["train"]["lr"] == 0.001


# ---------------------------------------------------------------- 8. one line, everywhere
def test_argparse_errors_are_a_usage_line_and_an_error_line(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--steps", "x"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(lines) == 2
    assert lines[0].startswith("usage: minivq train") and "--steps" in lines[1]


def test_minivq_debug_0_does_not_show_tracebacks(monkeypatch, capsys, tmp_path):
    for value in ("0", "false", "no", ""):
        monkeypatch.setenv("MINIVQ_DEBUG", value)
        one_line(capsys, 2, ["eval", str(tmp_path / "none.npz")], "no such file")
    monkeypatch.setenv("MINIVQ_DEBUG", "yes")
    with pytest.raises(FileNotFoundError):
        main(["eval", str(tmp_path / "none.npz")])


def test_ctrl_c_while_loading_is_one_line_and_exit_130(world, tmp_path, capsys, monkeypatch):
    import minivq.train as train_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "load_dataset", interrupted)
    assert one_line(capsys, 130, train_argv(world / "gray.npz", tmp_path / "run")) == "minivq train: interrupted"


def test_ctrl_c_while_importing_is_one_line_and_exit_130(monkeypatch, capsys):
    import importlib.abc
    import minivq.__main__ as entry_point

    class Interrupt(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "minivq.cli":
                raise KeyboardInterrupt
            return None

    monkeypatch.delitem(sys.modules, "minivq.cli")
    monkeypatch.setattr(sys, "meta_path", [Interrupt(), *sys.meta_path])
    monkeypatch.setattr(sys, "argv", ["minivq", "train", "--steps", "3"])
    assert entry_point.entry() == 130
    assert capsys.readouterr().err == "minivq train: interrupted\n"


def test_no_runtime_warning_reaches_stderr(world, tmp_path):
    """Constant data, a huge learning rate, a tiny temperature: each one line, even with every warning shown."""
    flat = tmp_path / "flat.npz"
    np.savez(flat, x_train=np.full((40, 16, 16), 7, np.uint8), x_test=np.full((8, 16, 16), 7, np.uint8))
    prior = str(world / "run" / "prior" / "checkpoint.npz")
    cases = [(train_argv(flat, tmp_path / "a"), 2), (train_argv(world / "gray.npz", tmp_path / "b", 6, "--lr", "1e6"), 3),
             (["sample", prior, "--class", "0", "--n", "2", "--temperature", "1e-320", "--out", str(tmp_path / "s.png")], 2)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), PYTHONWARNINGS="always")
    for argv, code in cases:
        proc = subprocess.run([sys.executable, "-m", "minivq", *argv], capture_output=True, text=True, env=env,
                              timeout=300)
        assert proc.returncode == code and proc.stderr.count("\n") == 1, (argv, proc.stderr)
        assert "Warning" not in proc.stderr, proc.stderr


def test_a_relative_data_path_is_stored_resolved(world, tmp_path, capsys, monkeypatch):
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "d.npz").write_bytes((world / "gray.npz").read_bytes())
    monkeypatch.chdir(tmp_path / "work")
    assert main(train_argv("d.npz", "run")) == 0
    meta, _ = read_checkpoint("run/checkpoint.npz", "minivq-vqvae")
    assert meta["train"]["data"] == str(tmp_path / "work" / "d.npz")
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["eval", "work/run/checkpoint.npz"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 8
