"""Adam's update as one CUDA launch per parameter (adam.cu), for minivq.optim.Adam on CuPy arrays.

The array-op version in optim.Adam._update is a dozen elementwise launches per parameter; on a GPU
each costs the host more time than the GPU spends on it (a training step of the default VQ-VAE is
bound by launches, not arithmetic). This one is one launch, and the same arithmetic to the bit
(adam.cu says how).
"""
import numpy as np

from . import adam_scalars
from .cuda_modules import SUFFIX, THREADS, blocks, module

SOURCE = "adam.cu"
OPTIONS = ("--fmad=false",)       # every operation rounded on its own, as NumPy's are


def compile():
    """Compile adam.cu for the current device now (an error here means the fused step is unusable)."""
    module(SOURCE, OPTIONS)


def adam_cupy(param, grad, exp_avg, exp_avg_sq, lr, betas, eps, weight_decay, step):
    """Update ``param``, ``exp_avg`` and ``exp_avg_sq`` in place (contiguous CuPy arrays of one float
    dtype; ``grad`` is made contiguous if it is not) for Adam's step number ``step`` (1-based)."""
    import cupy as cp
    dtype = np.dtype(param.dtype).type
    with param.device:
        grad = cp.ascontiguousarray(grad)
        scalars = adam_scalars(lr, betas, eps, weight_decay, step)
        module(SOURCE, OPTIONS).get_function("adam_" + SUFFIX[np.dtype(dtype)])(
            blocks(param.size), (THREADS,),
            (param, grad, exp_avg, exp_avg_sq, np.int64(param.size), *(dtype(s) for s in scalars)))
