"""The one ``cupyx`` function minivq uses, for the fake cupy (see ../cupy/__init__.py)."""
import numpy as _np

import cupy as _cp

# the dtypes cupyx.scatter_add accepts: what CUDA's atomicAdd supports
_ATOMIC_ADD = tuple(_np.dtype(t) for t in (_np.int32, _np.uint32, _np.uint64, _np.float16, _np.float32,
                                           _np.float64))


def scatter_add(a, slices, value):
    """``a[slices] += value`` with repeated indices adding up, in place, on device arrays."""
    if not isinstance(a, _cp.ndarray):
        raise TypeError(f"scatter_add needs a cupy.ndarray, got {type(a)}")
    if a.dtype not in _ATOMIC_ADD:
        raise TypeError("scatter_add only supports int32, float16, float32, float64, uint32, uint64, "
                        "as data type")
    _cp._check_device((a, value) + (slices if isinstance(slices, tuple) else (slices,)))
    key = _cp._index(slices)
    if isinstance(value, _cp.ndarray):
        value = value._a
    elif isinstance(value, _np.ndarray):
        if _cp._is_basic(key) and value.ndim:
            raise _cp._unsupported(value)
        _cp._count_h2d(value)
    elif not _cp._is_scalar(value):
        raise _cp._unsupported(value)
    _np.add.at(a._a, key, value)
