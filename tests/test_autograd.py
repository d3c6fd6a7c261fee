"""The autograd core: graph building, backward order, accumulation, hooks, grad mode."""
import gc
import weakref

import numpy as np
import pytest

import minivq as mv
from minivq import functional as F


def test_shared_subexpression_accumulates():
    x = mv.tensor(np.array([1.5, -2.0]), requires_grad=True)
    y = x * x            # used twice below
    z = (y + y * 3.0).sum()
    z.backward()
    np.testing.assert_allclose(x.grad, 8 * x.data)   # d(4x^2)/dx


def test_grads_accumulate_across_backward_calls_until_zeroed():
    x = mv.tensor(np.ones(3), requires_grad=True)
    (x * 2.0).sum().backward()
    (x * 3.0).sum().backward()
    np.testing.assert_allclose(x.grad, np.full(3, 5.0))
    x.zero_grad()
    assert x.grad is None


def test_diamond_graph_order():
    # a -> b, a -> c, (b, c) -> d: a's gradient must be complete before a's creator runs
    w = mv.tensor(np.array(2.0), requires_grad=True)
    a = w * 3.0
    b = a.exp()
    c = a * a
    d = b + c
    d.backward()
    expected = 3.0 * (np.exp(6.0) + 2 * 6.0)
    np.testing.assert_allclose(w.grad, expected)


def test_long_chain_has_no_recursion_limit():
    x = mv.tensor(np.array(1.0), requires_grad=True)
    y = x
    for _ in range(100_000):
        y = y + 1e-6
    y.backward()
    assert x.grad == pytest.approx(1.0)


def test_broadcasting_is_undone():
    a = mv.tensor(np.ones((3, 1, 4)), requires_grad=True)
    b = mv.tensor(np.ones((5, 1)), requires_grad=True)
    (a * b).sum().backward()
    assert a.grad.shape == (3, 1, 4) and b.grad.shape == (5, 1)
    np.testing.assert_allclose(a.grad, np.full((3, 1, 4), 5.0))
    np.testing.assert_allclose(b.grad, np.full((5, 1), 12.0))


def test_no_grad_builds_no_graph():
    x = mv.tensor(np.ones(2), requires_grad=True)
    with mv.no_grad():
        y = x * 2.0
    assert not y.requires_grad and y.creator is None
    assert mv.is_grad_enabled()


def test_detach_cuts_the_graph():
    x = mv.tensor(np.array([3.0]), requires_grad=True)
    y = (x * x).detach() * x
    y.sum().backward()
    np.testing.assert_allclose(x.grad, [9.0])


def test_hooks_see_and_replace_gradients():
    x = mv.tensor(np.array([1.0, 2.0]), requires_grad=True)
    y = x * 3.0
    seen = []
    y.register_hook(lambda g: seen.append(g.copy()))
    handle = x.register_hook(lambda g: g * 10)
    y.sum().backward()
    np.testing.assert_allclose(seen[0], [1.0, 1.0])
    np.testing.assert_allclose(x.grad, [30.0, 30.0])
    handle.remove()
    x.zero_grad()
    y = x * 3.0
    y.sum().backward()
    np.testing.assert_allclose(x.grad, [3.0, 3.0])


def test_retain_grad_keeps_intermediate_gradient():
    x = mv.tensor(np.array([1.0, 2.0]), requires_grad=True)
    y = (x * 2.0).retain_grad()
    (y * y).sum().backward()
    np.testing.assert_allclose(y.grad, 2 * y.data)
    z = x * 2.0
    (z * z).sum().backward()
    assert z.grad is None   # not retained


def test_graph_is_freed_with_its_last_tensor():
    x = mv.tensor(np.ones(3), requires_grad=True)
    y = (x * 2.0).exp()
    fn = weakref.ref(y.creator)
    del y
    gc.collect()
    assert fn() is None


def test_backward_needs_scalar_or_gradient():
    x = mv.tensor(np.ones(3), requires_grad=True)
    with pytest.raises(ValueError, match="one-element"):
        (x * 2.0).backward()
    with pytest.raises(ValueError, match="shape"):
        (x * 2.0).backward(np.ones(4))
    with pytest.raises(RuntimeError, match="does not require grad"):
        mv.tensor(np.ones(1)).backward()


def test_integer_tensor_cannot_require_grad():
    with pytest.raises(TypeError, match="floating"):
        mv.tensor(np.arange(3), requires_grad=True)


def test_dtype_is_kept_and_scalars_follow_it():
    x = mv.tensor(np.ones(3, np.float32), requires_grad=True)
    y = (x * 2.0 + 1) / 3.0 - 0.5
    assert y.dtype == np.float32
    y.sum().backward()
    assert x.grad.dtype == np.float32


def test_stop_gradient_and_straight_through_are_named_nodes():
    z_e = mv.tensor(np.array([1.0, 2.0]), requires_grad=True)
    z_q = mv.tensor(np.array([0.5, 0.5]), requires_grad=True)
    out = F.straight_through(z_e, z_q)
    assert out.creator.name == "StraightThrough"
    np.testing.assert_array_equal(out.data, z_q.data)
    (out * np.array([2.0, 3.0])).sum().backward()
    np.testing.assert_array_equal(z_e.grad, [2.0, 3.0])
    assert z_q.grad is None
    s = F.stop_gradient(z_e)
    assert s.creator.name == "StopGradient" and s.requires_grad
    z_e.zero_grad()
    (s * 5.0).sum().backward()
    assert z_e.grad is None


def test_repr_and_item():
    x = mv.tensor(np.array([1.0]), requires_grad=True)
    assert "requires_grad=True" in repr(x)
    assert "grad_fn=Mul" in repr(x * 2.0)
    assert (x * 2.0).item() == 2.0
