"""The training step's passes over memory compiled with Numba: ReLU, its gradient, a sum of two arrays,
and two sums over many numbers (a squared error's, a bias gradient's).

The references are NumPy's expressions (kernels/__init__.py): ``np.maximum(x, 0)``, ``g * (y > 0)``
and ``a + b``; each loop here does that arithmetic, number by number, so the results equal the
references to the bit (signed zeros and NaNs included). The two sums, ``((a - b) ** 2).mean()``
(with ``a - b`` kept for the gradient) and a bias gradient's column sums, add in another order than
NumPy's and BLAS's: they agree to float tolerance (the squared error sums in float64, so closer to
the exact sum than the float32 reference), deterministic for a given thread count.

ReLU's gradient. NumPy's expression makes two passes: the mask ``y > 0`` (a new boolean array), then
the product. One compiled loop reads g and y once and writes the result, with no mask array: about
15 % fewer bytes moved and one allocation fewer, on a pass over every activation of the network
(benchmarks/NOTES.md, round 4). It runs at any thread count.

ReLU on one thread (round 17). NumPy 2.4's ``maximum(x, 0)`` ran slower than ``+`` on the same bytes
(Zen 3, NumPy's AVX2 build, one core, warm: 4 MiB in 0.88 ms against 0.38, 8 MiB in 1.93 against 1.47),
where this loop runs at about ``+``'s speed; so ``relu_numba`` runs compiled on one thread too, as the
gradient does: the one-thread step 0.98-0.99x the time (NOTES.md, round 17).

Split over the threads (round 9). These passes move memory and do next to no arithmetic; on one core
NumPy's ``+`` is a single pass already, but it leaves a second core idle where the
convolutions split each batch over the Numba threads (``conv_numba.threads_here``: inside
``kernels.conv_threads``, as ``minivq train`` runs one process). There each pass over at least
``SPLIT_MIN`` numbers is cut into one contiguous share per thread (``prange`` over the shares). On a
2-core AVX-512 VM, caches cold as in a step, an 8 MiB ReLU took 0.9 ms instead of 1.4; ReLU and the
adds split, the step took 0.95x the time at batch 128 and 0.94x at batch 32, and the two sums split
too, 0.98-0.99x again at batch 128 (alternated in one process; NOTES.md, round 9). Below ``SPLIT_MIN``
the fork of the threads costs about what it saves. Where the split does not apply, ``add_numba``,
``squared_error_numba`` and ``column_sums_numba`` return ``None`` and the caller runs the reference
(ReLU's loop and the gradient's one-pass loop still run, whole).

Layouts. The loops run over flat views, so the operands must share one dense layout (any order of
axes: the channels-last activations of functional/conv.py are dense in (N, H, W, C) order); the
result is made in that layout too. Anything else gets ``None`` back, and the caller uses the reference.
"""
import numpy as np
from numba import njit, prange

from minivq.backend import memory_order

from .conv_numba import threads_here

SPLIT_MIN = 2 ** 18     # numbers: a share of a smaller pass costs about as much as the fork (NOTES.md, round 9)
_ALIGN = 16             # share bounds fall on multiples of 16 numbers: no two threads write one cache line


# ---------------------------------------------------------------- the loops, over whole (flat) arrays
# Each loop runs from 0: from a bound passed in, Numba cannot prove the index non-negative and checks
# every load for a negative index's wraparound, and the loop ran 1.5x slower. Shares are slices.
@njit(nogil=True, cache=True)
def _rectified(x, out):
    zero = out.dtype.type(0)
    for i in range(x.size):
        v = x[i]
        out[i] = v if not v <= 0 else zero     # np.maximum(v, 0): +0.0 for -0.0 and below, NaN stays NaN


@njit(nogil=True, cache=True)
def _masked(g, y, out):
    for i in range(g.size):
        out[i] = g[i] * (y[i] > 0)


@njit(nogil=True, cache=True)
def _summed(a, b, out):
    for i in range(a.size):
        out[i] = a[i] + b[i]


@njit(nogil=True, cache=True, fastmath={"reassoc"})
def _squared_error(a, b, diff):
    """diff = a - b; returns the sum of diff**2, in float64 (reassociated: vector lanes of partial sums)."""
    total = 0.0
    for i in range(a.size):
        d = a[i] - b[i]
        diff[i] = d
        total += np.float64(d) * np.float64(d)
    return total


@njit(nogil=True, cache=True)
def _column_sums(rows, out):
    """out[c] = the sum over i of rows[i, c], row after row (the inner loop runs along a row: vector lanes)."""
    out[:] = 0
    for i in range(rows.shape[0]):
        for c in range(rows.shape[1]):
            out[c] += rows[i, c]


# ---------------------------------------------------------------- one share per thread
@njit(parallel=True, nogil=True, cache=True)
def _rectified_shares(x, out, bounds):
    for s in prange(bounds.size - 1):
        lo, hi = bounds[s], bounds[s + 1]
        _rectified(x[lo:hi], out[lo:hi])


@njit(parallel=True, nogil=True, cache=True)
def _masked_shares(g, y, out, bounds):
    for s in prange(bounds.size - 1):
        lo, hi = bounds[s], bounds[s + 1]
        _masked(g[lo:hi], y[lo:hi], out[lo:hi])


@njit(parallel=True, nogil=True, cache=True)
def _summed_shares(a, b, out, bounds):
    for s in prange(bounds.size - 1):
        lo, hi = bounds[s], bounds[s + 1]
        _summed(a[lo:hi], b[lo:hi], out[lo:hi])


@njit(parallel=True, nogil=True, cache=True)
def _squared_error_shares(a, b, diff, bounds, totals):
    for s in prange(bounds.size - 1):
        lo, hi = bounds[s], bounds[s + 1]
        totals[s] = _squared_error(a[lo:hi], b[lo:hi], diff[lo:hi])


@njit(parallel=True, nogil=True, cache=True)
def _column_sums_shares(rows, bounds, partial):
    for s in prange(bounds.size - 1):
        _column_sums(rows[bounds[s]:bounds[s + 1]], partial[s])


# ---------------------------------------------------------------- drivers
def share_count(size):
    """Shares for a pass over ``size`` numbers from this thread: ``threads_here()`` from ``SPLIT_MIN`` on, else 1."""
    return max(1, threads_here()) if size >= SPLIT_MIN else 1


def _bounds(size, count):
    """0..size in ``count`` contiguous shares whose inner bounds are multiples of ``_ALIGN``."""
    inner = [size * s // count // _ALIGN * _ALIGN for s in range(1, count)]
    return np.array([0] + inner + [size], dtype=np.int64)


def _flat(first, *others):
    """A new array in ``first``'s layout, then flat views of ``first``, ``others`` and it; ``None`` unless all
    are NumPy float32/float64 arrays of one shape, dtype and dense layout (Numba does no float16 arithmetic)."""
    if first.dtype not in (np.float32, np.float64) or any(
            o.shape != first.shape or o.dtype != first.dtype for o in others):
        return None
    order = memory_order(first)                  # first's axes, slowest first
    views = [a.transpose(order) for a in (first, *others)]
    if not all(v.flags.c_contiguous for v in views):
        return None
    out = np.empty_like(first)                   # first's layout
    views.append(out.transpose(order))
    if not views[-1].flags.c_contiguous:         # (never seen: empty_like keeps a dense layout) a flat
        return None                              # copy of out would take the results, not out
    return out, [v.reshape(-1) for v in views]   # views: each is C-contiguous in that order


def _whole_or_split(loop, split_loop, flats):
    """Run ``loop`` over the flat views ``flats`` (inputs, then the output) whole, or ``split_loop`` in
    ``share_count`` shares where that is more than one."""
    size = flats[0].size
    count = share_count(size)
    if count > 1:
        split_loop(*flats, _bounds(size, count))
    else:
        loop(*flats)


def relu_numba(x):
    """``np.maximum(x, 0)`` in one compiled pass, split over the threads where ``share_count`` allows (on one
    thread too: faster than NumPy's ``maximum``, module doc); ``None`` for arrays it cannot take."""
    made = _flat(x)
    if made is None:
        return None
    out, flats = made
    _whole_or_split(_rectified, _rectified_shares, flats)
    return out


def relu_grad_numba(g, y):
    """``g * (y > 0)`` in one pass, split over the threads where ``share_count`` allows; ``None`` for
    arrays it cannot take."""
    made = _flat(g, y)
    if made is None:
        return None
    out, flats = made
    _whole_or_split(_masked, _masked_shares, flats)
    return out


def add_numba(a, b):
    """``a + b`` for arrays of one shape, dtype and dense layout, split over the threads; ``None`` where
    it would run on one or cannot take them (broadcasting among them: the caller's ``a + b`` runs)."""
    count = share_count(a.size)
    made = _flat(a, b) if count > 1 else None
    if made is None:
        return None
    out, flats = made
    _summed_shares(*flats, _bounds(a.size, count))
    return out


def squared_error_numba(a, b):
    """``(a - b, mean((a - b) ** 2))`` for arrays of one shape, dtype and dense layout, split over the
    threads (the mean summed in float64, per share, then the shares in order; returned in a's dtype);
    ``None`` where it would run on one or cannot take them."""
    count = share_count(a.size)
    made = _flat(a, b) if count > 1 else None
    if made is None:
        return None
    diff, flats = made
    totals = np.zeros(count, dtype=np.float64)
    _squared_error_shares(*flats, _bounds(a.size, count), totals)
    return diff, a.dtype.type(totals.sum() / a.size)


def column_sums_numba(rows):
    """The sum of ``rows`` (M, C) over M, C-contiguous float32/float64, split over the threads by rows
    (each share's sums, then the shares in order); ``None`` where it would run on one or cannot take them."""
    count = share_count(rows.size)
    if (count == 1 or rows.ndim != 2 or not rows.flags.c_contiguous
            or rows.dtype not in (np.float32, np.float64)):
        return None
    bounds = np.array([rows.shape[0] * s // count for s in range(count + 1)], dtype=np.int64)
    partial = np.empty((count, rows.shape[1]), dtype=rows.dtype)
    _column_sums_shares(rows, bounds, partial)
    total = partial[0].copy()
    for share in partial[1:]:
        total += share
    return total
