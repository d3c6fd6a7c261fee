"""The reference nearest-code search: the GEMM expansion of the squared distance, in row chunks.

For a row ``x`` and a code ``e``::

    ||x - e||^2 = ||x||^2 - 2 x.e + ||e||^2

``||x||^2`` is the same for every code of a row, so it cannot change which
code is nearest: it is dropped, and the argmin is taken over
``||e||^2 - 2 x.e`` alone. That saves a pass over ``x`` and keeps the score
small where it matters (the dropped term would only add a large constant that
rounds the differences between codes away in float32).

``x @ codebook.T`` is one matrix product (BLAS on NumPy, cuBLAS on CuPy), so
this is fast, but it materialises an (rows, K) block of scores. The rows are
processed in chunks sized so that this block stays under ``BLOCK_BYTES``,
which keeps the memory bounded for any N.

Ties: ``argmin`` returns the first (lowest) index among equal scores. Two
duplicated codebook rows go through identical arithmetic (the same products,
summed in the same order by the BLAS kernel), so their scores are bitwise
equal and the lower index wins. Two *different* codes at the same true
distance may round differently, as in any GEMM formulation.

The same code runs on CuPy arrays (``xp = get_array_module(x)``), which is
how the GPU path of the benchmark gets its GEMM-based comparison point.
"""
from minivq.backend import get_array_module

BLOCK_BYTES = 32 * 1024 * 1024   # the (rows, K) score block is kept under this size


def rows_per_chunk(num_codes, itemsize, block_bytes=BLOCK_BYTES):
    """How many rows of scores fit in ``block_bytes`` (at least one)."""
    return max(1, block_bytes // max(1, num_codes * itemsize))


def code_norms(codebook):
    """``||e_k||^2`` for every code, in the codebook's dtype."""
    xp = get_array_module(codebook)
    return xp.einsum("kd,kd->k", codebook, codebook)


def nearest_code_numpy(x, codebook, block_bytes=BLOCK_BYTES):
    """Index of the nearest code (squared L2) for every row of ``x``; ties to the lowest index.

    ``x``: (N, D) and ``codebook``: (K, D), both float32 or both float64, on
    the same array module (NumPy or CuPy). No validation here: the public
    entry point is ``minivq.kernels.nearest_code``. Returns int64 (N,).
    """
    xp = get_array_module(x, codebook)
    n = x.shape[0]
    indices = xp.empty(n, dtype=xp.int64)
    if n == 0:
        return indices
    norms = code_norms(codebook)
    step = rows_per_chunk(codebook.shape[0], codebook.dtype.itemsize, block_bytes)
    codebook_t = codebook.T
    for start in range(0, n, step):
        stop = min(n, start + step)
        scores = x[start:stop] @ codebook_t      # x.e for every (row, code) of the chunk
        scores *= -2                             # exact: a power of two
        scores += norms                          # ||e||^2 - 2 x.e
        indices[start:stop] = scores.argmin(axis=1)
    return indices
