"""A fake ``cupy`` for machines without a GPU: NumPy underneath, CuPy's strictness on top.

For the tests only. tests/test_fake_cupy.py puts ``tests/fakecupy`` on the
path of a subprocess, or of one test through a fixture that restores
``sys.modules`` afterwards; the installed package never sees this folder.
``cupy.__fake__`` is True, so a test can tell it from the real thing.

What it checks
--------------
A device array is a ``cupy.ndarray``: its type lives in module ``cupy`` (so
``minivq.backend`` takes it for a GPU array) and it wraps a NumPy array that
stands for device memory. It is deliberately *not* a subclass of
``numpy.ndarray``: NumPy converts a subclass to a plain ndarray without asking
it (``numpy.asarray`` calls no hook on a subclass), so a subclass could not
refuse the implicit copies that real CuPy refuses. As in CuPy:

* no implicit device -> host conversion: ``numpy.asarray(a)``, ``numpy.array(a)``,
  ``__array__``, the buffer protocol, ``__array_interface__`` and ``.data`` fail
  (TypeError / AttributeError). Only explicit ways cross back: ``a.get()``,
  ``cupy.asnumpy(a)``, and Python scalars (``float(a)``, ``int(a)``, ``bool(a)``,
  ``a.item()``, ``a.tolist()``, formatting), each counted in ``stats["d2h"]``
  (a synchronisation on a real GPU);
* no host arrays in device arithmetic: operators, ufuncs and cupy functions
  refuse a ``numpy.ndarray`` operand (0-d included) with "Unsupported type",
  as CuPy's kernels do; Python and NumPy scalars are fine;
* NumPy functions applied to device arrays dispatch here (NEP 18, as CuPy
  does: ``numpy.concatenate([a, b])`` gives a device array), but refuse a
  NumPy ndarray mixed in;
* ``a[basic index] = host_array`` with a non-scalar host array raises
  ValueError ("non-scalar numpy.ndarray cannot be used for fill"), as CuPy's
  ``__setitem__`` does; with an advanced index, host values and host index
  arrays are copied over, as CuPy does (counted in ``stats["h2d"]``);
* reductions and integer indexing give 0-d device arrays, never NumPy scalars;
* ``cupy.add.at`` (and ``cupyx.scatter_add``, the same call) refuses the dtypes CUDA's atomicAdd
  lacks (int64 ...);
* ``cupy.asarray(host)`` copies (``stats["h2d"]``, ``stats["h2d_bytes"]``), and
  ``cupy.asarray(device_array)`` copies it to the current device if it lives on another;
* ``cupy.cuda.runtime.getDeviceCount()`` reports ``$FAKECUPY_DEVICES`` (default 1)
  devices; ``cupy.cuda.Device(i)`` for a larger i raises as CUDA does;
* arithmetic runs on the current device (``cupy.cuda.Device(i).use()`` or ``with``):
  an array of another device in it raises ValueError, as CuPy does between GPUs
  without peer access (with peer access CuPy reads over the bus, slowly).

What it cannot check
--------------------
Kernels (``RawModule``, ``RawKernel``, ``ElementwiseKernel`` raise
NotImplementedError), streams and asynchrony, real memory limits, copies
between two GPUs, speed, and the numerics of cuBLAS and CUDA's math library:
the arithmetic is NumPy's, so results are bitwise those of the CPU run.
"""
import numbers
import os
import sys
import types

import numpy as _np

__fake__ = True
__version__ = "0.0.0+fake"

stats = {"h2d": 0, "h2d_bytes": 0, "d2h": 0}


def reset_stats():
    for key in stats:
        stats[key] = 0


def _count_d2h():
    stats["d2h"] += 1


def _count_h2d(a):
    stats["h2d"] += 1
    stats["h2d_bytes"] += int(_np.asarray(a).nbytes)


# ---------------------------------------------------------------- devices
class CUDARuntimeError(RuntimeError):
    pass


_current = [0]          # the current device id


def _device_count():
    return int(os.environ.get("FAKECUPY_DEVICES", "1"))


class Device:
    """``cupy.cuda.Device``: an id, a context manager that makes it current."""

    def __init__(self, device=None):
        self.id = _current[0] if device is None else int(device)
        self._previous = []

    def _check(self):
        if not 0 <= self.id < _device_count():
            raise CUDARuntimeError("cudaErrorInvalidDevice: invalid device ordinal")

    def __enter__(self):
        self._check()
        self._previous.append(_current[0])
        _current[0] = self.id
        return self

    def __exit__(self, *exc):
        _current[0] = self._previous.pop()

    def use(self):
        self._check()
        _current[0] = self.id

    def synchronize(self):
        pass

    @property
    def attributes(self):
        return {"MultiProcessorCount": 132}

    def __eq__(self, other):
        return isinstance(other, Device) and other.id == self.id

    def __hash__(self):
        return hash(self.id)

    def __repr__(self):
        return f"<CUDA Device {self.id}>"


class Stream:
    """A stream that does nothing: the fake runs everything at once."""

    null = None

    def __init__(self, non_blocking=False):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def synchronize(self):
        pass

    def use(self):
        return self


Stream.null = Stream()


def _runtime_get_device_count():
    return _device_count()


# ---------------------------------------------------------------- operand checks
def _unsupported(x):
    return TypeError(f"Unsupported type {type(x)}")


def _is_scalar(x):
    return isinstance(x, (numbers.Number, _np.generic)) and not isinstance(x, _np.ndarray)


def _unwrap(x):
    """Device arrays -> their NumPy stand-in; a host ndarray anywhere is refused, as CuPy does."""
    if isinstance(x, ndarray):
        return x._a
    if isinstance(x, _np.ndarray):
        raise _unsupported(x)
    if isinstance(x, (list, tuple)):
        return type(x)(_unwrap(v) for v in x)
    if isinstance(x, dict):
        return {k: _unwrap(v) for k, v in x.items()}
    return x


def _wrap(a, device=None):
    out = ndarray.__new__(ndarray)
    out._a = a
    out._device = _current[0] if device is None else device
    return out


def _wrap_result(r, device=None):
    """NumPy results -> device arrays (NumPy scalars become 0-d arrays, as CuPy returns)."""
    if isinstance(r, _np.ndarray):
        return _wrap(r, device)
    if isinstance(r, _np.generic):
        return _wrap(_np.asarray(r), device)
    if isinstance(r, tuple):
        return tuple(_wrap_result(v, device) for v in r)
    if isinstance(r, list):
        return [_wrap_result(v, device) for v in r]
    return r


def _index(key):
    """An index for a device array: device arrays unwrapped; host index arrays and lists copied over."""
    parts = key if isinstance(key, tuple) else (key,)
    out = []
    for p in parts:
        if isinstance(p, ndarray):
            out.append(p._a)
        elif isinstance(p, (_np.ndarray, list)):
            _count_h2d(p)
            out.append(_np.array(p))
        else:
            out.append(p)
    return tuple(out) if isinstance(key, tuple) else out[0]


def _is_basic(key):
    parts = key if isinstance(key, tuple) else (key,)
    return all(p is None or p is Ellipsis or isinstance(p, slice)
               or (isinstance(p, (int, _np.integer)) and not isinstance(p, (bool, _np.bool_)))
               for p in parts)


def _check_device(arrays):
    for x in arrays:
        if isinstance(x, ndarray) and x._device != _current[0]:
            raise ValueError(f"The device where the array resides ({x._device}) is different from the current "
                             f"device ({_current[0]}). Peer access is unavailable between these devices.")
        if isinstance(x, (list, tuple)):
            _check_device(x)


def _apply_ufunc(ufunc, method, inputs, kwargs):
    out = kwargs.get("out")
    out = None if out is None else out if isinstance(out, tuple) else (out,)
    _check_device(tuple(inputs) + (out or ()))
    args = []
    for x in inputs:
        if isinstance(x, ndarray):
            args.append(x._a)
        elif _is_scalar(x):
            args.append(x)
        else:
            raise _unsupported(x)
    if out is not None:
        for o in out:
            if not isinstance(o, ndarray):
                raise _unsupported(o)
        kwargs = dict(kwargs, out=tuple(o._a for o in out))
    if "where" in kwargs:
        kwargs["where"] = _unwrap(kwargs["where"])
    result = getattr(ufunc, method)(*args, **kwargs)
    if out is not None:
        return out[0] if len(out) == 1 else out
    return _wrap_result(result)


def _defers_to(other):
    """True when ``other`` is no array or scalar CuPy knows: let Python try its reflected operator."""
    return not isinstance(other, (ndarray, _np.ndarray)) and not _is_scalar(other)


def _binary(name, ufunc):
    def op(self, other):
        if _defers_to(other):
            return NotImplemented
        return _apply_ufunc(ufunc, "__call__", (self, other), {})

    def rop(self, other):
        if _defers_to(other):
            return NotImplemented
        return _apply_ufunc(ufunc, "__call__", (other, self), {})

    def iop(self, other):
        if _defers_to(other):
            return NotImplemented
        return _apply_ufunc(ufunc, "__call__", (self, other), {"out": (self,)})

    op.__name__, rop.__name__, iop.__name__ = f"__{name}__", f"__r{name}__", f"__i{name}__"
    return op, rop, iop


# attributes of numpy.ndarray that expose host memory, or that cupy.ndarray lacks
_HOST_ONLY = {"data", "ctypes", "tobytes", "tofile", "dump", "dumps", "tostring", "setflags", "byteswap",
              "getfield", "setfield", "itemset", "resize"}


class ndarray:
    """A device array: ``self._a`` is the NumPy array standing for its memory."""

    __slots__ = ("_a", "_device")
    __array_priority__ = 100
    __hash__ = None

    def __init__(self, shape, dtype=float, order="C"):
        self._a = _np.empty(shape, dtype=dtype, order=order)
        self._device = _current[0]

    # -- refusals
    def __array__(self, dtype=None, copy=None):
        raise TypeError("Implicit conversion to a NumPy array is not allowed. "
                        "Please use `.get()` to construct a NumPy array explicitly.")

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        if method not in ("__call__", "reduce", "accumulate", "outer"):
            raise TypeError(f"the fake cupy does not model ufunc.{method} ({ufunc.__name__})")
        return _apply_ufunc(ufunc, method, inputs, kwargs)

    def __array_function__(self, func, types_, args, kwargs):
        _check_device(args)
        return _wrap_result(func(*_unwrap(args), **_unwrap(kwargs)))

    def __getattr__(self, name):
        if name.startswith("__") or name in _HOST_ONLY:
            raise AttributeError(f"'cupy.ndarray' object has no attribute '{name}'")
        value = getattr(self._a, name)
        if not callable(value):
            return _wrap_result(value, self._device)

        def method(*args, **kwargs):
            if name == "view" and args and isinstance(args[0], type) and issubclass(args[0], _np.ndarray):
                raise TypeError("cupy.ndarray.view takes a dtype, not an array type")
            if name in ("item", "tolist"):
                _count_d2h()
            else:
                _check_device((self,) + args)
            return _wrap_result(getattr(self._a, name)(*_unwrap(args), **_unwrap(kwargs)), self._device)
        method.__name__ = name
        return method

    # -- what it is
    @property
    def device(self):
        return Device(self._device)

    def __len__(self):
        return len(self._a)

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def __repr__(self):
        _count_d2h()
        return repr(self._a)

    def __str__(self):
        _count_d2h()
        return str(self._a)

    def __format__(self, spec):
        _count_d2h()
        return format(self._a, spec)

    # -- explicit transfers and Python scalars (synchronising)
    def get(self, stream=None, order="C", out=None):
        _count_d2h()
        if out is not None:
            out[...] = self._a
            return out
        return _np.array(self._a, order=order, copy=True)

    def set(self, arr, stream=None):
        if not isinstance(arr, _np.ndarray):
            raise TypeError(f"Only numpy.ndarray can be set to cupy.ndarray, got {type(arr)}")
        if arr.shape != self._a.shape:
            raise ValueError(f"Shape mismatch: {arr.shape} vs {self._a.shape}")
        _count_h2d(arr)
        self._a[...] = arr

    def __float__(self):
        _count_d2h()
        return float(self._a)

    def __int__(self):
        _count_d2h()
        return int(self._a)

    def __complex__(self):
        _count_d2h()
        return complex(self._a)

    def __bool__(self):
        _count_d2h()
        return bool(self._a)

    # -- indexing
    def __getitem__(self, key):
        return _wrap_result(self._a[_index(key)], self._device)

    def __setitem__(self, key, value):
        _check_device((self, value))
        key = _index(key)
        if isinstance(value, ndarray):
            value = value._a
        elif isinstance(value, _np.ndarray):
            if value.ndim and _is_basic(key):
                raise ValueError("non-scalar numpy.ndarray cannot be used for fill")
            _count_h2d(value)
        elif isinstance(value, (list, tuple)):
            if _is_basic(key):
                raise _unsupported(value)
            _count_h2d(value)
        elif not _is_scalar(value):
            raise _unsupported(value)
        self._a[key] = value

    # -- unary operators
    def __neg__(self):
        return _apply_ufunc(_np.negative, "__call__", (self,), {})

    def __pos__(self):
        return _apply_ufunc(_np.positive, "__call__", (self,), {})

    def __abs__(self):
        return _apply_ufunc(_np.absolute, "__call__", (self,), {})

    def __invert__(self):
        return _apply_ufunc(_np.invert, "__call__", (self,), {})

    # -- comparisons
    def _compare(self, other, ufunc):
        if _defers_to(other):
            return NotImplemented
        return _apply_ufunc(ufunc, "__call__", (self, other), {})

    def __eq__(self, other):
        return self._compare(other, _np.equal)

    def __ne__(self, other):
        return self._compare(other, _np.not_equal)

    def __lt__(self, other):
        return self._compare(other, _np.less)

    def __le__(self, other):
        return self._compare(other, _np.less_equal)

    def __gt__(self, other):
        return self._compare(other, _np.greater)

    def __ge__(self, other):
        return self._compare(other, _np.greater_equal)


for _name, _ufunc in [("add", _np.add), ("sub", _np.subtract), ("mul", _np.multiply), ("truediv", _np.true_divide),
                      ("floordiv", _np.floor_divide), ("mod", _np.remainder), ("pow", _np.power),
                      ("matmul", _np.matmul), ("and", _np.bitwise_and), ("or", _np.bitwise_or),
                      ("xor", _np.bitwise_xor), ("lshift", _np.left_shift), ("rshift", _np.right_shift)]:
    for _f in _binary(_name, _ufunc):
        setattr(ndarray, _f.__name__, _f)
del _name, _ufunc, _f


# ---------------------------------------------------------------- module functions
def asarray(a, dtype=None, order=None, blocking=False):
    """A device array holding ``a``: the same array if it is one already, else a copy from the host."""
    if isinstance(a, ndarray):
        if a._device != _current[0]:          # from another GPU: a copy on the current one
            return _wrap(_np.array(a._a, dtype=dtype, copy=True))
        return a if dtype is None or _np.dtype(dtype) == a.dtype else a.astype(dtype)
    if isinstance(a, (list, tuple)) and any(isinstance(v, ndarray) for v in a):
        return stack(a).astype(dtype) if dtype is not None else stack(a)
    host = _np.array(a, dtype=dtype, order=order or "K", copy=True)
    if host.dtype == object:
        raise ValueError("Unsupported dtype object")
    _count_h2d(host)
    return _wrap(host)


def array(obj, dtype=None, copy=True, order="K", ndmin=0, blocking=False):
    if isinstance(obj, ndarray):
        copy = copy or obj._device != _current[0]
        out = _np.array(obj._a, dtype=dtype, copy=copy, order=order, ndmin=ndmin)
        return obj if out is obj._a else _wrap(out)
    out = asarray(obj, dtype=dtype, order=None if order == "K" else order)
    return _wrap(_np.array(out._a, ndmin=ndmin, copy=False)) if ndmin else out


def asnumpy(a, stream=None, order="C", out=None):
    if isinstance(a, ndarray):
        return a.get(order=order, out=out)
    return _np.asarray(a, order=order)


def get_array_module(*args):
    for a in args:
        if isinstance(a, ndarray):
            return sys.modules[__name__]
    return _np


def _kernels_unsupported(*args, **kwargs):
    raise NotImplementedError("the fake cupy cannot compile or run CUDA kernels; "
                              "this path needs a real GPU (pytest -m gpu)")


RawModule = RawKernel = ElementwiseKernel = ReductionKernel = _kernels_unsupported


def fuse(*args, **kwargs):
    _kernels_unsupported()


class _Ufunc:
    """A NumPy ufunc that runs on device arrays only."""

    def __init__(self, ufunc):
        self._ufunc = ufunc
        self.__name__ = ufunc.__name__

    def __call__(self, *args, **kwargs):
        return _apply_ufunc(self._ufunc, "__call__", args, kwargs)

    def reduce(self, array, axis=0, dtype=None, out=None, keepdims=False):
        kwargs = dict(axis=axis, dtype=dtype, keepdims=keepdims)
        if out is not None:
            kwargs["out"] = out
        return _apply_ufunc(self._ufunc, "reduce", (array,), kwargs)

    def at(self, a, indices, b=None):
        """``add.at``: ``a[indices] += b`` in place, repeated indices adding up, as CUDA's atomicAdd
        does it: only for the dtypes atomicAdd supports (``cupyx.scatter_add`` is the same call)."""
        if self.__name__ != "add":
            raise TypeError(f"the fake cupy models ufunc.at for add only, not {self.__name__}")
        if not isinstance(a, ndarray):
            raise TypeError(f"add.at needs a cupy.ndarray, got {type(a)}")
        if a.dtype not in _ATOMIC_ADD:
            raise TypeError("add.at only supports int32, float16, float32, float64, uint32, uint64, as data type")
        _check_device((a, b) + (indices if isinstance(indices, tuple) else (indices,)))
        key = _index(indices)
        if isinstance(b, ndarray):
            b = b._a
        elif isinstance(b, _np.ndarray):
            if _is_basic(key) and b.ndim:
                raise _unsupported(b)
            _count_h2d(b)
        elif not _is_scalar(b):
            raise _unsupported(b)
        _np.add.at(a._a, key, b)

    def __repr__(self):
        return f"<fake cupy ufunc '{self.__name__}'>"


# the dtypes add.at (and cupyx.scatter_add) accept: what CUDA's atomicAdd supports
_ATOMIC_ADD = tuple(_np.dtype(t) for t in (_np.int32, _np.uint32, _np.uint64, _np.float16, _np.float32, _np.float64))


def _device_function(name, func):
    def call(*args, **kwargs):
        out = kwargs.get("out")
        if out is not None and not isinstance(out, ndarray):
            raise _unsupported(out)
        _check_device(args)
        _check_device(tuple(kwargs.values()))
        result = func(*_unwrap(args), **_unwrap(kwargs))
        if out is not None and result is out._a:
            return out
        return _wrap_result(result)
    call.__name__ = call.__qualname__ = name
    call.__doc__ = f"numpy.{name} on device arrays (host ndarrays refused)."
    return call


_cache = {}


def __getattr__(name):
    """Everything else NumPy has: dtypes and constants as they are, functions on device arrays."""
    if name in _cache:
        return _cache[name]
    if name.startswith("__") or name in ("random", "linalg", "fft", "testing", "char", "ma", "rec", "polynomial"):
        raise AttributeError(f"the fake cupy has no attribute '{name}'")
    value = getattr(_np, name)          # AttributeError when NumPy lacks it too
    if isinstance(value, _np.ufunc):
        value = _Ufunc(value)
    elif callable(value) and not isinstance(value, type):
        value = _device_function(name, value)
    _cache[name] = value
    return value


# ---------------------------------------------------------------- submodules
def _as_strided(x, shape=None, strides=None):
    if not isinstance(x, ndarray):
        raise _unsupported(x)
    return _wrap(_np.lib.stride_tricks.as_strided(x._a, shape=shape, strides=strides), x._device)


def _submodule(name, **attrs):
    module = types.ModuleType(f"{__name__}.{name}")
    module.__dict__.update(attrs)
    sys.modules[module.__name__] = module
    return module


lib = _submodule("lib")
lib.stride_tricks = _submodule("lib.stride_tricks", as_strided=_as_strided)
cuda = _submodule("cuda", Device=Device, Stream=Stream, CUDARuntimeError=CUDARuntimeError,
                  get_current_stream=lambda: Stream.null)
cuda.runtime = _submodule("cuda.runtime", getDeviceCount=_runtime_get_device_count,
                          CUDARuntimeError=CUDARuntimeError)
