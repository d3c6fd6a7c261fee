"""Rows added into the rows their indices pick, ``out[indices[i]] += values[i]``, compiled with Numba.

The reference is ``backend.index_add`` (a stable sort of the indices, then ``np.add.reduceat`` over
each run of equal ones; atomic adds on CuPy). It is the embedding's gradient (every quantised
vector's gradient added into its code's row) and the EMA quantiser's sums of the vectors assigned
to each code. The sort and the gather of the sorted rows cost more than the adds: for 8,192
vectors of 64 numbers into 512 codes (a batch-128 step of the paper's model) 2.4 ms, where one
pass over the rows in their order takes 0.07 ms on the same core (benchmarks/NOTES.md, round 9).

Rounding. Each output row is 0 plus its rows in their order, one add at a time: deterministic, and
the sum a plain loop would give; ``reduceat`` adds in another order, so the two agree to float
tolerance, not to the bit (the tests hold both to a float64 sum).

An index outside ``[0, num_rows)`` stops the pass and is reported (``IndexError``, as NumPy's
indexing in the reference): the loop indexes without bounds checks otherwise.
"""
import numpy as np
from numba import njit


@njit(nogil=True, cache=True)
def _scatter_add(indices, values, out):
    """Adds row i of ``values`` into row ``indices[i]`` of ``out`` for i in order; returns the position of
    the first index out of range (``out`` then partly summed), or -1."""
    rows, width = out.shape
    for i in range(indices.size):
        k = indices[i]
        if k < 0 or k >= rows:
            return i
        for j in range(width):
            out[k, j] += values[i, j]
    return -1


def index_add_numba(indices, values, num_rows):
    """``backend.index_add`` for NumPy float32/float64 ``values`` (M, ...) and integer ``indices`` (M,);
    ``None`` for anything else (float16 among them: Numba does no float16 arithmetic on the CPU; and
    operands of mismatched shapes, which the loop, reading without bounds checks, must never see)."""
    if (values.dtype not in (np.float32, np.float64) or indices.dtype.kind not in "iu" or indices.ndim != 1
            or values.shape[:1] != indices.shape):
        return None
    out = np.zeros((num_rows,) + values.shape[1:], dtype=values.dtype)
    if indices.size == 0:
        return out
    width = int(np.prod(values.shape[1:], dtype=np.int64))
    rows = values.reshape(values.shape[0], width)       # a view where it can be, else one copy
    bad = _scatter_add(indices, rows, out.reshape(num_rows, width))
    if bad >= 0:
        raise IndexError(f"index_add: index {int(indices[bad])} is out of range for {num_rows} rows")
    return out
