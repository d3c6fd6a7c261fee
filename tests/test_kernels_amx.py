"""The AMX screen's own parts (kernels/nearest_amx.py): the hardware's bf16 arithmetic inside the bound the
screen relies on, bf16 rounding, the tiles' layout of the codes, and the margin. That it gives the fused
kernel's indices is tests/test_kernels_screens.py's."""
import numpy as np
import pytest

pytest.importorskip("numba")
from numba import njit  # noqa: E402

from minivq.kernels import amx, nearest_amx, nearest_numba  # noqa: E402

needs_amx = pytest.mark.skipif(not amx.available(), reason="this CPU or kernel has no AMX-BF16 tiles")


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
