"""Every basic op through mv.gradcheck (float64 central differences) on random shapes."""
import re

import numpy as np
import pytest

import minivq as mv
from minivq import functional as F
from minivq.autograd import Function
from minivq.functional.basic import GetItem


def T(a):
    return mv.tensor(np.asarray(a, dtype=np.float64), requires_grad=True)


def rand_shape(rng, ndim, low=1, high=4):
    return tuple(int(n) for n in rng.integers(low, high + 1, size=ndim))


def broadcast_pair(rng):
    """Two shapes that broadcast together, with size-1 axes and a missing leading axis."""
    ndim = int(rng.integers(1, 4))
    full = rand_shape(rng, ndim)
    a = tuple(1 if rng.random() < 0.3 else n for n in full)
    b = tuple(1 if rng.random() < 0.3 else n for n in full)
    if rng.random() < 0.5:
        b = b[int(rng.integers(0, ndim)):]
    return a, b


@pytest.mark.parametrize("op", ["add", "sub", "mul", "div", "pow"])
@pytest.mark.parametrize("seed", range(6))
def test_binary_ops_with_broadcasting(op, seed):
    rng = np.random.default_rng(seed)
    sa, sb = broadcast_pair(rng)
    a = T(rng.uniform(0.5, 2.0, sa))
    b = T(rng.uniform(0.5, 2.0, sb))
    fn = {"add": lambda x, y: x + y, "sub": lambda x, y: x - y, "mul": lambda x, y: x * y,
          "div": lambda x, y: x / y, "pow": lambda x, y: x ** y}[op]
    assert mv.gradcheck(fn, [a, b])


def test_scalar_operands_and_reflected_ops():
    rng = np.random.default_rng(0)
    x = T(rng.uniform(0.5, 2.0, (3, 2)))
    assert mv.gradcheck(lambda x: 2.0 - x + 3.0 * x / 4.0 - 1.0 / x + x ** 3 + 2.0 ** x - (-x), [x])


@pytest.mark.parametrize("name", ["exp", "log", "relu", "sigmoid", "tanh"])
@pytest.mark.parametrize("seed", range(3))
def test_unary_ops(name, seed):
    rng = np.random.default_rng(seed)
    shape = rand_shape(rng, int(rng.integers(0, 4)))
    data = rng.uniform(0.2, 2.0, shape) if name == "log" else rng.standard_normal(shape)
    if name == "relu":   # keep clear of the kink at 0, where the derivative is undefined
        data = np.where(np.abs(data) < 0.05, 0.5, data)
    assert mv.gradcheck(getattr(F, name), [T(data)])


@pytest.mark.parametrize("shapes", [((3, 4), (4, 5)), ((4,), (4, 2)), ((3, 4), (4,)), ((5,), (5,)),
                                    ((2, 3, 4), (4, 2)), ((2, 1, 3, 4), (5, 4, 2)), ((3,), (2, 3, 4))])
def test_matmul(shapes):
    rng = np.random.default_rng(1)
    a, b = T(rng.standard_normal(shapes[0])), T(rng.standard_normal(shapes[1]))
    assert mv.gradcheck(lambda x, y: x @ y, [a, b])


@pytest.mark.parametrize("seed", range(8))
def test_reductions_over_random_axes(seed):
    rng = np.random.default_rng(seed)
    ndim = int(rng.integers(1, 4))
    x = T(rng.standard_normal(rand_shape(rng, ndim)))
    axes = [None, int(rng.integers(-ndim, ndim)), tuple(sorted(set(rng.integers(0, ndim, 2).tolist())))]
    for axis in axes:
        for keepdims in (False, True):
            assert mv.gradcheck(lambda t: F.sum(t, axis=axis, keepdims=keepdims), [x])
            assert mv.gradcheck(lambda t: F.mean(t, axis=axis, keepdims=keepdims), [x])


def test_shape_ops():
    rng = np.random.default_rng(2)
    x = T(rng.standard_normal((2, 3, 4)))
    assert mv.gradcheck(lambda t: t.reshape(4, 6) * np.arange(24.0).reshape(4, 6), [x])
    assert mv.gradcheck(lambda t: t.reshape((-1,)), [x])
    assert mv.gradcheck(lambda t: t.transpose(2, 0, 1), [x])
    assert mv.gradcheck(lambda t: t.T, [x])
    assert mv.gradcheck(lambda t: F.transpose(t, (1, 2, 0)), [x])


@pytest.mark.parametrize("key", [
    (slice(None), 1), (Ellipsis, slice(1, None, 2)), 0, (1, slice(None, None, -1)), (None, 0, 2),
    (np.array([0, 1, 1, 0]),), (slice(None), np.array([2, 2, 0])), (np.array([1, 0, 1]), np.array([0, 2, 2])),
    np.array([True, False]),
])
@pytest.mark.parametrize("last_axis_first", [False, True], ids=["C order", "last axis outermost in memory"])
def test_indexing_and_slicing(key, last_axis_first):
    rng = np.random.default_rng(3)
    data = rng.standard_normal((2, 3, 4))
    if last_axis_first:         # laid out (4, 2, 3) in memory, as channels-last activations are
        data = np.ascontiguousarray(data.transpose(2, 0, 1)).transpose(1, 2, 0)
    x = T(data)
    assert mv.gradcheck(lambda t: t[key], [x])
    op = GetItem(key)
    y = op(x)
    assert op.backward(np.ones(y.shape)).strides == x.data.strides     # the gradient is made in x's layout


def test_indexing_repeated_indices_accumulate():
    x = T(np.zeros(3))
    x[np.array([1, 1, 1, 2])].sum().backward()
    np.testing.assert_array_equal(x.grad, [0.0, 3.0, 1.0])


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_concatenate(axis):
    rng = np.random.default_rng(4)
    base = [2, 3, 2]
    tensors = []
    for n in (1, 3, 2):
        shape = list(base)
        shape[axis] = n
        tensors.append(T(rng.standard_normal(shape)))
    assert mv.gradcheck(lambda *ts: F.concatenate(ts, axis=axis), tensors)


@pytest.mark.parametrize("pad", [(1, 2), (0, 1, 2, 0), (1, 1, 1, 1, 1, 0)])
def test_pad(pad):
    rng = np.random.default_rng(5)
    x = T(rng.standard_normal((2, 3, 2)))
    assert mv.gradcheck(lambda t: F.pad(t, pad, value=0.7), [x])
    out = F.pad(x, pad, value=0.7)
    assert out.shape == tuple(n + (pad[2 * (2 - i)] + pad[2 * (2 - i) + 1] if 2 * (2 - i) < len(pad) else 0)
                              for i, n in enumerate(x.shape))


@pytest.mark.parametrize("seed", range(4))
def test_embedding_gather_and_scatter_add(seed):
    rng = np.random.default_rng(seed)
    k, d = int(rng.integers(1, 6)), int(rng.integers(1, 4))
    idx = rng.integers(0, k, size=rand_shape(rng, int(rng.integers(1, 4))))
    w = T(rng.standard_normal((k, d)))
    assert mv.gradcheck(lambda weight: F.embedding(idx, weight), [w])
    out = F.embedding(idx, w)
    np.testing.assert_array_equal(out.data, w.data[idx])


def test_embedding_gradient_formula():
    w = T(np.zeros((4, 2)))
    idx = np.array([[3, 1], [3, 3]])
    F.embedding(idx, w).sum().backward()
    np.testing.assert_array_equal(w.grad, [[0, 0], [1, 1], [0, 0], [3, 3]])


@pytest.mark.parametrize("shape,axis", [((3, 5), 1), ((2, 4, 3), 1), ((2, 3, 2, 2), -1), ((4,), 0)])
def test_log_softmax(shape, axis):
    rng = np.random.default_rng(6)
    x = T(rng.standard_normal(shape) * 3)
    assert mv.gradcheck(lambda t: F.log_softmax(t, axis=axis), [x])
    out = F.log_softmax(x, axis=axis).data
    np.testing.assert_allclose(np.exp(out).sum(axis=axis), 1.0)


@pytest.mark.parametrize("shape", [(4, 3), (2, 5, 3), (2, 4, 3, 2), (1, 2, 1, 1, 3)])
def test_cross_entropy_with_trailing_axes(shape):
    rng = np.random.default_rng(7)
    logits = T(rng.standard_normal(shape) * 2)
    target = rng.integers(0, shape[1], size=shape[:1] + shape[2:])
    assert mv.gradcheck(lambda t: F.cross_entropy(t, target), [logits])
    # the value against the formula: mean over positions of logsumexp - logit[target]
    x = np.moveaxis(logits.data, 1, -1).reshape(-1, shape[1])
    t = target.reshape(-1)
    lse = np.log(np.exp(x).sum(1))
    expected = (lse - x[np.arange(len(t)), t]).mean()
    np.testing.assert_allclose(F.cross_entropy(logits, target).item(), expected, rtol=1e-12)


def test_cross_entropy_against_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(8)
    logits = rng.standard_normal((3, 6, 2, 5))
    target = rng.integers(0, 6, (3, 2, 5))
    ours = mv.tensor(logits, requires_grad=True)
    loss = F.cross_entropy(ours, mv.tensor(target))
    loss.backward()
    theirs = torch.tensor(logits, requires_grad=True)
    ref = torch.nn.functional.cross_entropy(theirs, torch.tensor(target))
    ref.backward()
    np.testing.assert_allclose(loss.item(), ref.item(), rtol=1e-12)
    np.testing.assert_allclose(ours.grad, theirs.grad.numpy(), rtol=1e-10, atol=1e-14)


def test_cross_entropy_rejects_bad_targets():
    logits = T(np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        F.cross_entropy(logits, np.array([0, 3]))
    with pytest.raises(ValueError, match="shape"):
        F.cross_entropy(logits, np.array([0, 1, 2]))
    with pytest.raises(TypeError, match="integer"):
        F.cross_entropy(logits, np.array([0.0, 1.0]))


def test_mse_loss():
    rng = np.random.default_rng(9)
    a, b = T(rng.standard_normal((2, 3, 2))), T(rng.standard_normal((2, 3, 2)))
    assert mv.gradcheck(F.mse_loss, [a, b])
    np.testing.assert_allclose(F.mse_loss(a, b).item(), ((a.data - b.data) ** 2).mean())
    with pytest.raises(ValueError, match="equal shapes"):
        F.mse_loss(a, T(np.zeros((2, 3))))


def test_named_quantizer_nodes_gradients():
    rng = np.random.default_rng(10)
    z_e, z_q = T(rng.standard_normal((2, 3))), T(rng.standard_normal((2, 3)))
    # straight_through: forward z_q; the gradient reaching z_e is the upstream one, unchanged
    # (finite differences cannot see it: the forward value does not depend on z_e)
    v = rng.standard_normal((2, 3))
    out = F.straight_through(z_e, z_q)
    np.testing.assert_array_equal(out.data, z_q.data)
    out.backward(v)
    np.testing.assert_array_equal(z_e.grad, v)
    assert z_q.grad is None
    # stop_gradient: x * sg[x] has gradient sg[x] only
    x = T(rng.standard_normal(4))
    (x * F.stop_gradient(x)).sum().backward()
    np.testing.assert_allclose(x.grad, x.data)


def test_gradcheck_catches_a_wrong_backward():
    class WrongSquare(Function):
        def forward(self, x):
            self.x = x
            return x * x

        def backward(self, g):
            return g * self.x      # should be 2 x g

    x = T(np.array([[1.0, 2.0], [3.0, -1.0]]))
    with pytest.raises(mv.GradcheckError, match=r"input 0 \(shape \(2, 2\)\) at index") as info:
        mv.gradcheck(lambda t: WrongSquare()(t), [x])
    analytic, numeric = map(float, re.search(r"analytic (\S+), numeric (\S+)", str(info.value)).groups())
    assert numeric == pytest.approx(2 * analytic, rel=1e-6)
    with pytest.raises(mv.GradcheckError, match="direction"):
        mv.gradcheck(lambda t: WrongSquare()(t), [x], directions=3)


def test_gradcheck_wants_float64():
    with pytest.raises(TypeError, match="float64"):
        mv.gradcheck(F.exp, [mv.tensor(np.ones(2, np.float32), requires_grad=True)])


def test_gradcheck_directions_on_a_large_input():
    rng = np.random.default_rng(11)
    x = T(rng.standard_normal((64, 50)))
    w = T(rng.standard_normal((50, 30)))
    assert mv.gradcheck(lambda a, b: F.log_softmax((a @ b).tanh(), axis=1), [x, w], directions=5)
