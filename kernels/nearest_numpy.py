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

Ties: ``argmin`` returns the first (lowest) index among equal scores. But
BLAS does not promise the same arithmetic for every column of a product:
OpenBLAS, for one, runs the columns at the edge of its register tiles
through other micro-kernels, so two *identical* codes can get scores one ulp
apart depending on where they sit (seen with K=100, D=64, float32). The
reference therefore maps every chosen code to the first copy of the same
vector (``first_copies``): duplicated codes, the one exact tie we can detect
without knowing x, always go to the lowest index. Two *different* codes at
the same true distance may still round differently, as in any GEMM
formulation.

The inner-product search (``metric="ip"``) takes the argmax of ``x.e`` over
the same chunked product; ``argmax`` returns the first of equal maxima, and
duplicated codes go to their first copy as above.

The same code runs on CuPy arrays (``xp = get_array_module(x)``), which is
how the GPU path of the benchmark gets its GEMM-based comparison point.
"""
import numpy as np

from minivq.backend import get_array_module, to_numpy

BLOCK_BYTES = 32 * 1024 * 1024   # the (rows, K) score block is kept under this size


def rows_per_chunk(num_codes, itemsize, block_bytes=BLOCK_BYTES):
    """How many rows of scores fit in ``block_bytes`` (at least one)."""
    return max(1, block_bytes // max(1, num_codes * itemsize))


def code_norms(codebook):
    """``||e_k||^2`` for every code, in the codebook's dtype."""
    xp = get_array_module(codebook)
    return xp.einsum("kd,kd->k", codebook, codebook)


def first_copies(codebook):
    """For every code, the lowest index holding a bitwise-identical vector (int64 (K,), on the host).

    One sort of the rows viewed as raw bytes: O(K log K) on a (K, D) array,
    small next to the (N, K, D) product.
    """
    host = np.ascontiguousarray(to_numpy(codebook))
    k, d = host.shape
    if d == 0:
        return np.zeros(k, dtype=np.int64)
    rows = host.view(np.dtype((np.void, d * host.dtype.itemsize))).reshape(k)
    _, first, inverse = np.unique(rows, return_index=True, return_inverse=True)
    return first[inverse.reshape(k)].astype(np.int64)


def nearest_code_numpy(x, codebook, block_bytes=BLOCK_BYTES, metric="l2"):
    """Index of the nearest code for every row of ``x``; ties to the lowest index.

    ``metric="l2"``: the smallest squared L2 distance; ``"ip"``: the largest
    inner product ``x.e``. ``x``: (N, D) and ``codebook``: (K, D), both float32
    or both float64, on the same array module (NumPy or CuPy). No validation
    here: the public entry point is ``minivq.kernels.nearest_code``. Returns
    int64 (N,).
    """
    xp = get_array_module(x, codebook)
    n = x.shape[0]
    indices = xp.empty(n, dtype=xp.int64)
    if n == 0:
        return indices
    step = rows_per_chunk(codebook.shape[0], codebook.dtype.itemsize, block_bytes)
    codebook_t = codebook.T
    if metric == "ip":
        for start in range(0, n, step):
            stop = min(n, start + step)
            indices[start:stop] = (x[start:stop] @ codebook_t).argmax(axis=1)     # max x.e
    else:
        norms = code_norms(codebook)
        for start in range(0, n, step):
            stop = min(n, start + step)
            scores = x[start:stop] @ codebook_t      # x.e for every (row, code) of the chunk
            scores *= -2                             # exact: a power of two
            scores += norms                          # ||e||^2 - 2 x.e
            indices[start:stop] = scores.argmin(axis=1)
    first = first_copies(codebook)
    if np.any(first != np.arange(first.shape[0])):      # duplicated codes: send ties to the first copy
        indices = xp.asarray(first)[indices]
    return indices
