"""Adam's update of one parameter as one compiled pass on the CPU (the reference: optim.Adam's array ops).

The array-op version makes about a dozen passes over each parameter and its two
moments, with temporaries; inside a training step, where backward has just
pushed the parameters out of cache, that is a dozen trips through memory. This
loop reads the parameter, its gradient and the two moments once and writes three
of them back: ~2 ms less a step of the default VQ-VAE (benchmarks/NOTES.md, round 5).

The arithmetic is the reference's, operation for operation and in the same order
(the same lines as adam.cu, the GPU's version), with the per-step scalars
computed in double precision and rounded to the parameter's dtype as NumPy does:

    g = grad + wd p                                 (only where wd != 0)
    m = m + (1 - b1) (g - m)
    v = v b2 + ((1 - b2) g) g
    p = p - step_size (m / (sqrt(v) / bias2_root + eps)),   step_size = lr / (1 - b1^t),
                                                              bias2_root = sqrt(1 - b2^t)

Numba contracts no multiply and add into one fused operation unless asked to
(``fastmath``), so every operation rounds as NumPy's does and the two agree to the bit.
"""
import numpy as np
from numba import njit

from . import adam_fits, adam_scalars


# error_model="numpy": a division by zero gives inf or NaN as in NumPy instead of raising, which also
# lets LLVM vectorise the loop (the check for ZeroDivisionError kept it scalar: 4x slower)
@njit(nogil=True, cache=True, error_model="numpy")
def _adam(param, grad, exp_avg, exp_avg_sq, one_minus_b1, b2, one_minus_b2, step_size, bias2_root, eps,
          weight_decay):
    for i in range(param.size):
        p = param[i]
        g = grad[i]
        if weight_decay != 0:
            g = g + weight_decay * p
        m = exp_avg[i] + one_minus_b1 * (g - exp_avg[i])
        v = exp_avg_sq[i] * b2 + (one_minus_b2 * g) * g
        exp_avg[i] = m
        exp_avg_sq[i] = v
        param[i] = p - step_size * (m / (np.sqrt(v) / bias2_root + eps))


def adam_numba(param, grad, exp_avg, exp_avg_sq, lr, betas, eps, weight_decay, step):
    """Update ``param``, ``exp_avg`` and ``exp_avg_sq`` in place for Adam's step ``step`` (1-based); returns
    whether it ran: float32/float64 NumPy arrays of one shape and dtype, the three updated ones
    C-contiguous (``grad`` is copied to that layout if it is not in it)."""
    if not adam_fits(param, grad, exp_avg, exp_avg_sq):
        return False
    dtype = param.dtype.type
    scalars = adam_scalars(lr, betas, eps, weight_decay, step)
    _adam(param.reshape(-1), np.ascontiguousarray(grad).reshape(-1), exp_avg.reshape(-1), exp_avg_sq.reshape(-1),
          *(dtype(s) for s in scalars))
    return True
