"""Data-parallel workers as threads of one process (``minivq train --workers N``, ``minivq.workers``).

The same per-rank code as under mpiexec, so the same promise: N workers leave the parameters, the
optimiser's state, the codebook and the random state one process leaves with the same global batch
(float64, to 1e-10), for every quantiser; a resumed run may change the number of workers; a failing
worker ends the run with its one-line error and the last checkpoint intact. Below that, the
communicator's collectives, and the per-thread state (grad mode, backward hook, random generator)
that keeps the workers apart. Needs threadpoolctl (`pip install -e .[threads]`) for the runs.
"""
import importlib.util
import json
import threading

import numpy as np
import pytest

import minivq as mv
from minivq import backend, workers
from minivq.autograd import is_grad_enabled, no_grad
from minivq.checkpoint import read_checkpoint
from minivq.cli import main

from test_distributed import CASES, assert_same_run, _log, _train_args, blobs  # noqa: F401  (a fixture)

needs_threadpoolctl = pytest.mark.skipif(importlib.util.find_spec("threadpoolctl") is None,
                                         reason="needs threadpoolctl: pip install -e .[threads]")


# ---------------------------------------------------------------- the communicator
def _on_ranks(size, fn):
    """``fn(comm)`` on ``size`` worker threads; every rank's result (run returns rank 0's alone)."""
    out = [None] * size

    def each(comm):
        out[comm.rank] = fn(comm)
        return out[comm.rank]
    assert workers.run(each, size) is out[0]
    return out


@needs_threadpoolctl
@pytest.mark.parametrize("size", [2, 3])
def test_collectives_give_every_rank_the_same_result(size):
    def fn(comm):
        gen = np.random.default_rng(comm.rank)
        mine = gen.standard_normal((5, 3)).astype(np.float32)
        total = comm.allreduce_sum(mine.copy())
        root = comm.bcast(np.full(4, float(comm.rank)), root=size - 1)
        every = comm.allgather(np.full((2, 3), comm.rank))
        obj = comm.bcast_object({"rank": comm.rank, "a": [comm.rank]}, root=1)
        objs = comm.allgather_object([comm.rank])
        return mine, total, root, every, obj, objs

    results = _on_ranks(size, fn)
    expected = results[0][0].copy()
    for r in results[1:]:
        expected += r[0]            # the sum in rank order, as every rank computes it
    for rank, (_, total, root, every, obj, objs) in enumerate(results):
        assert total.tobytes() == expected.tobytes()             # the same bits on every rank
        np.testing.assert_array_equal(root, np.full(4, size - 1.0))
        np.testing.assert_array_equal(every, np.repeat(np.arange(size), 2)[:, None] * np.ones((1, 3), int))
        assert obj == {"rank": 1, "a": [1]} and objs == [[r] for r in range(size)]
    # what one rank receives is a copy: changing it changes nothing on the rank that sent it
    assert results[0][4] is not results[1][4] and results[0][4]["a"] is not results[1][4]["a"]
    assert results[1][5][0] is not results[0][5][0]


@needs_threadpoolctl
def test_a_failing_worker_stops_the_others_and_its_error_is_raised():
    def fn(comm):
        if comm.rank == 1:
            raise ValueError("only worker 1 saw this")
        comm.allreduce_sum(np.zeros(3))          # worker 0 would wait here for ever without the abort
        return "unreachable"

    with pytest.raises(ValueError, match="only worker 1 saw this"):
        workers.run(fn, 2)


def test_one_worker_is_this_thread_and_a_single_process():
    seen = workers.run(lambda comm: (threading.current_thread(), comm.size), 1)
    assert seen == (threading.main_thread(), 1)


# ---------------------------------------------------------------- per-thread state
def test_grad_mode_hook_and_generator_belong_to_their_thread():
    mv.manual_seed(5)
    first = backend.rng().standard_normal(3)
    mv.manual_seed(5)
    seen = {}
    started, release = threading.Event(), threading.Event()

    def other():
        with no_grad(), mv.autograd.backward_hook(lambda fn, g: None):
            started.set()
            release.wait(5)
        mv.manual_seed(5)
        seen["draw"] = backend.rng().standard_normal(3)

    thread = threading.Thread(target=other)
    thread.start()
    assert started.wait(5)
    # the other thread is inside no_grad with a hook: this one records, with no hook, and its generator is its own
    assert is_grad_enabled() and mv.autograd.get_backward_hook() is None
    x = mv.tensor(np.ones(2), requires_grad=True)
    assert (x * 2).creator is not None
    release.set()
    thread.join()
    np.testing.assert_array_equal(backend.rng().standard_normal(3), first)    # not advanced by the other thread
    np.testing.assert_array_equal(seen["draw"], first)


# ---------------------------------------------------------------- training
@needs_threadpoolctl
@pytest.mark.parametrize("case", ["paper", "ema-dead-kmeans", "default"])
def test_two_workers_equal_one_process(blobs, tmp_path, capsys, case):  # noqa: F811
    extra = CASES[case]
    assert main(_train_args(blobs, tmp_path / "one", 4, *extra)) == 0
    capsys.readouterr()
    assert main(_train_args(blobs, tmp_path / "two", 4, "--workers", "2", *extra)) == 0
    out, err = capsys.readouterr()
    assert len(out.strip().splitlines()) == 1                   # the final metrics, once
    assert err.strip().splitlines() == [
        f"wrote {tmp_path / 'two' / 'checkpoint.npz'}, metrics.jsonl and reconstructions.png in {tmp_path / 'two'}"]
    assert json.loads(out)["step"] == 4
    assert_same_run(tmp_path / "one", tmp_path / "two")
    one, two = _log(tmp_path / "one"), _log(tmp_path / "two")
    assert [(r["step"], r["split"]) for r in one] == [(r["step"], r["split"]) for r in two]
    for a, b in zip(one, two):
        for key in ("loss", "nmse", "vq_loss", "perplexity", "mse"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-9, abs=1e-12), (a["step"], key)
        assert a.get("codes_used") == b.get("codes_used") and a.get("codes_replaced") == b.get("codes_replaced")
    assert all("comm_seconds" in r for r in two if r["split"] == "train")
    if case == "ema-dead-kmeans":       # the case exercises the reducer's sums, gathers and broadcasts
        assert sum(r["codes_replaced"] for r in one if r["split"] == "train") > 0


@needs_threadpoolctl
def test_the_workers_share_one_copy_of_the_dataset(blobs, tmp_path, monkeypatch):  # noqa: F811
    import minivq.train
    loads, real = [], minivq.train.load_dataset

    def counted(*args, **kwargs):
        loads.append(kwargs.get("split"))
        return real(*args, **kwargs)
    monkeypatch.setattr(minivq.train, "load_dataset", counted)
    assert main(_train_args(blobs, tmp_path, 2, "--workers", "2")) == 0
    assert sorted(loads) == ["test", "train"]           # once per split, not once per worker


@needs_threadpoolctl
def test_resume_with_another_number_of_workers(blobs, tmp_path):  # noqa: F811
    assert main(_train_args(blobs, tmp_path / "one", 6)) == 0
    assert main(_train_args(blobs, tmp_path / "mixed", 3, "--plan-steps", "6", "--workers", "2")) == 0
    assert main(_train_args(blobs, tmp_path / "mixed", 6, "--resume", "--workers", "4")) == 0
    assert_same_run(tmp_path / "one", tmp_path / "mixed")


@needs_threadpoolctl
def test_a_worker_that_diverges_alone_ends_the_run_and_keeps_the_checkpoint(blobs, tmp_path, capsys,  # noqa: F811
                                                                              monkeypatch):
    from minivq import loop
    real = loop._finite_sum

    def worker_1_sees_nan_at_step_5(arrays):
        if threading.current_thread().name == "minivq-worker-1" and _step[0] == 5:
            return False
        return real(arrays)
    _step = [0]
    real_run = loop.run_steps

    def counting(compute, *args, **kwargs):
        def counted(step):
            if threading.current_thread().name == "minivq-worker-1":
                _step[0] = step
            return compute(step)
        return real_run(counted, *args, **kwargs)
    monkeypatch.setattr(loop, "_finite_sum", worker_1_sees_nan_at_step_5)
    monkeypatch.setattr("minivq.train.run_steps", counting)
    assert main(_train_args(blobs, tmp_path, 6, "--workers", "2")) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "step 5" in err[0] and "gradients became non-finite" in err[0], err
    assert "Traceback" not in "".join(err)
    meta, _ = read_checkpoint(str(tmp_path / "checkpoint.npz"), "minivq-vqvae")
    assert meta["step"] == 3                    # the checkpoint of step 3 is kept, not overwritten


@pytest.mark.parametrize("argv, words", [
    (["--workers", "2", "--device", "cuda"], "runs threads on the CPU"),
    (["--workers", "3"], "does not split evenly over --workers 3"),
])
def test_bad_worker_settings_are_one_line(blobs, tmp_path, capsys, argv, words):  # noqa: F811
    assert main(_train_args(blobs, tmp_path, 2, *argv)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err
    assert not (tmp_path / "checkpoint.npz").exists()


def test_workers_without_threadpoolctl_is_one_line(blobs, tmp_path, capsys, monkeypatch):  # noqa: F811
    import builtins
    real_import = builtins.__import__

    def no_threadpoolctl(name, *args, **kwargs):
        if name == "threadpoolctl":
            raise ImportError("No module named 'threadpoolctl'")
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_threadpoolctl)
    assert main(_train_args(blobs, tmp_path, 2, "--workers", "2")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install -e .[threads]" in err[0] and "2 workers" in err[0], err
    assert not (tmp_path / "checkpoint.npz").exists()


@needs_threadpoolctl
def test_ctrl_c_stops_every_worker_and_keeps_the_checkpoint(blobs, tmp_path):  # noqa: F811
    import os
    import signal
    import subprocess
    import sys
    import time
    argv = [sys.executable, "-m", "minivq", *_train_args(blobs, tmp_path, 100000, "--workers", "2")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    # A shell without job control starts its background jobs with SIGINT ignored, and Python then keeps
    # ignoring it (no KeyboardInterrupt): give the child Ctrl-C's default, whoever started the tests.
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while proc.poll() is None and not (tmp_path / "checkpoint.npz").exists() and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("minivq train: interrupted at step "), err
    assert "continue with --resume" in lines[0] and out == ""
    meta, _ = read_checkpoint(str(tmp_path / "checkpoint.npz"), "minivq-vqvae")
    assert meta["step"] % 3 == 0 and f"the checkpoint of step {meta['step']}" in lines[0]


@needs_threadpoolctl
def test_gradient_logging_runs_under_workers(blobs, tmp_path):  # noqa: F811
    # the logged step's report is a collective (the global batch's code counts): every worker must take part
    assert main(_train_args(blobs, tmp_path, 3, "--workers", "2", "--log-grads", "--compare-estimators")) == 0
    logged = [r for r in _log(tmp_path) if r["split"] == "train"]
    assert len(logged) == 3 and all({"grad_norms", "z_e_grad", "code_counts", "estimator_cosine"} <= set(r) for r in logged), logged[0]


def test_workers_under_mpiexec_is_one_line(blobs, tmp_path):  # noqa: F811
    from test_distributed import HAVE_MPI4PY, MPIEXEC, _one_error_line, mpirun
    if not (MPIEXEC and HAVE_MPI4PY):
        pytest.skip("needs mpi4py and mpiexec: pip install -e .[mpi]")
    proc = mpirun(2, _train_args(blobs, tmp_path, 2, "--workers", "2"))
    assert proc.returncode == 2
    assert "--workers 2 under mpiexec" in _one_error_line(proc)
    assert not (tmp_path / "checkpoint.npz").exists()


# ---------------------------------------------------------------- the prior
PRIOR = ["--batch", "8", "--channels", "4", "--layers", "2", "--kernel-size", "3", "--no-progress",
         "--eval-every", "2", "--checkpoint-every", "3", "--log-every", "1"]


@pytest.fixture(scope="module")
def vqvae_checkpoint(blobs, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("vqvae")
    assert main(_train_args(blobs, out, 2)) == 0
    return str(out / "checkpoint.npz")


@needs_threadpoolctl
def test_the_prior_on_two_workers_equals_one_process(vqvae_checkpoint, tmp_path, capsys, monkeypatch):
    from minivq.models import GatedPixelCNN
    assert main(["train-prior", vqvae_checkpoint, "--steps", "4", "--out", str(tmp_path / "one"), *PRIOR]) == 0
    seen, loss = set(), GatedPixelCNN.loss

    def counting(self, indices, labels=None):      # which worker scores how many grids in a training step
        if self.training:
            seen.add((threading.current_thread().name, indices.shape[0]))
        return loss(self, indices, labels)
    monkeypatch.setattr(GatedPixelCNN, "loss", counting)
    assert main(["train-prior", vqvae_checkpoint, "--steps", "4", "--out", str(tmp_path / "two"), "--workers", "2",
                 *PRIOR]) == 0
    assert seen == {("minivq-worker-0", 4), ("minivq-worker-1", 4)}     # each its half of the batch of 8
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 2                                        # one final record per run
    a, b = (read_checkpoint(str(tmp_path / name / "checkpoint.npz"), "minivq-prior") for name in ("one", "two"))
    assert a[0]["step"] == b[0]["step"] == 4 and a[0]["rng_state"] == b[0]["rng_state"]
    for part in ("model", "optim"):      # float32: the same updates, the sums taken in another order
        for key, value in a[1][part].items():
            np.testing.assert_allclose(b[1][part][key], value, rtol=1e-5, atol=1e-7, err_msg=f"{part}.{key}")
    one, two = _log(tmp_path / "one"), _log(tmp_path / "two")
    assert [(r["step"], r["split"]) for r in one] == [(r["step"], r["split"]) for r in two]
    for r, s in zip(one, two):
        for key in ("loss", "nll_bits"):
            if key in r:
                assert s[key] == pytest.approx(r[key], rel=1e-5), (r["step"], key)
    assert all("comm_seconds" in r for r in two if r["split"] == "train")


# ---------------------------------------------------------------- one process: the convolutions take the cores
def _blas_threads_in_each_step(monkeypatch):
    """A list that gets, at every optimiser step, how many threads BLAS runs and whether the convolutions
    take the compiled kernels for float32 arrays."""
    from minivq import kernels
    from minivq.optim import Adam
    seen, step = [], Adam.step

    def spying(self):
        seen.append((backend.blas_thread_count(), kernels.direct_correlation(np.zeros((1, 4, 4, 16), np.float32))))
        return step(self)
    monkeypatch.setattr(Adam, "step", spying)
    return seen


@needs_threadpoolctl
def test_one_process_on_the_cpu_trains_with_the_kernels_taking_the_threads(blobs, tmp_path, monkeypatch):  # noqa: F811
    """``train`` and ``train-prior`` in one process at two Numba threads: BLAS at one thread in every
    step and the convolutions on the kernels (``kernels.conv_threads``); ``--dtype float64`` keeps
    BLAS's threads (its convolutions stay on the GEMMs). Put back when the run ends. ``eval`` and
    ``sample`` run their models the same way."""
    numba = pytest.importorskip("numba")
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("one core: Numba has one thread")
    before_numba = numba.get_num_threads()
    numba.set_num_threads(2)
    try:
        with backend.blas_threads(2):
            seen = _blas_threads_in_each_step(monkeypatch)
            assert main(_train_args(blobs, tmp_path / "vq", 2, "--dtype", "float32")) == 0
            assert seen and set(seen) == {(1, True)}
            assert backend.blas_thread_count() == 2
            seen.clear()
            assert main(["train-prior", str(tmp_path / "vq" / "checkpoint.npz"), "--steps", "2",
                         "--out", str(tmp_path / "prior"), *PRIOR]) == 0
            assert seen and set(seen) == {(1, True)}
            seen.clear()
            assert main(_train_args(blobs, tmp_path / "f64", 2)) == 0
            assert seen and {count for count, _ in seen} == {2}
            assert _blas_threads_in(monkeypatch, "minivq.cli.evaluate",
                                    ["eval", str(tmp_path / "vq" / "checkpoint.npz"), "--eval-size", "8"]) == 1
            assert _blas_threads_in(monkeypatch, "minivq.models.GatedPixelCNN.sample",
                                    ["sample", str(tmp_path / "prior" / "checkpoint.npz"), "--n", "2",
                                     "--out", str(tmp_path / "samples.png")]) == 1
    finally:
        numba.set_num_threads(before_numba)


def _blas_threads_in(monkeypatch, target, argv):
    """How many threads BLAS ran while ``target`` (a dotted name) ran under the command ``argv``."""
    import importlib
    owner_name, attribute = target.rsplit(".", 1)
    try:
        owner = importlib.import_module(owner_name)
    except ImportError:
        module_name, class_name = owner_name.rsplit(".", 1)
        owner = getattr(importlib.import_module(module_name), class_name)
    real, counts = getattr(owner, attribute), []

    def spying(*args, **kwargs):
        counts.append(backend.blas_thread_count())
        return real(*args, **kwargs)
    monkeypatch.setattr(owner, attribute, spying)
    assert main(argv) == 0
    assert counts and len(set(counts)) == 1
    return counts[0]


def test_one_process_changes_nothing_on_a_gpu():
    import contextlib
    assert isinstance(workers.one_process("cuda:0", np.float32), contextlib.nullcontext)
