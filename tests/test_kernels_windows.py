"""The window copies of a convolution (minivq.kernels.im2col / col2im): Numba against the NumPy
reference, and both against a loop, on random geometries; col2im is the adjoint of im2col."""
import numpy as np
import pytest

from minivq import kernels


def loop_im2col(image, kernel, stride, padding):
    n, h, w, c = image.shape
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    oh, ow = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    out = np.zeros((n, oh, ow, kh, kw, c), image.dtype)
    for b in range(n):
        for i in range(oh):
            for j in range(ow):
                for p in range(kh):
                    for q in range(kw):
                        y, x = i * sh - ph + p, j * sw - pw + q
                        if 0 <= y < h and 0 <= x < w:
                            out[b, i, j, p, q] = image[b, y, x]
    return out.reshape(n * oh * ow, kh * kw * c)


def random_geometry(gen):
    kernel = tuple(int(v) for v in gen.integers(1, 5, 2))
    stride = tuple(int(v) for v in gen.integers(1, 4, 2))
    padding = tuple(int(gen.integers(0, k)) for k in kernel)
    h, w = (int(gen.integers(k, k + 7)) for k in kernel)
    n, c = int(gen.integers(1, 5)), int(gen.integers(1, 9))
    return (n, h, w, c), kernel, stride, padding


def backends():
    return ["numpy"] + (["numba"] if "numba" in kernels.available_backends() else [])


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("seed", range(12))
def test_im2col_and_col2im_against_the_loop(backend, seed):
    gen = np.random.default_rng(seed)
    shape, kernel, stride, padding = random_geometry(gen)
    dtype = np.float32 if seed % 2 else np.float64
    image = gen.standard_normal(shape).astype(dtype)
    if seed % 3 == 0:                                   # a strided, non-contiguous view reads the same
        image = np.ascontiguousarray(image.transpose(0, 3, 1, 2)).transpose(0, 2, 3, 1)
    cols = kernels.im2col(image, kernel, stride, padding, backend=backend)
    expected = loop_im2col(image, kernel, stride, padding)
    assert cols.dtype == dtype and cols.flags.c_contiguous
    np.testing.assert_array_equal(cols, expected)
    # col2im is the adjoint: <im2col(x), g> = <x, col2im(g)>
    g = gen.standard_normal(cols.shape).astype(dtype)
    back = kernels.col2im(g, np.full(shape, np.nan, dtype), kernel, stride, padding, backend=backend)
    lhs, rhs = float((cols.astype(np.float64) * g).sum()), float((image.astype(np.float64) * back).sum())
    assert np.isclose(lhs, rhs, rtol=1e-5 if dtype == np.float32 else 1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_numba_col2im_equals_the_reference(seed):
    pytest.importorskip("numba")
    gen = np.random.default_rng(100 + seed)
    shape, kernel, stride, padding = random_geometry(gen)
    n, h, w, c = shape
    oh, ow = (h + 2 * padding[0] - kernel[0]) // stride[0] + 1, (w + 2 * padding[1] - kernel[1]) // stride[1] + 1
    cols = gen.standard_normal((n * oh * ow, kernel[0] * kernel[1] * c))
    ref = kernels.col2im(cols, np.empty(shape), kernel, stride, padding, backend="numpy")
    # a non-contiguous out is filled through a temporary
    out = np.empty((n, c, h, w)).transpose(0, 2, 3, 1)
    got = kernels.col2im(cols, out, kernel, stride, padding, backend="numba")
    assert got is out
    np.testing.assert_allclose(got, ref, rtol=1e-13, atol=1e-13)


def test_unknown_window_backend_is_refused():
    with pytest.raises(ValueError, match="unknown backend 'gpu' for the window copies"):
        kernels.im2col(np.zeros((1, 2, 2, 1)), (1, 1), (1, 1), (0, 0), backend="gpu")


def test_window_backends_that_cannot_run_here_are_clear_errors(monkeypatch):
    image = np.zeros((1, 2, 2, 1))
    with pytest.raises(TypeError, match="'cupy' copies windows of CuPy arrays"):
        kernels.im2col(image, (1, 1), (1, 1), (0, 0), backend="cupy")
    monkeypatch.setitem(kernels._loaded, "numba-windows", "ImportError: no numba here")
    assert kernels.window_backend(image) == "numpy"                 # auto falls back to the reference
    with pytest.raises(ValueError, match=r"no numba here.*pip install -e \.\[numba\]"):
        kernels.im2col(image, (1, 1), (1, 1), (0, 0), backend="numba")
    np.testing.assert_array_equal(kernels.im2col(image + 1, (1, 1), (1, 1), (0, 0)), np.ones((4, 1)))
