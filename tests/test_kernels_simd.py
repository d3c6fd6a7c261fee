"""The vector code of kernels/simd.py against NumPy (the reads of a block of scores; the int16 block
products of simd.PRODUCTS, exact at the largest sums they allow), and the int16 screen's own parts
(nearest_int16.py): the levels that keep every sum in int32, the quantising, the codes' layout, and its
bound held against exact arithmetic. That the screen gives the fused kernel's indices is
tests/test_kernels_screens.py's."""
import numpy as np
import pytest

pytest.importorskip("numba")
from numba import njit  # noqa: E402

from minivq.kernels import nearest_numba, nearest_int16, simd  # noqa: E402

needs_int16 = pytest.mark.skipif(not nearest_int16.available(), reason="this CPU or Numba has no int16 product")


# ----------------------------------------------------------------- the vector reads of the scores
@njit
def _reads(scores, norms, limits, row, limit):
    return (simd.rows_within(scores.ctypes.data, norms.ctypes.data, limits.ctypes.data),
            simd.lanes_within(scores[row].ctypes.data, norms.ctypes.data, limit),
            simd.row_minimum(scores[row].ctypes.data, norms.ctypes.data))


@njit
def _lowest_bit(mask):
    return simd.lowest_bit(mask)


@pytest.mark.parametrize("seed", range(4))
def test_the_vector_reads_agree_with_numpy(seed):
    rng = np.random.default_rng(seed)
    scores = rng.standard_normal((32, 32)).astype(np.float32)
    norms = rng.standard_normal(32).astype(np.float32)
    norms[rng.integers(0, 32, 3)] = np.inf                   # padding codes
    total = scores + norms
    limits = np.sort(total, axis=1)[:, rng.integers(0, 3)].astype(np.float32)   # ties with the limit count
    limits[rng.integers(0, 32, 5)] = -np.inf
    row = int(rng.integers(0, 32))
    within, lanes, low = _reads(scores, norms, limits, row, limits[row])
    assert within == sum(1 << r for r in range(32) if (total[r] <= limits[r]).any())
    assert lanes == sum(1 << c for c in range(32) if total[row, c] <= limits[row])
    assert low == total[row].min()
    for mask in (1, 6, 1 << 31, 0xFFFF0000):
        assert _lowest_bit(np.uint32(mask)) == (mask & -mask).bit_length() - 1


# ----------------------------------------------------------------- AVX-512 VNNI's int16 products
def as_blocks(e):
    """Codes (32, D even) in ``simd.named_block_product``'s layout: ``[p][h][c][s]``, code 16 h + c, feature 2 p + s."""
    return np.ascontiguousarray(e.reshape(2, 16, e.shape[1] // 2, 2).transpose(2, 0, 1, 3))


@pytest.fixture(params=sorted(simd.PRODUCTS))
def product(request):
    """A block product this CPU runs (``nearest_int16.block_calls``: q (rows, D), codes, scales, out). Where the
    CPU has AVX-VNNI, LLVM makes ``madd-256``'s pair of instructions one ``vpdpwssd``; the real ``vpmaddwd``
    runs in the held-CPU tests (test_kernels_screens.py, test_benchmarks.py)."""
    if request.param not in nearest_int16.compiled_products():
        pytest.skip(f"this CPU or Numba has no {request.param} product")
    call = nearest_int16.block_calls[request.param]
    return lambda q, rows, codes, scales, out: call(q[:rows], codes, scales, out)


def _block(q, rows, codes, scales, out):
    """The product the screen runs here."""
    nearest_int16.block_calls[nearest_int16.product_name()](q[:rows], codes, scales, out)


@pytest.mark.parametrize("d", [2, 40, 256, 1000])
def test_the_int16_block_product_is_exact_up_to_the_largest_sums(product, rng, d):
    level = nearest_int16.levels(d)
    q = np.where(rng.random((32, d)) < 0.5, -level, level).astype(np.int16)
    e = np.where(rng.random((32, d)) < 0.5, -level, level).astype(np.int16)
    e[0], e[1] = q[0], -q[1]                  # the largest sums there are: +-D L^2
    exact = q.astype(np.int64) @ e.astype(np.int64).T
    assert exact[0, 0] == d * level ** 2 and exact.max() < 2 ** 31
    scales = rng.random(32).astype(np.float32)
    out = np.zeros((32, 32), np.float32)
    product(q, 32, as_blocks(e), scales, out)
    np.testing.assert_array_equal(out, exact.astype(np.float32) * scales[:, None])


@pytest.mark.parametrize("rows", [1, 3, 4, 5, 7, 8, 9, 31])
def test_the_int16_block_product_writes_its_rows_rounded_up_to_whole_blocks(product, rng, rows):
    q = rng.integers(-300, 301, (32, 64)).astype(np.int16)
    e = rng.integers(-300, 301, (32, 64)).astype(np.int16)
    out = np.full((32, 32), np.nan, np.float32)
    product(q, rows, as_blocks(e), np.ones(32, np.float32), out)
    written = -(-rows // simd.BLOCK_ROWS) * simd.BLOCK_ROWS
    np.testing.assert_array_equal(out[:written], (q[:written].astype(np.int64) @ e.astype(np.int64).T))
    assert np.isnan(out[written:]).all()


@pytest.mark.parametrize("d", [1, 2, 3, 64, 255, 256, 4096, nearest_int16.MAX_DIM])
def test_the_levels_keep_every_sum_inside_int32(d):
    level = nearest_int16.levels(d)
    padded = d + d % 2
    assert padded * level ** 2 < 2 ** 31 <= padded * (level + 1) ** 2 or level == 32767
    assert 181 <= level <= 32767


def test_rows_quantise_to_the_nearest_level():
    x = np.array([[0.5, -1.0, 0.26, 0.0, -0.74]], np.float32)
    out = np.zeros((1, 6), np.int16)
    norm, l1, peak = nearest_int16._row_to_int16(x, x.view(np.uint32), 0, 100, out, 0)
    np.testing.assert_array_equal(out[0], [50, -100, 26, 0, -74, 0])
    assert peak == 1.0 and l1 == pytest.approx(2.5, rel=1e-6) and norm == pytest.approx(np.linalg.norm(x), rel=1e-6)


@pytest.mark.parametrize("k,d", [(1, 1), (31, 33), (64, 64), (100, 257)])
def test_pack_codes_lays_out_the_codes_and_the_bound_terms(rng, k, d):
    codebook = (rng.standard_normal((k, d)) * 3).astype(np.float32)
    norms = nearest_numba.score_norms(codebook)
    codes, screen_norms, terms = nearest_int16.pack_codes(codebook, norms)
    blocks, pairs, level = -(-k // 32), -(-d // 2), nearest_int16.levels(d)
    assert codes.shape == (blocks, pairs, 2, 16, 2) and screen_norms.shape == (blocks, 32)
    e64 = codebook.astype(np.float64)
    padded = np.zeros((blocks * 32, pairs * 2))
    padded[:k, :d] = np.rint(e64 * (level / np.abs(e64).max()))
    expected = padded.reshape(blocks, 2, 16, pairs, 2).transpose(0, 3, 1, 2, 4)
    np.testing.assert_array_equal(codes, expected)
    np.testing.assert_array_equal(screen_norms.reshape(-1)[:k], norms)
    assert np.all(np.isinf(screen_norms.reshape(-1)[k:]))
    assert terms[0] == pytest.approx(np.linalg.norm(e64, axis=1).max(), rel=1e-12)
    assert terms[1] == pytest.approx(np.abs(e64).sum(1).max(), rel=1e-12)
    assert terms[2] == pytest.approx(norms.max(), rel=1e-7) and terms[3] == np.abs(e64).max() / level


@needs_int16
@pytest.mark.parametrize("seed", range(4))
def test_the_screen_scores_lie_within_the_bound_of_exact_scores(seed):
    # the screen's scores against exact float64 ones; the margin is twice the bound (module doc), so half of it
    # must hold everywhere, far from the fused kernel's float32 error, which is tiny next to it
    rng = np.random.default_rng(seed)
    d = int(rng.integers(1, 300))
    x = (rng.standard_normal((32, d)) * 10.0 ** rng.uniform(-3, 3)).astype(np.float32)
    codebook = (rng.standard_normal((32, d)) * 10.0 ** rng.uniform(-3, 3)).astype(np.float32)
    norms = nearest_numba.score_norms(codebook)
    codes, screen_norms, terms = nearest_int16.pack_codes(codebook, norms)
    level = nearest_int16.levels(d)
    q = np.zeros((32, codes.shape[1] * 2), np.int16)
    scales = np.zeros(32, np.float32)
    bounds = np.zeros(32)
    for t in range(32):
        norm, l1, peak = nearest_int16._row_to_int16(x, x.view(np.uint32), t, level, q, t)
        scales[t] = np.float32(-2 * (peak / level) * terms[3])
        bounds[t] = nearest_int16.margin(norm, l1, peak / level, *terms[:3], terms[3], d) / 2
    out = np.zeros((32, 32), np.float32)
    _block(q, 32, codes[0], scales, out)
    screen = (out + screen_norms[0]).astype(np.float64)
    exact = norms.astype(np.float64) - 2 * x.astype(np.float64) @ codebook.astype(np.float64).T
    assert np.all(np.abs(screen - exact) <= bounds[:, None])


def test_the_vnni_margin_shrinks_with_the_steps_and_is_not_finite_for_nan():
    wide = nearest_int16.margin(1.0, 8.0, 1 / 100, 1.0, 8.0, 1.0, 1 / 100, 64)
    narrow = nearest_int16.margin(1.0, 8.0, 1 / 2000, 1.0, 8.0, 1.0, 1 / 2000, 64)
    assert 0 < narrow < wide and wide >= 2 * 2 * (0.5 / 100) * 8 * 2
    assert not np.isfinite(nearest_int16.margin(np.nan, 1.0, 0.01, 1.0, 1.0, 1.0, 0.01, 64))
