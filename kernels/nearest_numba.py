"""A fused, parallel nearest-code search on the CPU, compiled with Numba.

The reference (nearest_numpy.py) writes an (N, K) block of scores to memory
and reads it back for the argmin. This kernel keeps every score in registers:
it is a small GEMM micro-kernel with the argmin fused into its epilogue.

Layout (``pack_codebook``, once per call)
    The codebook is cut into tiles of ``CODES`` = 16 codes. Each tile is
    stored transposed, ``packed[t, d, c] = -2 * e[16 t + c, d]``, so the 16
    values a step of the inner loop needs are contiguous (two AVX2 registers
    of float32). The last tile is padded with zero codes whose norm is +inf,
    so every tile is full width and no code ever takes a remainder path.
    Scaling by -2 is exact (a power of two), so nothing is lost by folding it
    in here. ``norms[t, c] = ||e||^2`` (+inf for padding). For the
    inner-product search (``metric="ip"``) the norms of real codes are zero,
    so the score is ``-2 x.e`` and the same argmin finds the largest ``x.e``.

Micro-kernel (the ``d`` loop)
    ``ROWS`` = 4 rows of x against one tile: 4 x 16 running scores in a stack
    buffer that LLVM keeps in registers (8 ymm accumulators). Each step of d
    broadcasts 4 values of x, loads 16 packed codes and does 8 vector FMAs.
    The scores start at ``||e||^2`` and accumulate ``x_d * (-2 e_d)``, so at
    the end they hold ``||e||^2 - 2 x.e`` (``||x||^2`` is dropped: it is the
    same for every code of a row and cannot change the argmin).

Epilogue (argmin, per row of the micro-tile)
    The minimum of the 16 scores; if it beats the row's best so far, the
    first lane equal to it is the new index. Tiles are visited in increasing
    order and a later tile must be strictly better to win, and within a tile
    the first equal lane wins: ties go to the lowest index.

Blocking and threads
    ``prange`` hands out blocks of ``ROW_BLOCK`` = 64 rows. Inside a block the
    codebook is swept in blocks of tiles that fit in L2 (``CODE_BLOCK_BYTES``)
    and every 4-row micro-tile of the block runs over them before the next
    code block, so large codebooks are read from L2, not from memory.

Why ``fastmath={"contract"}`` and nothing more
    Contraction turns ``acc + x * e`` into one FMA. It changes the rounding
    compared with a separate multiply and add, but identically for every code:
    each code's score is the same sequence of operations (same start, same d
    order, same lane arithmetic) whichever tile or lane it lands in, so two
    identical codes always get bitwise-equal scores and the tie rule holds.
    ``reassoc`` would let LLVM reorder the sum over d, ``nnan``/``ninf`` would
    let it drop the IEEE comparison semantics the +inf padding relies on:
    neither is needed for speed here, so neither is allowed.

Compiled on first use per dtype and cached on disk (``cache=True``).
"""
import numpy as np
from numba import njit, prange, types
from numba.core import cgutils
from numba.core.errors import RequireLiteralValue
from numba.extending import intrinsic

ROWS = 4                        # rows of x per micro-tile
CODES = 16                      # codes per tile (two AVX2 float32 registers per row)
ROW_BLOCK = 64                  # rows per parallel task (a multiple of ROWS)
CODE_BLOCK_BYTES = 128 * 1024   # packed codes a row block sweeps while they sit in L2
_ACC_SLOTS = ROWS * CODES       # stack buffer sizes must be plain constants for _stack_buffer
_BEST_SLOTS = ROW_BLOCK + ROWS


@intrinsic
def _stack_buffer(typingctx, size, dtype):
    """A scratch buffer of ``size`` (a compile-time constant) elements on the stack, as a raw pointer.

    An LLVM ``alloca`` that is only indexed with constants after unrolling is
    promoted to registers; a NumPy array from ``np.empty`` would be heap
    memory that every iteration loads and stores.
    """
    if not isinstance(size, types.IntegerLiteral):
        raise RequireLiteralValue("_stack_buffer needs a compile-time constant size")
    count = size.literal_value
    element = dtype.dtype

    def codegen(context, builder, signature, args):
        return cgutils.alloca_once(builder, context.get_value_type(element), size=count)

    return types.CPointer(element)(size, dtype), codegen


def pack_codebook(codebook, metric="l2"):
    """``(packed, norms)``: the codebook in tiles of CODES codes, transposed and scaled by -2 (see the module doc).

    ``metric="ip"`` gives real codes a zero norm (the maximum-inner-product search); padding stays +inf.
    """
    k, d = codebook.shape
    tiles = -(-k // CODES)
    padded = np.zeros((tiles * CODES, d), dtype=codebook.dtype)
    padded[:k] = codebook
    norms = np.full(tiles * CODES, np.inf, dtype=codebook.dtype)
    norms[:k] = np.einsum("kd,kd->k", codebook, codebook) if metric == "l2" else 0
    packed = np.ascontiguousarray(padded.reshape(tiles, CODES, d).transpose(0, 2, 1))
    packed *= -2
    return packed, norms.reshape(tiles, CODES)


@njit(parallel=True, nogil=True, cache=True, fastmath={"contract"})
def _nearest_kernel(x, packed, norms, tiles_per_block, out):
    n, dim = x.shape
    num_tiles = packed.shape[0]
    for block in prange((n + ROW_BLOCK - 1) // ROW_BLOCK):
        first = block * ROW_BLOCK
        rows = min(ROW_BLOCK, n - first)
        best = _stack_buffer(_BEST_SLOTS, x.dtype)       # best score so far, per row of the block
        best_index = _stack_buffer(_BEST_SLOTS, np.int64)
        for r in range(_BEST_SLOTS):
            best[r] = np.inf
            best_index[r] = 0
        for tile_start in range(0, num_tiles, tiles_per_block):
            tile_stop = min(num_tiles, tile_start + tiles_per_block)
            for q in range(0, rows, ROWS):
                row = _stack_buffer(ROWS, np.int64)              # the micro-tile's rows; past the end, repeat the last
                for r in range(ROWS):
                    row[r] = min(first + q + r, n - 1)
                for t in range(tile_start, tile_stop):
                    acc = _stack_buffer(_ACC_SLOTS, x.dtype)   # acc[r * CODES + c]: score of row r, code c
                    xd = _stack_buffer(ROWS, x.dtype)
                    for r in range(ROWS):
                        for c in range(CODES):
                            acc[r * CODES + c] = norms[t, c]
                    for d in range(dim):
                        for r in range(ROWS):
                            xd[r] = x[row[r], d]
                        for c in range(CODES):
                            e = packed[t, d, c]
                            for r in range(ROWS):
                                acc[r * CODES + c] += xd[r] * e
                    for r in range(ROWS):
                        lane0 = r * CODES
                        low = acc[lane0]
                        for c in range(1, CODES):
                            v = acc[lane0 + c]
                            low = v if v < low else low
                        if low < best[q + r]:
                            best[q + r] = low
                            for c in range(CODES):
                                if acc[lane0 + c] == low:
                                    best_index[q + r] = t * CODES + c
                                    break
        for r in range(rows):
            out[first + r] = best_index[r]


def tiles_per_block(dim, itemsize):
    """How many packed tiles make one L2-sized code block."""
    return max(1, CODE_BLOCK_BYTES // (max(1, dim) * CODES * itemsize))


def nearest_code_numba(x, codebook, metric="l2"):
    """Index of the nearest code for every row of ``x`` (validated NumPy float arrays of one dtype).

    ``metric``: ``"l2"`` (squared distance) or ``"ip"`` (largest inner product).
    """
    x = np.ascontiguousarray(x)
    packed, norms = pack_codebook(codebook, metric)
    out = np.empty(x.shape[0], dtype=np.int64)
    if x.shape[0]:
        _nearest_kernel(x, packed, norms, tiles_per_block(x.shape[1], x.dtype.itemsize), out)
    return out
