"""The fused CUDA nearest-code search: nearest_code.cu, compiled by CuPy (NVRTC) on first use.

See nearest_code.cu for the kernel itself. This module computes the code
norms with a small kernel of the same file (so identical codes get identical
norms), or passes zeros for the inner-product search (``metric="ip"``: the
kernel's score ``||e||^2 - 2 x.e`` becomes ``-2 x.e``), chooses the launch geometry, and splits the codebook over a second
grid dimension when there are too few rows to fill the GPU: each split keeps
the best (score, index) of its share of the codes and ``reduce_splits``
picks the winner per row, ties to the lower index.

CuPy is imported inside the functions only: importing this module (for its
constants, as the compile test does) needs NumPy alone.
"""
import os

import numpy as np

from .cuda_modules import SUFFIX, module

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "nearest_code.cu")
THREADS = 256
# Rows and codes of one block tile per dtype: 16 * TM and 16 * TN of the template arguments in
# the extern "C" wrappers of nearest_code.cu (tests/test_cuda_compile.py checks they agree).
GEOMETRY = {np.dtype(np.float32): (128, 128), np.dtype(np.float64): (64, 64)}
BLOCKS_PER_SM = 2      # what the register count (<= 128 per thread, 256 threads) allows


def _module():
    return module(os.path.basename(SOURCE))


def code_splits(n, k, dtype, sm_count):
    """``(splits, tiles_per_split)``: how the codebook is shared over gridDim.y.

    One split when the row blocks alone make two full waves of the GPU;
    otherwise enough splits to get there, none of them empty.
    """
    rows, codes = GEOMETRY[np.dtype(dtype)]
    row_blocks = -(-n // rows)
    tiles = -(-k // codes)
    target = 2 * BLOCKS_PER_SM * sm_count
    if row_blocks >= target:
        return 1, tiles
    splits = min(tiles, -(-target // row_blocks))
    per_split = -(-tiles // splits)
    return -(-tiles // per_split), per_split


def nearest_code_cupy(x, codebook, metric="l2"):
    """Index of the nearest code for every row of ``x`` (validated CuPy float arrays of one dtype).

    ``metric``: ``"l2"`` (squared distance) or ``"ip"`` (largest inner product).
    """
    import cupy as cp
    n, d = x.shape
    k = codebook.shape[0]
    if max(n, k, d) >= 2 ** 31:
        raise ValueError(f"the CUDA kernel takes N, K and D below 2**31, got shapes {x.shape} and {codebook.shape}")
    dtype = np.dtype(x.dtype)
    suffix = SUFFIX[dtype]
    with x.device:
        x = cp.ascontiguousarray(x)
        codebook = cp.ascontiguousarray(codebook)
        module = _module()
        out = cp.empty(n, dtype=cp.int64)
        if n == 0:
            return out
        if metric == "ip":
            norms = cp.zeros(k, dtype=dtype)      # score -2 x.e: the argmin is the largest inner product
        else:
            norms = cp.empty(k, dtype=dtype)
            module.get_function("code_norms_" + suffix)(
                (-(-k // THREADS),), (THREADS,), (codebook, np.int32(k), np.int32(d), norms))
        sm_count = cp.cuda.Device().attributes["MultiProcessorCount"]
        splits, per_split = code_splits(n, k, dtype, sm_count)
        part_score = cp.empty((splits, n) if splits > 1 else 1, dtype=dtype)
        part_index = cp.empty((splits, n) if splits > 1 else 1, dtype=cp.int32)
        rows, _ = GEOMETRY[dtype]
        module.get_function("nearest_code_" + suffix)(
            (-(-n // rows), splits), (THREADS,),
            (x, codebook, norms, np.int32(n), np.int32(k), np.int32(d), np.int32(per_split),
             out, part_score, part_index))
        if splits > 1:
            module.get_function("reduce_splits_" + suffix)(
                (-(-n // THREADS),), (THREADS,), (part_score, part_index, np.int32(n), np.int32(splits), out))
    return out
