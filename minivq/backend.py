"""The one place that knows whether arrays live on NumPy (CPU) or CuPy (GPU).

Everything above this module takes the array module from the data itself,
``xp = get_array_module(a)``, and writes a single code path for both.
CuPy is imported lazily and in one guarded place, so ``import minivq`` needs
NumPy alone.
"""
import contextlib
import ctypes
import threading

import numpy as np

_cupy = None          # the cupy module once imported successfully
_cupy_error = None    # why importing it failed, for the error message


def _import_cupy():
    """Import CuPy on first use; remember the failure so the message can name it."""
    global _cupy, _cupy_error
    if _cupy is None and _cupy_error is None:
        try:
            import cupy
            _cupy = cupy
        except Exception as exc:  # ImportError, or a broken CUDA install raising anything
            _cupy_error = f"{type(exc).__name__}: {exc}"
    return _cupy


def _is_cupy_array(a):
    # Checked by the type's module so that CuPy is never imported just to ask.
    return type(a).__module__.split(".")[0] == "cupy"


def get_array_module(*arrays):
    """Return ``cupy`` if any argument is a CuPy array, else ``numpy``.

    Tensors are accepted too (their ``.data`` is looked at).
    """
    for a in arrays:
        if hasattr(a, "requires_grad"):      # a minivq Tensor: look at its array
            a = a.data
        if _is_cupy_array(a):
            return _import_cupy()
    return np


def cuda_available():
    """True when CuPy imports and sees at least one CUDA device."""
    cp = _import_cupy()
    if cp is None:
        return False
    try:
        return cp.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def parse_device(device):
    """Normalise a device name: ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` -> ``("cpu", None)`` or ``("cuda", N)``."""
    if device is None:
        return ("cpu", None)
    if not isinstance(device, str):
        raise TypeError(f"device must be a string such as 'cpu', 'cuda' or 'cuda:0', got {device!r}")
    name = device.strip().lower()
    if name == "cpu":
        return ("cpu", None)
    if name == "cuda" or name == "gpu":
        return ("cuda", 0)
    if name.startswith("cuda:"):
        idx = name[5:]
        if idx.isdigit():
            return ("cuda", int(idx))
    raise ValueError(f"unknown device {device!r}: use 'cpu', 'cuda' or 'cuda:N' (N a GPU index)")


def device_name(device):
    """Canonical string for a device: ``"cpu"`` or ``"cuda:N"``."""
    kind, idx = parse_device(device)
    return "cpu" if kind == "cpu" else f"cuda:{idx}"


def require_cuda(index=0):
    """Return the cupy module, or raise a one-line error that names the fix."""
    cp = _import_cupy()
    if cp is None:
        raise RuntimeError(
            "device 'cuda' needs CuPy, which is not importable "
            f"({_cupy_error}); install it with `pip install -e .[cuda]` or use --device cpu")
    try:
        count = cp.cuda.runtime.getDeviceCount()
    except Exception as exc:
        raise RuntimeError(f"device 'cuda' asked for but CUDA reports no usable GPU ({exc}); use --device cpu") from None
    if count == 0:
        raise RuntimeError("device 'cuda' asked for but CuPy sees no GPU (is CUDA_VISIBLE_DEVICES empty?); "
                           "use --device cpu")
    if index >= count:
        raise RuntimeError(f"device 'cuda:{index}' asked for but only {count} GPU(s) are visible; "
                           f"use cuda:0..cuda:{count - 1} or --device cpu")
    return cp


def use_device(device):
    """Make ``device`` CuPy's current GPU (for ``"cuda:N"``); nothing for ``"cpu"``.

    CuPy runs kernels, and allocates new arrays, on its current device, which is GPU 0
    unless set: a program working on ``cuda:1`` sets it once, before its first step.
    """
    kind, idx = parse_device(device)
    if kind == "cuda":
        require_cuda(idx).cuda.Device(idx).use()


def device_count():
    """How many GPUs CuPy sees; without CuPy or a GPU, ``require_cuda``'s one-line error."""
    return require_cuda(0).cuda.runtime.getDeviceCount()


def current_stream():
    """CuPy's current stream on the current GPU (``.ptr`` for NCCL, ``.synchronize()`` to wait for it)."""
    cp = _cupy if _cupy is not None else require_cuda(0)     # once per collective: skip the checks
    return cp.cuda.get_current_stream()


def array_device(a):
    """The device an array lives on, as ``"cpu"`` or ``"cuda:N"``."""
    if _is_cupy_array(a):
        return f"cuda:{a.device.id}"
    return "cpu"


# One im2col / col2im buffer of a convolution, by default (minivq.functional.conv.workspace_limit).
# CPU: small enough that a chunk's windows are still in L2/L3 when its GEMM reads them (measured
# in benchmarks/NOTES.md); GPU: large, since every chunk is a few kernel launches.
CPU_WORKSPACE_BYTES = 4 * 2 ** 20
GPU_WORKSPACE_BYTES = 256 * 2 ** 20


def default_workspace_bytes(a):
    """The default size of a convolution's window buffer for arrays on ``a``'s device."""
    return GPU_WORKSPACE_BYTES if _is_cupy_array(a) else CPU_WORKSPACE_BYTES


# glibc's malloc hands a freed block above its trim threshold back to the OS and serves a large
# request from fresh pages; a training step frees and asks again for the same tens of megabytes of
# activations every step, and every fresh page is a page fault (measured: 8,700-13,000 faults per
# batch-128 step, ~40 MB). These two settings keep freed memory in the process for the next step.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3          # mallopt's parameter numbers (malloc.h)
# Blocks up to the first of these that this glibc accepts come from the heap. Older glibc refuse
# more than 32 MiB, which a batch-512 step's largest blocks pass: 1,500-4,200 faults and 34-66 ms of
# system time a step under 32 MiB, none under 1 GiB (benchmarks/NOTES.md, round 20).
HOST_MMAP_THRESHOLDS = (2 ** 30, 32 * 2 ** 20)
HOST_TRIM_THRESHOLD = 2 ** 30          # the heap keeps up to this much freed memory at its top


def keep_freed_host_memory():
    """Ask the C library's malloc to keep freed host memory for reuse instead of returning it to the OS.

    Process-wide and opt-in: the CLI calls it, so do the benchmarks (for every engine in the
    process alike). Returns True where it took effect (glibc), False elsewhere (another C
    library, or none that ctypes can open), where nothing changes.
    """
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version       # glibc only: other C libraries' mallopt differs or is a stub
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # mallopt returns 0 for a value it refuses and leaves the setting as it was: try the next
    return any(mallopt(_M_MMAP_THRESHOLD, limit) for limit in HOST_MMAP_THRESHOLDS) and \
        bool(mallopt(_M_TRIM_THRESHOLD, HOST_TRIM_THRESHOLD))


def to_device(a, device):
    """Copy (only if needed) an array to ``device``; returns an array of the same dtype."""
    kind, idx = parse_device(device)
    if kind == "cpu":
        if _is_cupy_array(a):
            return a.get()
        return np.asarray(a)
    cp = require_cuda(idx)
    if _is_cupy_array(a) and a.device.id == idx:
        return a
    with cp.cuda.Device(idx):
        return cp.asarray(a)


def to_numpy(a):
    """A NumPy array with the same values (a copy from the GPU, or the array itself)."""
    return a.get() if _is_cupy_array(a) else np.asarray(a)


def memory_order(a):
    """The axes of ``a`` (NumPy or CuPy) from the slowest-varying in memory to the fastest: (0, 1, ..., n-1)
    for C order, (0, 2, 3, 1) for the channels-last activations of functional/conv.py."""
    return tuple(sorted(range(a.ndim), key=lambda axis: -a.strides[axis]))


def min_max(a):
    """``(min, max)`` of a non-empty array as Python numbers, read from the GPU in one copy.

    For range checks of indices: two ``int(a.min())`` reads would each wait for the device.
    """
    xp = get_array_module(a)
    both = to_numpy(xp.stack([a.min(), a.max()]))
    return both[0].item(), both[1].item()


# ---------------------------------------------------------------- random state
# minivq draws every random number (initialisation, shuffling, restarts,
# sampling) from one NumPy generator, on CPU and GPU runs alike, and moves
# the result to the device: so a seed gives the same initial weights on both.
# There is one generator per thread (a NumPy generator is not safe to share
# between threads): the data-parallel workers of ``minivq.workers`` each seed
# their own and draw what one process would draw. A new thread's generator is
# unseeded until that thread calls ``manual_seed``.
class _RandomState(threading.local):
    def __init__(self):
        self.generator = np.random.default_rng()


_random = _RandomState()


def manual_seed(seed):
    """Seed every random draw minivq makes in this thread."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    _random.generator = np.random.default_rng(int(seed))


def rng():
    """The generator behind every random draw minivq makes in this thread."""
    return _random.generator


def get_rng_state():
    """The generator's state as a JSON-able dict (for checkpoints)."""
    return _random.generator.bit_generator.state


def set_rng_state(state):
    _random.generator.bit_generator.state = state


# ---------------------------------------------------------------- threads
def blas_threads(count):
    """Within this block the BLAS library (NumPy's: OpenBLAS, MKL, ...) runs ``count`` threads, process-wide.

    Through threadpoolctl (``pip install -e .[threads]``); an ImportError naming
    that fix where it is missing.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        raise ImportError("threadpoolctl is not installed (install it with `pip install -e .[threads]`)") from None
    return threadpool_limits(count, user_api="blas")


_blas_libraries = None      # threadpoolctl's handles on the BLAS libraries loaded, found once


def blas_thread_count():
    """How many threads a BLAS call runs now (the most over the BLAS libraries loaded), read through
    threadpoolctl; None where the count cannot be known (threadpoolctl missing, or no BLAS it knows).

    The libraries are looked up on the first call (a scan of the process's shared objects, ~1 ms) and
    kept, so a call costs about a microsecond; a BLAS loaded after that first call is not seen.
    """
    global _blas_libraries
    if _blas_libraries is None:
        try:
            from threadpoolctl import ThreadpoolController
            _blas_libraries = [lib for lib in ThreadpoolController().lib_controllers if lib.user_api == "blas"]
        except ImportError:
            _blas_libraries = ()        # not installed: no handles, and no import tried again
    counts = [lib.get_num_threads() for lib in _blas_libraries]
    return max(counts) if counts else None


# ---------------------------------------------------------------- scatter-add
def index_add(indices, values, num_rows):
    """``out[indices[i]] += values[i]`` for rows, into a fresh ``(num_rows, ...)`` array.

    The one scatter the engine needs (embedding backward, EMA cluster sums,
    index backward). NumPy: a stable sort then ``add.reduceat`` over runs of
    equal indices (much faster than ``np.add.at`` for wide rows); CuPy:
    atomic adds through ``cupy.add.at``.
    """
    xp = get_array_module(values)
    if indices.ndim != 1 or values.shape[:1] != indices.shape:
        raise ValueError(f"index_add wants indices (M,) and values (M, ...), got {indices.shape} and {values.shape}")
    out = xp.zeros((num_rows,) + values.shape[1:], dtype=values.dtype)
    if indices.shape[0] == 0:
        return out
    if xp is np:
        order = np.argsort(indices, kind="stable")
        sorted_idx = indices[order]
        starts = np.flatnonzero(np.r_[True, sorted_idx[1:] != sorted_idx[:-1]])
        out[sorted_idx[starts]] = np.add.reduceat(values[order], starts, axis=0)
    else:
        xp.add.at(out, indices, values)
    return out


def bincount(indices, num_rows, dtype):
    """Count of each index in ``[0, num_rows)``, as ``dtype``."""
    xp = get_array_module(indices)
    return xp.bincount(indices.reshape(-1), minlength=num_rows).astype(dtype)


def add_at(target, key, values):
    """``target[key] += values`` in place, with repeated indices adding up (unbuffered; atomic adds on CuPy)."""
    get_array_module(target).add.at(target, key, values)


# ---------------------------------------------------------------- NCCL
# The collectives of minivq.distributed on GPU buffers, through CuPy's NCCL
# binding; the communicator it returns is CuPy's own (allReduce, bcast,
# allGather, destroy), called with device pointers and a stream pointer.
_NCCL_TYPES = {"float16": "NCCL_FLOAT16", "float32": "NCCL_FLOAT32", "float64": "NCCL_FLOAT64",
               "int32": "NCCL_INT32", "int64": "NCCL_INT64", "uint8": "NCCL_UINT8"}


def _nccl():
    from cupy.cuda import nccl
    return nccl


def nccl_unavailable():
    """None when CuPy's NCCL binding is usable here, else why not, in one line."""
    try:
        nccl = _nccl()
    except Exception as exc:    # no CuPy, or a CuPy without the binding, or a broken CUDA install
        return f"{type(exc).__name__}: {exc}"
    return None if nccl.available else "this CuPy was built without NCCL"


def nccl_unique_id():
    """A new NCCL unique id (made on one rank, shared with the others before ``nccl_communicator``)."""
    return _nccl().get_unique_id()


def nccl_communicator(size, unique_id, rank):
    """CuPy's ``NcclCommunicator`` for ``rank`` of ``size`` ranks on the current GPU; every rank calls it."""
    return _nccl().NcclCommunicator(size, unique_id, rank)


def nccl_dtype(dtype):
    """NCCL's code for an array dtype; a ``TypeError`` naming the supported ones otherwise."""
    name = _NCCL_TYPES.get(np.dtype(dtype).name)
    if name is None:
        raise TypeError(f"NCCL collectives take {', '.join(_NCCL_TYPES)} arrays, got {np.dtype(dtype)}")
    return getattr(_nccl(), name)


def nccl_sum():
    """NCCL's code for the sum reduction."""
    return _nccl().NCCL_SUM


# ---------------------------------------------------------------- settings
@contextlib.contextmanager
def setting(set_value, value):
    """Within this block a global setting holds ``value``; the previous value comes back after, even on error.

    ``set_value(v)`` sets the setting and returns the value it had. The few global
    settings minivq has (the grad mode and the backward hook, both per thread; the
    conv workspace limit) are each a setter plus this context manager.
    """
    previous = set_value(value)
    try:
        yield
    finally:
        set_value(previous)
