"""Data-parallel training under mpiexec: the same parameters as one process with the same global batch,
resume with another number of ranks, one-line errors for bad launches, and a job that ends (checkpoint
intact) when a rank fails or is killed mid-run.

The mpiexec tests need mpi4py and an mpiexec (`pip install -e .[mpi]` brings both); they are skipped,
naming that fix, where either is missing.
"""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from minivq import distributed
from minivq.cli import main
from minivq.checkpoint import read_checkpoint

from conftest import write_blobs

TINY = ["--num-hiddens", "8", "--residual-hiddens", "4", "--residual-layers", "1", "--embedding-dim", "4",
        "--num-embeddings", "32", "--kernel", "numpy"]
LAUNCH_VARIABLES = ("PMI_SIZE", "PMI_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE",
                    "MV2_COMM_WORLD_RANK", "PMIX_RANK", "MINIVQ_DISTRIBUTED")


def _mpiexec():
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")   # the mpich wheel's, in this environment
    return beside if os.access(beside, os.X_OK) else shutil.which("mpiexec")


MPIEXEC = _mpiexec()
HAVE_MPI4PY = importlib.util.find_spec("mpi4py") is not None
needs_mpi = pytest.mark.skipif(not (MPIEXEC and HAVE_MPI4PY),
                               reason="needs mpi4py and mpiexec: pip install -e .[mpi]")


def _launcher_flags():
    """Open MPI's mpiexec wants leave to oversubscribe this small machine (and to run as root)."""
    if not MPIEXEC:
        return []
    version = subprocess.run([MPIEXEC, "--version"], capture_output=True, text=True).stdout
    if "Open MPI" in version or "OpenRTE" in version:
        return ["--oversubscribe"] + (["--allow-run-as-root"] if os.geteuid() == 0 else [])
    return []


FLAGS = _launcher_flags()


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
    env.update(PYTHONPATH=os.pathsep.join(sys.path), OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", **extra)
    return env


def mpirun(n, argv, program=None, timeout=90, **env):
    """``mpiexec -n n python -m minivq argv`` (or ``python program argv``)."""
    cmd = [MPIEXEC, *FLAGS, "-n", str(n), sys.executable, *([program] if program else ["-m", "minivq"]), *argv]
    return subprocess.run(cmd, env=_env(**env), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def blobs(tmp_path_factory):
    return write_blobs(tmp_path_factory.mktemp("dp-data") / "blobs.npz", 96, 40, labels=False)


def _train_args(data, out, steps, *extra):
    return ["train", "--data", data, "--out", str(out), "--steps", str(steps), "--batch", "16", "--log-every", "1",
            "--eval-every", "2", "--checkpoint-every", "3", "--no-progress", "--dtype", "float64", *TINY, *extra]


def _log(folder):
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def assert_same_run(a, b, tol=1e-10):
    """Two run folders hold the same parameters, optimiser state and codebook (within tol), RNG state and step."""
    meta_a, sections_a = read_checkpoint(str(a / "checkpoint.npz"), "minivq-vqvae")
    meta_b, sections_b = read_checkpoint(str(b / "checkpoint.npz"), "minivq-vqvae")
    assert meta_a["step"] == meta_b["step"]
    assert meta_a["rng_state"] == meta_b["rng_state"]     # rank 0 drew exactly what one process drew
    for part in ("model", "optim"):
        assert sections_a[part].keys() == sections_b[part].keys()
        for key, value in sections_a[part].items():
            other = sections_b[part][key]
            assert value.dtype == other.dtype, key
            np.testing.assert_allclose(other, value, rtol=0, atol=tol, err_msg=f"{part}.{key}")
    assert sections_a["model"]["vq.codebook"].dtype == np.float64


# ---------------------------------------------------------------- without MPI
def test_launch_is_recognised_from_the_environment(monkeypatch):
    for name in LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert distributed.launched() == (False, None)
    assert isinstance(distributed.from_environment(), distributed.SingleProcess)
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "4")
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "3")
    assert distributed.launched() == (True, 4) and distributed.env_rank() == 3
    monkeypatch.setenv("MINIVQ_DISTRIBUTED", "0")
    assert distributed.launched() == (False, None)
    monkeypatch.setenv("MINIVQ_DISTRIBUTED", "1")
    monkeypatch.delenv("OMPI_COMM_WORLD_SIZE")
    assert distributed.launched() == (True, None)


@pytest.mark.parametrize("rank", [0, 1])
def test_missing_mpi4py_is_one_line_naming_the_fix(blobs, tmp_path, monkeypatch, capsys, rank):
    monkeypatch.setitem(sys.modules, "mpi4py", None)       # import mpi4py now raises ImportError
    monkeypatch.setenv("PMI_SIZE", "2")
    monkeypatch.setenv("PMI_RANK", str(rank))
    assert main(_train_args(blobs, tmp_path, 2)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    if rank == 0:
        assert len(err) == 1 and "mpi4py" in err[0] and "pip install -e .[mpi]" in err[0], err
    else:
        assert err == []        # rank 0 says it, once for the job
    assert not os.path.exists(tmp_path / "checkpoint.npz")


def test_float64_training_and_resume_keep_the_dtype(blobs, tmp_path):
    assert main(_train_args(blobs, tmp_path, 3, "--plan-steps", "4")) == 0
    meta, sections = read_checkpoint(str(tmp_path / "checkpoint.npz"), "minivq-vqvae")
    assert meta["train"]["dtype"] == "float64"
    assert all(v.dtype == np.float64 for k, v in sections["model"].items() if v.dtype.kind == "f")
    assert main(_train_args(blobs, tmp_path, 4, "--resume")) == 0
    _, sections = read_checkpoint(str(tmp_path / "checkpoint.npz"), "minivq-vqvae")
    assert sections["model"]["encoder.conv_1.weight"].dtype == np.float64


def test_single_process_communicator_changes_nothing():
    comm = distributed.SingleProcess()
    a = np.arange(6.0)
    assert comm.allreduce_sum(a) is a and comm.bcast(a) is a and comm.allgather(a) is a
    with pytest.raises(FileNotFoundError):      # one process: errors pass through as they are
        with distributed.agreement(comm):
            raise FileNotFoundError("x")


# ---------------------------------------------------------------- two ranks against one process
DEAD = ["--dead-code-threshold", "4", "--max-replacements", "4"]      # high enough to re-seed after k-means too
CASES = {"paper": ["--paper-quantizer"], "ema": ["--paper-quantizer", "--ema"],
         "paper-dead-kmeans": ["--paper-quantizer", *DEAD, "--kmeans-init"],
         "ema-dead-kmeans": ["--paper-quantizer", "--ema", *DEAD, "--kmeans-init"],
         # minivq's default quantiser: the EMA codebook, searched by cosine in 8 dimensions, dead codes re-seeded
         "default": [], "default-kmeans": ["--kmeans-init"]}


@needs_mpi
@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_equal_one_process(blobs, tmp_path, case):
    extra = CASES[case]
    assert main(_train_args(blobs, tmp_path / "one", 4, *extra)) == 0
    proc = mpirun(2, _train_args(blobs, tmp_path / "two", 4, *extra))
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.strip().splitlines()) == 1          # the final metrics, from rank 0 only
    assert [line for line in proc.stderr.splitlines() if line] == [
        f"wrote {tmp_path / 'two' / 'checkpoint.npz'}, metrics.jsonl and reconstructions.png in {tmp_path / 'two'}"]
    assert_same_run(tmp_path / "one", tmp_path / "two")
    one, two = _log(tmp_path / "one"), _log(tmp_path / "two")
    assert [(r["step"], r["split"]) for r in one] == [(r["step"], r["split"]) for r in two]
    for a, b in zip(one, two):      # metrics combined over the ranks are the global batch's
        for key in ("loss", "nmse", "vq_loss", "recon_error", "perplexity", "mse"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-9, abs=1e-12), (a["step"], key)
        assert a.get("codes_used") == b.get("codes_used")
        assert a.get("codes_replaced") == b.get("codes_replaced")
    assert all("comm_seconds" in r for r in two if r["split"] == "train")
    meta, _ = read_checkpoint(str(tmp_path / "two" / "checkpoint.npz"), "minivq-vqvae")
    if case.startswith("default"):      # the case must exercise what it names
        assert (meta["model"]["decay"], meta["model"]["lookup"], meta["model"]["lookup_dim"]) == (0.99, "cosine", 8)
    if case.startswith("default") or "--dead-code-threshold" in extra:
        replaced = [r["codes_replaced"] for r in one if r["split"] == "train"]
        assert sum(replaced) > 0
        if "--max-replacements" in extra:
            assert max(replaced) == 4, replaced          # the cap was reached, and held
    else:
        assert meta["model"]["dead_code_threshold"] == 0 and meta["model"]["lookup_dim"] is None


@needs_mpi
@pytest.mark.parametrize("extra", [[], ["--paper-quantizer", "--ema", *DEAD]], ids=["default", "ema-dead"])
def test_resume_with_another_number_of_ranks(blobs, tmp_path, extra):
    assert main(_train_args(blobs, tmp_path / "one", 6, *extra)) == 0
    # two ranks for 3 steps, then one process to 6
    assert mpirun(2, _train_args(blobs, tmp_path / "two-one", 3, "--plan-steps", "6", *extra)).returncode == 0
    assert main(_train_args(blobs, tmp_path / "two-one", 6, "--resume")) == 0
    assert_same_run(tmp_path / "one", tmp_path / "two-one")
    # one process for 3 steps, then two ranks to 6
    assert main(_train_args(blobs, tmp_path / "one-two", 3, "--plan-steps", "6", *extra)) == 0
    proc = mpirun(2, _train_args(blobs, tmp_path / "one-two", 6, "--resume"))
    assert proc.returncode == 0, proc.stderr
    assert_same_run(tmp_path / "one", tmp_path / "one-two")
    steps = [r["step"] for r in _log(tmp_path / "one-two") if r["split"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]


# ---------------------------------------------------------------- bad launches
def _one_error_line(proc):
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("minivq ") and "Traceback" not in proc.stderr
    return lines[0]


@needs_mpi
def test_global_batch_not_divisible_is_one_line(blobs, tmp_path):
    argv = _train_args(blobs, tmp_path, 2)
    argv[argv.index("--batch") + 1] = "15"
    proc = mpirun(2, argv)
    assert proc.returncode == 2
    assert "--batch 15" in _one_error_line(proc) and "multiple of 2" in proc.stderr
    assert not (tmp_path / "checkpoint.npz").exists()


@needs_mpi
def test_ranks_that_disagree_are_one_line(blobs, tmp_path):
    argv = _train_args(blobs, tmp_path, 2)
    cmd = [MPIEXEC, *FLAGS, "-n", "1", sys.executable, "-m", "minivq", *argv, ":",
           "-n", "1", sys.executable, "-m", "minivq", *argv, "--lr", "0.01"]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=90)
    assert proc.returncode == 2
    line = _one_error_line(proc)
    assert "disagree" in line and "rank 1 has lr=0.01" in line
    assert not (tmp_path / "checkpoint.npz").exists()


@needs_mpi
def test_only_train_runs_on_several_processes(blobs, tmp_path):
    assert main(_train_args(blobs, tmp_path, 1)) == 0
    proc = mpirun(2, ["eval", str(tmp_path / "checkpoint.npz")])
    assert proc.returncode == 2 and "without mpiexec" in _one_error_line(proc)


# ---------------------------------------------------------------- a rank that fails mid-run
FAILING = textwrap.dedent("""
    import os, signal, sys
    import minivq.functional as F
    from minivq import distributed
    from minivq.cli import main

    real, calls = F.mse_loss, [0]

    def mse_loss(a, b):       # rank FAIL_RANK fails in its FAIL_AT-th training step
        calls[0] += 1
        if distributed.env_rank() == int(os.environ["FAIL_RANK"]) and calls[0] == int(os.environ["FAIL_AT"]):
            if os.environ["FAIL_HOW"] == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError("injected failure")
        return real(a, b)

    F.mse_loss = mse_loss
    sys.exit(main(sys.argv[1:]))
""")


@needs_mpi
@pytest.mark.parametrize("how,rank", [("raise", 1), ("raise", 0), ("kill", 1)])
def test_a_failing_rank_ends_the_job_and_keeps_the_checkpoint(blobs, tmp_path, how, rank):
    program = tmp_path / "failing.py"
    program.write_text(FAILING)
    out = tmp_path / "run"
    argv = _train_args(blobs, out, 12, "--ema")
    argv[argv.index("--checkpoint-every") + 1] = "1"
    argv[argv.index("--eval-every") + 1] = "100"
    proc = mpirun(2, argv, program=str(program), timeout=60, FAIL_HOW=how, FAIL_RANK=str(rank), FAIL_AT="5")
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    ours = [line for line in proc.stderr.splitlines() if line.startswith("minivq")]
    if how == "raise":          # one line, from rank 0, naming the failing rank
        # (the job's status is 2, passed to MPI_Abort, or 9 when mpiexec reports a rank it had to kill)
        assert len(ours) == 1 and f"rank {rank} on " in ours[0] and "injected failure" in ours[0], proc.stderr
        assert "rank 0 in comm" in proc.stderr      # MPICH's note of who called MPI_Abort: rank 0
    else:                       # killed outright: mpiexec reports it and ends the other rank
        assert ours == []
    meta, sections = read_checkpoint(str(out / "checkpoint.npz"), "minivq-vqvae")    # intact, never half-written
    assert 3 <= meta["step"] <= 5 and sections["model"]
    # and the run continues from it (clearing any temporary file a killed writer left)
    assert main(_train_args(blobs, out, 6, "--resume")) == 0
    assert sorted(os.listdir(out)) == ["checkpoint.npz", "metrics.jsonl", "reconstructions.png"]


# ---------------------------------------------------------------- GPUs
NCCL_CHECK = textwrap.dedent("""
    import cupy as cp
    from mpi4py import MPI
    from minivq import distributed

    comm = distributed.NCCLCommunicator(distributed.MPICommunicator(MPI.COMM_WORLD), "cuda:0")
    comm.timing = True
    for dtype in ("float32", "float64", "int64"):
        a = cp.arange(10, dtype=dtype)
        assert (comm.allreduce_sum(a.copy()) == a * comm.size).all()
        assert (comm.bcast(a.copy() + comm.rank) == a).all()
        g = comm.allgather(a.reshape(5, 2) + comm.rank)
        assert g.shape == (5 * comm.size, 2) and (g[5 * comm.size - 5:] == a.reshape(5, 2) + comm.size - 1).all()
    h = comm.allreduce_sum(__import__("numpy").ones(3))     # host arrays go through MPI
    assert (h == comm.size).all() and comm.seconds > 0
    comm.close()
    print("ok")
""")


@pytest.mark.gpu
@needs_mpi
def test_nccl_collectives_on_device_buffers(tmp_path):
    program = tmp_path / "nccl_check.py"
    program.write_text(NCCL_CHECK)
    proc = subprocess.run([sys.executable, str(program)], env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


@pytest.mark.gpu
@needs_mpi
def test_two_gpus_through_nccl_equal_one(blobs, tmp_path):
    import cupy
    if cupy.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("needs two GPUs")
    extra = ["--device", "cuda", "--ema", *DEAD, "--kernel", "cupy"]       # the default quantiser, at most 4 a step
    assert main(_train_args(blobs, tmp_path / "one", 4, *extra)) == 0
    proc = mpirun(2, _train_args(blobs, tmp_path / "two", 4, *extra, "--comm", "nccl"), timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert_same_run(tmp_path / "one", tmp_path / "two", tol=1e-8)   # GPU sums are ordered by atomics
