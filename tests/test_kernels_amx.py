"""The AMX screen of the nearest-code search (kernels/nearest_amx.py): the same indices as the fused float32
kernel on every input, ties and near-ties included; the hardware's bf16 arithmetic inside the bound the
screen relies on; the vector reads of the scores against NumPy; and the ways out (float64, NaN, huge values,
too many near-equal codes, the switch)."""
import numpy as np
import pytest

pytest.importorskip("numba")
from numba import njit  # noqa: E402

from minivq import kernels  # noqa: E402
from minivq.kernels import amx, nearest_amx, nearest_numba  # noqa: E402

needs_amx = pytest.mark.skipif(not amx.available(), reason="this CPU or kernel has no AMX-BF16 tiles")


def fused(x, codebook, metric="l2"):
    return nearest_numba.nearest_code_numba(x, codebook, metric)


def backend(x, codebook, metric="l2"):
    """What ``kernels.nearest_code(backend="numba")`` runs: the screen, and the fused kernel for what it leaves."""
    return nearest_amx.nearest_code_screened(x, codebook, metric)


def screened(x, codebook, metric="l2"):
    """The AMX path alone: (indices, spilled); fails the test where it declines."""
    got = nearest_amx.nearest_code_amx(np.ascontiguousarray(x), codebook, nearest_numba.score_norms(codebook, metric))
    assert got is not None, "the AMX path declined"
    return got


def assert_same_as_fused(x, codebook, metric="l2"):
    indices, spilled = screened(x, codebook, metric)
    expected = fused(x, codebook, metric)
    np.testing.assert_array_equal(indices[~spilled], expected[~spilled])
    np.testing.assert_array_equal(backend(x, codebook, metric), expected)
    np.testing.assert_array_equal(kernels.nearest_code(x, codebook, backend="numba", metric=metric), expected)
    return spilled


# ----------------------------------------------------------------- the same indices as the fused kernel
@needs_amx
@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("n,k,d", [(1, 1, 1), (5, 3, 2), (31, 33, 31), (33, 31, 33), (129, 65, 64), (300, 512, 64),
                                   (257, 100, 257), (1000, 40, 7), (130, 2048, 96)])
def test_the_screen_gives_the_fused_kernels_indices(rng, metric, n, k, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    codebook = rng.standard_normal((k, d)).astype(np.float32)
    assert not assert_same_as_fused(x, codebook, metric).any()


@needs_amx
@pytest.mark.parametrize("seed", range(6))
def test_random_sizes_scales_and_offsets(seed):
    rng = np.random.default_rng(seed)
    n, k, d = rng.integers(1, 400), rng.integers(1, 700), rng.integers(1, 300)
    scale = 10.0 ** rng.uniform(-18, 12)          # norms stay under the screen's range limit (2^100)
    offset = rng.standard_normal(d) * rng.choice([0, 1, 100])     # far from the origin: a wide margin
    x = ((rng.standard_normal((n, d)) + offset) * scale).astype(np.float32)
    codebook = ((rng.standard_normal((k, d)) + offset) * scale).astype(np.float32)
    assert_same_as_fused(x, codebook)


@needs_amx
def test_training_like_latents_near_their_codes(rng):
    codebook = rng.standard_normal((512, 64)).astype(np.float32)
    x = (codebook[rng.integers(0, 512, 4000)] + 0.05 * rng.standard_normal((4000, 64))).astype(np.float32)
    assert not assert_same_as_fused(x, codebook).any()


# ----------------------------------------------------------------- ties and near-ties
@needs_amx
@pytest.mark.parametrize("copies", [2, 31, 32, 33, 200])
def test_duplicated_codes_tie_to_the_first_copy(rng, copies):
    # more copies than a row may hold at once (CAPACITY) must still end at the lowest index
    base = rng.standard_normal((10, 48)).astype(np.float32)
    codebook = np.concatenate([base, np.repeat(base[3:4], copies, axis=0), base[:2]])
    codebook = codebook[rng.permutation(codebook.shape[0])]
    x = (base[rng.integers(0, 10, 600)] + 0.01 * rng.standard_normal((600, 48))).astype(np.float32)
    spilled = assert_same_as_fused(x, codebook)
    got = backend(x, codebook)
    first = {}
    for i, row in enumerate(codebook.tolist()):
        first.setdefault(tuple(row), i)
    assert all(first[tuple(codebook[j].tolist())] == j for j in got)
    if copies > nearest_amx.CAPACITY:
        assert spilled.any()          # the rows nearest the repeated code were handed to the fused kernel


@needs_amx
def test_codes_one_ulp_apart_are_decided_by_float32_rounding(rng):
    # 64 codes that differ from one another by an ulp in a few features: the screen cannot tell them apart,
    # so every row's answer comes from the float32 scores, and must be the fused kernel's to the index
    base = rng.standard_normal(40).astype(np.float32)
    codebook = np.repeat(base[None], 64, axis=0)
    for j in range(64):
        feature = rng.integers(0, 40, 3)
        codebook[j, feature] = np.nextafter(codebook[j, feature], np.float32(rng.choice([-1, 1]) * np.inf))
    x = (base + 1e-6 * rng.standard_normal((500, 40))).astype(np.float32)
    assert_same_as_fused(x, codebook)


@needs_amx
def test_a_new_lowest_score_in_every_block_fills_and_compacts_the_candidates(rng):
    # block b of 32 codes holds one code nearer to every row than all of blocks 0..b-1 (the rest point
    # away): each block lowers the rows' thresholds and adds a candidate, so a row gathers more than
    # CAPACITY over the sweep and must drop those the threshold has passed (while only the last few
    # stay within it: no row is handed back)
    d, blocks = 24, 3 * nearest_amx.CAPACITY
    direction = rng.standard_normal(d).astype(np.float32)
    codebook = (-direction[None] * (3 + rng.random((blocks * 32, 1)))).astype(np.float32)    # scores >= 15 |d|^2
    codebook[::32] = direction[None] * (1 + np.linspace(2.0, 0.0, blocks, dtype=np.float32)[:, None])  # <= 3 |d|^2
    x = (direction[None] + 1e-3 * rng.standard_normal((70, d))).astype(np.float32)
    assert not assert_same_as_fused(x, codebook).any()
    np.testing.assert_array_equal(fused(x, codebook), np.full(70, (blocks - 1) * 32))


@needs_amx
@pytest.mark.parametrize("seed", range(4))
def test_clusters_of_near_equal_codes(seed):
    # each cluster: one code and copies a few ulps away in a few features, shuffled through the codebook
    rng = np.random.default_rng(seed)
    k, d = 600, int(rng.integers(8, 130))
    centres = rng.standard_normal((30, d)).astype(np.float32)
    codebook = centres[rng.integers(0, 30, k)]
    nudge = rng.random((k, d)) < 0.05
    codebook = np.where(nudge, np.nextafter(codebook, np.float32(np.inf) * np.sign(rng.standard_normal((k, d)))),
                        codebook).astype(np.float32)
    x = (centres[rng.integers(0, 30, 900)] + 1e-5 * rng.standard_normal((900, d))).astype(np.float32)
    assert_same_as_fused(x, codebook)


@needs_amx
def test_rows_halfway_between_two_codes(rng):
    a = rng.standard_normal((50, 20)).astype(np.float32)
    b = a + rng.standard_normal((50, 20)).astype(np.float32)
    codebook = np.concatenate([a, b, rng.standard_normal((50, 20)).astype(np.float32) + 20])
    assert_same_as_fused((a + b) / 2, codebook)


# ----------------------------------------------------------------- the ways out
@needs_amx
def test_rows_holding_nan_or_inf_go_to_the_fused_kernel(rng):
    x = rng.standard_normal((200, 16)).astype(np.float32)
    codebook = rng.standard_normal((30, 16)).astype(np.float32)
    x[7, 3] = np.nan
    x[150, 0] = np.inf
    indices, spilled = screened(x, codebook)
    assert set(np.flatnonzero(spilled)) == {7, 150}
    with pytest.raises(kernels.NonFiniteError):
        kernels.nearest_code(x, codebook, backend="numba")


@needs_amx
def test_rows_near_float32s_range_go_to_the_fused_kernel(rng):
    x = rng.standard_normal((100, 8)).astype(np.float32)
    x[5] *= np.float32(1e30)
    codebook = rng.standard_normal((20, 8)).astype(np.float32)
    indices, spilled = screened(x, codebook)
    assert np.flatnonzero(spilled).tolist() == [5]
    np.testing.assert_array_equal(backend(x, codebook), fused(x, codebook))


@needs_amx
def test_the_screen_declines_float64_huge_codebooks_and_empty_inputs(rng):
    x = rng.standard_normal((10, 4))
    codebook = rng.standard_normal((5, 4))
    norms = nearest_numba.score_norms(codebook)
    assert nearest_amx.nearest_code_amx(x, codebook, norms) is None
    big = (codebook * 1e36).astype(np.float32)
    assert nearest_amx.nearest_code_amx(x.astype(np.float32), big, nearest_numba.score_norms(big)) is None
    empty = np.empty((0, 4), np.float32)
    assert nearest_amx.nearest_code_amx(empty, codebook.astype(np.float32), norms.astype(np.float32)) is None


def test_the_switch_turns_the_screen_off(monkeypatch, rng):
    monkeypatch.setenv("MINIVQ_NUMBA_AMX", "0")
    assert not amx.available()
    x = rng.standard_normal((10, 4)).astype(np.float32)
    codebook = rng.standard_normal((5, 4)).astype(np.float32)
    assert nearest_amx.nearest_code_amx(x, codebook, nearest_numba.score_norms(codebook)) is None


@needs_amx
def test_one_thread_runs_the_serial_sweep_with_the_same_result(rng, monkeypatch):
    import numba
    x = rng.standard_normal((700, 70)).astype(np.float32)
    codebook = rng.standard_normal((300, 70)).astype(np.float32)
    expected = fused(x, codebook)
    called = []
    monkeypatch.setattr(nearest_amx, "_screen_kernel", lambda *a: called.append("parallel") or
                        nearest_amx._screen_kernel_serial(*a))
    previous = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        np.testing.assert_array_equal(screened(x, codebook)[0], expected)
    finally:
        numba.set_num_threads(previous)
    assert called == []
    np.testing.assert_array_equal(screened(x, codebook)[0], expected)
    assert called == ["parallel"] or previous == 1


# ----------------------------------------------------------------- the arithmetic under the bound
@njit
def _tile_scores(x16, tiles, config):
    """One 32 x 32 block of screen products (no norms), straight from the tiles: ``x16`` holds 32 rows in
    bf16, ``tiles`` the first 32 codes as ``pack_codes`` lays them out (chunks, 2, 16, 16, 2)."""
    out = np.empty((32, 32), dtype=np.float32)
    chunks = tiles.shape[0]
    row_bytes = x16.shape[1] * 2
    amx.tile_config(config.ctypes.data)
    amx.tile_zero(0)
    amx.tile_zero(1)
    amx.tile_zero(2)
    amx.tile_zero(3)
    for chunk in range(chunks):
        amx.tile_load(4, x16.ctypes.data + chunk * 64, row_bytes)
        amx.tile_load(5, x16.ctypes.data + 16 * row_bytes + chunk * 64, row_bytes)
        amx.tile_load(6, tiles.ctypes.data + chunk * 2048, 64)
        amx.tile_load(7, tiles.ctypes.data + chunk * 2048 + 1024, 64)
        amx.tile_dot_bf16(0, 4, 6)
        amx.tile_dot_bf16(1, 4, 7)
        amx.tile_dot_bf16(2, 5, 6)
        amx.tile_dot_bf16(3, 5, 7)
    s = out.ctypes.data
    amx.tile_store(0, s, 128)
    amx.tile_store(1, s + 64, 128)
    amx.tile_store(2, s + 2048, 128)
    amx.tile_store(3, s + 2112, 128)
    amx.tile_release()
    return out


def bf16_bits(a):
    """float32 ``a`` rounded to nearest even bf16, as uint16 bits: the NumPy reference of the kernels' rounding."""
    bits = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    return ((bits + np.uint32(0x7FFF) + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def _as_float(bits):
    return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


@needs_amx
@pytest.mark.parametrize("d", [1, 32, 64, 200, 256])
def test_the_tiles_sum_bf16_products_within_the_float32_bound(rng, d):
    x = (rng.standard_normal((32, d)) * rng.uniform(0.01, 100, (32, 1))).astype(np.float32)
    codebook = rng.standard_normal((32, d)).astype(np.float32)
    chunks = -(-d // 32)
    x16 = np.zeros((32, chunks * 32), np.uint16)
    x16[:, :d] = bf16_bits(x)
    tiles, _, _ = nearest_amx.pack_codes(codebook, np.zeros(32, np.float32), codebook * np.float32(-2))
    got = _tile_scores(x16, tiles[0], amx.tile_config_bytes()).astype(np.float64)
    xb = _as_float(x16[:, :d])
    eb = _as_float(bf16_bits(codebook * np.float32(-2)))
    exact = xb @ eb.T                                            # bf16 products are exact in float64
    gamma = d * 2.0 ** -23 / (1 - d * 2.0 ** -23)
    assert np.all(np.abs(got - exact) <= gamma * (np.abs(xb) @ np.abs(eb).T) + 1e-30)
    # and against the float32 inputs, the whole screen half of the module doc's bound
    truth = x.astype(np.float64) @ (-2 * codebook.astype(np.float64)).T
    p = np.linalg.norm(x.astype(np.float64), axis=1)[:, None] * np.linalg.norm(codebook.astype(np.float64), axis=1)
    assert np.all(np.abs(got - truth) <= 2 * (2.0 ** -7 + 2.0 ** -16) * p + gamma * 2.1 * p + 1e-30)


def test_bf16_rounds_to_nearest_even():
    values = np.array([1.0, 1.00390625, 1.01171875, 1.0 + 2 ** -8 + 2 ** -20, -2.5, 3.0e38, 1e-40, 0.1],
                      dtype=np.float32)
    # 1 + 2^-8 is halfway between 1 and 1 + 2^-7: to even (1); 1 + 3 * 2^-8 is halfway: to even (1 + 2^-6)
    expected = np.array([1.0, 1.0, 1.015625, 1.0078125, -2.5], dtype=np.float64)
    assert np.array_equal(_as_float(bf16_bits(values))[:5], expected)
    error = np.abs(_as_float(bf16_bits(values)) - values.astype(np.float64))
    normal = np.abs(values) >= np.finfo(np.float32).tiny
    assert np.all(error[normal] <= 2.0 ** -8 * np.abs(values[normal].astype(np.float64)))   # relative, normal
    assert np.all(error[~normal] <= 2.0 ** -134)             # half the spacing of bf16's subnormals
    out = np.zeros((1, 9), np.uint16)
    norm, peak = nearest_amx._row_to_bf16(values[None], values[None].view(np.uint32), 0, out, 0)
    np.testing.assert_array_equal(out[0, :8], bf16_bits(values))
    assert out[0, 8] == 0
    assert peak == np.float32(3.0e38) and norm == pytest.approx(np.linalg.norm(values.astype(np.float64)))


@pytest.mark.parametrize("k,d", [(1, 1), (31, 33), (64, 64), (100, 257)])
def test_pack_codes_lays_out_the_tiles_and_the_bound_terms(rng, k, d):
    codebook = (rng.standard_normal((k, d)) * 3).astype(np.float32)
    norms = nearest_numba.score_norms(codebook)
    tiles, screen_norms, terms = nearest_amx.pack_codes(codebook, norms, codebook * np.float32(-2))
    pairs, chunks = -(-k // 32), -(-d // 32)
    assert tiles.shape == (pairs, chunks, 2, 16, 16, 2) and screen_norms.shape == (pairs, 32)
    padded = np.zeros((pairs * 32, chunks * 32), np.uint16)
    padded[:k, :d] = bf16_bits(codebook * np.float32(-2))
    # feature 32 c + 2 q + s of code 32 p + 16 h + j at tiles[p, c, h, q, j, s]
    expected = padded.reshape(pairs, 2, 16, chunks, 16, 2).transpose(0, 3, 1, 4, 2, 5)
    np.testing.assert_array_equal(tiles, expected)
    np.testing.assert_array_equal(screen_norms.reshape(-1)[:k], norms)
    assert np.all(np.isinf(screen_norms.reshape(-1)[k:]))
    e64 = codebook.astype(np.float64)
    assert terms[0] == pytest.approx(np.linalg.norm(e64, axis=1).max(), rel=1e-12)
    assert terms[1] == np.abs(e64).max() and terms[2] == pytest.approx(norms.max(), rel=1e-7)


def test_the_margin_grows_with_the_norms_and_is_not_finite_for_nan():
    small = nearest_amx.margin(1.0, 1.0, 1.0, 1.0, 1.0, 64)
    assert 0 < small < nearest_amx.margin(10.0, 1.0, 1.0, 1.0, 1.0, 64)
    assert small >= 2 * 2 * 2.0 ** -7          # at least twice the bf16 rounding of a unit product
    assert not np.isfinite(nearest_amx.margin(np.nan, 1.0, 1.0, 1.0, 1.0, 64))


# ----------------------------------------------------------------- the vector reads of the scores
@njit
def _reads(scores, norms, limits, row, limit):
    return (amx.rows_within(scores.ctypes.data, norms.ctypes.data, limits.ctypes.data),
            amx.lanes_within(scores[row].ctypes.data, norms.ctypes.data, limit),
            amx.row_minimum(scores[row].ctypes.data, norms.ctypes.data))


@njit
def _lowest_bit(mask):
    return amx.lowest_bit(mask)


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
