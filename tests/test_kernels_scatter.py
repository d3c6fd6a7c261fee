"""Rows added by index (minivq.kernels.index_add): the compiled pass (scatter_numba.py) against the reference
``backend.index_add`` and a float64 sum, on random shapes, repeated and unused indices, empty inputs; its
order of adds is the rows' own; an index out of range is reported, never written past the output."""
import numpy as np
import pytest

from minivq import backend, kernels

numba = pytest.importorskip("numba")
scatter = pytest.importorskip("minivq.kernels.scatter_numba")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("seed", range(6))
def test_the_compiled_pass_equals_the_reference(dtype, seed):
    gen = np.random.default_rng(seed)
    m, k = int(gen.integers(1, 300)), int(gen.integers(1, 40))
    tail = tuple(int(v) for v in gen.integers(1, 5, int(gen.integers(0, 3))))
    indices = gen.integers(0, k, m).astype(gen.choice([np.int64, np.int32, np.uint32]))
    values = gen.standard_normal((m,) + tail).astype(dtype)
    if seed % 2:
        values = np.asfortranarray(values)                  # any layout of the rows
    mine = scatter.index_add_numba(indices, values, k)
    reference = backend.index_add(indices, values, k)
    exact = np.zeros((k,) + tail)
    np.add.at(exact, indices, values.astype(np.float64))
    tol = 1e-5 if dtype == np.float32 else 1e-12
    assert mine.dtype == dtype and mine.shape == (k,) + tail
    np.testing.assert_allclose(mine, exact, rtol=tol, atol=tol * np.sqrt(m))
    np.testing.assert_allclose(mine, reference, rtol=tol, atol=tol * np.sqrt(m))
    assert np.array_equal(kernels.index_add(indices, values, k), mine)
    unused = np.setdiff1d(np.arange(k), indices)
    assert np.all(mine[unused] == 0)


def test_each_row_is_summed_in_the_order_of_the_rows():
    """0 + v0 + v1 + ... one add at a time: values whose sum depends on the order show it."""
    values = np.array([[1e8], [1.0], [-1e8], [1.0]], np.float32)
    out = scatter.index_add_numba(np.array([0, 0, 0, 0]), values, 1)
    expected = np.float32(0)
    for v in values[:, 0]:
        expected = np.float32(expected + v)
    assert out[0, 0] == expected == np.float32(1.0)


def test_empty_inputs_and_rows_never_picked_give_zeros():
    out = kernels.index_add(np.zeros(0, np.int64), np.zeros((0, 3), np.float32), 4)
    assert out.shape == (4, 3) and not out.any()
    out = kernels.index_add(np.array([2]), np.ones((1, 3), np.float32), 4)
    assert out.tolist() == [[0, 0, 0], [0, 0, 0], [1, 1, 1], [0, 0, 0]]


@pytest.mark.parametrize("bad", [-1, 5, 99])
def test_an_index_out_of_range_is_reported_not_written(bad):
    values = np.ones((3, 2), np.float32)
    with pytest.raises(IndexError, match=f"index {bad} is out of range for 5 rows"):
        kernels.index_add(np.array([0, bad, 1]), values, 5)


def test_what_it_cannot_take_goes_to_the_reference(monkeypatch):
    gen = np.random.default_rng(2)
    indices = gen.integers(0, 6, 50)
    half = gen.standard_normal((50, 4)).astype(np.float16)          # no float16 arithmetic in Numba
    assert scatter.index_add_numba(indices, half, 6) is None
    assert np.array_equal(kernels.index_add(indices, half, 6), backend.index_add(indices, half, 6))
    monkeypatch.setitem(kernels._loaded, "numba-scatter", "ImportError: no numba here")
    values = gen.standard_normal((50, 4)).astype(np.float32)
    assert np.array_equal(kernels.index_add(indices, values, 6), backend.index_add(indices, values, 6))
    with pytest.raises(ValueError, match="index_add wants indices"):
        kernels.index_add(indices[:, None], values, 6)
