"""Winograd's F(4x4, 3x3) for the 3x3 stride-1 products (minivq.kernels.winograd_numba): against the float64
references on random geometries (odd sizes, every padding it takes, partial tiles), within a bound that a
wrong transform would break by orders of magnitude; where it runs (``applies``, the switch) and that the
convolutions take it, their float64 gradients included."""
import numpy as np
import pytest

import minivq as mv
from minivq import kernels

pytest.importorskip("numba")
from minivq.kernels import conv_numba, winograd_numba  # noqa: E402

# float32 rounding, in units of sum |x| |w| over an output's terms: the direct kernel stays near 3e-7, F(4x4, 3x3)
# near 3e-6 (its transforms scale by up to 8 and round sixths; benchmarks/NOTES.md, round 18)
FLOAT32_BOUND = 2e-5
FLOAT64_BOUND = 1e-13


def random_geometry(gen):
    n, h, w = int(gen.integers(1, 4)), int(gen.integers(1, 12)), int(gen.integers(1, 12))
    padding = tuple(int(gen.integers(0, 3)) for _ in range(2))
    if h + 2 * padding[0] < 3 or w + 2 * padding[1] < 3:
        padding = (2, 2)
    return n, h, w, int(gen.integers(1, 40)), int(gen.integers(1, 40)), padding


def tile_scale(scale, n, oh, ow):
    """Each forward output's rounding scale: the largest over its 4x4 tile (the transforms mix a tile's outputs,
    so an output whose own terms are small still carries its tile's roundings)."""
    c = scale.shape[1]
    th, tw = -(-oh // 4), -(-ow // 4)
    padded = np.zeros((n, th * 4, tw * 4, c))
    padded[:, :oh, :ow] = scale.reshape(n, oh, ow, c)
    tiles = padded.reshape(n, th, 4, tw, 4, c).max(axis=(2, 4), keepdims=True)
    return np.broadcast_to(tiles, (n, th, 4, tw, 4, c)).reshape(n, th * 4, tw * 4, c)[:, :oh, :ow].reshape(-1, c)


def taps_scale(scale):
    """Each weight-gradient entry's rounding scale: the largest over the nine taps of its channel pair (the
    taps' transform mixes them)."""
    c_grid = scale.shape[0]
    nine = scale.reshape(c_grid, 9, -1)
    return np.broadcast_to(nine.max(axis=1, keepdims=True), nine.shape).reshape(c_grid, -1)


def references(image, wmat, grid_rows, padding):
    """The float64 products and the scales of their roundings (products of magnitudes, over what is mixed)."""
    def both(a, b, weight_grad):
        if weight_grad:
            return kernels.correlate_weight_grad(a, b, (3, 3), (1, 1), padding, backend="numpy")
        return kernels.correlate(a, b, (3, 3), (1, 1), padding, backend="numpy")
    x, w, g = (np.asarray(a, dtype=np.float64) for a in (image, wmat, grid_rows))
    n, h, width, _ = x.shape
    oh, ow = h + 2 * padding[0] - 2, width + 2 * padding[1] - 2
    return ((both(x, w, False), tile_scale(both(np.abs(x), np.abs(w), False), n, oh, ow)),
            (both(x, g, True), taps_scale(both(np.abs(x), np.abs(g), True))))


def within(got, ref, scale, bound):
    assert got.shape == ref.shape
    excess = np.abs(got.astype(np.float64) - ref) - bound * scale
    assert excess.max(initial=-1.0) <= 0, f"off by {np.abs(got - ref).max()} (scale {scale.max()})"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("seed", range(8))
def test_winograd_matches_the_reference_on_random_geometries(seed, dtype):
    gen = np.random.default_rng(seed)
    n, h, w, c, c_grid, padding = random_geometry(gen)
    image = gen.standard_normal((n, h, w, c)).astype(dtype)
    wmat = gen.standard_normal((c_grid, 9 * c)).astype(dtype)
    bias = gen.standard_normal(c_grid).astype(dtype)
    oh, ow = h + 2 * padding[0] - 2, w + 2 * padding[1] - 2
    grid_rows = gen.standard_normal((n * oh * ow, c_grid)).astype(dtype)
    (ref, scale), (ref_w, scale_w) = references(image, wmat, grid_rows, padding)
    bound = FLOAT32_BOUND if dtype == np.float32 else FLOAT64_BOUND
    got = winograd_numba.correlate_winograd(image, wmat, padding, bias)
    assert got.dtype == dtype
    within(got - bias, ref, scale + np.abs(bias), bound)
    got_w = winograd_numba.weight_grad_winograd(image, grid_rows, padding)
    assert got_w.dtype == dtype
    within(got_w, ref_w, scale_w, bound)


def test_the_compiled_transforms_are_the_matrices_of_the_module_doc():
    """One tile: the input transform is B^T X B, the output transform A^T M A (plus the bias), the gradient's
    A dY A^T, with the matrices written out in the module, each channel on its own."""
    gen = np.random.default_rng(6)
    bt, at = winograd_numba.BT, winograd_numba.AT
    f = winograd_numba._coefficients(np.float64)
    block = gen.standard_normal((1, 6, 6, 3))                    # one 6x6 block, no padding: one tile
    u, _ = winograd_numba._planes(1, 3, np.float64)
    winograd_numba._input_tiles(block, (0, 0), 1, 1, f, u, (0, 1))
    for ch in range(3):
        np.testing.assert_allclose(u[:, ch].reshape(6, 6), bt @ block[0, :, :, ch] @ bt.T, rtol=1e-13, atol=1e-12)
    m, _ = winograd_numba._planes(1, 3, np.float64)
    m[:, :3] = gen.standard_normal((36, 3))
    bias, out = gen.standard_normal(3), np.empty((1, 4, 4, 3))
    winograd_numba._output_tiles(m, 1, 1, f, bias, out, (0, 1))
    grad = gen.standard_normal((1, 4, 4, 3))
    dm, _ = winograd_numba._planes(1, 3, np.float64)
    winograd_numba._grad_tiles(grad, 1, 1, f, dm, (0, 1))
    for ch in range(3):
        np.testing.assert_allclose(out[0, :, :, ch], at @ m[:, ch].reshape(6, 6) @ at.T + bias[ch], rtol=1e-13,
                                   atol=1e-12)
        np.testing.assert_allclose(dm[:, ch].reshape(6, 6), at.T @ grad[0, :, :, ch] @ at, rtol=1e-13, atol=1e-12)


def test_a_wrong_transform_would_fail_the_bound():
    """The float64 bound is tight enough to catch a slip: one coefficient of the taps' transform off by a
    part in a billion moves the outputs past it."""
    gen = np.random.default_rng(1)
    image, wmat = gen.standard_normal((2, 8, 8, 16)), gen.standard_normal((8, 144))
    (ref, scale), _ = references(image, wmat, np.zeros((128, 8)), (1, 1))
    within(winograd_numba.correlate_winograd(image, wmat, (1, 1), None), ref, scale, FLOAT64_BOUND)
    gg = winograd_numba.GG.copy()
    try:
        winograd_numba.GG[7, 4] *= 1 + 1e-9
        with pytest.raises(AssertionError):
            within(winograd_numba.correlate_winograd(image, wmat, (1, 1), None), ref, scale, FLOAT64_BOUND)
    finally:
        winograd_numba.GG[:] = gg


@pytest.mark.parametrize("count", [2, 3, 5])
def test_a_batch_split_into_shares_gives_the_same_products(monkeypatch, count):
    """The transforms and the 1x1 products split the batch as the direct kernels do: the forward's
    bits do not depend on the split, the weight gradient's sums only by rounding."""
    gen = np.random.default_rng(2)
    image = gen.standard_normal((3, 6, 7, 64)).astype(np.float32)
    wmat = gen.standard_normal((64, 576)).astype(np.float32)
    grid_rows = gen.standard_normal((3 * 42, 64)).astype(np.float32)
    whole = winograd_numba.correlate_winograd(image, wmat, (1, 1), None)
    whole_w = winograd_numba.weight_grad_winograd(image, grid_rows, (1, 1))
    monkeypatch.setattr(conv_numba, "_share_count", lambda: count)
    assert np.array_equal(winograd_numba.correlate_winograd(image, wmat, (1, 1), None), whole)
    np.testing.assert_allclose(winograd_numba.weight_grad_winograd(image, grid_rows, (1, 1)), whole_w,
                               rtol=1e-5, atol=1e-5 * np.abs(whole_w).max())


def test_one_share_takes_the_forward_in_chunks_with_the_same_bits(monkeypatch):
    """One share runs the forward a GROUP of tiles at a time (module doc, Chunks): a batch of three chunks, the
    last one short, gives the bits of the whole batch in one go, bias included; several shares take it whole."""
    gen = np.random.default_rng(4)
    image = gen.standard_normal((37, 8, 8, 32)).astype(np.float32)
    wmat = gen.standard_normal((48, 288)).astype(np.float32)
    bias = gen.standard_normal(48).astype(np.float32)
    monkeypatch.setattr(conv_numba, "_share_count", lambda: 1)
    assert [stop - start for start, stop in winograd_numba._chunks(37, 4)] == [16, 16, 5]
    chunked = winograd_numba.correlate_winograd(image, wmat, (1, 1), bias)
    monkeypatch.setattr(winograd_numba, "_chunks", lambda n, tiles_per_image: [(0, n)])
    assert np.array_equal(chunked, winograd_numba.correlate_winograd(image, wmat, (1, 1), bias))
    monkeypatch.undo()
    monkeypatch.setattr(conv_numba, "_share_count", lambda: 2)
    assert winograd_numba._chunks(37, 4) == [(0, 37)]


def test_an_empty_batch():
    image, wmat = np.zeros((0, 8, 8, 64), np.float32), np.ones((64, 576), np.float32)
    assert winograd_numba.correlate_winograd(image, wmat, (1, 1), None).shape == (0, 64)
    got = winograd_numba.weight_grad_winograd(image, np.zeros((0, 64), np.float32), (1, 1))
    assert got.shape == (64, 576) and not got.any()


def test_where_it_applies(monkeypatch):
    monkeypatch.delenv("MINIVQ_NUMBA_WINOGRAD", raising=False)
    applies = winograd_numba.applies
    assert applies((2, 8, 8, 128), 128, (3, 3), (1, 1), (1, 1))
    assert applies((2, 8, 8, 64), 128, (3, 3), (1, 1), (0, 2))
    assert applies((2, 1, 1, 64), 64, (3, 3), (1, 1), (1, 1))           # one pixel, padded
    assert applies((2, 8, 8, 128), 32, (3, 3), (1, 1), (1, 1))          # the residual blocks' 128 -> 32
    assert applies((2, 8, 8, 32), 128, (3, 3), (1, 1), (1, 1))          # and their input gradient's mirror
    assert applies((2, 8, 8, 128), 32, (3, 3), (1, 1), (1, 1), weight_grad=True)
    monkeypatch.setattr(conv_numba, "_share_count", lambda: 1)
    assert applies((2, 8, 8, 32), 128, (3, 3), (1, 1), (1, 1), weight_grad=True)     # one share: BLAS's GEMM
    monkeypatch.setattr(conv_numba, "_share_count", lambda: 2)
    assert not applies((2, 8, 8, 32), 128, (3, 3), (1, 1), (1, 1), weight_grad=True)  # lanes along 32 channels
    assert applies((2, 8, 8, 64), 128, (3, 3), (1, 1), (1, 1), weight_grad=True)
    assert not applies((2, 8, 8, 128), 16, (3, 3), (1, 1), (1, 1))      # too narrow a side to pay
    assert not applies((2, 8, 8, 16), 128, (3, 3), (1, 1), (1, 1))
    assert not applies((2, 8, 8, 128), 128, (3, 3), (2, 2), (1, 1))     # strided
    assert not applies((2, 8, 8, 128), 128, (4, 4), (1, 1), (1, 1))
    assert not applies((2, 8, 8, 128), 128, (3, 3), (1, 1), (3, 3))     # padding wider than the taps reach
    assert not applies((2, 1, 1, 128), 128, (3, 3), (1, 1), (0, 0))     # no output
    monkeypatch.setenv("MINIVQ_NUMBA_WINOGRAD", "0")
    assert not applies((2, 8, 8, 128), 128, (3, 3), (1, 1), (1, 1))


def spy(monkeypatch):
    calls = []
    for name in ("correlate_winograd", "weight_grad_winograd"):
        real = getattr(winograd_numba, name)
        monkeypatch.setattr(winograd_numba, name, lambda *a, real=real, name=name: (calls.append(name), real(*a))[1])
    return calls


def test_the_numba_backend_takes_it_where_it_applies_and_the_switch_turns_it_off(monkeypatch):
    gen = np.random.default_rng(3)
    image = gen.standard_normal((2, 8, 8, 64)).astype(np.float32)
    wmat = gen.standard_normal((64, 576)).astype(np.float32)
    grid_rows = gen.standard_normal((128, 64)).astype(np.float32)
    calls = spy(monkeypatch)
    monkeypatch.delenv("MINIVQ_NUMBA_WINOGRAD", raising=False)
    by_winograd = kernels.correlate(image, wmat, (3, 3), (1, 1), (1, 1), backend="numba")
    kernels.correlate_weight_grad(image, grid_rows, (3, 3), (1, 1), (1, 1), backend="numba")
    assert calls == ["correlate_winograd", "weight_grad_winograd"]
    monkeypatch.setenv("MINIVQ_NUMBA_WINOGRAD", "0")
    direct = kernels.correlate(image, wmat, (3, 3), (1, 1), (1, 1), backend="numba")
    kernels.correlate_weight_grad(image, grid_rows, (3, 3), (1, 1), (1, 1), backend="numba")
    assert len(calls) == 2
    (ref, scale), _ = references(image, wmat, grid_rows, (1, 1))
    within(by_winograd, ref, scale, FLOAT32_BOUND)
    within(direct, ref, scale, FLOAT32_BOUND)


def test_the_input_gradient_of_a_widening_conv_runs_in_its_mirror(monkeypatch, one_numba_thread):
    """conv2d 64 -> 128 channels (the decoder's first layer): its input gradient is the forward product of
    the mirror geometry by F(4x4, 3x3) instead of the adjoint kernel, and its float32 gradients stay within
    the bound of the im2col path's."""
    monkeypatch.delenv("MINIVQ_NUMBA_WINOGRAD", raising=False)
    gen = np.random.default_rng(4)
    x0 = gen.standard_normal((2, 64, 6, 6)).astype(np.float32)
    w0 = (gen.standard_normal((128, 64, 3, 3)) * 0.05).astype(np.float32)
    gy = gen.standard_normal((2, 128, 6, 6)).astype(np.float32)

    def grads():
        x, w = mv.tensor(x0, requires_grad=True), mv.tensor(w0, requires_grad=True)
        y = mv.functional.conv2d(x, w, None, stride=1, padding=1)
        (y * mv.tensor(gy)).sum().backward()
        return x.grad, w.grad
    adjoint = []
    real = kernels.correlate_adjoint
    monkeypatch.setattr(kernels, "correlate_adjoint", lambda *a, **k: (adjoint.append(1), real(*a, **k))[1])
    calls = spy(monkeypatch)
    gx, gw = grads()
    assert calls.count("correlate_winograd") == 2 and calls.count("weight_grad_winograd") == 1, calls
    assert not adjoint
    monkeypatch.setattr(kernels, "direct_correlation", lambda a, window_row=None, pointwise=False: False)
    ref_x, ref_w = grads()                                                  # im2col and GEMMs
    for got, ref in ((gx, ref_x), (gw, ref_w)):
        np.testing.assert_allclose(got, ref, rtol=1e-3, atol=FLOAT32_BOUND * 50 * np.abs(ref).max())


def test_gradcheck_through_winograd(monkeypatch, one_numba_thread):
    """Float64 central differences along random directions, with every product of a 64-channel 3x3 conv
    (forward, input gradient in the mirror, weight gradient) by F(4x4, 3x3)."""
    from minivq.kernels import conv_numba as module
    monkeypatch.delenv("MINIVQ_NUMBA_WINOGRAD", raising=False)
    monkeypatch.setattr(kernels, "direct_correlation", lambda a, window_row=None, pointwise=False: (
        kernels._conv_kernels(a) is not None and (window_row is None or window_row >= module.LANES)))
    calls = spy(monkeypatch)
    gen = np.random.default_rng(5)
    x = mv.tensor(gen.standard_normal((2, 64, 5, 6)), requires_grad=True)
    w = mv.tensor(gen.standard_normal((64, 64, 3, 3)) * 0.05, requires_grad=True)
    b = mv.tensor(gen.standard_normal(64), requires_grad=True)
    assert mv.gradcheck(lambda x, w, b: mv.functional.conv2d(x, w, b, stride=1, padding=1), [x, w, b], directions=6)
    assert {"correlate_winograd", "weight_grad_winograd"} <= set(calls), calls
