"""The nearest-code search screened in int16, then decided in float32: the same answer, faster wherever the
CPU multiplies int16 quicker than the fused kernel's float32 FMAs run.

The fused float32 kernel (nearest_numba.py) runs near what the CPU's FMA units allow. Integer products
of int16 pairs, two added into each int32 lane, come faster and read half the bytes: ``vpdpwssd``
(AVX-512 VNNI: Intel since Cascade Lake, AMD since Zen 4) at 184 G multiply-adds a second on one core of
the Xeon of benchmarks/NOTES.md round 11, against 111 G float32 FMAs; its ymm form (AVX-VNNI: Intel
client cores since Alder Lake, without AVX-512); and on AVX2 CPUs without either ``vpmaddwd`` and
``vpaddd``, the same sums in two instructions (round 12: 1.2-1.4x the fused kernel held to AVX2 where
the codebook is large). ``product_name()`` picks.
About twelve bits a number cannot pick the nearest code, but they can rule codes out with a proof, and
the few left are scored exactly as the fused kernel scores them (screen.py). The result is the fused
kernel's, index for index and tie for tie.

Quantising (each row of x by itself, the codebook with one scale; L = ``levels(D)``)
    x~_d = rint(L x_d / max|x|),  e~_d = rint(L e_d / max|e|),  both in [-L, L] (int16)
    with sx = max|x| / L and se = max|e| / L, x is about sx x~ and e about se e~.
    int32: z = x~.e~ exactly: L is the largest with D' L^2 < 2^31 (D' = D rounded up to even), so no
    lane can wrap; L is 2896 at D = 256 and at most 32767 (so no -32768, the one input ``vpmaddwd``
    cannot take exactly).
    screen: s'_e = ||e||^2 + f float32(z), f = float32(-2 sx se), in float32 arithmetic

The certificate (``margin``)
    x.e - sx se x~.e~ = (x - sx x~).e + sx x~.(e - se e~). Each rounding is off by at most half a step,
    dx = sx (1/2 + 2^-20) and de = se (1/2 + 2^-20) (the 2^-20 covers the float64 products before rint),
    and ||sx x~||_1 <= ||x||_1 + D dx, so

        |x.e - sx se x~.e~| <= R = dx max ||e||_1 + de (||x||_1 + D dx)

    With P = ||x|| max ||e||, Nmax = max ||e||^2, u = 2^-23 and g = D u / (1 - D u) (as in nearest_amx.py):

        B = 2 R                                  the quantising, doubled by the score's -2
          + (2 g + 2^-21)(Nmax + 2.1 P + 2 R)     the fused kernel's float32 sum; the screen's five
                                                 roundings (f, z to float32, the product, the norm's add)
          + D 2^-120                             subnormal results anywhere

    bounds |s' - s^| for every code of the row, s^ being the fused kernel's float32 score; screen.py rules
    out every code over the row's lowest s' plus 2B. R shrinks as 1/L: at D = 256 the margin is a few
    hundredths of the spread of a row's scores over random codes, and one or two codes are left a row.

The sweep (``_screen_loops``) is nearest_amx.py's without the tiles: tasks of ``TASK_ROWS`` rows run in
parallel, quantise their rows (with each row's margin), and sweep the codebook in blocks of
``CODE_BLOCK_BYTES`` of int16, scoring 32 rows x 32 codes at a time (a product of ``simd.PRODUCTS``) and keeping
the codes within each row's running threshold (``screen.scan``); ``screen.decide`` settles them.

What goes back to the fused kernel: the whole search (``nearest_code_int16`` returns None) for float64
inputs, a CPU or a Numba with none of the products, D over ``MAX_DIM``, a codebook holding NaN or inf or one
near float32's range; single rows (spilled) holding NaN or inf, near float32's range, or meeting more
than ``CAPACITY`` near-equal codes at once. ``MINIVQ_NUMBA_INT16=0`` turns this screen off.
"""
import math
import os

import numpy as np
from numba import get_num_threads, njit, prange

from .screen import CAPACITY, CODES, FLOAT32_MAX, RANGE_LIMIT, ROWS, decide, row_terms, scan
from .simd import PRODUCTS, named_block_product, target_features

PAIR_BYTES = 2 * 2 * CODES      # one pair of features of a block of 32 codes: 128 bytes
MAX_DIM = 65536                 # L >= 181 (about eight bits) up to here
TASK_ROWS = 128                 # rows per parallel task
CODE_BLOCK_BYTES = 128 * 1024   # int16 codes a task sweeps before the next block


def levels(dim):
    """L: the largest integer with ``D' L^2 < 2^31`` (``D'``: dim rounded up to even), at most 32767."""
    padded = dim + dim % 2
    level = min(32767, math.isqrt((2 ** 31 - 1) // padded))
    while padded * level * level >= 2 ** 31:
        level -= 1
    return level


@njit(nogil=True, cache=True)
def _row_to_int16(x, x_bits, i, level, out, t):
    """Row i of x quantised into row t of ``out`` (int16, ``L x / max|x|`` rounded); ``(||x_i||, ||x_i||_1,
    max |x_id|)`` (``screen.row_terms``; NaN or inf make the norm NaN or inf). ``x_bits``: x viewed as
    uint32."""
    norm, absolute, peak = row_terms(x, x_bits, i)
    inverse = level / peak if 0 < peak <= FLOAT32_MAX else 0.0
    row, source = out[t], x[i]          # views, and rint through int32: LLVM vectorises it (vcvtpd2dq)
    for d in range(source.shape[0]):
        row[d] = np.int16(np.int32(np.rint(np.float64(source[d]) * inverse)))
    return norm, absolute, peak


def _pack_loops(blocks):
    """The loops of ``pack_codes``, one block of 32 codes per task handed out by ``blocks`` (``prange``, or
    ``range`` at one thread); ``stats[p]``: block p's largest ``||e||`` and ``||e||_1`` (``screen.row_terms``)."""
    def pack(codebook, code_bits, inverse, norms, codes, screen_norms, stats):
        k, dim = codebook.shape
        for p in blocks(codes.shape[0]):
            for c in range(min(CODES, k - p * CODES)):
                code = p * CODES + c
                for f in range(dim):
                    level = np.rint(np.float64(codebook[code, f]) * inverse)
                    codes[p, f // 2, c // 16, c % 16, f % 2] = np.int16(level)
                norm, absolute, _ = row_terms(codebook, code_bits, code)
                screen_norms[p, c] = norms[code]
                stats[p, 0] = max(stats[p, 0], norm)
                stats[p, 1] = max(stats[p, 1], absolute)
    return pack


_pack_codes = njit(parallel=True, nogil=True, cache=True)(_pack_loops(prange))
_pack_codes_serial = njit(nogil=True, cache=True)(_pack_loops(range))


def pack_codes(codebook, norms):
    """``(codes, screen_norms, terms)``: the codebook in int16 for the block products (``simd.named_block_product``).

    ``codes[p, j, h, c, s]`` is e~ of code ``32 p + 16 h + c``, feature ``2 j + s``; zero past the codebook
    and its features. ``screen_norms[p, c]``: the float32 norms, +inf past the codebook. ``terms``:
    ``(max ||e||, max ||e||_1, max |norm|, se)`` in float64, se the codebook's step (max |e_d| / L).
    Expects a finite codebook.
    """
    k, dim = codebook.shape
    level = levels(dim)
    blocks = -(-k // CODES)
    peak = float(np.abs(codebook).max(initial=0.0))
    inverse = level / peak if peak > 0 else 0.0
    codes = np.zeros((blocks, -(-dim // 2), 2, 16, 2), dtype=np.int16)
    screen_norms = np.full((blocks, CODES), np.inf, dtype=np.float32)
    stats = np.zeros((blocks, 2))
    pack = _pack_codes_serial if get_num_threads() == 1 else _pack_codes
    pack(codebook, codebook.view(np.uint32), inverse, norms, codes, screen_norms, stats)
    norm_max = float(np.abs(norms).max(initial=0.0))
    return codes, screen_norms, (float(stats[:, 0].max()), float(stats[:, 1].max()), norm_max, peak / level)


@njit(nogil=True, cache=True)
def margin(x_norm, x_l1, x_step, code_norm, code_l1, norm_max, code_step, dim):
    """``2 B`` for one row (float32, rounded up): how far over the row's lowest screen score a code may
    still be the nearest (the module doc derives B; ``x_step``, ``code_step``: sx and se). Not finite
    where x is not."""
    u = 2.0 ** -23
    g = dim * u / (1 - dim * u)
    dx = x_step * (0.5 + 2.0 ** -20)
    de = code_step * (0.5 + 2.0 ** -20)
    r = dx * code_l1 + de * (x_l1 + dim * dx)
    p = x_norm * code_norm
    bound = 2 * r + (2 * g + 2.0 ** -21) * (norm_max + 2.1 * p + 2 * r) + dim * 2.0 ** -120
    return np.float32(2 * bound * (1 + 2.0 ** -20))      # the factor covers rounding to float32


def _screen_loops(blocks, product):
    """The sweep and the decisions, tasks handed out by ``blocks`` (``prange``, or ``range`` at one thread),
    blocks scored by the product named ``product`` (a name of ``simd.PRODUCTS``: closures over names, not
    over the intrinsics, so that Numba's cache keeps them, ``simd.named_block_product``)."""
    def kernel(x, x_bits, level, codes, screen_norms, neg2e, norms, code_terms, blocks_per_sweep, out, spilled):
        n, dim = x.shape
        code_blocks, pairs = codes.shape[0], codes.shape[1]
        row_bytes = pairs * 4
        block_bytes = pairs * PAIR_BYTES
        code_norm, code_l1, norm_max, code_step = code_terms
        for task in blocks((n + TASK_ROWS - 1) // TASK_ROWS):
            first = task * TASK_ROWS
            rows = min(TASK_ROWS, n - first)
            q = np.zeros((TASK_ROWS, 2 * pairs), dtype=np.int16)    # the task's rows in int16
            scales = np.zeros(TASK_ROWS, dtype=np.float32)         # each row's f = -2 sx se
            scores = np.empty((1, ROWS, CODES), dtype=np.float32)
            state = np.empty((3, TASK_ROWS), dtype=np.float32)     # thresholds, lowest scores, margins
            state[0] = FLOAT32_MAX
            state[1] = np.inf
            count = np.zeros(TASK_ROWS, dtype=np.int64)
            candidates = np.empty((TASK_ROWS, CAPACITY), dtype=np.int64)
            candidate_scores = np.empty((TASK_ROWS, CAPACITY), dtype=np.float32)
            for t in range(rows):
                x_norm, x_l1, x_peak = _row_to_int16(x, x_bits, first + t, level, q, t)
                x_step = x_peak / level
                state[2, t] = margin(x_norm, x_l1, x_step, code_norm, code_l1, norm_max, code_step, dim)
                if not x_norm * code_norm + norm_max <= RANGE_LIMIT:    # NaN, inf or near overflow
                    spilled[first + t] = True
                    state[0, t] = -np.inf
                else:
                    scales[t] = np.float32(-2 * x_step * code_step)
            for sweep_start in range(0, code_blocks, blocks_per_sweep):
                sweep_stop = min(code_blocks, sweep_start + blocks_per_sweep)
                for sub in range(0, rows, ROWS):
                    sub_rows = min(ROWS, rows - sub)     # rounded up to whole register blocks inside: q has the rows
                    for block in range(sweep_start, sweep_stop):
                        named_block_product(product, q.ctypes.data + sub * row_bytes, row_bytes, sub_rows,
                                            codes.ctypes.data + block * block_bytes, pairs,
                                            scales.ctypes.data + sub * 4, scores.ctypes.data)
                        scan(scores, 0, sub_rows, screen_norms, block, sub, state, count, candidates,
                             candidate_scores)
            decide(x, first, rows, neg2e, norms, candidates, candidate_scores, count, state[0], out, spilled)
    return kernel


_screen_kernels = {name: (njit(parallel=True, nogil=True, cache=True)(_screen_loops(prange, name)),
                          njit(nogil=True, cache=True)(_screen_loops(range, name)))
                   for name in PRODUCTS}     # (parallel, one thread), compiled on first use


def blocks_per_sweep(dim):
    """How many blocks of 32 codes a task sweeps at a time (``CODE_BLOCK_BYTES`` of int16; at least one)."""
    return max(1, CODE_BLOCK_BYTES // (-(-max(1, dim) // 2) * PAIR_BYTES))


# ---------------------------------------------------------------- which block product, checked before first use
def _block_call(product):
    def call(q, codes, scales, out):
        named_block_product(product, q.ctypes.data, q.shape[1] * 2, q.shape[0], codes.ctypes.data,
                            q.shape[1] // 2, scales.ctypes.data, out.ctypes.data)
    return njit(nogil=True, cache=True)(call)


block_calls = {name: _block_call(name) for name in PRODUCTS}   # q (rows, D even) @ codes


def _self_test(name):
    """Block products of ``name`` at the extremes of the range (the int32 sums at their largest) and at
    random, against NumPy."""
    rng = np.random.default_rng(0)
    dim = 40
    level = levels(dim)
    for extreme in (True, False):
        if extreme:
            q = np.where(rng.random((32, dim)) < 0.5, -level, level).astype(np.int16)
            e = np.where(rng.random((CODES, dim)) < 0.5, -level, level).astype(np.int16)
            e[0] = q[0]                       # the largest sum there is: D L^2
        else:
            q = rng.integers(-level, level + 1, (32, dim)).astype(np.int16)
            e = rng.integers(-level, level + 1, (CODES, dim)).astype(np.int16)
        codes = np.ascontiguousarray(e.reshape(2, 16, dim // 2, 2).transpose(2, 0, 1, 3))
        out = np.zeros((32, CODES), dtype=np.float32)
        block_calls[name](q, codes, np.ones(32, dtype=np.float32), out)
        expected = (q.astype(np.int64) @ e.astype(np.int64).T).astype(np.float32)
        if not np.array_equal(out, expected):
            return False
    return True


def compiled_products():
    """The block products Numba can compile and run here (``simd.PRODUCTS``' names, in their order)."""
    features = target_features()
    return [name for name, (_, needs) in PRODUCTS.items() if any(need <= features for need in needs)]


_checked = {}                     # product: whether its self-test passed
_chosen = {}                      # MINIVQ_NUMBA_INT16's value: the product it leads to


def product_name():
    """The block product the screen runs here, or None (no screen); worked out once per value of the switch.

    The first of ``simd.PRODUCTS`` that Numba compiles for and that passes ``_self_test``, but not
    ``madd-256`` on an AVX-512 CPU: the fused kernel's zmm FMAs are quicker there (0.77-1.01x, NOTES round
    12). ``MINIVQ_NUMBA_INT16=0`` turns the screen off; ``MINIVQ_NUMBA_INT16=<product>`` (``vnni-256``,
    ``madd-256``) asks for that one where it runs (to compare them); None where it does not.
    """
    switch = os.environ.get("MINIVQ_NUMBA_INT16", "")
    if switch not in _chosen:
        _chosen[switch] = _choose(switch)
    return _chosen[switch]


def _choose(switch):
    if switch == "0":
        return None
    avx512 = "+avx512f" in target_features()
    for name in compiled_products():
        if switch in PRODUCTS:
            if name != switch:
                continue
        elif name == "madd-256" and avx512:
            continue
        if name not in _checked:
            try:
                _checked[name] = _self_test(name)
            except Exception:         # an llvmlite that cannot emit the instructions: the fused kernel runs
                _checked[name] = False
        if _checked[name]:
            return name
    return None


def available():
    """Whether the int16 screen can run here (``product_name``)."""
    return product_name() is not None


def nearest_code_int16(x, codebook, norms):
    """``(indices, spilled)`` for float32 ``x`` (N, D) and ``codebook`` (K, D), or None where this path
    declines (module doc). ``norms``: the fused kernel's ``||e||^2`` (zeros for the inner-product search).
    Rows marked in ``spilled`` are left for the fused kernel; every other index is the fused kernel's.
    """
    product = product_name()
    if x.dtype != np.float32 or codebook.dtype != np.float32 or product is None:
        return None
    n, dim = x.shape
    if n == 0 or not 0 < dim <= MAX_DIM or codebook.shape[0] == 0 or not np.isfinite(codebook).all():
        return None
    codes, screen_norms, code_terms = pack_codes(codebook, norms)
    if not code_terms[0] + code_terms[2] <= RANGE_LIMIT:       # norms that overflowed included
        return None
    x = np.ascontiguousarray(x)
    neg2e = np.ascontiguousarray(codebook * np.float32(-2))    # exact: a power of two
    out = np.empty(n, dtype=np.int64)
    spilled = np.zeros(n, dtype=np.bool_)
    compiled = _screen_kernels[product][1 if get_num_threads() == 1 else 0]
    compiled(x, x.view(np.uint32), levels(dim), codes, screen_norms, neg2e, norms, np.array(code_terms),
             blocks_per_sweep(dim), out, spilled)
    return out, spilled
