"""minivq on the GPU held against minivq on the CPU: every differentiable op forward and backward, the
quantisers, the optimisers, the VQ-VAE, training, the prior and sampling.

Every test is marked ``gpu``: tests/conftest.py skips them where CuPy or a GPU is missing.
tests/test_fake_cupy.py also runs this file on machines without a GPU, against the fake cupy of
tests/fakecupy (NumPy arithmetic behind CuPy's refusals); there both sides compute with NumPy and may
differ only where backend.py sums a scatter in another order, so the bound below is applied with each
dtype's own eps (float64 included): anything more is a code path that depends on the device.

On a real GPU the two sides round differently, and the tolerances say by how much:

* float64: within 1e-10, relative to the value and to the array's largest magnitude.
* float32: CUDA's reductions and cuBLAS sum in another order than NumPy's pairwise sums and
  OpenBLAS, and CUDA's exp/log/tanh are within 2 ulp of the correctly rounded result where
  NumPy's are within about 1. An accumulated result of ``terms`` products of inputs of order one
  then carries a rounding error of about ``terms * eps`` times its size on each side (a random
  walk of ``terms`` roundings of terms of size ``|result| / sqrt(terms)``); we allow four times
  that, ``4 * terms * eps32`` (eps32 = 2**-23), relative to the value and to the array's largest
  magnitude. ``terms`` is the length of the longest sum behind an output: the inner dimension of a
  product, the window of a convolution, the elements of a mean, the layers of a network.
"""
import os
import types
import zlib

import numpy as np
import pytest

import minivq as mv

from conftest import read_log, write_blobs
from minivq import backend, kernels, nn, optim
from minivq import prior as prior_training
from minivq import train as training
from minivq.config import ModelConfig, PriorConfig, TrainConfig
from minivq import functional as F
from minivq.kernels.nearest_numpy import nearest_code_numpy

try:
    import cupy
except ImportError:          # the tests are skipped then (conftest); the module must still import
    cupy = None

pytestmark = pytest.mark.gpu

FAKE = bool(getattr(cupy, "__fake__", False))
GPU = "cuda"
EPS32 = float(np.finfo(np.float32).eps)
DTYPES = [np.float64, np.float32]


@pytest.fixture(autouse=True)
def _fake_stands_in_the_cuda_kernel(monkeypatch):
    """The fake cupy cannot run the CUDA nearest-code kernel: there "auto" uses the GEMM reference."""
    if FAKE:
        monkeypatch.setitem(kernels._loaded, "cupy", types.SimpleNamespace(nearest_code_cupy=nearest_code_numpy))


def host(a):
    if isinstance(a, mv.Tensor):
        a = a.data
    return backend.to_numpy(a)


def on_gpu(a):
    if isinstance(a, mv.Tensor):
        a = a.data
    return backend.array_device(a).startswith("cuda")


def assert_matches(gpu, cpu, terms=1, what="", magnitude=None):
    """A GPU result (left on the device) against the CPU one, within the rounding the docstring derives.

    ``magnitude``: the size of the summed terms behind each element, where it is known and the sum
    cancels (by default the array's largest magnitude stands for it).
    """
    assert on_gpu(gpu), f"{what}: the GPU result is on the host"
    gpu, cpu = host(gpu), np.asarray(host(cpu))
    assert gpu.dtype == cpu.dtype and gpu.shape == cpu.shape, (what, gpu.dtype, cpu.dtype, gpu.shape, cpu.shape)
    if cpu.dtype.kind not in "fc":
        np.testing.assert_array_equal(gpu, cpu, err_msg=what)
        return
    if FAKE:      # NumPy on both sides: only the scatter-adds of backend.py sum in another order
        tol = 4 * terms * float(np.finfo(cpu.dtype).eps)
    else:
        tol = 1e-10 if cpu.dtype == np.float64 else 4 * terms * EPS32
    scale = float(np.abs(cpu).max()) if cpu.size else 0.0
    atol = tol * (scale if magnitude is None else np.asarray(magnitude))
    excess = np.abs(gpu.astype(np.float64) - cpu) - (tol * np.abs(cpu) + atol)
    if np.any(excess > 0):
        worst = np.unravel_index(np.argmax(excess), cpu.shape) if cpu.ndim else ()
        raise AssertionError(f"{what}: {int((excess > 0).sum())} of {cpu.size} elements differ by more than "
                             f"{tol:.3g} relative; worst at {worst}: GPU {gpu[worst]!r}, CPU {cpu[worst]!r}")


def assert_close_floats(gpu, cpu, rtol, what=""):
    """Python floats from the two runs (losses in a log)."""
    assert gpu == pytest.approx(cpu, rel=rtol, abs=rtol * 1e-3), what


# ---------------------------------------------------------------- every op, forward and backward
def positive(shape):
    return lambda r, dt: r.uniform(0.5, 2.0, shape).astype(dt)


def normal(*shape):
    return lambda r, dt: r.standard_normal(shape).astype(dt)


def ints(high, *shape):
    return lambda r, dt: r.integers(0, high, shape).astype(np.int64)


def latents(r, dt):
    return r.standard_normal((2, 3, 4, 5)).astype(dt)


# name: (fn(*tensors), input makers, terms)
OPS = {
    "add broadcast": (lambda a, b: a + b, [normal(3, 4, 5), normal(4, 1)], 1),
    "sub broadcast": (lambda a, b: a - b, [normal(4, 1), normal(3, 4, 5)], 1),
    "mul broadcast": (lambda a, b: a * b, [normal(3, 1, 5), normal(4, 5)], 1),
    "div broadcast": (lambda a, b: a / b, [normal(3, 4), positive((4,))], 1),
    "scalar arithmetic": (lambda a: (2.0 - a * 3) / 4 + 1, [normal(3, 4)], 1),
    "neg": (lambda a: -a, [normal(3, 4)], 1),
    "pow": (lambda a, b: a ** b, [positive((3, 4)), normal(4)], 4),
    "pow scalar exponent": (lambda a: a ** 3, [normal(3, 4)], 4),
    "scalar base pow": (lambda a: 2.0 ** a, [normal(3, 4)], 4),
    "matmul batched": (lambda a, b: a @ b, [normal(2, 3, 6), normal(6, 5)], 6),
    "matmul vector-matrix": (lambda a, b: a @ b, [normal(6), normal(6, 5)], 6),
    "matmul matrix-vector": (lambda a, b: F.matmul(a, b), [normal(3, 6), normal(6)], 6),
    "exp": (F.exp, [normal(3, 4)], 4),
    "log": (F.log, [positive((3, 4))], 4),
    "relu": (F.relu, [normal(3, 4)], 1),
    "sigmoid": (F.sigmoid, [normal(3, 4)], 4),
    "tanh": (F.tanh, [normal(3, 4)], 4),
    "sum all": (lambda a: a.sum(), [normal(3, 4, 5)], 60),
    "sum axis keepdims": (lambda a: F.sum(a, axis=1, keepdims=True), [normal(3, 4, 5)], 4),
    "sum two axes": (lambda a: a.sum(axis=(0, 2)), [normal(3, 4, 5)], 15),
    "mean all": (lambda a: a.mean(), [normal(3, 4, 5)], 60),
    "mean axis": (lambda a: F.mean(a, axis=-1), [normal(3, 4, 5)], 5),
    "reshape": (lambda a: a.reshape(4, 15), [normal(3, 4, 5)], 1),
    "transpose": (lambda a: a.transpose(2, 0, 1), [normal(3, 4, 5)], 1),
    "transpose reversed": (lambda a: a.T, [normal(3, 4, 5)], 1),
    "getitem basic": (lambda a: a[1:, ::2, 3], [normal(3, 4, 5)], 1),
    "getitem repeated indices": (lambda a: a[np.array([0, 2, 0, 1, 0])], [normal(3, 4)], 1),
    "getitem advanced with slice": (lambda a: a[:, [1, 1, 3], 2:], [normal(3, 4, 5)], 1),
    "getitem two index arrays": (lambda a: a[np.array([0, 0, 2]), np.array([1, 1, 3])], [normal(3, 4)], 1),
    "concatenate": (lambda a, b, c: F.concatenate([a, b, c], axis=1), [normal(2, 3), normal(2, 1), normal(2, 4)], 1),
    "pad": (lambda a: F.pad(a, (1, 2, 0, 3), value=0.5), [normal(2, 3, 4)], 1),
    "cast": (lambda a: F.cast(a, np.float64) * 2, [normal(3, 4)], 1),
    "embedding with repeats": (lambda i, w: F.embedding(i, w), [ints(7, 2, 5), normal(7, 3)], 1),
    "log_softmax": (lambda a: F.log_softmax(a, axis=1), [normal(4, 6, 2)], 6),
    "cross_entropy": (lambda a, t: F.cross_entropy(a, t), [normal(4, 5, 2, 3), ints(5, 4, 2, 3)], 30),
    "mse_loss": (F.mse_loss, [normal(3, 4, 5), normal(3, 4, 5)], 60),
    "stop_gradient": (lambda a, b: F.stop_gradient(a) * b, [normal(3, 4), normal(3, 4)], 1),
    "straight_through": (F.straight_through, [latents, latents], 1),
    "rotation_trick": (F.rotation_trick, [latents, latents], 12),
}

CONVS = {   # name: (input shape, weight shape, kwargs); conv2d weights (C_out, C_in, kH, kW)
    "1x1": ((2, 3, 5, 4), (4, 3, 1, 1), dict()),
    "3x3 pad 1": ((2, 3, 6, 5), (4, 3, 3, 3), dict(padding=1)),
    "4x4 stride 2 pad 1": ((2, 3, 8, 8), (5, 3, 4, 4), dict(stride=2, padding=1)),
    "3x2 stride (2, 1) pad (0, 2)": ((1, 2, 7, 5), (3, 2, 3, 2), dict(stride=(2, 1), padding=(0, 2))),
    "5x5 wide padding, no bias": ((2, 2, 4, 4), (3, 2, 5, 5), dict(padding=3, bias=False)),
}
TRANSPOSED = {   # conv_transpose2d weights (C_in, C_out, kH, kW)
    "1x1": ((2, 3, 5, 4), (3, 4, 1, 1), dict()),
    "3x3 pad 1": ((2, 4, 5, 6), (4, 3, 3, 3), dict(padding=1)),
    "4x4 stride 2 pad 1": ((2, 5, 4, 4), (5, 3, 4, 4), dict(stride=2, padding=1)),
    "3x3 stride 2 output_padding 1": ((1, 3, 3, 4), (3, 2, 3, 3), dict(stride=2, output_padding=1)),
    "3x2 stride (1, 2) pad (1, 0), no bias": ((2, 2, 4, 3), (2, 3, 3, 2), dict(stride=(1, 2), padding=(1, 0),
                                                                              bias=False)),
}


def conv_case(fn, x_shape, w_shape, kwargs, out_channel_dim):
    kwargs = dict(kwargs)
    with_bias = kwargs.pop("bias", True)
    makers = [normal(*x_shape), normal(*w_shape)]
    if with_bias:
        makers.append(normal(w_shape[out_channel_dim]))
        return (lambda x, w, b: fn(x, w, b, **kwargs)), makers
    return (lambda x, w: fn(x, w, **kwargs)), makers


for _name, (_x, _w, _kw) in CONVS.items():
    _f, _m = conv_case(F.conv2d, _x, _w, _kw, 0)
    OPS["conv2d " + _name] = (_f, _m, _w[1] * _w[2] * _w[3])
for _name, (_x, _w, _kw) in TRANSPOSED.items():
    _f, _m = conv_case(F.conv_transpose2d, _x, _w, _kw, 1)
    OPS["conv_transpose2d " + _name] = (_f, _m, _w[1] * _w[2] * _w[3])


def run_op(fn, arrays, upstream, device):
    """fn on tensors made from ``arrays`` on ``device``; backward with ``upstream``: (output, input grads)."""
    tensors = [mv.tensor(a, requires_grad=a.dtype.kind == "f", device=device) for a in arrays]
    out = fn(*tensors)
    out.backward(backend.to_device(upstream(out.shape, out.dtype), device))
    return out, [t.grad for t in tensors if t.requires_grad]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(OPS))
def test_op_forward_and_backward_match_the_cpu(name, dtype):
    fn, makers, terms = OPS[name]
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    arrays = [make(rng, dtype) for make in makers]
    up_seed = int(rng.integers(2 ** 32))

    def upstream(shape, dt):
        return np.random.default_rng(up_seed).standard_normal(shape).astype(dt)

    out_cpu, grads_cpu = run_op(fn, arrays, upstream, "cpu")
    out_gpu, grads_gpu = run_op(fn, arrays, upstream, GPU)
    assert out_gpu.device == "cuda:0"
    assert_matches(out_gpu, out_cpu, terms, f"{name} forward")
    assert len(grads_gpu) == len(grads_cpu)
    for i, (g_gpu, g_cpu) in enumerate(zip(grads_gpu, grads_cpu)):
        assert (g_gpu is None) == (g_cpu is None), f"{name}: a gradient for input {i} on one device only"
        if g_cpu is None:          # sg[x], and z_q behind straight_through: no gradient on either
            continue
        # a backward sums over what forward spread out, so allow the forward's terms once more
        assert_matches(g_gpu, g_cpu, 2 * terms, f"{name} gradient of input {i}")


def test_getitem_with_a_device_index_and_a_host_gradient():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((5, 3))
    idx = np.array([4, 0, 4, 4, 2])
    upstream = rng.standard_normal((5, 3))
    x_cpu = mv.tensor(a, requires_grad=True)
    x_cpu[idx].backward(upstream)
    x_gpu = mv.tensor(a, requires_grad=True, device=GPU)
    y = x_gpu[mv.tensor(idx, device=GPU)]
    y.backward(upstream)                       # a host gradient for a device output is moved over
    assert_matches(x_gpu.grad, x_cpu.grad, 5)


def test_to_device_is_differentiable_both_ways():
    rng = np.random.default_rng(2)
    a = rng.standard_normal((3, 4))
    x = mv.tensor(a, requires_grad=True)                    # a CPU leaf
    y = x.to(GPU)
    assert y.device == "cuda:0"
    z = (y * y).sum().to("cpu")
    assert z.device == "cpu"
    z.backward()
    assert x.grad is not None and not on_gpu(x.grad)
    np.testing.assert_allclose(x.grad, 2 * a, rtol=1e-12)


def test_cross_entropy_takes_a_host_or_device_target():
    rng = np.random.default_rng(3)
    logits = rng.standard_normal((4, 5, 3)).astype(np.float32)
    target = rng.integers(0, 5, (4, 3))
    expected = F.cross_entropy(mv.tensor(logits), target).item()
    for t in (target, backend.to_device(target, GPU), mv.tensor(target, device=GPU)):
        got = F.cross_entropy(mv.tensor(logits, device=GPU), t)
        assert on_gpu(got)
        assert_close_floats(got.item(), expected, 60 * EPS32)


# ---------------------------------------------------------------- quantisers
def quantizer_pair(cls, **kwargs):
    """The same quantiser (same seed) on the CPU and on the GPU."""
    mv.manual_seed(0)
    cpu = cls(**kwargs)
    mv.manual_seed(0)
    gpu = cls(**kwargs).to(GPU)
    return cpu, gpu


def compare_vq_outputs(out_gpu, out_cpu, terms, what):
    assert_matches(out_gpu.quantized, out_cpu.quantized, 1, what + " quantized")
    assert_matches(out_gpu.loss, out_cpu.loss, terms, what + " loss")
    assert_matches(out_gpu.indices, out_cpu.indices, 1, what + " indices")
    assert_matches(out_gpu.perplexity, out_cpu.perplexity, terms, what + " perplexity")
    assert out_gpu.codes_used == out_cpu.codes_used


def compare_state(gpu_module, cpu_module, terms, what):
    cpu_state = cpu_module.state_dict()
    for key, value in gpu_module.state_dict().items():
        assert_matches(value, cpu_state[key], terms, f"{what} {key}")


@pytest.mark.parametrize("kernel", ["numpy", "auto"])
@pytest.mark.parametrize("options", [dict(), dict(dead_code_threshold=2.0, max_replacements=4),
                                     dict(kmeans_init=True), dict(estimator="rotation")])
def test_vector_quantizer_matches_the_cpu(kernel, options):
    rng = np.random.default_rng(4)
    cpu, gpu = quantizer_pair(nn.VectorQuantizer, num_embeddings=12, embedding_dim=4, commitment_cost=0.3,
                              kernel=kernel, **options)
    for step in range(3):
        z = rng.standard_normal((2, 4, 3, 5)).astype(np.float32)
        up = rng.standard_normal(z.shape).astype(np.float32)
        outs = []
        for q, device in ((cpu, "cpu"), (gpu, GPU)):
            q.zero_grad()
            mv.manual_seed(10 + step)            # dead-code replacement draws rows from the generator
            z_e = mv.tensor(z, requires_grad=True, device=device)
            out = q(z_e)
            ((out.quantized * backend.to_device(up, device)).sum() + out.loss).backward()
            outs.append((out, z_e))
        (out_cpu, z_cpu), (out_gpu, z_gpu) = outs
        compare_vq_outputs(out_gpu, out_cpu, 120, f"step {step}")
        assert out_gpu.replaced == out_cpu.replaced
        assert_matches(z_gpu.grad, z_cpu.grad, 120, f"step {step} dL/dz_e")
        # dL/de_k sums 2 (e_k - z_e) / numel over the positions that picked k: nearly nothing after k-means
        # (a centroid), so the bound is taken from the summed terms, not from the result
        rows = np.abs(host(out_cpu.quantized) - z).transpose(0, 2, 3, 1).reshape(-1, z.shape[1])
        magnitude = np.zeros(cpu.codebook.shape)
        np.add.at(magnitude, host(out_cpu.indices).reshape(-1), 2 * rows / z.size)
        assert_matches(gpu.codebook.grad, cpu.codebook.grad, 120, f"step {step} dL/dcodebook", magnitude)
        compare_state(gpu, cpu, 120, f"step {step}")
        for key, value in gpu.state_dict().items():
            assert on_gpu(value), f"buffer {key} left the device"


@pytest.mark.parametrize("options", [dict(), dict(dead_code_threshold=2.0, max_replacements=4),
                                     dict(kmeans_init=True)])
def test_ema_quantizer_update_matches_the_cpu(options):
    rng = np.random.default_rng(5)
    cpu, gpu = quantizer_pair(nn.VectorQuantizerEMA, num_embeddings=10, embedding_dim=3, decay=0.8,
                              kernel="numpy", **options)
    for step in range(4):
        z = rng.standard_normal((3, 3, 4, 2)).astype(np.float32)
        outs = []
        for q, device in ((cpu, "cpu"), (gpu, GPU)):
            mv.manual_seed(20 + step)
            z_e = mv.tensor(z, requires_grad=True, device=device)
            out = q(z_e)
            out.loss.backward()
            outs.append((out, z_e))
        (out_cpu, z_cpu), (out_gpu, z_gpu) = outs
        compare_vq_outputs(out_gpu, out_cpu, 100, f"step {step}")
        assert_matches(z_gpu.grad, z_cpu.grad, 100, f"step {step} dL/dz_e")
        compare_state(gpu, cpu, 100, f"step {step}")
        for key, value in gpu.state_dict().items():
            assert on_gpu(value), f"buffer {key} left the device"
    gpu.eval()          # eval mode: no update
    before = host(gpu.codebook).copy()
    gpu(mv.tensor(rng.standard_normal((1, 3, 2, 2)).astype(np.float32), device=GPU))
    np.testing.assert_array_equal(host(gpu.codebook), before)


@pytest.mark.parametrize("ema", [False, True])
def test_duplicated_codes_go_to_the_first_copy_on_the_gpu(ema):
    """Exact ties through the quantiser (and so the CUDA kernel under "auto"): the lowest index wins."""
    cls = nn.VectorQuantizerEMA if ema else nn.VectorQuantizer
    rng = np.random.default_rng(6)
    codebook = rng.integers(-3, 4, (6, 4)).astype(np.float32)
    codebook = codebook[[0, 1, 2, 1, 0, 5, 2, 5]]        # rows 3, 4, 6, 7 copy earlier ones
    for device in ("cpu", GPU):
        mv.manual_seed(0)
        q = cls(8, 4, kernel="auto").eval().to(device)
        if ema:
            q.codebook = backend.to_device(codebook, device)
        else:
            q.codebook.data = backend.to_device(codebook, device)
        z = codebook[[3, 4, 6, 7, 7, 1]].reshape(1, 6, 4).transpose(0, 2, 1)[..., None]     # (1, 4, 6, 1)
        out = q(mv.tensor(np.ascontiguousarray(z), device=device))
        assert backend.array_device(out.indices) == backend.device_name(device)
        np.testing.assert_array_equal(host(out.indices).reshape(-1), [1, 0, 2, 5, 5, 1])


# ---------------------------------------------------------------- optimisers
@pytest.mark.parametrize("make", [
    lambda ps: optim.Adam(ps, lr=0.01, betas=(0.8, 0.95), eps=1e-6),
    lambda ps: optim.Adam(ps, lr=0.003, weight_decay=0.1),
    lambda ps: optim.SGD(ps, lr=0.05),
    lambda ps: optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
], ids=["adam", "adam-weight-decay", "sgd", "sgd-nesterov"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_optimizer_steps_match_the_cpu(make, dtype):
    rng = np.random.default_rng(7)
    shapes = [(4, 3), (5,), ()]
    start = [rng.standard_normal(s).astype(dtype) for s in shapes]
    grads = [[rng.standard_normal(s).astype(dtype) * 10.0 ** rng.uniform(-3, 1) for s in shapes] for _ in range(4)]
    runs = {}
    for device in ("cpu", GPU):
        params = [mv.tensor(a.copy(), requires_grad=True, device=device) for a in start]
        opt = make(params)
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = backend.to_device(g, device)
            opt.step()
        runs[device] = (params, opt)
    (p_cpu, opt_cpu), (p_gpu, opt_gpu) = runs["cpu"], runs[GPU]
    for a, b in zip(p_gpu, p_cpu):
        assert_matches(a, b, 8)
    state_cpu = opt_cpu.state_dict()
    for key, value in opt_gpu.state_dict().items():
        if hasattr(value, "shape"):
            assert_matches(value, state_cpu[key], 8, key)
        else:
            assert value == state_cpu[key]
    # a GPU optimiser state loads into a CPU optimiser and back
    params = [mv.tensor(a.copy(), requires_grad=True) for a in start]
    fresh = make(params)
    fresh.load_state_dict(opt_gpu.state_dict())
    for key, value in fresh.state_dict().items():
        if hasattr(value, "shape"):
            assert not on_gpu(value)
            np.testing.assert_array_equal(value, host(opt_gpu.state_dict()[key]))


# ---------------------------------------------------------------- the VQ-VAE
TINY_MODEL = dict(in_channels=1, num_hiddens=8, num_residual_hiddens=4, num_residual_layers=1, embedding_dim=4,
                  num_embeddings=16)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("decay", [0.0, 0.9])
def test_vqvae_forward_backward_matches_the_cpu(decay, dtype):
    rng = np.random.default_rng(8)
    x = rng.uniform(-0.5, 0.5, (2, 1, 16, 16)).astype(dtype)
    results = {}
    for device in ("cpu", GPU):
        mv.manual_seed(3)
        model = mv.models.VQVAE(decay=decay, quantizer=mv.models.PAPER_QUANTIZER, kernel="numpy",
                                **TINY_MODEL).astype(dtype).to(device)          # the paper's, or its EMA codebook
        x_recon, vq = model(mv.tensor(x, device=device))
        loss = F.mse_loss(x_recon, mv.tensor(x, device=device)) + vq.loss
        loss.backward()
        results[device] = (model, x_recon, vq, loss)
    m_cpu, r_cpu, vq_cpu, l_cpu = results["cpu"]
    m_gpu, r_gpu, vq_gpu, l_gpu = results[GPU]
    terms = 2000          # seven convolutions of up to 8*4*4 = 128 terms each, and means over 512 pixels
    assert_matches(vq_gpu.indices, vq_cpu.indices, what="indices")
    assert_matches(r_gpu, r_cpu, terms, "reconstruction")
    assert_matches(l_gpu, l_cpu, terms, "loss")
    grads_cpu = dict(m_cpu.named_parameters())
    for name, p in m_gpu.named_parameters():
        assert_matches(p.grad, grads_cpu[name].grad, 2 * terms, f"gradient of {name}")
    compare_state(m_gpu, m_cpu, terms, "state")


def test_vqvae_encode_and_decode_on_the_gpu():
    rng = np.random.default_rng(9)
    x = rng.uniform(-0.5, 0.5, (3, 1, 8, 8)).astype(np.float32)
    out = {}
    for device in ("cpu", GPU):
        mv.manual_seed(4)
        model = mv.models.VQVAE(decay=0.9, quantizer=mv.models.PAPER_QUANTIZER, kernel="auto", **TINY_MODEL).to(device)
        codes = model.encode(backend.to_device(x, device))
        with mv.no_grad():
            images = model.decode_indices(codes)
        out[device] = codes, images
    assert_matches(out[GPU][0], out["cpu"][0], what="codes")
    assert_matches(out[GPU][1], out["cpu"][1], 200, "decoded images")


# ---------------------------------------------------------------- training, the prior, sampling
@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return write_blobs(tmp_path_factory.mktemp("gpu-data") / "blobs.npz", 48, 16)


TINY_MODEL = dict(num_hiddens=8, num_residual_hiddens=4, num_residual_layers=1, embedding_dim=4, num_embeddings=16)


def train_both(tiny_data, root, model=None, **options):
    """train_vqvae on the CPU and on the GPU, three steps logged every step; returns the two run folders."""
    folders = {}
    for device in ("cpu", GPU):
        out = os.path.join(root, f"vqvae-{device}")
        training.train_vqvae(TrainConfig(out=out, data=tiny_data, steps=3, batch_size=8, lr=2e-3, seed=1,
                                         device=device, eval_every=100, checkpoint_every=3, log_every=1,
                                         progress=False, **options),
                             ModelConfig.paper(**TINY_MODEL, **(model or {})))     # the paper's, options on top
        folders[device] = out
    return folders


def compare_logs(folders, keys, first_rtol, later_rtol):
    logs = {device: read_log(folder) for device, folder in folders.items()}
    cpu, gpu = logs["cpu"], logs[GPU]
    assert [(r["step"], r["split"]) for r in gpu] == [(r["step"], r["split"]) for r in cpu]
    for rec_cpu, rec_gpu in zip(cpu, gpu):
        # the first step sees the same weights (float32 forward rounding only); later ones follow Adam
        # updates whose sign can flip where a gradient is at rounding level, so they drift further
        rtol = first_rtol if rec_cpu["step"] == 1 and rec_cpu["split"] == "train" else later_rtol
        for key in keys:
            if key in rec_cpu:
                assert_close_floats(rec_gpu[key], rec_cpu[key], rtol, f"step {rec_cpu['step']} {key}")


@pytest.mark.parametrize("model,options", [(None, dict()), (dict(kmeans_init=True, dead_code_threshold=0.5, max_replacements=4), dict()),
                                           (None, dict(log_grads=True))],
                         ids=["plain", "kmeans-dead-codes", "log-grads"])
def test_train_vqvae_first_losses_match_the_cpu(tiny_data, tmp_path, model, options):
    folders = train_both(tiny_data, str(tmp_path), model, **options)
    compare_logs(folders, ["loss", "nmse", "vq_loss", "recon_error"], 1e-4, 5e-3)
    assert os.path.exists(os.path.join(folders[GPU], "reconstructions.png"))


def test_train_vqvae_ema_first_losses_match_the_cpu(tiny_data, tmp_path):
    folders = {}
    for device in ("cpu", GPU):
        out = str(tmp_path / device)
        training.train_vqvae(TrainConfig(out=out, data=tiny_data, steps=3, batch_size=8, seed=2, device=device,
                                         eval_every=2, checkpoint_every=3, log_every=1, progress=False),
                             ModelConfig.paper(**TINY_MODEL, decay=0.9))
        folders[device] = out
    compare_logs(folders, ["loss", "nmse", "vq_loss", "mse"], 1e-4, 5e-3)


def test_prior_training_and_sampling_match_the_cpu(tiny_data, tmp_path):
    import shutil
    vq_folders = train_both(tiny_data, str(tmp_path))
    # each device's prior gets its own copy of the CPU-trained VQ-VAE, so each encodes the data itself
    prior_folders, ckpts = {}, {}
    for device in ("cpu", GPU):
        folder = tmp_path / f"prior-{device}"
        folder.mkdir()
        ckpt = folder / "vqvae.npz"
        shutil.copy(os.path.join(vq_folders["cpu"], "checkpoint.npz"), ckpt)
        out = str(folder / "prior")
        prior_training.train_prior(str(ckpt), PriorConfig(
            out=out, steps=3, batch_size=8, seed=0, device=device, eval_every=2, checkpoint_every=3, log_every=1,
            conditional=True, progress=False, channels=4, num_layers=2, kernel_size=3, head_channels=8))
        prior_folders[device], ckpts[device] = out, os.path.join(out, "checkpoint.npz")
    caches = {device: [f for f in os.listdir(tmp_path / f"prior-{device}") if f.startswith("codes-")]
              for device in prior_folders}
    codes = {device: mv.load(tmp_path / f"prior-{device}" / caches[device][0]) for device in prior_folders}
    for key in codes["cpu"]:
        np.testing.assert_array_equal(codes[GPU][key], codes["cpu"][key], err_msg=f"encoded {key}")
    compare_logs(prior_folders, ["loss", "bits_per_latent", "nll_bits"], 1e-4, 5e-3)
    # sampling the same (CPU-trained) prior on both devices draws the same codes and images
    images = {device: prior_training.sample_images(ckpts["cpu"], n=3, label=1, seed=5, device=device)
              for device in ("cpu", GPU)}
    assert not on_gpu(images[GPU])
    np.testing.assert_allclose(images[GPU], images["cpu"], rtol=1e-4, atol=1e-5)


def test_cuda_index_beyond_the_visible_devices_is_one_line(tiny_data, tmp_path, capsys):
    from minivq.cli import main
    count = cupy.cuda.runtime.getDeviceCount()
    with pytest.raises(RuntimeError) as info:
        mv.tensor(np.zeros(2), device=f"cuda:{count}")
    assert f"only {count} GPU(s) are visible" in str(info.value) and "\n" not in str(info.value)
    argv = ["train", "--data", tiny_data, "--out", str(tmp_path / "run"), "--steps", "1", "--batch", "8",
            "--no-progress", "--device", f"cuda:{count}"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"cuda:{count}" in err[0] and "--device cpu" in err[0], err
