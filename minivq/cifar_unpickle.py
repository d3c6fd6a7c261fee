"""The one unpickler minivq runs on untrusted bytes: CIFAR-10's python batches, and nothing else.

CIFAR-10's "python version" is a set of Python 2 pickles, and unpickling can run
arbitrary code. This unpickler resolves no global but the four NumPy names that
NumPy's own pickles of plain numeric arrays use, each replaced by a stand-in that
admits only the arguments NumPy writes. Kept alone so the security-critical code
can be reviewed in one sitting; ``minivq.data`` is its only user.
"""
import io
import pickle

import numpy as np

try:  # NumPy >= 2 keeps it in numpy._core; its pickles name numpy._core.multiarray._reconstruct
    from numpy._core.multiarray import _reconstruct as _np_reconstruct
except ImportError:  # NumPy 1.x
    from numpy.core.multiarray import _reconstruct as _np_reconstruct


class _PickledNdarrayType:
    """Stands for ``numpy.ndarray`` in a pickle: good only as ``_reconstruct``'s first argument.
    No attributes and no ``__dict__``, so a pickle cannot alter it (BUILD fails)."""
    __slots__ = ()


class _PickledReconstruct:
    """``_reconstruct`` as NumPy's own pickles call it: ``(ndarray, (0,), b'b')``, an empty
    array that ``__setstate__`` then fills from bytes whose length NumPy checks."""
    __slots__ = ()

    def __call__(self, subtype, shape, typecode):
        if not (isinstance(subtype, _PickledNdarrayType) and type(shape) is tuple and shape == (0,)
                and type(typecode) in (bytes, str) and typecode in (b"b", "b")):
            raise pickle.UnpicklingError("numpy _reconstruct called with arguments NumPy never writes")
        return _np_reconstruct(np.ndarray, (0,), b"b")


class _PickledDtype:
    """``numpy.dtype`` restricted to plain numeric types, always a fresh copy (so that the
    pickle's BUILD sets the state of its own dtype, never of NumPy's shared ones)."""
    __slots__ = ()

    def __call__(self, spec, align=False, copy=True):
        if isinstance(spec, bytes):
            spec = spec.decode("ascii")
        if not isinstance(spec, str) or len(spec) > 8:
            raise pickle.UnpicklingError(f"numpy dtype {spec!r} is not a plain numeric type")
        dtype = np.dtype(spec)
        if dtype.kind not in "biuf":
            raise pickle.UnpicklingError(f"numpy dtype {spec!r} is not a plain numeric type")
        return np.dtype(spec, bool(align), True)


_ADMITTED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _PickledReconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _PickledReconstruct,
    ("numpy", "ndarray"): _PickledNdarrayType,
    ("numpy", "dtype"): _PickledDtype,
}


class RefusedGlobal(pickle.UnpicklingError):
    """The pickle names a global this unpickler does not admit; nothing of it was run."""


class CifarUnpickler(pickle.Unpickler):
    """An unpickler that resolves no global but the four NumPy names above (strings stay bytes)."""

    def __init__(self, file):
        super().__init__(file, encoding="bytes")

    def find_class(self, module, name):
        admitted = _ADMITTED_GLOBALS.get((module, name))
        if admitted is None:
            why = ""
            if (module, name) == ("_codecs", "encode"):
                why = " (a pickle re-written by Python 3 with protocol 2; use the original files)"
            raise RefusedGlobal(f"its pickle names the global {module}.{name}{why}")
        return admitted()   # a fresh instance per use: nothing a pickle does to it outlives the load


def load_cifar_batch(payload):
    """The object a CIFAR-10 python batch's bytes hold; RefusedGlobal or another UnpicklingError otherwise."""
    return CifarUnpickler(io.BytesIO(payload)).load()
