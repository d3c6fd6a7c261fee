"""Gradient checking by central differences, in float64.

For an output y = fn(*inputs), a fixed random cotangent v turns the check into
one of a scalar, s = sum(v * y): backward gives ds/dx for every input at once,
and each element is compared with (s(x + eps e_i) - s(x - eps e_i)) / (2 eps).

With ``directions=k`` the check is instead made along k random directions d
(one VJP . d against one finite difference each), as HIPS autograd and JAX do:
cheap enough for large inputs, where element-by-element checking is not.
"""
import numpy as np

from . import backend
from .autograd import Tensor, no_grad


class GradcheckError(AssertionError):
    """An analytic gradient disagrees with the finite-difference one."""


def _scalar(fn, inputs, v):
    with no_grad():
        out = fn(*inputs)
    return float(backend.to_numpy((out.data * v).sum()))


def gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4, directions=None, seed=0):
    """Check the gradients of ``fn(*inputs)`` for every input that requires grad.

    ``inputs``: a sequence of Tensors (those with ``requires_grad=True`` must be
    float64) and other arguments passed through unchanged. Returns True, or
    raises ``GradcheckError`` naming the input, the worst element, and the
    analytic and numeric values there.
    """
    inputs = list(inputs)
    checked = [i for i, x in enumerate(inputs) if isinstance(x, Tensor) and x.requires_grad]
    if not checked:
        raise ValueError("gradcheck needs at least one input Tensor with requires_grad=True")
    for i in checked:
        if inputs[i].dtype != np.float64:
            raise TypeError(f"gradcheck needs float64 inputs (finite differences in float32 are noise); "
                            f"input {i} is {inputs[i].dtype}")
    gen = np.random.default_rng(seed)
    out = fn(*inputs)
    if not isinstance(out, Tensor) or not out.requires_grad:
        raise ValueError("gradcheck: fn must return a Tensor that depends on the inputs being checked")
    xp = backend.get_array_module(out.data)
    v = xp.asarray(gen.standard_normal(out.shape))

    saved = [inputs[i].grad for i in checked]
    for i in checked:
        inputs[i].grad = None
    try:
        out.backward(v)
        analytic = {i: backend.to_numpy(inputs[i].grad) if inputs[i].grad is not None
                    else np.zeros(inputs[i].shape) for i in checked}
    finally:
        for i, g in zip(checked, saved):
            inputs[i].grad = g

    if directions is None:
        _check_elementwise(fn, inputs, checked, v, analytic, eps, atol, rtol)
    else:
        _check_directions(fn, inputs, checked, v, analytic, eps, atol, rtol, int(directions), gen)
    return True


def _check_elementwise(fn, inputs, checked, v, analytic, eps, atol, rtol):
    for i in checked:
        x = inputs[i]
        original = x.data
        work = original.copy()             # contiguous, so the flat view below writes into it
        flat, base = work.reshape(-1), backend.to_numpy(original).reshape(-1)
        numeric = np.empty(x.shape)
        x.data = work
        try:
            for j in range(flat.size):
                flat[j] = base[j] + eps
                plus = _scalar(fn, inputs, v)
                flat[j] = base[j] - eps
                minus = _scalar(fn, inputs, v)
                flat[j] = base[j]
                numeric.reshape(-1)[j] = (plus - minus) / (2 * eps)
        finally:
            x.data = original
        excess = np.abs(analytic[i] - numeric) - (atol + rtol * np.abs(numeric))
        if excess.size and excess.max() > 0:
            worst = np.unravel_index(int(np.argmax(excess)), x.shape)
            raise GradcheckError(
                f"gradcheck failed for input {i} (shape {x.shape}) at index {tuple(int(k) for k in worst)}: "
                f"analytic {analytic[i][worst]:.10g}, numeric {numeric[worst]:.10g} "
                f"(atol={atol}, rtol={rtol}; {int((excess > 0).sum())} of {excess.size} elements off)")


def _check_directions(fn, inputs, checked, v, analytic, eps, atol, rtol, count, gen):
    for k in range(count):
        dirs = {i: gen.standard_normal(inputs[i].shape) for i in checked}
        originals = {i: inputs[i].data for i in checked}
        xp = backend.get_array_module(originals[checked[0]])
        try:
            for i in checked:
                inputs[i].data = originals[i] + eps * xp.asarray(dirs[i])
            plus = _scalar(fn, inputs, v)
            for i in checked:
                inputs[i].data = originals[i] - eps * xp.asarray(dirs[i])
            minus = _scalar(fn, inputs, v)
        finally:
            for i in checked:
                inputs[i].data = originals[i]
        numeric = (plus - minus) / (2 * eps)
        vjp = float(sum((analytic[i] * dirs[i]).sum() for i in checked))
        if abs(vjp - numeric) > atol + rtol * abs(numeric):
            raise GradcheckError(
                f"gradcheck failed along random direction {k} over inputs {checked}: "
                f"analytic (VJP . d) {vjp:.10g}, numeric {numeric:.10g} (atol={atol}, rtol={rtol})")
