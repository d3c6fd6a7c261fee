"""ReLU's gradient (minivq.kernels.relu_grad): the compiled pass against the reference ``g * (y > 0)``,
to the bit, on random shapes and layouts, with zeros, signed zeros, infinities and NaNs among the values."""
import numpy as np
import pytest

from minivq import kernels

numba = pytest.importorskip("numba")
relu_numba = pytest.importorskip("minivq.kernels.relu_numba")
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")   # the reference: inf * 0


def same_bits(a, b):
    bits = f"u{a.itemsize}"
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a.view(bits), b.view(bits))


def awkward(gen, shape, dtype):
    """Normal numbers with exact zeros, -0.0, +-inf and NaN sprinkled in."""
    a = gen.standard_normal(shape).astype(dtype)
    specials = np.array([0.0, -0.0, np.inf, -np.inf, np.nan], dtype)
    where = gen.random(shape) < 0.2
    a[where] = gen.choice(specials, int(where.sum()))
    return a


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("seed", range(8))
def test_the_compiled_pass_equals_the_reference_to_the_bit(dtype, seed):
    gen = np.random.default_rng(seed)
    shape = tuple(int(v) for v in gen.integers(1, 7, int(gen.integers(0, 5))))
    order = tuple(gen.permutation(len(shape)))          # a dense layout in some order of axes

    def make():
        return np.ascontiguousarray(awkward(gen, shape, dtype).transpose(order)).transpose(np.argsort(order))
    g, y = make(), np.maximum(make(), 0)                  # y = relu(x): NaN stays NaN, zeros stay
    mine = relu_numba.relu_grad_numba(g, y)
    assert mine is not None
    assert same_bits(mine, g * (y > 0))
    assert all(m == s for m, s, n in zip(mine.strides, g.strides, shape) if n > 1)     # made in g's layout
    assert same_bits(kernels.relu_grad(g, y), g * (y > 0))


def test_layouts_it_cannot_take_go_to_the_reference():
    gen = np.random.default_rng(1)
    g = gen.standard_normal((4, 6, 5)).astype(np.float32)
    y = np.maximum(gen.standard_normal((4, 6, 5)).astype(np.float32), 0)
    cases = [(g[:, ::2], y[:, ::2]),                      # strided: not dense
             (g, np.asfortranarray(y)),                   # dense, but in another order than g
             (g, y.astype(np.float64)),                   # mixed dtypes
             (g.astype(np.float16), y.astype(np.float16))]  # no float16 arithmetic in Numba
    for a, b in cases:
        assert relu_numba.relu_grad_numba(a, b) is None
        assert same_bits(kernels.relu_grad(a, b), a * (b > 0))


def test_without_numba_the_reference_runs(monkeypatch):
    monkeypatch.setitem(kernels._loaded, "numba-relu", "ImportError: no numba here")
    g = np.array([[1.5, -2.0], [np.nan, 3.0]], np.float32)
    y = np.array([[0.0, 1.0], [2.0, np.nan]], np.float32)
    out = kernels.relu_grad(g, y)
    assert same_bits(out, np.array([[0.0, -2.0], [np.nan, 0.0]], np.float32))
