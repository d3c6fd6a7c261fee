"""The nearest-code search screened in bf16 on AMX tiles, then decided in float32: the same answer, faster.

The fused float32 kernel (nearest_numba.py) runs at what the CPU's FMA units
allow, about as fast as SGEMM. On a CPU with AMX (amx.py) a bf16 tile product
runs about twenty times faster. bf16 keeps 8 significant bits, so its scores
cannot pick the nearest code themselves; but they can rule codes *out*, with a
proof, and the few codes they cannot rule out are scored again exactly as the
float32 kernel scores them. The result is the float32 kernel's, index for
index and tie for tie; only the time changes.

Scores (per row x of the input and code e)
    exact:    s_e  = ||e||^2 + sum_d x_d (-2 e_d)            (real numbers)
    float32:  s^_e = the fused kernel's value: start at ||e||^2 (float32),
              one FMA per feature d in order (``decide`` repeats it)
    screen:   s'_e = ||e||^2 + (tile product of bf16(x) and bf16(-2 e))

The certificate (``margin``)
    |s'_e - s^_e| <= B for every code of a row, where, with P = ||x|| max ||e||,
    Nmax = max ||e||^2, u = 2^-23 and g = D u / (1 - D u):

        B = 2 (2^-7 + 2^-16) P                 rounding x and e to bf16
          + (2 g + 2^-21) (Nmax + 2.1 P)       the float32 sums of both (any order), and the last add
          + D 2^-118 (1 + max|x|)(1 + max|e|)  subnormals flushed to zero by the tiles

    (bf16 rounds to nearest even: relative error 2^-8 per operand, so a
    product is off by at most 2^-7 + 2^-16 of |x_d e_d|; sum_d |x_d e_d| <=
    ||x|| ||e|| by Cauchy-Schwarz; g bounds a float32 sum of D terms; u is
    twice float32's unit roundoff, room for any rounding direction.)

    So if m' is the lowest screen score of the row, every code with the lowest
    float32 score has s' <= s^ + B <= s^_j + B <= s'_j + 2B for all j, that is
    s' <= m' + 2B. Every code above ``m' + 2B`` is ruled out.

The codes (``pack_codes``, once per call)
    bf16(-2 e) in the B tiles' layout (pairs of features of 16 codes a row),
    the norms padded with +inf, and the codebook's terms of the bound, in one
    parallel pass over the codebook.

The sweep (``_screen_loops``)
    Tasks of ``TASK_ROWS`` rows run in parallel. A task first rounds its rows
    to bf16 (to nearest even, into a buffer that stays in L2) with each row's
    margin 2B. It then sweeps the codebook in blocks (``CODE_BLOCK_BYTES`` of
    bf16, kept in L2), and for every 32 rows x 32 codes runs ``D / 32`` steps
    of four tile products (tiles 0-3 hold the 2 x 2 blocks of 16 x 16 scores,
    4-5 the rows, 6-7 the codes), stores the scores and compares them with
    each row's running threshold ``m' + 2B`` (screen.py's ``scan``, one block behind the
    tiles, so the compare never waits for the store). A score at or under it
    is kept as a candidate (up to ``CAPACITY`` a row) and may lower the
    threshold. The threshold only falls, so every code within the final one
    was kept when it came.

Deciding (screen.py's ``decide``)
    A row left with one candidate within its final threshold has its code.
    Where several remain, each gets its float32 score from the fused kernel's
    arithmetic, and the lowest wins, ties to the lowest index, as in the fused
    kernel.

What goes back to the fused kernel
    The whole search (``nearest_code_amx`` returns None) for float64 inputs, a
    CPU or kernel without AMX, a codebook holding NaN or inf or one near
    float32's range; single rows ("spilled") that hold NaN or inf, that are
    near float32's range (scores could overflow: the fused kernel's own
    handling stays in charge), or that meet more than ``CAPACITY``
    near-equal codes at once. nearest_screened.py puts the two together.
"""
import numpy as np
from numba import get_num_threads, njit, prange

from . import amx
from .amx import tile_config, tile_dot_bf16, tile_load, tile_release, tile_store, tile_zero
from .screen import CAPACITY, CODES, FLOAT32_MAX, RANGE_LIMIT, ROWS, decide, row_terms, scan

CHUNK = 32                      # features per tile step: 64 bytes of bf16
TASK_ROWS = 128                 # rows per parallel task
CODE_BLOCK_BYTES = 128 * 1024   # bf16 codes a task sweeps before the next block


@njit(nogil=True, cache=True)
def _bf16(bits):
    """The bf16 nearest (ties to even) to the float32 with these uint32 bits, as uint16 bits: keep the top
    16 bits after adding 0x7FFF plus the lowest kept bit."""
    return np.uint16((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))


@njit(nogil=True, cache=True)
def _row_to_bf16(x, x_bits, i, out, t):
    """Row i of x rounded to nearest even bf16 into row t of ``out`` (uint16 bits); ``(||x_i||, max |x_id|)``
    (``screen.row_terms``; NaN or inf in the row make the norm NaN or inf). ``x_bits``: x viewed as uint32
    (``_bf16`` rounds them)."""
    row, bits = out[t], x_bits[i]       # views: the loop vectorises
    for d in range(bits.shape[0]):
        row[d] = _bf16(bits[d])
    norm, _, peak = row_terms(x, x_bits, i)
    return norm, peak


def _pack_loops(blocks):
    """The loops of ``pack_codes``, one block of 32 codes per task handed out by ``blocks`` (``prange``, or
    ``range`` at one thread); ``stats[p]``: block p's largest ``||e||`` and ``|e_d|`` (``screen.row_terms``)."""
    def pack(codebook, code_bits, neg2e_bits, norms, tiles, screen_norms, stats):
        k, dim = codebook.shape
        for p in blocks(tiles.shape[0]):
            for c in range(min(CODES, k - p * CODES)):
                code = p * CODES + c
                for f in range(dim):
                    tiles[p, f // CHUNK, c // 16, (f % CHUNK) // 2, c % 16, f % 2] = _bf16(neg2e_bits[code, f])
                norm, _, peak = row_terms(codebook, code_bits, code)
                screen_norms[p, c] = norms[code]
                stats[p, 0] = max(stats[p, 0], norm)
                stats[p, 1] = max(stats[p, 1], peak)
    return pack


_pack_codes = njit(parallel=True, nogil=True, cache=True)(_pack_loops(prange))
_pack_codes_serial = njit(nogil=True, cache=True)(_pack_loops(range))


def pack_codes(codebook, norms, neg2e):
    """``(tiles, screen_norms, terms)``: the codes for the tiles, and the codebook's share of the bound.

    ``tiles[p, c, h, q, j, s]`` is bf16(-2 e), feature ``32 c + 2 q + s`` of code ``32 p + 16 h + j``: for
    each block of 32 codes and 32 features, two 1 KiB B tiles of 16 rows (feature pairs) x 16 codes x 2;
    zero past the codebook. ``screen_norms[p, j]``: the float32 norms, +inf past the codebook.
    ``terms``: ``(max ||e||, max |e_d|, max |norm|)`` in float64. ``neg2e``: ``-2 * codebook`` (float32).
    """
    k, dim = codebook.shape
    pairs = -(-k // CODES)
    tiles = np.zeros((pairs, -(-dim // CHUNK), 2, 16, 16, 2), dtype=np.uint16)
    screen_norms = np.full((pairs, CODES), np.inf, dtype=np.float32)
    stats = np.zeros((pairs, 2))
    pack = _pack_codes_serial if get_num_threads() == 1 else _pack_codes
    pack(codebook, codebook.view(np.uint32), neg2e.view(np.uint32), norms, tiles, screen_norms, stats)
    norm_max = float(np.abs(norms).max(initial=0.0))
    return tiles, screen_norms, (float(stats[:, 0].max()), float(stats[:, 1].max()), norm_max)


@njit(nogil=True, cache=True)
def margin(x_norm, x_peak, code_norm, code_peak, norm_max, dim):
    """``2 B`` for one row (float32, rounded up): how far over the row's lowest screen score a code may
    still be the nearest (the module doc derives B). Not finite where x is not."""
    u = 2.0 ** -23
    g = dim * u / (1 - dim * u)
    p = x_norm * code_norm
    bound = (2 * (2.0 ** -7 + 2.0 ** -16) * p + (2 * g + 2.0 ** -21) * (norm_max + 2.1 * p)
             + dim * 2.0 ** -118 * (1 + x_peak) * (1 + code_peak))
    return np.float32(2 * bound * (1 + 2.0 ** -20))      # the factor covers rounding to float32


def _screen_loops(blocks):
    """The sweep and the decisions, tasks handed out by ``blocks``: ``prange`` or ``range`` (one thread)."""
    def kernel(x, x_bits, tiles, screen_norms, neg2e, norms, code_terms, config, pairs_per_block, out, spilled):
        n, dim = x.shape
        chunks = tiles.shape[1]
        pairs = tiles.shape[0]
        row_bytes = chunks * CHUNK * 2
        code_norm, code_peak, norm_max = code_terms
        for task in blocks((n + TASK_ROWS - 1) // TASK_ROWS):
            first = task * TASK_ROWS
            rows = min(TASK_ROWS, n - first)
            x16 = np.zeros((TASK_ROWS, chunks * CHUNK), dtype=np.uint16)      # the task's rows in bf16
            scores = np.empty((2, ROWS, CODES), dtype=np.float32)    # two blocks: one computed, one compared
            state = np.empty((3, TASK_ROWS), dtype=np.float32)      # thresholds, lowest scores, margins
            state[0] = FLOAT32_MAX
            state[1] = np.inf
            count = np.zeros(TASK_ROWS, dtype=np.int64)
            candidates = np.empty((TASK_ROWS, CAPACITY), dtype=np.int64)
            candidate_scores = np.empty((TASK_ROWS, CAPACITY), dtype=np.float32)
            for t in range(rows):
                x_norm, x_peak = _row_to_bf16(x, x_bits, first + t, x16, t)
                state[2, t] = margin(x_norm, x_peak, code_norm, code_peak, norm_max, dim)
                if not x_norm * code_norm + norm_max <= RANGE_LIMIT:    # NaN, inf or near overflow
                    spilled[first + t] = True
                    state[0, t] = -np.inf
            tile_config(config.ctypes.data)
            for block_start in range(0, pairs, pairs_per_block):
                block_stop = min(pairs, block_start + pairs_per_block)
                for sub in range(0, rows, ROWS):
                    a = x16.ctypes.data + sub * row_bytes
                    # one block behind: while the tiles multiply block ``pair``, the scores of ``pair - 1``
                    # are compared (reading a tile's stored scores at once would wait for the store)
                    for pair in range(block_start, block_stop + 1):
                        if pair < block_stop:
                            tile_zero(0)
                            tile_zero(1)
                            tile_zero(2)
                            tile_zero(3)
                            b = tiles.ctypes.data + pair * chunks * 2048
                            for chunk in range(chunks):
                                tile_load(4, a + chunk * 64, row_bytes)
                                tile_load(5, a + 16 * row_bytes + chunk * 64, row_bytes)
                                tile_load(6, b + chunk * 2048, 64)
                                tile_load(7, b + chunk * 2048 + 1024, 64)
                                tile_dot_bf16(0, 4, 6)
                                tile_dot_bf16(1, 4, 7)
                                tile_dot_bf16(2, 5, 6)
                                tile_dot_bf16(3, 5, 7)
                        if pair > block_start:
                            scan(scores, (pair - 1) & 1, min(ROWS, rows - sub), screen_norms, pair - 1, sub,
                                  state, count, candidates, candidate_scores)
                        if pair < block_stop:           # scores[pair & 1][r, c]: row sub + r, code 32 pair + c
                            s = scores.ctypes.data + (pair & 1) * ROWS * CODES * 4
                            tile_store(0, s, CODES * 4)
                            tile_store(1, s + 64, CODES * 4)
                            tile_store(2, s + 16 * CODES * 4, CODES * 4)
                            tile_store(3, s + 16 * CODES * 4 + 64, CODES * 4)
            tile_release()
            decide(x, first, rows, neg2e, norms, candidates, candidate_scores, count, state[0], out, spilled)
    return kernel


_screen_kernel = njit(parallel=True, nogil=True, cache=True)(_screen_loops(prange))
_screen_kernel_serial = njit(nogil=True, cache=True)(_screen_loops(range))


def pairs_per_block(dim):
    """How many blocks of 32 codes make one code block (``CODE_BLOCK_BYTES`` of bf16; at least one)."""
    chunks = -(-max(1, dim) // CHUNK)
    return max(1, CODE_BLOCK_BYTES // (chunks * 2048))


def nearest_code_amx(x, codebook, norms):
    """``(indices, spilled)`` for float32 ``x`` (N, D) and ``codebook`` (K, D), or None where this path
    declines (module doc). ``norms``: the fused kernel's ``||e||^2`` (zeros for the inner-product search).
    Rows marked in ``spilled`` are left for the fused kernel: those holding NaN or inf, those near
    float32's range, and those with too many near-equal codes. Every other index is the fused kernel's.
    """
    if x.dtype != np.float32 or codebook.dtype != np.float32 or not amx.available():
        return None
    n, dim = x.shape
    if n == 0 or dim == 0 or codebook.shape[0] == 0 or not np.isfinite(codebook).all():
        return None
    neg2e = np.ascontiguousarray(codebook * np.float32(-2))    # exact: a power of two
    tiles, screen_norms, code_terms = pack_codes(codebook, norms, neg2e)
    if not code_terms[0] + code_terms[2] <= RANGE_LIMIT:     # norms that overflowed included
        return None
    x = np.ascontiguousarray(x)
    out = np.empty(n, dtype=np.int64)
    spilled = np.zeros(n, dtype=np.bool_)
    compiled = _screen_kernel_serial if get_num_threads() == 1 else _screen_kernel
    compiled(x, x.view(np.uint32), tiles, screen_norms, neg2e, norms, np.array(code_terms), amx.tile_config_bytes(),
             pairs_per_block(dim), out, spilled)
    return out, spilled
