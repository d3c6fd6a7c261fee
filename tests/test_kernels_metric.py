"""nearest_code's maximum-inner-product search (metric="ip"), on every backend.

Each backend against a brute-force float64 argmax of x.e (exact where the best code is clear of the
runner-up by more than rounding), exact ties to the lowest index (duplicated codes, and distinct
codes with equal integer inner products), the cosine lookup it serves, the CUDA source run on the
CPU by tests/test_cuda_compile.py's emulator, the fake CuPy, and the errors.
"""
import sys
import types

import numpy as np
import pytest

from minivq import kernels
from minivq.kernels import cuda_modules, nearest_cuda, nearest_numpy

CPU_BACKENDS = [b for b in kernels.available_backends() if b != "cupy"]
DTYPES = [np.float32, np.float64]


def brute_inner(x, codebook):
    return x.astype(np.float64) @ codebook.astype(np.float64).T


def check_against_brute(x, codebook, got):
    """The chosen code's x.e is the largest within rounding; exactly the argmax where that is clear."""
    assert got.dtype == np.int64 and got.shape == (x.shape[0],)
    ip = brute_inner(x, codebook)
    eps = np.finfo(x.dtype).eps
    x64, e64 = x.astype(np.float64), codebook.astype(np.float64)
    slack = 4 * (x.shape[1] + 2) * eps * np.abs(x64).sum(1) * np.abs(e64).max()
    rows = np.arange(x.shape[0])
    assert np.all(ip[rows, got] >= ip.max(1) - slack)
    if codebook.shape[0] == 1:
        return np.ones(x.shape[0], bool)
    top = -np.partition(-ip, 1, axis=1)[:, :2]
    separated = top[:, 0] - top[:, 1] > 2 * slack
    np.testing.assert_array_equal(got[separated], ip.argmax(1)[separated])
    return separated


def first_occurrence(codebook):
    _, first, inverse = np.unique(codebook, axis=0, return_index=True, return_inverse=True)
    return first[inverse.reshape(-1)]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k,d", [(1, 1, 1), (7, 3, 1), (65, 17, 31), (257, 513, 16), (77, 300, 300)])
def test_ip_matches_brute_force(rng, backend, dtype, n, k, d):
    x = rng.standard_normal((n, d)).astype(dtype)
    codebook = rng.standard_normal((k, d)).astype(dtype)
    got = kernels.nearest_code(x, codebook, backend=backend, metric="ip")
    separated = check_against_brute(x, codebook, got)
    assert separated.mean() > 0.9
    reference = nearest_numpy.nearest_code_numpy(x, codebook, metric="ip")
    np.testing.assert_array_equal(got[separated], reference[separated])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_ip_is_not_l2(rng, backend, dtype):
    """A long code wins the inner product from a short code nearer in distance: the metric is really used."""
    codebook = np.array([[1.0, 0.0], [10.0, 5.0]], dtype)
    x = np.array([[1.0, 0.1]], dtype)
    assert kernels.nearest_code(x, codebook, backend=backend)[0] == 0
    assert kernels.nearest_code(x, codebook, backend=backend, metric="ip")[0] == 1


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k,d,uniques", [(40, 3, 4), (100, 64, 7), (333, 300, 5), (17, 1, 2)])
def test_ip_ties_from_duplicated_codes_go_to_lowest_index(rng, backend, dtype, k, d, uniques):
    vectors = rng.integers(-20, 20, size=(uniques, d)).astype(dtype)
    codebook = vectors[rng.integers(0, uniques, k)]
    codebook[-1] = codebook[0]
    x = rng.standard_normal((250, d)).astype(dtype)
    got = kernels.nearest_code(x, codebook, backend=backend, metric="ip")
    np.testing.assert_array_equal(got, first_occurrence(codebook)[got])      # always the first copy
    check_against_brute(x, codebook, got)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_ip_exact_ties_between_distinct_codes_go_to_lowest_index(backend, dtype):
    """Integer data: distinct codes with bitwise-equal inner products; the lowest index wins, in any tile."""
    codebook = np.zeros((70, 4), dtype)
    codebook[5] = [1, 0, 0, 0]
    codebook[9] = [0, 1, 0, 0]          # x.e equal to code 5's for x = (1, 1, *, *)
    codebook[40] = [0, 0, 1, 0]
    codebook[66] = [1, 0, 0, 0]         # a duplicate of code 5 in the last, padded tile
    x = np.array([[1, 1, 0, 0], [2, 2, 2, 0], [0, 3, 3, 0], [-1, -1, -1, 0]], dtype)
    got = kernels.nearest_code(x, codebook, backend=backend, metric="ip")
    # row 4: every scored x.e is <= 0 and the zero codes tie at 0: the first zero code, index 0
    np.testing.assert_array_equal(got, [5, 5, 9, 0])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_cosine_lookup_is_l2_on_unit_vectors(rng, backend):
    """On l2-normalised codes, the largest inner product is the nearest code of the normalised row."""
    x = rng.standard_normal((500, 8))
    codebook = rng.standard_normal((64, 8))
    unit = codebook / np.linalg.norm(codebook, axis=1, keepdims=True)
    got = kernels.nearest_code(x, unit, backend=backend, metric="ip")
    x_unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    l2 = kernels.nearest_code(x_unit, unit, backend=backend)
    cos = brute_inner(x_unit, unit)
    top = -np.partition(-cos, 1, axis=1)[:, :2]
    clear = top[:, 0] - top[:, 1] > 1e-9
    np.testing.assert_array_equal(got[clear], l2[clear])
    assert clear.mean() > 0.99


@pytest.mark.parametrize("metric", ["l1", "cosine", None, 2])
def test_unknown_metric_is_named(metric):
    with pytest.raises(ValueError, match="unknown metric"):
        kernels.nearest_code(np.zeros((2, 3)), np.zeros((4, 3)), metric=metric)


def test_numba_packing_zero_norms_for_ip():
    pytest.importorskip("numba")
    from minivq.kernels import nearest_numba
    k = nearest_numba.CODES + 2                                    # one full tile and a padded one
    codebook = np.arange(1.0, 2 * k + 1).reshape(k, 2)
    _, norms_l2 = nearest_numba.pack_codebook(codebook)
    _, norms_ip = nearest_numba.pack_codebook(codebook, "ip")
    assert norms_ip.shape == norms_l2.shape == (2, nearest_numba.CODES)
    np.testing.assert_array_equal(norms_ip.reshape(-1)[:k], 0)
    assert np.all(np.isinf(norms_ip.reshape(-1)[k:]))              # padding still never wins


# ----------------------------------------------------------------- the CUDA source, run on the CPU
from test_cuda_compile import emulator_library  # noqa: E402,F401  (the fixture)
from test_cuda_compile import fake_cupy as cuda_stand_in  # noqa: E402  (its CuPy stand-in for the emulator)


@pytest.fixture
def emulate(emulator_library, monkeypatch):  # noqa: F811
    """nearest_cuda.nearest_code_cupy with metric="ip", its kernels run by the emulator."""
    def run(x, codebook, sm_count=132):
        cp = cuda_stand_in(emulator_library, sm_count)
        cp.zeros = lambda shape, dtype: np.zeros(shape, dtype=dtype).view(cp.ndarray)
        monkeypatch.setitem(sys.modules, "cupy", cp)
        monkeypatch.setattr(cuda_modules, "_modules", {})
        return np.asarray(nearest_cuda.nearest_code_cupy(cp.ascontiguousarray(x), cp.ascontiguousarray(codebook),
                                                         metric="ip"))
    return run


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k,d,sm_count", [(1, 1, 1, 132), (130, 200, 9, 1), (70, 300, 20, 132)])
def test_emulated_cuda_ip_matches_brute_force(emulate, dtype, n, k, d, sm_count):
    rng = np.random.default_rng(n + k + d)
    x = rng.standard_normal((n, d)).astype(dtype)
    codebook = rng.standard_normal((k, d)).astype(dtype)
    got = emulate(x, codebook, sm_count)
    separated = check_against_brute(x, codebook, got.astype(np.int64))
    assert separated.mean() > 0.9


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sm_count", [1, 132])
def test_emulated_cuda_ip_ties_go_to_the_lowest_index(emulate, dtype, sm_count):
    rng = np.random.default_rng(7)
    codebook = rng.integers(-5, 5, size=(6, 11)).astype(dtype)[rng.integers(0, 6, 260)]
    codebook[-1] = codebook[0]
    x = rng.standard_normal((60, 11)).astype(dtype)
    got = emulate(x, codebook, sm_count)
    np.testing.assert_array_equal(got, first_occurrence(codebook)[got])
    check_against_brute(x, codebook, got.astype(np.int64))
    ints = np.zeros((130, 4), dtype)                         # distinct codes, equal x.e, across tiles
    ints[3], ints[100], ints[129] = [1, 0, 0, 0], [0, 1, 0, 0], [1, 0, 0, 0]
    got = emulate(np.array([[1, 1, 0, 0], [0, 2, 0, 0]], dtype), ints, sm_count)
    np.testing.assert_array_equal(got, [3, 100])


# ----------------------------------------------------------------- on the fake CuPy
from test_fake_cupy import fake_cupy  # noqa: E402,F401  (the fixture)


def test_ip_on_device_arrays_through_the_fake(fake_cupy, monkeypatch):  # noqa: F811
    """Device arrays reach the GPU backend with the metric; the result stays on the device."""
    cp = fake_cupy
    seen = {}

    def gpu_kernel(x, codebook, metric="l2"):
        seen["metric"] = metric
        return nearest_numpy.nearest_code_numpy(x, codebook, metric=metric)

    monkeypatch.setitem(kernels._loaded, "cupy", types.SimpleNamespace(nearest_code_cupy=gpu_kernel))
    rng = np.random.default_rng(3)
    x, codebook = rng.standard_normal((40, 5)), rng.standard_normal((30, 5))
    got = kernels.nearest_code(cp.asarray(x), cp.asarray(codebook), metric="ip")
    assert seen["metric"] == "ip" and isinstance(got, cp.ndarray)
    check_against_brute(x, codebook, cp.asnumpy(got))
    # the GEMM reference itself on device arrays
    got = kernels.nearest_code(cp.asarray(x), cp.asarray(codebook), backend="numpy", metric="ip")
    np.testing.assert_array_equal(cp.asnumpy(got), nearest_numpy.nearest_code_numpy(x, codebook, metric="ip"))
