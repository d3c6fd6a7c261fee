"""minivq.kernels.nearest_code: every CPU backend against the NumPy reference, the reference
against a brute-force float64 formula, exact ties, and the validation at the public boundary."""
import os
import subprocess
import sys

import numpy as np
import pytest

import minivq as mv
from minivq import kernels
from minivq.kernels import nearest_numpy

CPU_BACKENDS = [b for b in kernels.available_backends() if b != "cupy"]
FAST_BACKENDS = [b for b in CPU_BACKENDS if b != "numpy"]
DTYPES = [np.float32, np.float64]


# ----------------------------------------------------------------- helpers
def brute_distances(x, codebook):
    """||x_i - e_k||^2 in float64, straight from the definition (no GEMM expansion)."""
    x64, e64 = x.astype(np.float64), codebook.astype(np.float64)
    out = np.empty((x.shape[0], codebook.shape[0]))
    for k in range(codebook.shape[0]):
        diff = x64 - e64[k]
        out[:, k] = (diff * diff).sum(axis=1)
    return out


def rounding_slack(x, codebook):
    """How far from the true minimum a GEMM-expansion score in x.dtype may land, per row.

    Scores ||e||^2 - 2 x.e carry a rounding error of a few ulps of
    ||x||^2 + ||e||^2 per term of the D-long sum; this bounds it generously.
    """
    eps = np.finfo(x.dtype).eps
    d = max(1, x.shape[1])
    x64, e64 = x.astype(np.float64), codebook.astype(np.float64)
    scale = (x64 * x64).sum(1) + (e64 * e64).sum(1).max()
    return 4 * (d + 2) * eps * scale


def check_against_brute(x, codebook, indices):
    """The chosen code is nearest within rounding; where the nearest is clear, it is exactly it.

    Returns the mask of rows whose nearest code is separated from the
    runner-up by more than the rounding slack (there the index is exact).
    """
    assert indices.dtype == np.int64 and indices.shape == (x.shape[0],)
    dist = brute_distances(x, codebook)
    slack = rounding_slack(x, codebook)
    rows = np.arange(x.shape[0])
    best = dist.min(axis=1)
    chosen = dist[rows, indices]
    assert np.all(chosen <= best + slack), "a chosen code is farther than rounding allows"
    if codebook.shape[0] == 1:
        separated = np.ones(x.shape[0], bool)
    else:
        two = np.partition(dist, 1, axis=1)[:, :2]
        separated = two[:, 1] - two[:, 0] > 2 * slack
    np.testing.assert_array_equal(indices[separated], dist.argmin(axis=1)[separated])
    return separated


def first_occurrence(codebook):
    """For every code, the lowest index holding the same vector."""
    _, first, inverse = np.unique(codebook, axis=0, return_index=True, return_inverse=True)
    return first[inverse.reshape(-1)]


def separated_codebook(rng, k, d, dtype, spread=10.0):
    """K codes on a coarse random grid (pairwise far apart), and rows each close to one of them."""
    codes = rng.integers(-50, 50, size=(k, d)).astype(dtype) * spread
    _, keep = np.unique(codes, axis=0, return_index=True)
    return codes[np.sort(keep)]


# ----------------------------------------------------------------- the reference itself
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k,d", [(1, 1, 1), (7, 3, 1), (100, 37, 5), (257, 129, 64), (33, 600, 17), (5, 1, 300)])
def test_reference_matches_brute_force(rng, dtype, n, k, d):
    x = rng.standard_normal((n, d)).astype(dtype)
    codebook = rng.standard_normal((k, d)).astype(dtype)
    indices = nearest_numpy.nearest_code_numpy(x, codebook)
    separated = check_against_brute(x, codebook, indices)
    assert separated.mean() > 0.9          # the exact check really ran on most rows


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_exact_on_well_separated_data(rng, dtype):
    codebook = separated_codebook(rng, 300, 8, dtype)
    truth = rng.integers(0, codebook.shape[0], 2000)
    x = codebook[truth] + rng.uniform(-1, 1, (2000, 8)).astype(dtype)
    np.testing.assert_array_equal(nearest_numpy.nearest_code_numpy(x, codebook), truth)


@pytest.mark.parametrize("block_bytes", [1, 64, 4096, 10 ** 9])
def test_reference_chunking_changes_nothing(rng, block_bytes):
    x = rng.standard_normal((531, 9)).astype(np.float32)
    codebook = rng.standard_normal((70, 9)).astype(np.float32)
    expected = nearest_numpy.nearest_code_numpy(x, codebook)
    np.testing.assert_array_equal(nearest_numpy.nearest_code_numpy(x, codebook, block_bytes=block_bytes), expected)


def test_reference_chunks_bound_the_score_block():
    assert nearest_numpy.rows_per_chunk(512, 4) * 512 * 4 <= nearest_numpy.BLOCK_BYTES
    assert nearest_numpy.rows_per_chunk(10 ** 9, 8) == 1        # a huge codebook still makes progress
    assert nearest_numpy.rows_per_chunk(8192, 4) >= 256


# ----------------------------------------------------------------- every CPU backend against the reference
SHAPES = [
    (1, 1, 1), (1, 17, 3), (5, 1, 7), (3, 16, 64), (4, 15, 2), (63, 65, 1), (64, 64, 64),
    (65, 17, 31), (129, 33, 65), (257, 513, 16), (1000, 100, 7), (77, 300, 300),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k,d", SHAPES)
def test_backend_matches_reference(rng, backend, dtype, n, k, d):
    x = rng.standard_normal((n, d)).astype(dtype)
    codebook = rng.standard_normal((k, d)).astype(dtype)
    got = kernels.nearest_code(x, codebook, backend=backend)
    reference = nearest_numpy.nearest_code_numpy(x, codebook)
    separated = check_against_brute(x, codebook, got)
    # where the nearest code is clear, the backends agree exactly; elsewhere both are within rounding
    np.testing.assert_array_equal(got[separated], reference[separated])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_backend_exact_on_well_separated_data(rng, backend, dtype):
    codebook = separated_codebook(rng, 700, 24, dtype)
    truth = rng.integers(0, codebook.shape[0], 3001)
    x = codebook[truth] + rng.uniform(-1, 1, (3001, 24)).astype(dtype)
    np.testing.assert_array_equal(kernels.nearest_code(x, codebook, backend=backend), truth)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k,d,uniques", [(40, 3, 4), (100, 64, 7), (333, 300, 5), (17, 1, 2)])
def test_exact_ties_from_duplicated_codes_go_to_lowest_index(rng, backend, dtype, k, d, uniques):
    # a few distinct vectors, each repeated at many positions: in one tile, across tiles, across
    # L2 code blocks (D=300 makes those small), and in the padded last tile
    vectors = separated_codebook(rng, uniques, d, dtype)
    codebook = vectors[rng.integers(0, vectors.shape[0], k)]
    codebook[-1] = codebook[0]                                  # the very last code duplicates the first
    distinct = np.unique(codebook, axis=0)
    x = rng.standard_normal((250, d)).astype(dtype) * 40
    got = kernels.nearest_code(x, codebook, backend=backend)
    np.testing.assert_array_equal(got, first_occurrence(codebook)[got])     # always the first copy
    nearest_distinct = brute_distances(x, distinct).argmin(axis=1)
    where = {tuple(v): i for i, v in reversed(list(enumerate(codebook.tolist())))}
    expected = np.array([where[tuple(distinct[j].tolist())] for j in nearest_distinct])
    check_against_brute(x, codebook, got)
    separated = check_against_brute(x, distinct, nearest_distinct)
    np.testing.assert_array_equal(got[separated], expected[separated])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_all_codes_equal_gives_index_zero(rng, backend, dtype):
    codebook = np.tile(rng.standard_normal((1, 5)).astype(dtype), (37, 1))
    x = rng.standard_normal((90, 5)).astype(dtype)
    np.testing.assert_array_equal(kernels.nearest_code(x, codebook, backend=backend), np.zeros(90, np.int64))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_equal_to_a_code(rng, backend, dtype):
    codebook = rng.standard_normal((200, 12)).astype(dtype)
    truth = rng.integers(0, 200, 500)
    x = codebook[truth].copy()
    got = kernels.nearest_code(x, codebook, backend=backend)
    separated = check_against_brute(x, codebook, got)
    assert separated.all()
    np.testing.assert_array_equal(got, truth)
    # a duplicate at a lower index takes the row over, a duplicate at a higher index does not
    codebook[3] = codebook[150]
    codebook[190] = codebook[20]
    got = kernels.nearest_code(codebook[[150, 20, 3, 190]], codebook, backend=backend)
    np.testing.assert_array_equal(got, [3, 20, 3, 20])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_near_ties_are_within_rounding(rng, backend, dtype):
    # every row exactly halfway between two codes: either may win, but only within rounding
    a = rng.standard_normal((50, 6)).astype(dtype)
    b = a + rng.standard_normal((50, 6)).astype(dtype)
    codebook = np.concatenate([a, b, rng.standard_normal((50, 6)).astype(dtype) + 20])
    x = (a + b) / 2
    got = kernels.nearest_code(x, codebook, backend=backend)
    check_against_brute(x, codebook, got)
    assert set(np.unique(got)) <= set(range(100))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_contiguous_inputs(rng, backend):
    x = rng.standard_normal((90, 20)).astype(np.float32)
    codebook = np.asfortranarray(rng.standard_normal((33, 10)).astype(np.float32))
    got = kernels.nearest_code(x[::2, ::2], codebook, backend=backend)
    np.testing.assert_array_equal(got, kernels.nearest_code(np.ascontiguousarray(x[::2, ::2]),
                                                            np.ascontiguousarray(codebook), backend=backend))
    check_against_brute(x[::2, ::2], codebook, got)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_x_returns_empty_int64(backend, dtype):
    got = kernels.nearest_code(np.empty((0, 4), dtype), np.ones((3, 4), dtype), backend=backend)
    assert isinstance(got, np.ndarray) and got.dtype == np.int64 and got.shape == (0,)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_zero_features_everything_ties_to_code_zero(backend):
    got = kernels.nearest_code(np.empty((5, 0), np.float32), np.empty((4, 0), np.float32), backend=backend)
    np.testing.assert_array_equal(got, np.zeros(5, np.int64))


def test_tensors_are_unwrapped(rng):
    x = rng.standard_normal((10, 3))
    codebook = rng.standard_normal((4, 3))
    np.testing.assert_array_equal(kernels.nearest_code(mv.tensor(x), mv.tensor(codebook), backend="numpy"),
                                  nearest_numpy.nearest_code_numpy(x, codebook))


def test_public_through_minivq():
    assert mv.kernels.nearest_code is kernels.nearest_code


# ----------------------------------------------------------------- random sizes (hypothesis)
try:
    from hypothesis import given, settings, strategies as st
except ImportError:        # without hypothesis, the property is checked on seeded random sizes instead
    given = settings = st = None


def _random_sizes(n, k, d, dtype, seed):
    gen = np.random.default_rng(seed)
    x = gen.standard_normal((n, d)).astype(dtype)
    codebook = gen.standard_normal((k, d)).astype(dtype)
    codebook[gen.integers(0, k, k // 3)] = codebook[gen.integers(0, k, k // 3)]    # some duplicates
    reference = nearest_numpy.nearest_code_numpy(x, codebook)
    separated = check_against_brute(x, codebook, reference)
    np.testing.assert_array_equal(reference, first_occurrence(codebook)[reference])
    for backend in FAST_BACKENDS:
        got = kernels.nearest_code(x, codebook, backend=backend)
        check_against_brute(x, codebook, got)
        np.testing.assert_array_equal(got, first_occurrence(codebook)[got])
        np.testing.assert_array_equal(got[separated], reference[separated])


if given is not None:
    test_random_sizes_all_backends = settings(max_examples=40, deadline=None)(given(
        n=st.integers(1, 150), k=st.integers(1, 90), d=st.integers(1, 40),
        dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2 ** 32 - 1))(_random_sizes))
else:
    def test_random_sizes_all_backends():
        """The same property on 40 sizes drawn from a seeded generator (hypothesis would shrink a failure)."""
        gen = np.random.default_rng(2024)
        for _ in range(40):
            n, k, d = (int(gen.integers(1, high)) for high in (151, 91, 41))
            _random_sizes(n, k, d, DTYPES[int(gen.integers(0, 2))], int(gen.integers(0, 2 ** 32)))


@pytest.mark.slow
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_large_random_problem(backend):
    gen = np.random.default_rng(7)
    x = gen.standard_normal((20011, 64)).astype(np.float32)
    codebook = gen.standard_normal((1031, 64)).astype(np.float32)
    got = kernels.nearest_code(x, codebook, backend=backend)
    reference = nearest_numpy.nearest_code_numpy(x, codebook)
    assert (got == reference).mean() > 0.999
    check_against_brute(x[:2000], codebook, got[:2000])


# ----------------------------------------------------------------- validation at the boundary
def _good(dtype=np.float32):
    return np.zeros((4, 3), dtype), np.ones((5, 3), dtype)


@pytest.mark.parametrize("x_shape,cb_shape,what", [
    ((12,), (5, 3), r"x must be 2-D \(N, D\), got shape \(12,\)"),
    ((2, 2, 3), (5, 3), r"x must be 2-D \(N, D\), got shape \(2, 2, 3\)"),
    ((4, 3), (3,), r"codebook must be 2-D \(K, D\), got shape \(3,\)"),
    ((4, 3), (1, 5, 3), r"codebook must be 2-D \(K, D\), got shape \(1, 5, 3\)"),
])
def test_wrong_ndim(x_shape, cb_shape, what):
    with pytest.raises(ValueError, match=what):
        kernels.nearest_code(np.zeros(x_shape, np.float32), np.zeros(cb_shape, np.float32))


def test_feature_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"D=3 but codebook has D=4: shapes \(4, 3\) and \(5, 4\)"):
        kernels.nearest_code(np.zeros((4, 3), np.float32), np.zeros((5, 4), np.float32))


def test_empty_codebook():
    with pytest.raises(ValueError, match=r"codebook \(0, 3\) has no codes"):
        kernels.nearest_code(np.zeros((4, 3), np.float32), np.zeros((0, 3), np.float32))


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.float16, np.complex64, np.bool_])
def test_non_float_dtype(dtype):
    x, codebook = _good()
    with pytest.raises(TypeError, match=rf"x must be float32 or float64, got {np.dtype(dtype)}"):
        kernels.nearest_code(x.astype(dtype), codebook)
    with pytest.raises(TypeError, match=rf"codebook must be float32 or float64, got {np.dtype(dtype)}"):
        kernels.nearest_code(x, codebook.astype(dtype))


def test_mixed_dtypes_name_both():
    x, codebook = _good()
    with pytest.raises(TypeError, match="same dtype, got x float32 and codebook float64"):
        kernels.nearest_code(x, codebook.astype(np.float64))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("which", ["x", "codebook"])
def test_non_finite_values_are_located(bad, which):
    x, codebook = _good()
    target = x if which == "x" else codebook
    target[2, 1] = bad
    with pytest.raises(ValueError, match=rf"{which} \(\d, 3\) contains NaN or inf: first at row 2, column 1"):
        kernels.nearest_code(x, codebook)


def test_finite_values_whose_sum_overflows_pass_validation():
    # x.sum() overflows to inf although every value is finite: the cheap check must not reject it
    # (the distances themselves overflow too, so only the absence of an error is checked)
    x = np.full((3, 4), np.finfo(np.float32).max / 2, np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        assert kernels.nearest_code(x, np.ones((2, 4), np.float32), backend="numpy").shape == (3,)


@pytest.mark.parametrize("name", ["cuda", "NUMBA", "", None, 3])
def test_unknown_backend(name):
    with pytest.raises(ValueError, match="unknown backend"):
        kernels.nearest_code(*_good(), backend=name)


def test_not_an_array():
    with pytest.raises(TypeError, match="x must be a NumPy or CuPy array, got list"):
        kernels.nearest_code([[0.0, 1.0]], np.zeros((2, 2)))


@pytest.mark.skipif("cupy" in kernels.available_backends(), reason="CuPy is usable here")
def test_cupy_backend_unavailable_names_the_fix():
    with pytest.raises(ValueError, match=r"backend 'cupy' is not available.*pip install -e \.\[cuda\]"):
        kernels.nearest_code(*_good(), backend="cupy")


@pytest.fixture
def without_numba(monkeypatch):
    """Pretend numba failed to import."""
    monkeypatch.setitem(kernels._loaded, "numba", "ImportError: No module named 'numba'")


def test_numba_backend_unavailable_names_the_fix(without_numba):
    with pytest.raises(ValueError, match=r"backend 'numba' is not available.*pip install -e \.\[numba\]"):
        kernels.nearest_code(*_good(), backend="numba")
    assert "numba" not in kernels.available_backends()


# ----------------------------------------------------------------- auto dispatch
def _spy(monkeypatch, module, name):
    calls = []
    real = getattr(module, name)

    def spy(*args, **kwargs):
        calls.append(name)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return calls


def test_auto_without_numba_uses_the_reference(rng, monkeypatch, without_numba):
    calls = _spy(monkeypatch, nearest_numpy, "nearest_code_numpy")
    x, codebook = rng.standard_normal((6, 2)), rng.standard_normal((3, 2))
    kernels.nearest_code(x, codebook)
    assert calls == ["nearest_code_numpy"]


@pytest.mark.skipif("numba" not in kernels.available_backends(), reason="numba is not installed")
def test_auto_prefers_numba_for_numpy_arrays(rng, monkeypatch):
    from minivq.kernels import nearest_numba
    calls = _spy(monkeypatch, nearest_numba, "nearest_code_numba")
    reference = _spy(monkeypatch, nearest_numpy, "nearest_code_numpy")
    x, codebook = rng.standard_normal((6, 2)), rng.standard_normal((3, 2))
    kernels.nearest_code(x, codebook)
    assert calls == ["nearest_code_numba"] and reference == []


def test_available_backends():
    names = kernels.available_backends()
    assert names[0] == "numpy" and set(names) <= {"numpy", "numba", "cupy"}
    try:
        import numba  # noqa: F401
        assert "numba" in names
    except ImportError:
        assert "numba" not in names


def test_import_is_lazy_and_needs_numpy_only():
    code = ("import sys, minivq.kernels as k; "
            "assert 'numba' not in sys.modules and 'cupy' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(__import__("pathlib").Path(__file__).parents[1]))


# ---------------------------------------------------------------- the Numba kernel's two tiles
_TILE_CHECK = """
import numpy as np
from minivq.kernels import nearest_code
from minivq.kernels import nearest_numba as K
assert (K.ROWS, K.CODES) == {tile}, (K.ROWS, K.CODES)
rng = np.random.default_rng(0)
for n, k, d in [(1, 1, 1), (37, 33, 5), (200, 100, 64), (129, 517, 17)]:
    for dtype in (np.float32, np.float64):
        x = rng.standard_normal((n, d)).astype(dtype)
        cb = rng.standard_normal((k, d)).astype(dtype)
        cb[k // 2:] = cb[: k - k // 2]                          # exact ties: duplicated codes
        for metric in ("l2", "ip"):
            got = nearest_code(x, cb, backend="numba", metric=metric)
            ref = nearest_code(x, cb, backend="numpy", metric=metric)
            assert (got == ref).all(), (n, k, d, dtype, metric)
"""


@pytest.mark.skipif("numba" not in kernels.available_backends(), reason="numba is not installed")
def test_the_avx2_tile_also_matches_the_reference():
    """MINIVQ_NUMBA_WIDE=0 forces the 3 x 32 tile that AVX2 machines use; on any machine it must agree."""
    env = dict(os.environ, MINIVQ_NUMBA_WIDE="0")
    subprocess.run([sys.executable, "-c", _TILE_CHECK.format(tile=(3, 32))], check=True, env=env,
                   cwd=str(__import__("pathlib").Path(__file__).parents[1]))


def _fresh_fused_kernel_asm(kernel, **flags):
    """The fused kernel's float32 assembly, from a fresh compile of ``kernel``'s Python (the cached kernel
    can't be inspected)."""
    import numba
    from minivq.kernels import nearest_numba
    fresh = numba.njit(nogil=True, fastmath={"contract"}, **flags)(kernel.py_func)
    x, cb = np.ones((8, 4), np.float32), np.ones((40, 4), np.float32)
    packed, norms = nearest_numba.pack_codebook(cb)
    fresh(x, packed, norms, 1, np.empty(8, np.int64), np.empty(8, np.float32))
    return fresh.inspect_asm(fresh.signatures[0])


@pytest.mark.skipif("numba" not in kernels.available_backends(), reason="numba is not installed")
def test_the_wide_tile_uses_512_bit_registers_where_the_cpu_has_them():
    from minivq.kernels import nearest_numba
    if not nearest_numba._host_has_avx512() or os.environ.get("MINIVQ_NUMBA_WIDE") == "0":
        pytest.skip("no AVX-512 here")
    assert (nearest_numba.ROWS, nearest_numba.CODES) == (8, 32)
    asm = _fresh_fused_kernel_asm(nearest_numba._nearest_kernel, parallel=True)
    assert "zmm" in asm            # without the vector-width hint LLVM would use ymm only


@pytest.mark.skipif("numba" not in kernels.available_backends(), reason="numba is not installed")
def test_the_fused_kernel_keeps_its_lane_minima_without_masked_stores():
    """The per-lane argmin is a select and a plain store. Written as ``if v < best: best = v`` it compiled to
    AVX's masked stores (``vmaskmovps``; with AVX-512 a store under a k-mask), slow on AMD's Zen cores: on a
    Zen 3 the select takes 0.57-0.87x the time (benchmarks/NOTES.md round 15)."""
    import re
    from minivq.kernels import nearest_numba
    asm = _fresh_fused_kernel_asm(nearest_numba._nearest_kernel_serial).splitlines()
    masked = [line for line in asm if "maskmov" in line
              or re.match(r"\s*v\w*mov\w*\s+%[xyz]mm\d+, [^,]*\(.*\{%k", line)]
    assert not masked, masked[:4]


needs_numba = pytest.mark.skipif("numba" not in kernels.available_backends(), reason="numba is not installed")


@needs_numba
@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("row", [0, 37, 199])
def test_the_numba_kernel_finds_a_non_finite_x_itself(monkeypatch, metric, bad, row):
    """The Numba search checks only the codebook before it runs: a NaN or an inf in a row of x makes that
    row's best score non-finite, and only then is x searched for it, for the same error as the other
    backends give. Finite inputs never take that pass."""
    gen = np.random.default_rng(row)
    x, codebook = gen.standard_normal((200, 16)).astype(np.float32), gen.standard_normal((40, 16)).astype(np.float32)
    checked = []
    real = kernels._check_finite
    monkeypatch.setattr(kernels, "_check_finite", lambda named: checked.append([w for _, w in named]) or real(named))
    kernels.nearest_code(x, codebook, backend="numba", metric=metric)
    assert checked == []
    x[row, 5] = bad
    with pytest.raises(kernels.NonFiniteError, match=rf"x \(200, 16\) contains NaN or inf: first at row {row}, column 5"):
        kernels.nearest_code(x, codebook, backend="numba", metric=metric)
    codebook[3, 2] = np.nan                         # both: x's error first, as the one-pass check gives it
    with pytest.raises(kernels.NonFiniteError, match=rf"x \(200, 16\) contains NaN or inf: first at row {row}"):
        kernels.nearest_code(x, codebook, backend="numba", metric=metric)
    x[row, 5] = 0
    with pytest.raises(kernels.NonFiniteError, match=r"codebook \(40, 16\) contains NaN or inf: first at row 3"):
        kernels.nearest_code(x, codebook, backend="numba", metric=metric)


@needs_numba
def test_finite_rows_whose_scores_overflow_still_get_their_codes_from_the_numba_kernel(monkeypatch):
    """Every score of a row can overflow with finite inputs (here the codes' norms do); x is then
    checked, found finite, and the kernel's indices stand."""
    from minivq.kernels import nearest_numba
    big = np.finfo(np.float32).max / 4
    x = np.array([[big, big, 0.0], [0.5, -0.25, 1.0]], np.float32)
    codebook = np.array([[big, big, 0.0], [-big, -big, 0.0]], np.float32)
    checked = []
    real = kernels._check_finite
    monkeypatch.setattr(kernels, "_check_finite", lambda named: checked.append(len(named)) or real(named))
    with np.errstate(over="ignore", invalid="ignore"):
        got = kernels.nearest_code(x, codebook, backend="numba")
        assert np.array_equal(got, nearest_numba.nearest_code_numba(x, codebook))
    assert checked == [2]           # the kernel saw a non-finite best score; x and the codebook are finite
