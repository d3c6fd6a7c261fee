"""The products without the windows (minivq.kernels.correlate, correlate_weight_grad): the compiled
Numba kernels against the references ``im2col(image) @ wmat.T + bias`` and ``grid_rows.T @ im2col(image)``,
on random geometries and on the models' own; the convolutions take them where the calling thread
has one Numba thread, with the same results and gradients."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import minivq as mv
from minivq import kernels
from minivq.functional import conv as conv_module

needs_numba = pytest.mark.skipif("numba" not in kernels.available_backends(), reason="numba is not installed")


def kernels_in_float64_too(monkeypatch):
    """``"auto"`` takes the kernels in float32 only (float64 spills their float32-sized tiles); the
    float64 checks below make it take them in float64 too, wherever they can run (the tests that
    use this also hold their thread to one Numba thread, as the real rule asks)."""
    from minivq.kernels import conv_numba
    monkeypatch.setattr(kernels, "direct_correlation", lambda a, window_row=None, pointwise=False: (
        kernels._conv_kernels(a) is not None and (window_row is None or window_row >= conv_numba.LANES)))


def spy_on_the_kernels(monkeypatch):
    """A list that gets the name of every call of kernels.correlate, correlate_weight_grad and correlate_adjoint."""
    calls = []

    def spy(name, real):
        return lambda *args, **kwargs: calls.append(name) or real(*args, **kwargs)
    for name in ("correlate", "correlate_weight_grad", "correlate_adjoint"):
        monkeypatch.setattr(kernels, name, spy(name, getattr(kernels, name)))
    return calls


def random_case(gen, dtype):
    kernel = tuple(int(v) for v in gen.integers(1, 6, 2))
    stride = tuple(int(v) for v in gen.integers(1, 4, 2))
    padding = tuple(int(gen.integers(0, k)) for k in kernel)
    h, w = (int(gen.integers(k, k + 9)) for k in kernel)
    n, c, c_grid = int(gen.integers(1, 6)), int(gen.integers(1, 40)), int(gen.integers(1, 75))
    image = gen.standard_normal((n, h, w, c)).astype(dtype)
    wmat = gen.standard_normal((c_grid, kernel[0] * kernel[1] * c)).astype(dtype)
    bias = gen.standard_normal(c_grid).astype(dtype) if gen.integers(2) else None
    return image, wmat, kernel, stride, padding, bias


def reference(image, wmat, kernel, stride, padding, bias):
    return kernels.correlate(image, wmat, kernel, stride, padding, bias, backend="numpy")


def close(got, ref, dtype):
    scale = np.abs(ref).max() if ref.size else 1.0
    tol = 1e-5 if dtype == np.float32 else 1e-13
    np.testing.assert_allclose(got, ref, rtol=tol, atol=tol * scale)


@needs_numba
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("seed", range(10))
def test_the_kernel_matches_the_reference_on_random_geometries(seed, dtype):
    """Strides, paddings and kernels of every shape, channel counts that fill no tile exactly, pixel
    counts that are no multiple of a tile's rows, with and without a bias."""
    image, wmat, kernel, stride, padding, bias = random_case(np.random.default_rng(seed), dtype)
    got = kernels.correlate(image, wmat, kernel, stride, padding, bias, backend="numba")
    ref = reference(image, wmat, kernel, stride, padding, bias)
    assert got.shape == ref.shape and got.dtype == dtype and got.flags.c_contiguous
    close(got, ref, dtype)


@needs_numba
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("seed", range(10))
def test_the_weight_gradient_kernel_matches_the_reference_on_random_geometries(seed, dtype):
    """Grid channel counts that fill no tile, window rows shorter and longer than a tile of lanes."""
    image, wmat, kernel, stride, padding, _ = random_case(np.random.default_rng(100 + seed), dtype)
    rows = kernels.correlate(image, wmat, kernel, stride, padding, backend="numpy").shape[0]
    grid_rows = np.random.default_rng(seed).standard_normal((rows, wmat.shape[0])).astype(dtype)
    got = kernels.correlate_weight_grad(image, grid_rows, kernel, stride, padding, backend="numba")
    ref = kernels.correlate_weight_grad(image, grid_rows, kernel, stride, padding, backend="numpy")
    assert got.shape == ref.shape == wmat.shape and got.dtype == dtype
    close(got, ref, dtype)


@needs_numba
@pytest.mark.parametrize("shape", [
    ((6, 8, 8, 128), 128, (3, 3), (1, 1), (1, 1)),      # the VQ-VAE's residual 3x3 convolutions
    ((6, 8, 8, 64), 128, (3, 3), (1, 1), (1, 1)),
    ((6, 16, 16, 64), 128, (4, 4), (2, 2), (1, 1)),     # its strided 4x4 convolutions
    ((6, 32, 32, 1), 64, (4, 4), (2, 2), (1, 1)),       # its 1-channel edge
    ((4, 8, 8, 32), 64, (3, 5), (1, 1), (1, 2)),        # the prior's padded masked convolution
], ids=["3x3-128", "3x3-64", "4x4s2-64", "4x4s2-1", "3x5-32"])
def test_the_kernel_matches_the_reference_on_the_models_geometries(shape, monkeypatch):
    monkeypatch.setenv("MINIVQ_NUMBA_WINOGRAD", "0")       # the direct kernel (test_kernels_winograd.py: the other)
    (n, h, w, c), c_grid, kernel, stride, padding = shape
    gen = np.random.default_rng(3)
    image = gen.standard_normal((n, h, w, c)).astype(np.float32)
    wmat = gen.standard_normal((c_grid, kernel[0] * kernel[1] * c)).astype(np.float32)
    bias = gen.standard_normal(c_grid).astype(np.float32)
    close(kernels.correlate(image, wmat, kernel, stride, padding, bias, backend="numba"),
          reference(image, wmat, kernel, stride, padding, bias), np.float32)
    grid_rows = gen.standard_normal((image.shape[0] * _grid_pixels(image.shape, kernel, stride, padding), c_grid))
    grid_rows = grid_rows.astype(np.float32)
    close(kernels.correlate_weight_grad(image, grid_rows, kernel, stride, padding, backend="numba"),
          kernels.correlate_weight_grad(image, grid_rows, kernel, stride, padding, backend="numpy"), np.float32)


def _grid_pixels(shape, kernel, stride, padding):
    _, h, w, _ = shape
    return ((h + 2 * padding[0] - kernel[0]) // stride[0] + 1) * ((w + 2 * padding[1] - kernel[1]) // stride[1] + 1)


@needs_numba
def test_the_kernel_takes_any_image_layout_and_an_empty_batch():
    gen = np.random.default_rng(4)
    nchw = gen.standard_normal((3, 5, 7, 6))                       # a channels-first array seen channels-last
    image = nchw.transpose(0, 2, 3, 1)
    wmat = gen.standard_normal((9, 2 * 3 * 5))
    got = kernels.correlate(image, wmat, (2, 3), (1, 2), (1, 0), backend="numba")
    close(got, reference(image, wmat, (2, 3), (1, 2), (1, 0), None), np.float64)
    grid_rows = gen.standard_normal((got.shape[0], 9)).T.copy().T        # rows that are not contiguous
    close(kernels.correlate_weight_grad(image, grid_rows, (2, 3), (1, 2), (1, 0), backend="numba"),
          kernels.correlate_weight_grad(image, grid_rows, (2, 3), (1, 2), (1, 0), backend="numpy"), np.float64)
    assert kernels.correlate(image[:0], wmat, (2, 3), (1, 2), (1, 0), backend="numba").shape == (0, 9)
    empty = kernels.correlate_weight_grad(image[:0], grid_rows[:0], (2, 3), (1, 2), (1, 0), backend="numba")
    assert empty.shape == (9, 30) and not empty.any()


@needs_numba
def test_the_kernel_sums_every_tap_in_order_so_a_pixel_does_not_depend_on_its_tile():
    """The same window gives bitwise the same output wherever it lies: the pixel's row in a tile and
    its parallel block do not change its rounding."""
    gen = np.random.default_rng(5)
    window = gen.standard_normal((1, 3, 3, 20)).astype(np.float32)
    image = np.tile(window, (1, 7, 11, 1))                          # the same 3x3 window everywhere, stride 3
    wmat = gen.standard_normal((40, 3 * 3 * 20)).astype(np.float32)
    out = kernels.correlate(image, wmat, (3, 3), (3, 3), (0, 0), backend="numba")
    assert (out == out[0]).all()


@needs_numba
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_forward_blocks_change_no_bit(dtype):
    """Blocks of pixels and of window-row depth (weights kept in L1) leave each sum in its order: any
    block size gives bitwise the same output, a last block of one pixel and a depth that ends mid-row
    included, and it matches the reference. Two images of 72 pixels: a block ends where its image
    does (each image is padded in turn)."""
    from minivq.kernels import conv_numba
    gen = np.random.default_rng(14)
    n, h, w, c, c_grid = 2, 9, 8, 21, 37                 # 9 * 8 = PIXEL_BLOCK + 8 pixels in each image
    image = gen.standard_normal((n, h, w, c)).astype(dtype)
    wmat = gen.standard_normal((c_grid, 3 * 3 * c)).astype(dtype)
    bias = gen.standard_normal(c_grid).astype(dtype)
    oh, ow = conv_numba._grid_size(image, (3, 3), (1, 1), (1, 1))
    packed = conv_numba.pack_weight(wmat)
    lanes = np.zeros(packed.shape[0] * conv_numba.LANES, dtype)
    lanes[:c_grid] = bias
    outs = []
    for depth in (1, 5, 3 * c - 1, 3 * c, 10 ** 6):
        out = np.full((n * oh * ow, c_grid), np.nan, dtype)
        conv_numba._correlate(image, np.empty(0, dtype), (1, 1), (3, 3, 1, 1, oh, ow), packed, lanes, depth, out,
                              (0, n))
        outs.append(out)
    for out in outs[1:]:
        assert np.array_equal(out, outs[0])
    last = np.full((conv_numba.PIXEL_BLOCK + 1, c_grid), np.nan, dtype)      # a last block of one pixel
    one_row = image[:1, :1, :1].repeat(conv_numba.PIXEL_BLOCK + 1, axis=2)
    conv_numba._correlate(one_row, np.ascontiguousarray(one_row).reshape(-1), (0, 0),
                          (1, 1, 1, 1, 1, conv_numba.PIXEL_BLOCK + 1), conv_numba.pack_weight(wmat[:, :c]), lanes, 7,
                          last, (0, 1))
    assert np.array_equal(last, last[:1].repeat(len(last), axis=0))
    close(outs[0], reference(image, wmat, (3, 3), (1, 1), (1, 1), bias), dtype)


@needs_numba
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("seed", range(8))
def test_the_adjoint_kernel_matches_the_reference_on_random_geometries(seed, dtype):
    """col2im(grid_rows @ wmat) (+ bias) without the columns: strides, paddings, channel counts that fill
    no tile, window rows that end inside a tile of lanes, against the product then col2im."""
    image, wmat, kernel, stride, padding, bias = random_case(np.random.default_rng(200 + seed), dtype)
    rows = kernels.correlate(image, wmat, kernel, stride, padding, backend="numpy").shape[0]
    grid_rows = np.random.default_rng(seed).standard_normal((rows, wmat.shape[0])).astype(dtype)
    c_bias = np.random.default_rng(seed).standard_normal(image.shape[3]).astype(dtype) if bias is not None else None
    got = kernels.correlate_adjoint(grid_rows, wmat, image.shape, kernel, stride, padding, c_bias, backend="numba")
    ref = kernels.correlate_adjoint(grid_rows, wmat, image.shape, kernel, stride, padding, c_bias, backend="numpy")
    assert got.shape == ref.shape == image.shape and got.dtype == dtype and got.flags.c_contiguous
    close(got, ref, dtype)


@needs_numba
def test_the_adjoint_adds_a_pixel_only_inside_its_window():
    """A NaN in one grid pixel reaches the image pixels of its window and no others (a tile's lanes past
    the end of a window row are never added), as in the reference; an empty batch gives an empty image."""
    gen = np.random.default_rng(16)
    shape, kernel, stride, padding = (2, 9, 10, 13), (4, 3), (2, 2), (1, 1)    # window rows of 39: a tile and 7
    wmat = gen.standard_normal((20, 4 * 3 * 13)).astype(np.float32)
    grid_rows = gen.standard_normal((2 * 4 * 5, 20)).astype(np.float32)
    grid_rows[23, 5] = np.nan
    got = kernels.correlate_adjoint(grid_rows, wmat, shape, kernel, stride, padding, backend="numba")
    ref = kernels.correlate_adjoint(grid_rows, wmat, shape, kernel, stride, padding, backend="numpy")
    assert 0 < np.isnan(ref).sum() < ref.size and np.array_equal(np.isnan(got), np.isnan(ref))
    finite = ~np.isnan(ref)
    close(got[finite], ref[finite], np.float32)
    empty = kernels.correlate_adjoint(grid_rows[:0], wmat, (0,) + shape[1:], kernel, stride, padding, backend="numba")
    assert empty.shape == (0,) + shape[1:]


@needs_numba
def test_an_unpadded_image_read_in_place_gives_the_bits_of_its_copy():
    """Without padding the forward reads a contiguous image in place instead of copying each image into
    its buffer: the same sums in the same order, so the same bits as a strided view of the same numbers."""
    gen = np.random.default_rng(17)
    image = gen.standard_normal((3, 10, 12, 40)).astype(np.float32)
    strided = np.asfortranarray(image)              # the same numbers, not one C-ordered run: copied per image
    wmat = gen.standard_normal((50, 3 * 5 * 40)).astype(np.float32)
    got = kernels.correlate(image, wmat, (3, 5), (1, 1), (0, 0), backend="numba")
    assert np.array_equal(got, kernels.correlate(strided, wmat, (3, 5), (1, 1), (0, 0), backend="numba"))
    close(got, reference(image, wmat, (3, 5), (1, 1), (0, 0), None), np.float32)


def test_operands_that_do_not_fit_the_geometry_are_one_clear_error():
    """The compiled kernels index without bounds checks: a wrong size stops before them, on any backend."""
    image, wmat, grid_rows = np.zeros((2, 5, 5, 3), np.float32), np.zeros((4, 27), np.float32), np.zeros((50, 4))
    window = (3, 3), (1, 1), (1, 1)
    for backend in ("auto", "numpy"):
        with pytest.raises(ValueError, match=r"correlate: wmat must be \(C_grid, kH\*kW\*C\) = \(C_grid, 27\)"):
            kernels.correlate(image, wmat[:, :26], *window, backend=backend)
        with pytest.raises(ValueError, match="correlate_weight_grad: grid_rows must have one row per window .50."):
            kernels.correlate_weight_grad(image, grid_rows[:49], *window, backend=backend)
        with pytest.raises(ValueError, match="correlate_adjoint: grid_rows must have one row per window"):
            kernels.correlate_adjoint(grid_rows[:, :3], wmat, image.shape, *window, backend=backend)
        with pytest.raises(ValueError, match="the image must be channels-last"):
            kernels.correlate(image[0], wmat, *window, backend=backend)


def test_correlate_refuses_what_it_cannot_run():
    image, wmat = np.zeros((1, 3, 3, 2)), np.zeros((4, 18))
    with pytest.raises(ValueError, match="unknown backend"):
        kernels.correlate(image, wmat, (3, 3), (1, 1), (0, 0), backend="cuda")
    with pytest.raises(ValueError, match="'numba' for correlate needs"):
        kernels.correlate(image.astype(np.float16), wmat.astype(np.float16), (3, 3), (1, 1), (0, 0), backend="numba")
    with pytest.raises(ValueError, match="'numba' for correlate_weight_grad needs"):
        kernels.correlate_weight_grad(image.astype(np.float16), np.zeros((1, 4), np.float16), (3, 3), (1, 1), (0, 0),
                                      backend="numba")
    assert not kernels.direct_correlation(image.astype(np.float16))


@needs_numba
def test_auto_runs_the_kernels_where_blas_runs_one_thread_or_numba_does(one_numba_thread):
    """In float32 only, and where the calling thread's Numba count is 1 or BLAS runs one thread per call:
    with BLAS threads of its own (which spin on the cores after each GEMM) the convolutions keep
    OpenBLAS's threaded GEMMs. A window row shorter than a tile of lanes keeps the weight gradient on
    the GEMM too."""
    import numba
    from minivq.kernels import conv_numba
    image = np.zeros((1, 4, 4, 16), np.float32)
    assert kernels.direct_correlation(image) and not kernels.direct_correlation(image.astype(np.float64))
    assert kernels.direct_correlation(image, window_row=conv_numba.LANES)
    assert not kernels.direct_correlation(image, window_row=conv_numba.LANES - 1)
    assert conv_numba.threads_here() == 1
    assert not kernels.direct_correlation(image, pointwise=True)      # one thread: OpenBLAS's GEMM, no copy
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("one core: Numba has one thread")
    pytest.importorskip("threadpoolctl")
    numba.set_num_threads(2)
    with mv.backend.blas_threads(2):
        assert not kernels.direct_correlation(image) and conv_numba.threads_here() == 0
    with mv.backend.blas_threads(1):
        assert kernels.direct_correlation(image) and conv_numba.threads_here() == 2
        assert kernels.direct_correlation(image, pointwise=True)      # two shares beat one BLAS thread


@needs_numba
def test_conv_threads_holds_blas_to_one_thread_for_float32_only(one_numba_thread):
    """Inside ``kernels.conv_threads`` the kernels take the threads (BLAS at one), and the count is put
    back after; float64 and a thread of one Numba thread change nothing."""
    import numba
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("one core: Numba has one thread")
    pytest.importorskip("threadpoolctl")
    image = np.zeros((1, 4, 4, 16), np.float32)
    numba.set_num_threads(2)
    with mv.backend.blas_threads(2):
        with kernels.conv_threads(np.float32):
            assert mv.backend.blas_thread_count() == 1 and kernels.direct_correlation(image)
        assert mv.backend.blas_thread_count() == 2 and not kernels.direct_correlation(image)
        with kernels.conv_threads("float64"):
            assert mv.backend.blas_thread_count() == 2
        numba.set_num_threads(1)
        with kernels.conv_threads(np.float32):
            assert mv.backend.blas_thread_count() == 2


@pytest.fixture
def shares(monkeypatch):
    """``shares(k)``: the kernels split every batch into k shares of images (one per thread), whatever
    the threads here."""
    from minivq.kernels import conv_numba

    def split_into(count):
        monkeypatch.setattr(conv_numba, "_share_count", lambda: count)
    return split_into


@needs_numba
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("seed", range(6))
def test_a_batch_split_into_shares_gives_the_same_products(seed, dtype, shares):
    """Each output image of the forward and the adjoint is its own sum: the same bits for any split. The
    weight gradient sums each share, then the shares in order: the reference's values, and the same
    bits on every call with the same number of shares. More shares than images: one image each."""
    from minivq.kernels import conv_numba
    gen = np.random.default_rng(300 + seed)
    image, wmat, kernel, stride, padding, bias = random_case(gen, dtype)
    image = np.concatenate([image] * 3)                    # 3 to 15 images
    (oh, ow), c_grid = conv_numba._grid_size(image, kernel, stride, padding), wmat.shape[0]
    grid = gen.standard_normal((image.shape[0] * oh * ow, c_grid)).astype(dtype)
    window = kernel, stride, padding

    def products():
        return (conv_numba.correlate_numba(image, wmat, *window, bias),
                conv_numba.correlate_adjoint_numba(grid, wmat, image.shape, *window, bias),
                conv_numba.correlate_weight_grad_numba(image, grid, *window))
    shares(1)
    forward, adjoint, _ = products()
    for count in (2, 3, 4, 16):
        shares(count)
        got, again = products(), products()
        assert np.array_equal(got[0], forward) and np.array_equal(got[1], adjoint)
        close(got[2], kernels.correlate_weight_grad(image, grid, *window, backend="numpy"), dtype)
        assert np.array_equal(got[2], again[2])


@needs_numba
def test_the_convolutions_split_over_two_real_threads_inside_conv_threads(monkeypatch, one_numba_thread):
    """Two Numba threads with BLAS at one (``conv_threads``): all three kernels run, each batch in two
    shares on two threads (a spy on the parallel drivers), and a conv2d's forward and gradients equal
    the GEMM path's; a 1x1 conv's too (its GEMMs run on one BLAS thread there, so the kernels take it)."""
    import numba
    from minivq.kernels import conv_numba
    splits = []
    for name in ("_correlate_shares", "_weight_grad_shares", "_adjoint_shares"):
        real = getattr(conv_numba, name)
        monkeypatch.setattr(conv_numba, name, lambda *args, real=real, name=name: (
            splits.append((name, args[-1].size - 1)), real(*args))[1])
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("one core: Numba has one thread")
    pytest.importorskip("threadpoolctl")
    gen = np.random.default_rng(21)
    x0 = gen.standard_normal((6, 32, 8, 8)).astype(np.float32)
    numba.set_num_threads(2)

    def run(w0, stride, padding):
        x, w = mv.tensor(x0, requires_grad=True), mv.tensor(w0, requires_grad=True)
        y = mv.functional.conv2d(x, w, stride=stride, padding=padding)
        (y * y).sum().backward()
        return y.data, x.grad, w.grad
    for w0, stride, padding in [((gen.standard_normal((48, 32, 4, 4)) * 0.1).astype(np.float32), 2, 1),
                                ((gen.standard_normal((48, 32, 1, 1)) * 0.1).astype(np.float32), 1, 0)]:
        with mv.backend.blas_threads(2):
            reference_run = run(w0, stride, padding)        # im2col (or the rows) and threaded GEMMs
        splits.clear()
        with kernels.conv_threads(np.float32):
            assert kernels.direct_correlation(x0.transpose(0, 2, 3, 1)) and mv.backend.blas_thread_count() == 1
            got = run(w0, stride, padding)
        for a, b in zip(got, reference_run):
            close(a, b, np.float32)
        assert sorted(splits) == [("_adjoint_shares", 2), ("_correlate_shares", 2), ("_weight_grad_shares", 2)]


@needs_numba
def test_the_avx2_tile_also_matches_the_reference():
    """MINIVQ_NUMBA_WIDE=0 forces the 3 x 32 tile that AVX2 machines use; on any machine the three kernels
    must agree with the references."""
    check = """
import numpy as np
from minivq import kernels
from minivq.kernels import conv_numba as k
assert (k.ROWS, k.LANES, k.PIXEL_BLOCK) == (3, 32, 48)
g = np.random.default_rng(0)
# grid channels that fill no whole tile of 3; images of more pixels than a block; strided and padded
for shape, c_grid, window in [((3, 7, 6, 19), 21, ((3, 3), (1, 2), (1, 1))),
                              ((2, 9, 8, 33), 20, ((3, 3), (1, 1), (1, 1))),
                              ((1, 5, 13, 7), 50, ((2, 4), (2, 1), (1, 2)))]:
    x = g.standard_normal(shape)
    w = g.standard_normal((c_grid, window[0][0] * window[0][1] * shape[3]))
    b, b_image = g.standard_normal(c_grid), g.standard_normal(shape[3])
    for backend in ("numba", "numpy"):
        y = kernels.correlate(x, w, *window, b, backend=backend)
        gy = np.random.default_rng(1).standard_normal(y.shape)
        dw = kernels.correlate_weight_grad(x, gy, *window, backend=backend)
        dx = kernels.correlate_adjoint(gy, w, x.shape, *window, b_image, backend=backend)
        if backend == "numba":
            got = (y, dw, dx)
    for a, r in zip(got, (y, dw, dx)):
        np.testing.assert_allclose(a, r, rtol=1e-12, atol=1e-12)
"""
    subprocess.run([sys.executable, "-c", check], check=True, env=dict(os.environ, MINIVQ_NUMBA_WIDE="0"),
                   cwd=str(Path(__file__).parents[1]))


@needs_numba
@pytest.mark.parametrize("transposed", [False, "narrow", True, "strided", "strided-transposed"],
                         ids=["conv2d", "conv2d-narrow", "conv_transpose2d", "conv2d-strided", "conv_transpose2d-strided"])
def test_the_convolutions_give_the_same_with_and_without_the_kernels(monkeypatch, one_numba_thread, transposed):
    """Forward and backward products through the kernels, against the im2col path they replace:
    outputs and all three gradients, float64. ("narrow": fewer channels out than in, the conv that
    otherwise runs as the transposed conv of its mirror; "strided": no mirror, so the input gradient
    of conv2d and the forward of conv_transpose2d run col2im(grid @ wmat), through correlate_adjoint.)"""
    gen = np.random.default_rng(6)
    used = {"correlate", "correlate_weight_grad"}
    if transposed == "strided":
        x0, w0 = gen.standard_normal((3, 12, 9, 8)), gen.standard_normal((14, 12, 4, 3))
        op = lambda x, w, b: mv.functional.conv2d(x, w, b, stride=2, padding=1)  # noqa: E731
        transposed, used = False, used | {"correlate_adjoint"}
    elif transposed == "strided-transposed":
        x0, w0 = gen.standard_normal((3, 14, 4, 5)), gen.standard_normal((14, 12, 4, 3))
        op = lambda x, w, b: mv.functional.conv_transpose2d(x, w, b, stride=2, padding=1, output_padding=1)  # noqa
        transposed, used = True, used | {"correlate_adjoint"}
    elif transposed == "narrow":
        x0, w0 = gen.standard_normal((3, 40, 7, 7)), gen.standard_normal((12, 40, 3, 3))
        op = lambda x, w, b: mv.functional.conv2d(x, w, b, stride=1, padding=1)  # noqa: E731
        transposed = False
    elif transposed:
        # stride 1 and fewer channels in than out: its forward reads the windows of its input (_flipped_geometry)
        x0, w0 = gen.standard_normal((4, 12, 5, 5)), gen.standard_normal((12, 16, 3, 4))
        op = lambda x, w, b: mv.functional.conv_transpose2d(x, w, b, stride=1, padding=1)  # noqa: E731
    else:       # more channels out than in: no mirror for the input gradient, so col2im(gy @ wmat) too
        x0, w0 = gen.standard_normal((4, 12, 9, 9)), gen.standard_normal((14, 12, 3, 3))
        op = lambda x, w, b: mv.functional.conv2d(x, w, b, stride=1, padding=1)  # noqa: E731
        used = used | {"correlate_adjoint"}
    b0 = gen.standard_normal(w0.shape[1] if transposed else w0.shape[0])
    kernels_in_float64_too(monkeypatch)
    calls = spy_on_the_kernels(monkeypatch)
    results = {}
    for direct in (True, False):
        if not direct:
            monkeypatch.setattr(kernels, "direct_correlation", lambda a, window_row=None, pointwise=False: False)
        x, w, b = (mv.tensor(v, requires_grad=True) for v in (x0, w0, b0))
        y = op(x, w, b)
        (y * mv.tensor(np.cos(np.arange(y.data.size)).reshape(y.shape))).sum().backward()
        results[direct] = [y.data, x.grad, w.grad, b.grad]
        if direct:
            assert set(calls) == used, calls
    for got, ref in zip(results[True], results[False]):
        np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-12 * np.abs(ref).max())


@needs_numba
def test_a_step_with_the_kernels_copies_no_windows(monkeypatch, one_numba_thread):
    copies = []
    original = conv_module._im2col
    monkeypatch.setattr(conv_module, "_im2col", lambda image, g: copies.append(image.shape) or original(image, g))
    gen = np.random.default_rng(7)
    x = mv.tensor(gen.standard_normal((3, 12, 9, 9)).astype(np.float32), requires_grad=True)
    w = mv.tensor(gen.standard_normal((16, 12, 3, 3)).astype(np.float32), requires_grad=True)
    mv.functional.conv2d(x, w, padding=1).sum().backward()
    assert copies == [] and x.grad is not None and w.grad is not None


@needs_numba
@pytest.mark.parametrize("transposed", [False, True], ids=["conv2d", "conv_transpose2d"])
def test_gradcheck_through_the_kernels(monkeypatch, one_numba_thread, transposed):
    """Float64 central differences on random shapes wide enough (kW*C >= a tile of lanes) that the
    kernels run, forward and backward (a spy counts them); the first shape strided, so that
    col2im(grid @ wmat) runs through correlate_adjoint too."""
    kernels_in_float64_too(monkeypatch)
    calls = spy_on_the_kernels(monkeypatch)
    gen = np.random.default_rng(11)
    for draw in range(3):
        k, c_in, c_out = int(gen.integers(2, 4)), int(gen.integers(16, 20)), int(gen.integers(16, 20))
        stride, padding = 2 if draw == 0 else int(gen.integers(1, 3)), int(gen.integers(0, 2))
        size = int(gen.integers(k + 1, k + 5))
        x = mv.tensor(gen.standard_normal((2, c_in, size, size)), requires_grad=True)
        if transposed:
            w = mv.tensor(gen.standard_normal((c_in, c_out, k, k)) * 0.2, requires_grad=True)
            op = lambda x, w, b: mv.functional.conv_transpose2d(x, w, b, stride=stride, padding=padding)  # noqa: E731
        else:
            w = mv.tensor(gen.standard_normal((c_out, c_in, k, k)) * 0.2, requires_grad=True)
            op = lambda x, w, b: mv.functional.conv2d(x, w, b, stride=stride, padding=padding)  # noqa: E731
        b = mv.tensor(gen.standard_normal(c_out), requires_grad=True)
        assert mv.gradcheck(op, [x, w, b], directions=8)
    assert {"correlate", "correlate_weight_grad", "correlate_adjoint"} <= set(calls), calls


@needs_numba
@pytest.mark.parametrize("transposed", [False, True], ids=["conv2d", "conv_transpose2d"])
def test_gradcheck_through_the_kernels_with_the_batch_split_into_shares(monkeypatch, one_numba_thread, shares,
                                                                       transposed):
    """The same float64 central differences with every batch of three images split into three shares
    (the parallel drivers, one image each; their weight gradients summed share by share)."""
    from minivq.kernels import conv_numba
    kernels_in_float64_too(monkeypatch)
    shares(3)
    drivers = []
    for name in ("_correlate_shares", "_weight_grad_shares", "_adjoint_shares"):
        real = getattr(conv_numba, name)
        monkeypatch.setattr(conv_numba, name, lambda *args, real=real, name=name: (drivers.append(name),
                                                                                   real(*args))[1])
    gen = np.random.default_rng(12)
    for stride, padding in ((2, 1), (1, 1)):
        x = mv.tensor(gen.standard_normal((3, 17, 5, 5)), requires_grad=True)
        shape = (17, 18, 3, 3) if transposed else (18, 17, 3, 3)
        w = mv.tensor(gen.standard_normal(shape) * 0.2, requires_grad=True)
        b = mv.tensor(gen.standard_normal(18), requires_grad=True)
        conv = mv.functional.conv_transpose2d if transposed else mv.functional.conv2d
        assert mv.gradcheck(lambda x, w, b: conv(x, w, b, stride=stride, padding=padding), [x, w, b], directions=8)
    assert {"_correlate_shares", "_weight_grad_shares", "_adjoint_shares"} <= set(drivers), drivers


@needs_numba
def test_worker_threads_never_enter_numbas_threading_layer_together():
    """Data-parallel workers (one Numba thread each) call the parallel kernels at once. Numba's
    fallback threading layer, workqueue, aborts the process when two threads enter it together; at
    one thread the kernels run their serial compile and never enter it."""
    check = """
import threading
import numpy as np
from minivq import kernels
def work(seed):
    kernels.set_cpu_threads(1)
    g = np.random.default_rng(seed)
    for _ in range(30):
        x = g.standard_normal((512, 16)).astype(np.float32)
        kernels.nearest_code(x, x[:64], backend="numba")
        kernels.correlate(g.standard_normal((4, 8, 8, 16)), g.standard_normal((32, 144)), (3, 3), (1, 1), (1, 1),
                          backend="numba")
threads = [threading.Thread(target=work, args=(s,)) for s in range(2)]
for t in threads:
    t.start()
for t in threads:
    t.join()
"""
    env = dict(os.environ, NUMBA_THREADING_LAYER="workqueue")
    done = subprocess.run([sys.executable, "-c", check], env=env, cwd=str(Path(__file__).parents[1]),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]


@needs_numba
def test_the_weight_gradient_counts_a_last_block_of_one_pixel():
    from minivq.kernels import conv_numba
    gen = np.random.default_rng(12)
    image = gen.standard_normal((1, conv_numba.CHUNK + 1, 1, 40))           # CHUNK + 1 windows of 1x1
    grid_rows = gen.standard_normal((conv_numba.CHUNK + 1, 9))
    close(kernels.correlate_weight_grad(image, grid_rows, (1, 1), (1, 1), (0, 0), backend="numba"),
          grid_rows.T @ image.reshape(-1, 40), np.float64)


def test_without_numba_everything_takes_the_reference(monkeypatch, one_numba_thread):
    """The NumPy-only install: no kernel, the references, a clear error for an explicit 'numba'."""
    monkeypatch.setitem(kernels._loaded, "numba-conv", "ImportError: no numba here")
    image = np.random.default_rng(13).standard_normal((2, 5, 5, 40)).astype(np.float32)
    wmat = np.ones((3, 9 * 40), np.float32)
    assert not kernels.direct_correlation(image)
    close(kernels.correlate(image, wmat, (3, 3), (1, 1), (1, 1)), reference(image, wmat, (3, 3), (1, 1), (1, 1), None),
          np.float32)
    with pytest.raises(ValueError, match=r"'numba' for correlate needs .*pip install -e \.\[numba\]"):
        kernels.correlate(image, wmat, (3, 3), (1, 1), (1, 1), backend="numba")
    x = mv.tensor(image.transpose(0, 3, 1, 2), requires_grad=True)
    mv.functional.conv2d(x, mv.tensor(wmat.reshape(3, 3, 3, 40).transpose(0, 3, 1, 2)), padding=1).sum().backward()
    assert x.grad.shape == x.shape


@needs_numba
def test_the_wide_tiles_use_512_bit_registers_where_the_cpu_has_them():
    """Without the vector-width hint LLVM would use ymm only on Skylake-class CPUs (nearest_numba.py)."""
    from minivq.kernels import conv_numba, nearest_numba
    if not nearest_numba._host_has_avx512() or os.environ.get("MINIVQ_NUMBA_WIDE") == "0":
        pytest.skip("no AVX-512 here")
    import numba
    image = np.ones((1, 4, 4, 40), np.float32)
    forward = numba.njit(nogil=True, fastmath={"contract"})(conv_numba._correlate.py_func)   # the cached
    forward(image, np.empty(0, np.float32), (1, 1), (3, 3, 1, 1, 4, 4), conv_numba.pack_weight(np.ones((8, 360), np.float32)),
            np.zeros(conv_numba.LANES, np.float32), 64, np.empty((16, 8), np.float32), (0, 1))  # can't be inspected
    weight = numba.njit(nogil=True, fastmath={"contract"})(conv_numba._weight_grad.py_func)
    weight(image, (1, 1), (3, 3, 1, 1, 4, 4), np.ones((16, 8), np.float32),
           np.zeros((8, 3 * 4 * conv_numba.LANES), np.float32), (0, 1))
    adjoint = numba.njit(nogil=True, fastmath={"contract"})(conv_numba._adjoint.py_func)
    adjoint(np.ones((16, 8), np.float32), (1, 1), (3, 3, 1, 1, 4, 4), np.ones((3, 4, 8, conv_numba.LANES), np.float32),
            np.zeros(40, np.float32), np.empty((1, 4, 4, 40), np.float32), (0, 1))
    for fresh in (forward, weight, adjoint):
        assert "zmm" in fresh.inspect_asm(fresh.signatures[0])


@needs_numba
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [
    ((3, 8, 8, 128), 40, (3, 3), (1, 1), (1, 1)),      # padded rows of 10 x 128 numbers: 5120 (float32) bytes
    ((3, 16, 16, 64), 24, (4, 4), (2, 2), (1, 1)),     # two padded rows a grid row: 9216 bytes
    ((2, 14, 14, 24), 7, (3, 3), (1, 1), (1, 1)),      # the last tile of lanes reads past its window row
], ids=["3x3-128", "4x4s2-64", "3x3-24"])
def test_the_weight_gradient_is_the_same_where_its_padded_rows_are_skewed(shape, dtype):
    """Rows of the weight gradient's padded image whose grid-row step is a multiple of 512 bytes get one cache line
    more (conv_numba._skewed_pitch); the windows move, the numbers a last tile reads past a row land in the skew."""
    from minivq.kernels import conv_numba
    (n, h, w, c), c_grid, kernel, stride, padding = shape
    numbers, itemsize = (w + 2 * padding[1]) * c, np.dtype(dtype).itemsize
    assert conv_numba._skewed_pitch(numbers, stride[0], itemsize) == numbers + conv_numba.CACHE_LINE // itemsize
    gen = np.random.default_rng(7)
    image = gen.standard_normal((n, h, w, c)).astype(dtype)
    grid_rows = gen.standard_normal((n * _grid_pixels(image.shape, kernel, stride, padding), c_grid)).astype(dtype)
    close(kernels.correlate_weight_grad(image, grid_rows, kernel, stride, padding, backend="numba"),
          kernels.correlate_weight_grad(image, grid_rows, kernel, stride, padding, backend="numpy"), dtype)


@needs_numba
def test_the_padded_rows_are_skewed_only_where_they_would_alias():
    from minivq.kernels import conv_numba
    assert conv_numba._skewed_pitch(10 * 32, 1, 4) == 10 * 32          # 1280 bytes: the rows spread over the sets
    assert conv_numba._skewed_pitch(18 * 32, 1, 4) == 18 * 32          # 2304 bytes, a grid row at stride 1 ...
    assert conv_numba._skewed_pitch(18 * 32, 2, 4) == 18 * 32 + 16     # ... at stride 2 two rows: 4608 bytes
    assert conv_numba._skewed_pitch(18 * 32, 2, 8) == 18 * 32 + 8      # float64: 9216 bytes; a line is 8 numbers
