"""minivq's CUDA kernels on a GPU: the nearest-code search against the NumPy reference (ties
included), and the window copies and Adam's fused step against theirs, to the bit.

Skipped without CuPy or a GPU (tests/test_cuda_emulated.py and test_cuda_compile.py run the
same sources on the CPU through an emulation of CUDA).
"""
import numpy as np
import pytest

import minivq as mv
from minivq import kernels, optim
from minivq.kernels import nearest_numpy, windows_numpy

pytestmark = pytest.mark.gpu

cp = pytest.importorskip("cupy")
try:
    _devices = cp.cuda.runtime.getDeviceCount()
except Exception:          # CuPy installed, but no driver or no device
    _devices = 0
if _devices == 0:
    pytest.skip("no CUDA GPU visible to CuPy", allow_module_level=True)

DTYPES = [np.float32, np.float64]


def brute_distances(x, codebook):
    x64, e64 = x.astype(np.float64), codebook.astype(np.float64)
    return np.stack([((x64 - e) ** 2).sum(1) for e in e64], axis=1)


def check(x, codebook, got):
    """Nearest within rounding everywhere; exactly the nearest where it is clear; a lower copy never loses."""
    got = cp.asnumpy(got)
    assert got.dtype == np.int64 and got.shape == (x.shape[0],)
    dist = brute_distances(x, codebook)
    eps = np.finfo(x.dtype).eps
    x64, e64 = x.astype(np.float64), codebook.astype(np.float64)
    slack = 4 * (x.shape[1] + 2) * eps * ((x64 ** 2).sum(1) + (e64 ** 2).sum(1).max())
    rows = np.arange(x.shape[0])
    assert np.all(dist[rows, got] <= dist.min(1) + slack)
    _, first, inverse = np.unique(codebook, axis=0, return_index=True, return_inverse=True)
    np.testing.assert_array_equal(got, first[inverse.reshape(-1)][got])
    if codebook.shape[0] > 1:
        two = np.partition(dist, 1, axis=1)[:, :2]
        clear = two[:, 1] - two[:, 0] > 2 * slack
        np.testing.assert_array_equal(got[clear], dist.argmin(1)[clear])
    return got


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k,d", [(1, 1, 1), (3, 17, 5), (127, 129, 8), (128, 128, 64), (129, 65, 63),
                                   (1000, 700, 24), (300, 5000, 3), (4097, 257, 100), (50, 9, 300)])
def test_cupy_matches_reference(rng, dtype, n, k, d):
    x = rng.standard_normal((n, d)).astype(dtype)
    codebook = rng.standard_normal((k, d)).astype(dtype)
    got = kernels.nearest_code(cp.asarray(x), cp.asarray(codebook), backend="cupy")
    assert isinstance(got, cp.ndarray)
    got = check(x, codebook, got)
    reference = nearest_numpy.nearest_code_numpy(x, codebook)
    assert (got == reference).mean() > 0.99


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [37, 70000])        # the codebook split over gridDim.y, and not
def test_exact_ties_from_duplicated_codes(rng, dtype, n):
    distinct = rng.integers(-20, 20, size=(9, 16)).astype(dtype) * 5
    codebook = distinct[rng.integers(0, 9, 1500)]
    codebook[-1] = codebook[0]
    x = rng.standard_normal((n, 16)).astype(dtype) * 30
    x[:3] = codebook[[1499, 700, 3]]
    got = kernels.nearest_code(cp.asarray(x), cp.asarray(codebook))       # auto -> cupy
    check(x[:2000], codebook, got[:2000])
    got = cp.asnumpy(got)
    _, first, inverse = np.unique(codebook, axis=0, return_index=True, return_inverse=True)
    first_copy = first[inverse.reshape(-1)]
    np.testing.assert_array_equal(got, first_copy[got])
    np.testing.assert_array_equal(got[:3], first_copy[[1499, 700, 3]])


@pytest.mark.parametrize("dtype", DTYPES)
def test_well_separated_data_is_exact(rng, dtype):
    codebook = np.unique(rng.integers(-50, 50, size=(800, 12)).astype(dtype) * 10, axis=0)
    truth = rng.integers(0, codebook.shape[0], 30000)
    x = codebook[truth] + rng.uniform(-1, 1, (30000, 12)).astype(dtype)
    np.testing.assert_array_equal(cp.asnumpy(kernels.nearest_code(cp.asarray(x), cp.asarray(codebook))), truth)


def test_reference_path_runs_on_cupy_arrays(rng):
    x = rng.standard_normal((500, 32)).astype(np.float32)
    codebook = rng.standard_normal((300, 32)).astype(np.float32)
    got = kernels.nearest_code(cp.asarray(x), cp.asarray(codebook), backend="numpy")
    assert isinstance(got, cp.ndarray)
    check(x, codebook, got)


def test_non_contiguous_and_empty(rng):
    x = cp.asarray(rng.standard_normal((90, 20)).astype(np.float32))
    codebook = cp.asfortranarray(cp.asarray(rng.standard_normal((33, 10)).astype(np.float32)))
    check(cp.asnumpy(x[::2, ::2]), cp.asnumpy(codebook), kernels.nearest_code(x[::2, ::2], codebook))
    empty = kernels.nearest_code(cp.zeros((0, 10), cp.float32), codebook)
    assert isinstance(empty, cp.ndarray) and empty.dtype == cp.int64 and empty.shape == (0,)


def test_auto_picks_cupy_for_cupy_arrays(rng, monkeypatch):
    from minivq.kernels import nearest_cuda
    calls = []
    real = nearest_cuda.nearest_code_cupy
    monkeypatch.setattr(nearest_cuda, "nearest_code_cupy", lambda *a: calls.append(1) or real(*a))
    kernels.nearest_code(cp.ones((4, 3), cp.float32), cp.ones((2, 3), cp.float32))
    assert calls == [1] and "cupy" in kernels.available_backends()


def test_wrong_device_for_the_backend():
    x, codebook = np.zeros((4, 3), np.float32), np.ones((5, 3), np.float32)
    with pytest.raises(TypeError, match="backend 'cupy' needs CuPy arrays but got NumPy arrays"):
        kernels.nearest_code(x, codebook, backend="cupy")
    if "numba" in kernels.available_backends():
        with pytest.raises(TypeError, match="backend 'numba' runs on the CPU but the arrays are CuPy arrays"):
            kernels.nearest_code(cp.asarray(x), cp.asarray(codebook), backend="numba")
    with pytest.raises(TypeError, match="same device, got x on cpu and codebook on cuda:0"):
        kernels.nearest_code(x, cp.asarray(codebook))


def test_non_finite_on_the_gpu():
    x = cp.zeros((4, 3), cp.float32)
    x[1, 2] = cp.nan
    with pytest.raises(ValueError, match=r"x \(4, 3\) contains NaN or inf: first at row 1, column 2"):
        kernels.nearest_code(x, cp.ones((5, 3), cp.float32))


@pytest.mark.slow
def test_benchmark_size_agrees_with_cublas_reference():
    gen = cp.random.default_rng(3)
    x = gen.standard_normal((262144, 64), dtype=cp.float32)
    codebook = gen.standard_normal((8192, 64), dtype=cp.float32)
    got = kernels.nearest_code(x, codebook, backend="cupy")
    reference = kernels.nearest_code(x, codebook, backend="numpy")
    assert float((got == reference).mean()) > 0.999
    check(cp.asnumpy(x[:1000]), cp.asnumpy(codebook), got[:1000])


# ---------------------------------------------------------------- the window copies and Adam
def test_auto_takes_the_cuda_kernels_for_cupy_arrays():
    a = cp.zeros((1, 4, 4, 2), dtype=cp.float32)
    assert kernels.window_backend(a) == "cupy", kernels._load("cuda-windows")
    p, g = cp.ones(3, dtype=cp.float32), cp.ones(3, dtype=cp.float32)
    m, v = cp.zeros(3, dtype=cp.float32), cp.zeros(3, dtype=cp.float32)
    assert kernels.adam_step(p, g, m, v, 1e-3, (0.9, 0.999), 1e-8, 0.0, 1), kernels._load("cuda-adam")
    assert kernels.window_backend(np.zeros((1, 4, 4, 2))) in ("numba", "numpy")


@pytest.mark.parametrize("dtype", DTYPES)
def test_windows_equal_the_reference_on_random_geometries(dtype):
    rng = np.random.default_rng(3)
    for _ in range(40):
        kh, kw = rng.integers(1, 6, 2)
        sh, sw = rng.integers(1, 4, 2)
        ph, pw = rng.integers(0, 3, 2)
        h, w = rng.integers(max(1, kh - 2 * ph), 20), rng.integers(max(1, kw - 2 * pw), 20)
        n, c = rng.integers(1, 5), rng.integers(1, 70)
        geometry = ((int(kh), int(kw)), (int(sh), int(sw)), (int(ph), int(pw)))
        nchw = rng.standard_normal((n, c, h, w)).astype(dtype)
        image = nchw.transpose(0, 2, 3, 1)
        expected = windows_numpy.im2col_numpy(image, *geometry)
        cols = kernels.im2col(cp.asarray(nchw).transpose(0, 2, 3, 1), *geometry)
        np.testing.assert_array_equal(cp.asnumpy(cols), expected)
        grad = rng.standard_normal(expected.shape).astype(dtype)
        reference = windows_numpy.col2im_numpy(grad, np.empty(image.shape, dtype), *geometry)
        out = cp.full((n, c, h, w), cp.nan, dtype=dtype).transpose(0, 2, 3, 1)        # strided and poisoned
        kernels.col2im(cp.asarray(grad), out, *geometry)
        np.testing.assert_array_equal(cp.asnumpy(out), reference)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("settings", [dict(), dict(lr=0.01, betas=(0.8, 0.95), eps=1e-6), dict(weight_decay=0.1)],
                         ids=["default", "betas", "decay"])
def test_the_fused_adam_step_equals_the_cpu_step_to_the_bit(dtype, settings):
    rng = np.random.default_rng(9)
    shapes = [(64, 3, 4, 4), (1000,), ()]
    start = [rng.standard_normal(s).astype(dtype) for s in shapes]
    runs = {}
    for device in ("cpu", "cuda"):
        params = [mv.tensor(a.copy(), requires_grad=True, device=device) for a in start]
        runs[device] = (params, optim.Adam(params, **settings))
    for _ in range(5):
        grads = [(rng.standard_normal(s) * 10.0 ** rng.uniform(-3, 1)).astype(dtype) for s in shapes]
        for device, (params, opt) in runs.items():
            for p, g in zip(params, grads):
                p.grad = g if device == "cpu" else cp.asarray(g)
            opt.step()
    (cpu, opt_cpu), (gpu, opt_gpu) = runs["cpu"], runs["cuda"]
    for i, (a, b) in enumerate(zip(cpu, gpu)):
        np.testing.assert_array_equal(cp.asnumpy(b.data), a.data)
        for name in ("exp_avg", "exp_avg_sq"):
            np.testing.assert_array_equal(cp.asnumpy(opt_gpu.state[i][name]), opt_cpu.state[i][name])
