"""The GPU code paths, on a machine without a GPU, against the fake cupy of tests/fakecupy.

The fake (its docstring says what it checks and what it cannot) wraps NumPy arrays in a
``cupy.ndarray`` that refuses what CuPy refuses: implicit copies to the host, host arrays in
device arithmetic or assigned into device slices, arrays of another GPU. This file checks:

1. the fake itself: every refusal it promises happens (else it would check nothing), and it
   never leaks into the other tests or the installed package;
2. tests/test_gpu.py (every op forward and backward, the quantisers, the optimisers, the
   VQ-VAE, ``train_vqvae``, ``train_prior`` and ``sample`` on "cuda" against the CPU) passes
   against the fake, in a subprocess that imports it as ``cupy``;
3. the CLI, checkpoints, modules and gradcheck on ``--device cuda``;
4. the GPU bugs the fake found stay fixed, and what crosses between host and device in a step.

Here the fake is imported in-process by the ``fake_cupy`` fixture, which restores
``sys.modules``, ``sys.path`` and minivq's cached CuPy module afterwards.
"""
import configparser
import importlib.util
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

import minivq as mv
from minivq import backend, kernels, nn, optim
from minivq import functional as F
from minivq import train as training
from minivq.cli import main
from minivq.config import ModelConfig, TrainConfig
from minivq.data import Dataset
from minivq.kernels.nearest_numpy import nearest_code_numpy

TESTS = Path(__file__).resolve().parent
FAKE_DIR = str(TESTS / "fakecupy")
TINY = dict(num_hiddens=8, num_residual_hiddens=4, num_residual_layers=1, embedding_dim=4, num_embeddings=16)
TINY_FLAGS = ["--num-hiddens", "8", "--residual-hiddens", "4", "--residual-layers", "1", "--embedding-dim", "4",
              "--num-embeddings", "16"]


def _cupy_modules():
    return {name: module for name, module in sys.modules.items()
            if name.split(".")[0] in ("cupy", "cupyx")}


@pytest.fixture
def fake_cupy(monkeypatch):
    """The fake imported as ``cupy`` for one test; everything it touched is put back afterwards."""
    saved = _cupy_modules()
    for name in saved:
        del sys.modules[name]
    sys.path.insert(0, FAKE_DIR)
    try:
        import cupy
        assert cupy.__fake__
        monkeypatch.setattr(backend, "_cupy", None)         # minivq imports "cupy" afresh: the fake
        monkeypatch.setattr(backend, "_cupy_error", None)
        # the fake cannot run the CUDA nearest-code kernel: "auto" on device arrays gets the GEMM reference
        monkeypatch.setitem(kernels._loaded, "cupy", types.SimpleNamespace(nearest_code_cupy=nearest_code_numpy))
        # nor compile the window copies and Adam: they take their array-op references, as where NVRTC fails
        for name in ("cuda-windows", "cuda-adam"):
            monkeypatch.setitem(kernels._loaded, name, "the fake CuPy compiles no CUDA")
        cupy.reset_stats()
        yield cupy
    finally:
        sys.path.remove(FAKE_DIR)
        for name in _cupy_modules():
            del sys.modules[name]
        sys.modules.update(saved)


@pytest.fixture(scope="module")
def tiny_npz(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fake-cupy-data")
    rng = np.random.default_rng(0)
    path = folder / "tiny.npz"
    np.savez(path, x_train=rng.integers(0, 256, (24, 16, 16), dtype=np.uint8), y_train=rng.integers(0, 3, 24),
             x_test=rng.integers(0, 256, (8, 16, 16), dtype=np.uint8), y_test=rng.integers(0, 3, 8))
    return str(path)


# ---------------------------------------------------------------- 1. the fake itself
def test_the_fake_refuses_what_cupy_refuses(fake_cupy):
    cp = fake_cupy
    import cupyx
    a = cp.asarray(np.arange(6.0).reshape(2, 3))
    host = np.ones(3)
    refusals = {
        "numpy.asarray(device array)": (lambda: np.asarray(a), TypeError),
        "numpy.array(device array)": (lambda: np.array(a), TypeError),
        "device + host": (lambda: a + host, TypeError),
        "host + device": (lambda: host + a, TypeError),
        "device * 0-d host array": (lambda: a * np.array(2.0), TypeError),
        "in place, host into device": (lambda: a.__iadd__(host), TypeError),
        "a NumPy function mixing both": (lambda: np.concatenate([a, host[None]]), TypeError),
        "a cupy function on a host array": (lambda: cp.exp(host), TypeError),
        "a host array into a device slice": (lambda: a.__setitem__(slice(None), np.ones((2, 3))), ValueError),
        "the host memory of a device array": (lambda: a.data, AttributeError),
        "the buffer protocol": (lambda: memoryview(a), TypeError),
        "a NumPy view of a device array": (lambda: a.view(np.ndarray), TypeError),
        "scatter_add into int64": (lambda: cupyx.scatter_add(cp.zeros(3, np.int64), cp.asarray([0]), 1), TypeError),
        "add.at into int64": (lambda: cp.add.at(cp.zeros(3, np.int64), cp.asarray([0]), 1), TypeError),
        "add.at of a host array": (lambda: cp.add.at(np.zeros(3, np.float32), cp.asarray([0]), 1.0), TypeError),
        "a CUDA kernel": (lambda: cp.RawModule(code=""), NotImplementedError),
        "a GPU that is not there": (lambda: cp.cuda.Device(1).use(), cp.cuda.runtime.CUDARuntimeError),
    }
    for what, (attempt, error) in refusals.items():
        with pytest.raises(error):
            attempt()
            pytest.fail(f"the fake allowed {what}")


def test_the_fake_allows_what_cupy_allows(fake_cupy):
    cp = fake_cupy
    import cupyx
    a = cp.asarray(np.arange(6.0).reshape(2, 3))
    assert type(a).__module__ == "cupy" and not isinstance(a, np.ndarray)
    assert backend.get_array_module(a) is cp and backend.array_device(a) == "cuda:0"
    both = np.concatenate([a, a])                           # NumPy's API dispatches to the device
    assert isinstance(both, cp.ndarray) and both.shape == (4, 3)
    total = a.sum()
    assert isinstance(total, cp.ndarray) and total.shape == ()   # reductions stay on the device
    assert isinstance(a[0, 1], cp.ndarray)
    assert float(total) == 15.0 and int(a[1, 2]) == 5 and f"{total:.1f}" == "15.0"
    assert isinstance(np.float32(2) * a, cp.ndarray) and isinstance(2 * a, cp.ndarray)
    b = a.copy()
    b[np.array([1, 1])] = np.array([7.0, 8.0, 9.0])         # advanced index and values: copied over
    b[:, 0] = 0.5
    np.testing.assert_array_equal(b.get(), [[0.5, 1, 2], [0.5, 8, 9]])
    z = cp.zeros(3, np.float32)
    cupyx.scatter_add(z, cp.asarray([0, 0, 2]), cp.asarray([1.0, 2.0, 3.0], np.float32))
    np.testing.assert_array_equal(cp.asnumpy(z), [3, 0, 3])
    cp.add.at(z, cp.asarray([1, 1]), cp.asarray([0.5, 0.25], np.float32))
    np.testing.assert_array_equal(cp.asnumpy(z), [3, 0.75, 3])
    view = cp.lib.stride_tricks.as_strided(a, shape=(2, 2), strides=a.strides)
    np.testing.assert_array_equal(view.get(), [[0, 1], [3, 4]])
    out = cp.empty((2, 3))
    assert cp.add(a, 1.0, out=out) is out


def test_the_fake_counts_transfers(fake_cupy):
    cp = fake_cupy
    cp.reset_stats()
    a = cp.asarray(np.zeros((4, 5), np.float32))
    assert cp.stats == {"h2d": 1, "h2d_bytes": 80, "d2h": 0}
    (a * 2 + 1).sum(axis=0)
    assert cp.stats["d2h"] == 0
    a.get()
    float(a[0, 0])
    assert cp.stats["d2h"] == 2


def test_the_fake_is_confined_to_its_fixture():
    """Run after the tests above: nothing of the fake is left, and nothing else can import it."""
    assert FAKE_DIR not in sys.path
    for name, module in _cupy_modules().items():
        assert not getattr(module, "__fake__", False), name
    assert not getattr(backend._import_cupy(), "__fake__", False)
    spec = importlib.util.find_spec("cupy")
    assert spec is None or "fakecupy" not in str(spec.origin)
    config = configparser.ConfigParser()
    config.read(TESTS.parent / "setup.cfg")
    packages = config["options"]["packages"].split()
    assert packages and not any("fakecupy" in p or p.startswith("tests") for p in packages)


# ---------------------------------------------------------------- 2. tests/test_gpu.py against the fake
def test_gpu_tests_pass_against_the_fake():
    """Every op, the quantisers, optimisers, the VQ-VAE, training, the prior and sampling, on "cuda"."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([FAKE_DIR] + sys.path))
    env.pop("FAKECUPY_DEVICES", None)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
                           str(TESTS / "test_gpu.py")], cwd=str(TESTS.parent), env=env,
                          capture_output=True, text=True, timeout=600)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    # all of them ran: none skipped for want of a GPU (the fake was found) and none left out
    assert "skipped" not in summary and "deselected" not in summary, summary
    assert int(summary.split(" passed")[0].split()[-1]) >= 100, summary


# ---------------------------------------------------------------- 3. CLI, checkpoints, modules on cuda
def test_cli_train_eval_reconstruct_on_cuda(fake_cupy, tiny_npz, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--data", tiny_npz, "--out", str(out), "--steps", "2", "--batch", "8", "--log-every", "1",
            "--no-progress", "--device", "cuda", "--kernel", "numpy", "--ema", "--plan-steps", "3", *TINY_FLAGS]
    assert main(argv) == 0, capsys.readouterr().err
    final = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    ckpt = str(out / "checkpoint.npz")
    assert main(["eval", ckpt, "--device", "cuda"]) == 0, capsys.readouterr().err
    again = json.loads(capsys.readouterr().out)
    assert again["mse"] == pytest.approx(final["mse"], rel=1e-5)
    assert main(["reconstruct", ckpt, "--device", "cuda", "--out", str(tmp_path / "r.png"), "--n", "4"]) == 0
    assert (tmp_path / "r.png").read_bytes().startswith(b"\x89PNG")
    assert main(argv[:6] + ["3", "--resume", "--device", "cuda", "--no-progress"]) == 0, capsys.readouterr().err
    # the checkpoint holds host arrays only
    for key, value in mv.load(ckpt).items():
        assert isinstance(value, np.ndarray), key


def test_module_state_and_gradcheck_on_the_device(fake_cupy):
    options = mv.models.QuantizerOptions(kmeans_init=True, dead_code_threshold=1.0, lookup="cosine", lookup_dim=2)
    mv.manual_seed(0)
    model = mv.models.VQVAE(decay=0.9, quantizer=options, kernel="numpy", **TINY).to("cuda")
    for name, value in model.state_dict().items():
        assert backend.array_device(value) == "cuda:0", name
    mv.manual_seed(1)
    cpu_model = mv.models.VQVAE(decay=0.9, quantizer=options, kernel="numpy", **TINY)
    model.load_state_dict(cpu_model.state_dict())               # host arrays into a device model
    for name, value in model.state_dict().items():
        assert backend.array_device(value) == "cuda:0", name
        np.testing.assert_array_equal(backend.to_numpy(value), backend.to_numpy(cpu_model.state_dict()[name]))
    assert "device='cuda:0'" in repr(mv.tensor([1.0, 2.0], device="cuda"))
    rng = np.random.default_rng(2)
    x = mv.tensor(rng.standard_normal((1, 2, 5, 5)), requires_grad=True, device="cuda")
    w = mv.tensor(rng.standard_normal((3, 2, 3, 3)), requires_grad=True, device="cuda")
    assert mv.gradcheck(lambda a, b: F.conv2d(a, b, stride=2, padding=1), [x, w])


def test_to_device_backward_brings_the_gradient_home(fake_cupy):
    """Tensor.to is a node of the graph: its backward moves the gradient to the input's device, both ways."""
    host = mv.tensor(np.arange(6.0).reshape(2, 3), requires_grad=True)
    (host.to("cuda") * mv.tensor(np.array([1.0, 2.0, 3.0]), device="cuda")).sum().backward()
    assert isinstance(host.grad, np.ndarray)
    np.testing.assert_array_equal(host.grad, [[1, 2, 3], [1, 2, 3]])
    on_device = mv.tensor(np.ones(3), requires_grad=True, device="cuda")
    (on_device.to("cpu") * np.array([4.0, 5.0, 6.0])).sum().backward()
    assert backend.array_device(on_device.grad) == "cuda:0"
    np.testing.assert_array_equal(backend.to_numpy(on_device.grad), [4, 5, 6])


def test_conv_references_run_on_device_arrays(fake_cupy):
    """The loop references take the array module from their input: device in, device out, nothing read back."""
    from minivq.functional.conv_reference import conv2d_reference, conv_transpose2d_reference
    cp = fake_cupy
    rng = np.random.default_rng(6)
    x, bias = rng.standard_normal((2, 3, 7, 6)), rng.standard_normal(4)
    cases = [(conv2d_reference, rng.standard_normal((4, 3, 3, 2)), dict(stride=(2, 1), padding=1)),
             (conv_transpose2d_reference, rng.standard_normal((3, 4, 3, 2)), dict(stride=2, padding=(1, 0),
                                                                                  output_padding=1))]
    for reference, weight, kwargs in cases:
        expected = reference(x, weight, bias, **kwargs)
        on_device = [cp.asarray(a) for a in (x, weight, bias)]
        cp.reset_stats()
        got = reference(*on_device, **kwargs)
        assert cp.stats["d2h"] == 0 and backend.array_device(got) == "cuda:0", reference.__name__
        np.testing.assert_allclose(cp.asnumpy(got), expected, rtol=1e-12, atol=1e-12)


def test_the_correlation_references_run_on_device_arrays(fake_cupy):
    """kernels.correlate and correlate_weight_grad take their references for device arrays ("auto"), as
    "numpy" says: device in, device out, nothing read back, NumPy's numbers."""
    cp = fake_cupy
    rng = np.random.default_rng(7)
    image, wmat = rng.standard_normal((2, 7, 6, 5)), rng.standard_normal((4, 3 * 2 * 5))
    grid_rows, bias = rng.standard_normal((2 * 4 * 5, 3)), rng.standard_normal(4)
    window = (3, 2), (2, 1), (1, 0)
    expected = (kernels.correlate(image, wmat, *window, bias, backend="numpy"),
                kernels.correlate_weight_grad(image, grid_rows, *window, backend="numpy"))
    d_image, d_wmat, d_grid, d_bias = (cp.asarray(a) for a in (image, wmat, grid_rows, bias))
    cp.reset_stats()
    got = (kernels.correlate(d_image, d_wmat, *window, d_bias), kernels.correlate_weight_grad(d_image, d_grid, *window))
    assert cp.stats["d2h"] == 0
    for g, e in zip(got, expected):
        assert backend.array_device(g) == "cuda:0"
        np.testing.assert_allclose(cp.asnumpy(g), e, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- 4. bugs the fake found
def test_backward_moves_a_host_gradient_to_the_device(fake_cupy):
    """Was: a NumPy gradient given to backward() of a device tensor stayed on the host (mixed arithmetic)."""
    a = np.arange(6.0).reshape(3, 2)
    x = mv.tensor(a, requires_grad=True, device="cuda")
    y = x[mv.tensor(np.array([2, 0, 2]), device="cuda")] * 3.0
    y.backward(np.ones((3, 2)))
    assert backend.array_device(x.grad) == "cuda:0"
    np.testing.assert_array_equal(backend.to_numpy(x.grad), [[3, 3], [0, 0], [6, 6]])


@pytest.mark.parametrize("cls", [nn.VectorQuantizer, nn.VectorQuantizerEMA])
def test_quantizer_buffers_stay_on_the_device(fake_cupy, cls):
    """Was: k-means initialisation and dead-code restarts put `initialized` and `unused_steps` on the host;
    the same with dead-code replacement (`usage`, `usage_steps`), which replaced the restarts."""
    mv.manual_seed(0)
    q = cls(8, 3, kmeans_init=True, dead_code_threshold=1.0, kernel="numpy").to("cuda")
    rng = np.random.default_rng(0)
    for _ in range(3):
        q(mv.tensor(rng.standard_normal((2, 3, 2, 2)).astype(np.float32), requires_grad=True, device="cuda"))
    for name, value in q.state_dict().items():
        assert backend.array_device(value) == "cuda:0", name


def test_sgd_momentum_of_a_0d_parameter():
    """Was (on the CPU, seen as a GPU/CPU difference): with weight decay, the momentum buffer of a 0-d
    parameter was a NumPy scalar, which `buf *= momentum` rebinds instead of updating."""
    p = mv.tensor(np.array(1.0), requires_grad=True)
    opt = optim.SGD([p], lr=0.1, momentum=0.9, weight_decay=0.5)
    value, buf = 1.0, None
    for g in (2.0, -1.0, 0.5):
        p.grad = np.array(g)
        opt.step()
        d = g + 0.5 * value
        buf = d if buf is None else 0.9 * buf + d
        value -= 0.1 * buf
        assert float(p.data) == pytest.approx(value, rel=1e-12)


def test_no_gpu_visible_is_one_line(fake_cupy, monkeypatch):
    """Was: "only 0 GPU(s) are visible; use cuda:0..cuda:-1" where CuPy sees no device."""
    monkeypatch.setenv("FAKECUPY_DEVICES", "0")
    with pytest.raises(RuntimeError) as info:
        mv.tensor(np.zeros(2), device="cuda")
    message = str(info.value)
    assert "sees no GPU" in message and "--device cpu" in message and "\n" not in message
    monkeypatch.setenv("FAKECUPY_DEVICES", "1")
    with pytest.raises(RuntimeError, match=r"'cuda:1' asked for but only 1 GPU\(s\) are visible; use cuda:0\.\.cuda:0"):
        mv.nn.Conv2d(1, 1, 1).to("cuda:1")


def test_cuda_1_runs_once_it_is_the_current_device(fake_cupy, monkeypatch):
    """CuPy runs kernels and allocates on its current device: backend.use_device makes it cuda:1."""
    monkeypatch.setenv("FAKECUPY_DEVICES", "2")
    rng = np.random.default_rng(3)
    x = rng.uniform(-0.5, 0.5, (2, 1, 8, 8)).astype(np.float32)
    results = {}
    for device in ("cpu", "cuda:1"):
        backend.use_device(device)
        mv.manual_seed(0)
        model = mv.models.VQVAE(decay=0.9, kernel="numpy", **TINY).to(device)
        opt = optim.Adam(model.parameters(), lr=1e-2)
        xt = mv.tensor(x, device=device)
        recon, vq = model(xt)
        (F.mse_loss(recon, xt) + vq.loss).backward()
        opt.step()
        results[device] = model.state_dict()
    for name, value in results["cuda:1"].items():
        assert backend.array_device(value) == "cuda:1", name
        np.testing.assert_allclose(backend.to_numpy(value), results["cpu"][name], rtol=1e-5, atol=1e-6,
                                   err_msg=name)


def test_train_on_cuda_1_in_one_process(fake_cupy, monkeypatch, tiny_npz, tmp_path, tmp_path_factory, capsys):
    """A run on the second of two GPUs: its losses are computed on cuda:1 with cuda:1 CuPy's current device,
    and are finite and those of the same run on the CPU; its checkpoint holds host arrays equal to the CPU
    run's, and evaluates on the CPU to the run's own final test error."""
    cp = fake_cupy
    # the same run on the CPU, through the CLI (whose defaults are the trainer's)
    cpu_run = tmp_path_factory.mktemp("cpu-run")
    assert main(["train", "--data", tiny_npz, "--out", str(cpu_run), "--steps", "1", "--batch", "8", "--kernel",
                 "numpy", "--no-progress", *TINY_FLAGS]) == 0, capsys.readouterr().err
    capsys.readouterr()
    backwards = []                          # (device of the loss, CuPy's current device) at each backward
    real_backward = mv.Tensor.backward

    def recording_backward(self, *args, **kwargs):
        backwards.append((backend.array_device(self.data), cp.cuda.Device().id))
        return real_backward(self, *args, **kwargs)
    monkeypatch.setattr(mv.Tensor, "backward", recording_backward)
    monkeypatch.setenv("FAKECUPY_DEVICES", "2")
    training.train_vqvae(TrainConfig(out=str(tmp_path), data=tiny_npz, steps=1, batch_size=8, device="cuda:1",
                                     kernel="numpy", progress=False), ModelConfig(**TINY))
    monkeypatch.setattr(mv.Tensor, "backward", real_backward)
    assert backwards and set(backwards) == {("cuda:1", 1)}, backwards

    def records(folder):
        with open(folder / "metrics.jsonl") as f:
            return [json.loads(line) for line in f]
    gpu_log, cpu_log = records(tmp_path), records(cpu_run)
    assert [(r["split"], r["step"]) for r in gpu_log] == [(r["split"], r["step"]) for r in cpu_log]
    assert {r["split"] for r in gpu_log} == {"train", "test"}
    assert np.isfinite(gpu_log[0]["loss"]) and np.isfinite(gpu_log[-1]["mse"])
    for mine, ref in zip(gpu_log, cpu_log):
        assert set(mine) == set(ref)
        for key in set(ref) - {"seconds"}:          # loss, mse, nmse, vq_loss, perplexity, codes used ...
            if isinstance(ref[key], (int, float)):
                assert mine[key] == pytest.approx(ref[key], rel=1e-5), (key, mine, ref)
            else:                                   # the split's name, the per-code counts ...
                assert mine[key] == ref[key], (key, mine, ref)
    state, cpu_state = mv.load(tmp_path / "checkpoint.npz"), mv.load(cpu_run / "checkpoint.npz")
    assert sorted(state) == sorted(cpu_state) and any(key.startswith("model.") for key in state)
    for key, value in state.items():
        assert isinstance(value, np.ndarray), key                          # the checkpoint holds host arrays
        if key != "meta":
            np.testing.assert_allclose(value, cpu_state[key], rtol=1e-5, atol=1e-6, err_msg=key)
    assert main(["eval", str(tmp_path / "checkpoint.npz")]) == 0, capsys.readouterr().err
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["mse"] == pytest.approx(gpu_log[-1]["mse"], rel=1e-5)


@pytest.mark.parametrize("decay,quantizer", [
    (0.0, mv.models.PAPER_QUANTIZER), (0.9, mv.models.PAPER_QUANTIZER),
    (0.99, mv.models.QuantizerOptions(lookup="cosine", lookup_dim=8)),      # the default's lookup, no dead codes
], ids=["paper", "ema", "ema-cosine8"])
def test_a_training_step_waits_for_the_gpu_only_in_the_kernel_checks(fake_cupy, monkeypatch, decay, quantizer):
    """Forward, backward and the Adam step read nothing back from the GPU, but in the nearest-code call (dead-code
    replacement, which decides on the host, is left out: it reads the step's code counts back by design)."""
    cp = fake_cupy
    in_kernel = []
    real = kernels.nearest_code

    def counted(*args, **kwargs):
        before = cp.stats["d2h"]
        try:
            return real(*args, **kwargs)
        finally:
            in_kernel.append(cp.stats["d2h"] - before)
    monkeypatch.setattr(mv.functional.quantize, "nearest_code", counted)     # the quantisers' one call site
    mv.manual_seed(0)
    model = mv.models.VQVAE(decay=decay, quantizer=quantizer, kernel="numpy", **TINY).to("cuda")
    opt = optim.Adam(model.parameters())
    x = backend.to_device(np.random.default_rng(0).uniform(-0.5, 0.5, (4, 1, 16, 16)).astype(np.float32), "cuda")
    for step in range(2):
        cp.reset_stats()
        in_kernel.clear()
        xt = mv.tensor(x)
        recon, vq = model(xt)
        loss = F.mse_loss(recon, xt) + vq.loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert len(in_kernel) == 1
        assert cp.stats["d2h"] == in_kernel[0], f"step {step}: {cp.stats['d2h'] - in_kernel[0]} waits outside"


def test_a_batch_crosses_as_uint8_once(fake_cupy):
    """Dataset.batch gathers on the host, copies the uint8 pixels (and labels) once, scales on the device."""
    cp = fake_cupy
    rng = np.random.default_rng(4)
    data = Dataset.from_arrays(rng.integers(0, 256, (10, 1, 8, 8), dtype=np.uint8),
                                       rng.integers(0, 10, 10))
    idx = np.array([7, 1, 1, 4])
    cp.reset_stats()
    x, labels = data.batch(idx, device="cuda")
    assert cp.stats == {"h2d": 2, "h2d_bytes": 4 * 64 + 4 * 8, "d2h": 0}
    assert backend.array_device(x) == "cuda:0" and x.dtype == np.float32
    x_cpu, labels_cpu = data.batch(idx)
    np.testing.assert_array_equal(backend.to_numpy(x), x_cpu)
    np.testing.assert_array_equal(backend.to_numpy(labels), labels_cpu)


def test_col2im_on_device_is_one_pass_per_kernel_offset(fake_cupy, monkeypatch):
    """On the CPU col2im works in cache-sized blocks of images; on a GPU each pass is a kernel
    launch and the chunk fits in L2, so it must add the whole chunk at once: kH*kW passes."""
    from minivq import kernels
    from minivq.kernels import windows_numpy
    monkeypatch.setattr(windows_numpy, "COL2IM_BLOCK_BYTES", 1)          # one image per block on the CPU
    n, h, w, c, kernel, stride, padding = 6, 7, 6, 3, (4, 3), (2, 2), (1, 1)
    oh, ow = (h + 2 - 4) // 2 + 1, (w + 2 - 3) // 2 + 1
    cols = np.random.default_rng(0).standard_normal((n * oh * ow, 4 * 3 * c))
    passes = []
    original = fake_cupy.ndarray.__setitem__
    monkeypatch.setattr(fake_cupy.ndarray, "__setitem__", lambda self, k, v: passes.append(1) or original(self, k, v))
    out = fake_cupy.empty((n, h, w, c))
    on_device = kernels.col2im(fake_cupy.asarray(cols), out, kernel, stride, padding)
    assert len(passes) == 4 * 3 + 1                   # the kH*kW adds, and one store of the whole batch
    expected = kernels.col2im(cols, np.empty((n, h, w, c)), kernel, stride, padding, backend="numpy")
    np.testing.assert_array_equal(on_device.get(), expected)


def test_nearest_code_checks_both_inputs_with_one_wait(fake_cupy, monkeypatch):
    """The finite check over x and the codebook reads one number back from the GPU, not one per array;
    a NaN is still named with its array and place."""
    cp = fake_cupy
    monkeypatch.setitem(kernels._loaded, "cupy", types.SimpleNamespace(
        nearest_code_cupy=lambda x, cb: cp.zeros(x.shape[0], dtype=np.int64)))    # a kernel that waits for nothing
    x = np.random.default_rng(0).standard_normal((7, 3)).astype(np.float32)
    cb = np.random.default_rng(1).standard_normal((5, 3)).astype(np.float32)
    x_dev, cb_dev = cp.asarray(x), cp.asarray(cb)
    cp.reset_stats()
    kernels.nearest_code(x_dev, cb_dev, backend="cupy")
    assert cp.stats["d2h"] == 1
    cb[4, 2] = np.nan
    with pytest.raises(ValueError, match=r"codebook \(5, 3\) contains NaN or inf: first at row 4, column 2"):
        kernels.nearest_code(x_dev, cp.asarray(cb), backend="cupy")


def test_conv_workspace_default_is_per_device(fake_cupy):
    """Small cache-sized im2col chunks on the CPU, few large ones on a GPU (each chunk is kernel launches)."""
    from minivq import backend
    from minivq.functional import conv as conv_module
    g = conv_module._Geometry(4096, 64, 8, 8, 64, (3, 3), (1, 1), (1, 1))
    per_image = 8 * 8 * 9 * 64 * 4
    assert g.images_per_chunk(np.zeros(1, np.float32)) == backend.CPU_WORKSPACE_BYTES // per_image
    assert g.images_per_chunk(fake_cupy.zeros(1, np.float32)) == backend.GPU_WORKSPACE_BYTES // per_image


def test_cuda_sources_that_do_not_compile_leave_the_array_ops(fake_cupy, monkeypatch):
    """Where a CUDA source does not compile (here: the fake's RawModule), "auto" takes the references."""
    cp = fake_cupy
    for name in ("cuda-windows", "cuda-adam"):
        monkeypatch.delitem(kernels._loaded, name)
        assert "NotImplementedError" in kernels._load(name)
    image = cp.asarray(np.arange(8.0).reshape(1, 2, 2, 2))
    assert kernels.window_backend(image) == "numpy"
    np.testing.assert_array_equal(cp.asnumpy(kernels.im2col(image, (1, 1), (1, 1), (0, 0))),
                                  np.arange(8.0).reshape(4, 2))
    with pytest.raises(ValueError, match="NotImplementedError"):
        kernels.im2col(image, (1, 1), (1, 1), (0, 0), backend="cupy")
    p, g = cp.ones(3, np.float32), cp.ones(3, np.float32)
    assert not kernels.adam_step(p, g, cp.zeros(3, np.float32), cp.zeros(3, np.float32), 1e-3, (0.9, 0.999), 1e-8,
                                 0.0, 1)

