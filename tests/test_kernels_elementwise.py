"""The compiled elementwise passes (minivq.kernels.relu, relu_grad, add; elementwise_numba.py) against their
references ``np.maximum(x, 0)``, ``g * (y > 0)`` and ``a + b``, to the bit, on random shapes and layouts, with
zeros, signed zeros, infinities and NaNs among the values; whole and split into shares, on two real threads."""
import numpy as np
import pytest

from minivq import kernels

numba = pytest.importorskip("numba")
elementwise = pytest.importorskip("minivq.kernels.elementwise_numba")
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
    mine = elementwise.relu_grad_numba(g, y)
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
        assert elementwise.relu_grad_numba(a, b) is None
        assert same_bits(kernels.relu_grad(a, b), a * (b > 0))


def test_without_numba_the_reference_runs(monkeypatch):
    monkeypatch.setitem(kernels._loaded, "numba-elementwise", "ImportError: no numba here")
    g = np.array([[1.5, -2.0], [np.nan, 3.0]], np.float32)
    y = np.array([[0.0, 1.0], [2.0, np.nan]], np.float32)
    out = kernels.relu_grad(g, y)
    assert same_bits(out, np.array([[0.0, -2.0], [np.nan, 0.0]], np.float32))
    x = np.array([[-1.0, 0.0], [np.nan, 2.0]], np.float32)
    assert same_bits(kernels.relu(x), np.maximum(x, 0))
    assert same_bits(kernels.add(x, g), x + g)


def random_layout(gen, dtype, shape):
    """An array of ``awkward`` values, dense in a random order of its axes."""
    order = tuple(gen.permutation(len(shape)))
    return np.ascontiguousarray(awkward(gen, shape, dtype).transpose(order)).transpose(np.argsort(order))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shares", [2, 3, 5])
@pytest.mark.parametrize("seed", range(4))
def test_split_into_shares_the_passes_equal_the_references_to_the_bit(monkeypatch, dtype, shares, seed):
    """Forced to ``shares`` shares (on whatever threads Numba has), every number is written once, by the
    reference's arithmetic: sizes that are no multiple of the shares' alignment, layouts in any order."""
    monkeypatch.setattr(elementwise, "share_count", lambda size: shares)
    gen = np.random.default_rng(seed)
    shape = tuple(int(v) for v in gen.integers(1, 9, int(gen.integers(1, 5))))
    x = random_layout(gen, dtype, shape)
    g = np.empty_like(x)
    g[...] = awkward(gen, shape, dtype)                                # g in x's layout
    y = np.maximum(x, 0)
    for mine, reference in [(elementwise.relu_numba(x), np.maximum(x, 0)),
                            (elementwise.relu_grad_numba(g, y), g * (y > 0)),
                            (elementwise.add_numba(x, g), x + g)]:
        assert mine is not None
        assert same_bits(mine, reference)
        assert all(m == s for m, s, n in zip(mine.strides, x.strides, shape) if n > 1)     # made in x's layout


@pytest.mark.parametrize("size", [0, 1, 15, 16, 17, 1000, 2 ** 18 + 3])
@pytest.mark.parametrize("count", [1, 2, 3, 7])
def test_share_bounds_cover_the_pass_once_on_aligned_inner_bounds(size, count):
    bounds = elementwise._bounds(size, count)
    assert bounds[0] == 0 and bounds[-1] == size and len(bounds) == count + 1
    assert np.all(np.diff(bounds) >= 0)
    assert all(b % elementwise._ALIGN == 0 for b in bounds[1:-1])


def test_one_thread_leaves_add_to_numpy_and_runs_relu_and_its_gradient_whole(monkeypatch):
    """At one share ``add_numba`` declines (NumPy's ``+`` is one pass already); ReLU and its gradient still
    run compiled, whole (NumPy's ``maximum`` is the slower pass); the public functions give the references."""
    monkeypatch.setattr(elementwise, "share_count", lambda size: 1)
    whole = []
    real = elementwise._rectified
    monkeypatch.setattr(elementwise, "_rectified", lambda *args: (whole.append(args[0].size), real(*args))[1])
    gen = np.random.default_rng(3)
    x, g = awkward(gen, (4, 5, 6), np.float32), awkward(gen, (4, 5, 6), np.float32)
    assert elementwise.add_numba(x, g) is None
    y = np.maximum(x, 0)
    assert same_bits(elementwise.relu_numba(x), y) and whole == [x.size]
    assert same_bits(elementwise.relu_grad_numba(g, y), g * (y > 0))
    assert same_bits(kernels.relu(x), y) and same_bits(kernels.add(x, g), x + g)


def test_operands_it_cannot_take_go_to_the_reference(monkeypatch):
    monkeypatch.setattr(elementwise, "share_count", lambda size: 2)
    gen = np.random.default_rng(4)
    a = gen.standard_normal((4, 6, 5)).astype(np.float32)
    cases = [(a[:, ::2], a[:, ::2].copy()),                 # strided: not dense
             (a, np.asfortranarray(a)),                     # dense, but in another order than the first
             (a, a.astype(np.float64)),                     # mixed dtypes
             (a.astype(np.float16), a.astype(np.float16)),  # no float16 arithmetic in Numba
             (a, a[:1])]                                    # broadcasting
    for p, q in cases:
        assert elementwise.add_numba(p, q) is None
        assert same_bits(kernels.add(p, q), p + q)
    for p in (a[:, ::2], a.astype(np.float16)):
        assert elementwise.relu_numba(p) is None
        assert same_bits(kernels.relu(p), np.maximum(p, 0))


@pytest.fixture
def numba_threads_put_back():
    before = numba.get_num_threads()
    yield
    numba.set_num_threads(before)


def test_the_passes_split_over_two_real_threads_inside_conv_threads(monkeypatch, numba_threads_put_back):
    """Two Numba threads with BLAS held to one (``conv_threads``, as ``minivq train`` runs one process): a
    pass of ``SPLIT_MIN`` numbers or more runs in two shares (a spy on the parallel drivers), a smaller one
    whole; the results equal the references. Outside, with BLAS's own threads, nothing is split."""
    pytest.importorskip("threadpoolctl")
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("one core: Numba has one thread")
    import minivq as mv
    splits = []
    # each driver with the position of its share bounds among its arguments
    for name, at in (("_rectified_shares", 2), ("_masked_shares", 3), ("_summed_shares", 3),
                     ("_squared_error_shares", 3), ("_column_sums_shares", 1)):
        real = getattr(elementwise, name)
        monkeypatch.setattr(elementwise, name, lambda *args, real=real, name=name, at=at: (
            splits.append((name, args[at].size - 1)), real(*args))[1])
    gen = np.random.default_rng(5)
    big = (2, 64, 64, 33)                                   # 270,336 numbers, channels-last as the convs make them
    x = awkward(gen, big, np.float32).transpose(0, 3, 1, 2)
    g = awkward(gen, big, np.float32).transpose(0, 3, 1, 2)
    numba.set_num_threads(2)
    with kernels.conv_threads(np.float32):
        assert mv.backend.blas_thread_count() == 1
        y = kernels.relu(x)
        results = [(y, np.maximum(x, 0)), (kernels.relu_grad(g, y), g * (y > 0)), (kernels.add(x, g), x + g)]
        diff, mean = kernels.squared_error(x, g)
        finite = np.isfinite(diff)
        rows = np.where(finite, diff, 0).transpose(0, 2, 3, 1).reshape(-1, big[-1])     # channels-last rows
        sums = kernels.column_sums(rows)
        assert sorted(splits) == [("_column_sums_shares", 2), ("_masked_shares", 2), ("_rectified_shares", 2),
                                  ("_squared_error_shares", 2), ("_summed_shares", 2)]
        splits.clear()
        small = np.ascontiguousarray(x[:, :, :8])            # below SPLIT_MIN
        assert same_bits(kernels.relu(small), np.maximum(small, 0)) and splits == []
    for mine, reference in results:
        assert same_bits(mine, reference)
    assert same_bits(diff, x - g) and np.isnan(mean)          # awkward values: an inf - inf among them
    np.testing.assert_allclose(sums, rows.astype(np.float64).sum(axis=0), rtol=1e-4, atol=1e-3)
    with mv.backend.blas_threads(2):
        assert same_bits(elementwise.relu_numba(x), np.maximum(x, 0)) and splits == []      # compiled, whole


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shares", [2, 3])
@pytest.mark.parametrize("seed", range(4))
def test_the_split_sums_agree_with_their_references(monkeypatch, dtype, shares, seed):
    """The squared error (its difference to the bit, its mean to float tolerance, closer to the float64 sum
    than NumPy's float32 mean) and the column sums, forced into shares, on random shapes and layouts."""
    monkeypatch.setattr(elementwise, "share_count", lambda size: shares)
    gen = np.random.default_rng(seed)
    shape = tuple(int(v) for v in gen.integers(1, 9, int(gen.integers(1, 5))))
    a = random_layout(gen, dtype, shape)
    a[~np.isfinite(a)] = 1.5                                           # finite values: a mean to compare
    b = np.empty_like(a)
    b[...] = gen.standard_normal(shape)
    diff, mean = elementwise.squared_error_numba(a, b)
    assert same_bits(diff, a - b) and type(mean) is np.dtype(dtype).type
    exact = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean()
    tol = 1e-6 if dtype == np.float32 else 1e-13
    assert abs(mean - exact) <= tol * exact
    assert same_bits(kernels.squared_error(a, b)[0], a - b)
    rows = gen.standard_normal((int(gen.integers(1, 500)), int(gen.integers(1, 70)))).astype(dtype)
    sums = elementwise.column_sums_numba(rows)
    np.testing.assert_allclose(sums, rows.astype(np.float64).sum(axis=0), rtol=tol * 10, atol=tol * 100)
    assert sums.dtype == dtype and sums.shape == rows.shape[1:]


def test_sums_it_cannot_split_are_the_references(monkeypatch):
    """At one share, for operands it cannot take, and without Numba: exactly the reference expressions."""
    gen = np.random.default_rng(6)
    a, b = gen.standard_normal((2, 3, 40)).astype(np.float32), gen.standard_normal((2, 3, 40)).astype(np.float32)
    rows = gen.standard_normal((50, 7)).astype(np.float32)

    def reference_sums():
        diff = a - b
        assert same_bits(kernels.squared_error(a, b)[0], diff)
        assert kernels.squared_error(a, b)[1] == (diff * diff).mean()
        assert same_bits(kernels.column_sums(rows), np.ones(50, np.float32) @ rows)
    monkeypatch.setattr(elementwise, "share_count", lambda size: 1)
    assert elementwise.squared_error_numba(a, b) is None and elementwise.column_sums_numba(rows) is None
    reference_sums()
    monkeypatch.setattr(elementwise, "share_count", lambda size: 2)
    assert elementwise.squared_error_numba(a, np.asfortranarray(b)) is None          # another layout
    assert elementwise.column_sums_numba(np.asfortranarray(rows)) is None            # rows not C-contiguous
    assert elementwise.column_sums_numba(rows.astype(np.float16)) is None
    monkeypatch.setitem(kernels._loaded, "numba-elementwise", "ImportError: no numba here")
    reference_sums()


@pytest.mark.parametrize("seed", range(4))
def test_gradcheck_through_the_split_passes(monkeypatch, seed):
    """The ops that call these passes (ReLU, Add, the MSE loss, a conv's bias gradient), each forced into
    three shares, pass mv.gradcheck in float64 on random shapes; a spy shows every driver ran."""
    import minivq as mv
    from minivq import functional as F
    monkeypatch.setattr(elementwise, "share_count", lambda size: 3)
    ran = set()
    for name in ("_rectified_shares", "_masked_shares", "_summed_shares", "_squared_error_shares",
                 "_column_sums_shares"):
        real = getattr(elementwise, name)
        monkeypatch.setattr(elementwise, name, lambda *args, real=real, name=name: (ran.add(name), real(*args))[1])
    gen = np.random.default_rng(seed)
    shape = tuple(int(v) for v in gen.integers(2, 6, 4))

    def leaf(*dims):
        return mv.tensor(gen.standard_normal(dims), requires_grad=True)
    x, y = leaf(*shape), leaf(*shape)
    assert mv.gradcheck(lambda a, b: F.mse_loss(F.relu(a) + b, b * 0.5), [x, y])
    w, b = leaf(3, shape[1], 2, 2), leaf(3)
    assert mv.gradcheck(lambda a, w, b: F.conv2d(a, w, b, padding=1).sum(), [x, w, b])
    assert ran == {"_rectified_shares", "_masked_shares", "_summed_shares", "_squared_error_shares",
                   "_column_sums_shares"}, ran
