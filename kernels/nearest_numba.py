"""A fused, parallel nearest-code search on the CPU, compiled with Numba.

The reference (nearest_numpy.py) writes an (N, K) block of scores to memory
and reads it back for the argmin. This kernel keeps every score in registers:
it is a small GEMM micro-kernel with the argmin fused into its epilogue.

Tile shape (chosen once at import from the CPU)
    With AVX-512 (32 vector registers of 16 floats): ``ROWS`` = 8 rows of x
    against tiles of ``CODES`` = 32 codes, 16 zmm accumulators. Otherwise
    (AVX2, 16 registers of 8 floats): 3 rows against 32 codes, 12 ymm
    accumulators, the most that leave registers for a vector of codes and
    the broadcasts. Two FMA ports of 4-5 cycles' latency need about ten
    independent sums in flight: the earlier 4 x 16 tile had 8 and ran at
    53-84 GF/s where 3 x 32 runs at 98-119, on one core of an AVX-512 Xeon
    held to AVX2 (NOTES.md, round 8). ``MINIVQ_NUMBA_WIDE=0`` forces the AVX2
    tile (the tests use it to check both). LLVM's tuning for Skylake-class CPUs prefers 256-bit
    vectors even where AVX-512 exists; ``_vector_width_hint`` lifts that for
    this kernel alone (measured: 84 -> 108 GF/s on one core, NOTES.md).

Layout (``pack_codebook``, once per call)
    The codebook is cut into tiles of ``CODES`` codes. Each tile is stored
    transposed, ``packed[t, d, c] = -2 * e[CODES t + c, d]``, so the CODES
    values a step of the inner loop needs are contiguous (two vector
    registers). The last tile is padded with zero codes whose norm is +inf,
    so every tile is full width and no code ever takes a remainder path.
    Scaling by -2 is exact (a power of two), so nothing is lost by folding it
    in here. ``norms[t, c] = ||e||^2`` (+inf for padding). For the
    inner-product search (``metric="ip"``) the norms of real codes are zero,
    so the score is ``-2 x.e`` and the same argmin finds the largest ``x.e``.

Micro-kernel (the ``d`` loop)
    ROWS rows of x against one tile: ROWS x CODES running scores in a stack
    buffer that LLVM keeps in registers. Each step of d broadcasts ROWS values
    of x, loads CODES packed codes (2 zmm or 4 ymm) and does ROWS FMAs per
    register of codes. The scores
    start at ``||e||^2`` and accumulate ``x_d * (-2 e_d)``, so at the end they
    hold ``||e||^2 - 2 x.e`` (``||x||^2`` is dropped: it is the same for every
    code of a row and cannot change the argmin).

Epilogue (argmin, per lane, then per row)
    Every row of the block keeps a best score and index per *lane* (CODES of
    them, in a stack buffer in L1): after a tile, each lane takes the tile's
    score where it is strictly lower. That is a vector compare and two blends,
    with no horizontal minimum in the hot loop (measured: K=4096, D=64 went
    from 77 to 122 GF/s on one core). It is written as a select followed by
    an unconditional store: the ``if v < best: best = v`` form compiled to
    AVX's masked stores (``vmaskmovps``; with AVX-512, stores under a k-mask),
    slow on AMD's Zen cores: on a Zen 3 the select form takes 0.57-0.87x the
    time at N = 65536, K 512-4096, D 64-256, and 0.36x at D = 8 (NOTES.md
    round 15). Tiles come in increasing order, so a
    lane keeps the lowest index among its equal scores; after the last tile
    the row's CODES lanes are reduced to the smallest score, ties to the
    smaller index: ties go to the lowest index overall.

Blocking and threads
    ``prange`` hands out blocks of ``ROW_BLOCK`` = 64 rows (48 with the AVX2 tile; one thread: the same loops
    compiled serially, ``one_thread``). Inside a block the
    codebook is swept in blocks of tiles (``CODE_BLOCK_BYTES``: 32 KiB, what
    fits L1) and every
    micro-tile of the block runs over them before the next code block, so the
    codes come from cache, not from memory, however large the codebook.

Why ``fastmath={"contract"}`` and nothing more
    Contraction turns ``acc + x * e`` into one FMA. It changes the rounding
    compared with a separate multiply and add, but identically for every code:
    each code's score is the same sequence of operations (same start, same d
    order, same lane arithmetic) whichever tile or lane it lands in, so two
    identical codes always get bitwise-equal scores and the tie rule holds.
    ``reassoc`` would let LLVM reorder the sum over d, ``nnan``/``ninf`` would
    let it drop the IEEE comparison semantics the +inf padding relies on:
    neither is needed for speed here, so neither is allowed.

Compiled on first use per dtype and cached on disk (unless the tile is forced).

Where the CPU allows, the ``"numba"`` backend hands float32 searches to a
screen first (nearest_screened.py: bf16 on AMX tiles, else int16). It returns
this kernel's indices, so nothing above can tell, except by the clock; the
rows it cannot settle (NaN or inf, magnitudes near float32's range, dozens of
near-equal codes) come back here.
"""
import os

import numpy as np
from numba import get_num_threads, njit, prange, types
from numba.core import cgutils
from numba.core.errors import RequireLiteralValue
from numba.extending import intrinsic


def _host_has_avx512():
    """Whether LLVM sees AVX-512F on this CPU (it then has 32 vector registers of 16 floats)."""
    try:
        from llvmlite import binding
        return "+avx512f" in binding.get_host_cpu_features().flatten().split(",")
    except Exception:       # an llvmlite that cannot say: take the AVX2 tile, correct everywhere
        return False


WIDE = _host_has_avx512() and os.environ.get("MINIVQ_NUMBA_WIDE", "1") != "0"   # "0": the AVX2 tile (tests)
# Numba's disk cache keys on the CPU, not on these constants: a forced tile is compiled, never cached
_CACHE = "MINIVQ_NUMBA_WIDE" not in os.environ
ROWS = 8 if WIDE else 3         # rows of x per micro-tile
CODES = 32                      # codes per tile: two float32 registers per row with AVX-512 (zmm), four with AVX2
ROW_BLOCK = 64 if WIDE else 48  # rows per parallel task (a multiple of ROWS)
# packed codes a row block sweeps before the next: what fits L1 (with the wide tile the best of 16-128 KiB on an
# AVX-512 Xeon, 7-13 % faster than 128 KiB, benchmarks/NOTES.md round 4; with the AVX2 tile the best of 32-256 KiB
# on that Xeon held to AVX2, round 8)
CODE_BLOCK_BYTES = 32 * 1024
_ACC_SLOTS = ROWS * CODES       # stack buffer sizes must be plain constants for _stack_buffer
_LANE_SLOTS = (ROW_BLOCK + ROWS) * CODES


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


@intrinsic
def _vector_width_hint(typingctx):
    """Ask LLVM for 512-bit vectors in the calling function (a no-op without AVX-512).

    LLVM's tuning for Skylake-class CPUs prefers 256-bit vectors even where
    AVX-512 exists, so the micro-kernel would use half of each register. The
    function attributes below lift that preference for this function only;
    the rest of the process (and of Numba) is untouched.
    """
    def codegen(context, builder, signature, args):
        if WIDE:
            attributes = builder.function.attributes
            set.add(attributes, '"prefer-vector-width"="512"')      # llvmlite only validates keyword attributes
            set.add(attributes, '"min-legal-vector-width"="512"')
        return context.get_dummy_value()

    return types.none(), codegen


def one_thread():
    """Whether the calling thread's Numba count is 1 (``--threads 1``, a data-parallel worker): the
    parallel kernels then run their serial compile, which never enters Numba's threading layer. Beyond
    saving a launch, that keeps ``minivq train --workers N`` alive where Numba has neither OpenMP nor
    TBB: its fallback layer, ``workqueue``, aborts the process when two threads enter it at once."""
    return get_num_threads() == 1


def score_norms(codebook, metric="l2"):
    """The term every score starts from: ``||e||^2`` per code, or zeros for ``metric="ip"``."""
    if metric == "l2":
        return np.einsum("kd,kd->k", codebook, codebook)
    return np.zeros(codebook.shape[0], dtype=codebook.dtype)


def pack_codebook(codebook, metric="l2"):
    """``(packed, norms)``: the codebook in tiles of CODES codes, transposed and scaled by -2 (see the module doc).

    ``metric="ip"`` gives real codes a zero norm (the maximum-inner-product search); padding stays +inf.
    """
    k, d = codebook.shape
    tiles = -(-k // CODES)
    padded = np.zeros((tiles * CODES, d), dtype=codebook.dtype)
    padded[:k] = codebook
    norms = np.full(tiles * CODES, np.inf, dtype=codebook.dtype)
    norms[:k] = score_norms(codebook, metric)
    packed = np.ascontiguousarray(padded.reshape(tiles, CODES, d).transpose(0, 2, 1))
    packed *= -2
    return packed, norms.reshape(tiles, CODES)


def _nearest_loops(blocks):
    """The kernel, its row blocks handed out by ``blocks``: ``prange`` (parallel) or ``range`` (serial,
    ``one_thread``)."""
    def kernel(x, packed, norms, tiles_per_block, out, lows):
        n, dim = x.shape
        num_tiles = packed.shape[0]
        for block in blocks((n + ROW_BLOCK - 1) // ROW_BLOCK):
            _vector_width_hint()
            first = block * ROW_BLOCK
            rows = min(ROW_BLOCK, n - first)
            best = _stack_buffer(_LANE_SLOTS, x.dtype)       # best score so far, per row of the block and lane
            best_index = _stack_buffer(_LANE_SLOTS, np.int32)
            for r in range(_LANE_SLOTS):
                best[r] = np.inf
                best_index[r] = 0
            for tile_start in range(0, num_tiles, tiles_per_block):
                tile_stop = min(num_tiles, tile_start + tiles_per_block)
                for q in range(0, rows, ROWS):
                    row = _stack_buffer(ROWS, np.int64)      # the micro-tile's rows; past the end, repeat the last
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
                        base = t * CODES
                        for r in range(ROWS):
                            lane0 = (q + r) * CODES
                            for c in range(CODES):   # a select and a plain store: no masked store (module doc)
                                v = acc[r * CODES + c]
                                b = best[lane0 + c]
                                i = best_index[lane0 + c]
                                take = v < b
                                best[lane0 + c] = v if take else b
                                best_index[lane0 + c] = base + c if take else i
            for r in range(rows):
                lane0 = r * CODES
                low = best[lane0]
                index = best_index[lane0]
                for c in range(1, CODES):
                    v = best[lane0 + c]
                    i = best_index[lane0 + c]
                    if v < low or (v == low and i < index):
                        low = v
                        index = i
                out[first + r] = index
                lows[first + r] = low       # not finite where the row of x is not (or a score overflowed)
    return kernel


_nearest_kernel = njit(parallel=True, nogil=True, cache=_CACHE, fastmath={"contract"})(_nearest_loops(prange))
# the same loops for a thread with one Numba thread: no threading layer entered (one_thread)
_nearest_kernel_serial = njit(nogil=True, cache=_CACHE, fastmath={"contract"})(_nearest_loops(range))


def tiles_per_block(dim, itemsize):
    """How many packed tiles make one code block (``CODE_BLOCK_BYTES``; at least one tile)."""
    return max(1, CODE_BLOCK_BYTES // (max(1, dim) * CODES * itemsize))


def nearest_code_numba(x, codebook, metric="l2", check_x=None):
    """Index of the nearest code for every row of ``x`` (validated NumPy float arrays of one dtype).

    ``metric``: ``"l2"`` (squared distance) or ``"ip"`` (largest inner product). ``check_x``: called when
    some row's best score is not finite, which every row holding a NaN or an inf gives (its scores are
    all NaN or infinite), and which a finite row gives only when a score overflows; so the caller need
    not check x for NaN and inf in a pass of its own first (at N = 65536, D = 256 that pass was 5 of
    117 ms). It raises for a non-finite x; otherwise the indices are returned.
    """
    x = np.ascontiguousarray(x)
    packed, norms = pack_codebook(codebook, metric)
    out = np.empty(x.shape[0], dtype=np.int64)
    lows = np.empty(x.shape[0], dtype=x.dtype)        # each row's best score
    if x.shape[0]:
        compiled = _nearest_kernel_serial if one_thread() else _nearest_kernel
        compiled(x, packed, norms, tiles_per_block(x.shape[1], x.dtype.itemsize), out, lows)
        if check_x is not None and not np.isfinite(lows).all():
            check_x()
    return out
