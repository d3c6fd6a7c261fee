"""The CUDA sources of minivq.kernels, compiled by CuPy (NVRTC) once per device and source.

CuPy is imported inside the functions only: importing this module needs NumPy alone.
"""
import os

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
SUFFIX = {np.dtype(np.float32): "f32", np.dtype(np.float64): "f64"}
THREADS = 256

_modules = {}          # (device id, source, options) -> compiled cupy.RawModule


def module(source, options=()):
    """The RawModule of ``kernels/<source>`` on the current device (compiled on first use)."""
    import cupy as cp
    key = (cp.cuda.Device().id, source, tuple(options))
    if key not in _modules:
        with open(os.path.join(HERE, source)) as f:
            _modules[key] = cp.RawModule(code=f.read(), options=("--std=c++17",) + tuple(options))
    return _modules[key]


def blocks(n):
    """Blocks of THREADS for ``n`` elements of a grid-strided loop: enough to fill a GPU, at most 2**16."""
    return (max(1, min(-(-n // THREADS), 65536)),)
