"""What a certified screen of the nearest-code search does with its scores: keep the codes it cannot rule
out, then decide among them exactly as the fused float32 kernel would.

Two screens compute cheap scores s' of every code for a block of rows: bf16 on AMX tiles (nearest_amx.py)
and int16 (nearest_int16.py). Each proves a bound B with |s' - s^| <= B for every code of a row,
s^ being the fused kernel's float32 score (nearest_numba.py). So with m' the row's lowest screen score,
every code whose s^ is the lowest has s' <= m' + 2B: the margin ``2B`` per row is all this module needs.

``scan``: the codes of a 32 x 32 block of screen scores within each row's running threshold
(lowest so far + margin), kept as candidates (at most ``CAPACITY`` a row at once). The threshold only
falls, so every code within the final one was kept when it came.

``decide``: a row left with one candidate has its code; where several remain, their float32 scores come
from the fused kernel's own arithmetic and the lowest wins, ties to the lowest index. A row that met more
than ``CAPACITY`` near-equal codes at once is marked spilled and left to the fused kernel.
"""
import numpy as np
from numba import njit

from .nearest_numba import _stack_buffer
from .simd import float32_from_bits, lanes_within, lowest_bit, row_minimum, rows_within

ROWS = 32                       # rows of x per block of scores
CODES = 32                      # codes per block of scores
CAPACITY = 32                   # candidates a row may hold at once
FLOAT32_MAX = float(np.finfo(np.float32).max)
RANGE_LIMIT = 2.0 ** 100        # larger norms: the fused kernel decides (scores could overflow)


@njit(nogil=True, cache=True, fastmath={"reassoc", "contract"})
def row_terms(x, x_bits, i):
    """``(||x_i||, ||x_i||_1, max_d |x_id|)`` in float64, the row's share of a screen's bound.

    ``x_bits``: x viewed as uint32. The largest magnitude is taken on the bits with the sign cleared (the
    order of non-negative floats; a NaN's bits lie above inf's, so a NaN row has a NaN peak), an integer
    maximum that vectorises with the sums, where a float ``max`` would keep the loop scalar. The sums may
    be reassociated: they only feed the bound. NaN or inf in the row make the norm NaN or inf.
    """
    total = 0.0
    absolute = 0.0
    peak_bits = np.uint32(0)
    for d in range(x.shape[1]):
        v = abs(np.float64(x[i, d]))
        total += v * v
        absolute += v
        peak_bits = max(peak_bits, x_bits[i, d] & np.uint32(0x7FFFFFFF))
    return np.sqrt(total), absolute, np.float64(float32_from_bits(peak_bits))


@njit(nogil=True, cache=True)
def keep(codes, scores, count, limit):
    """Drop a row's candidates whose score is over ``limit``; the new count."""
    kept = 0
    for j in range(count):
        if scores[j] <= limit:
            codes[kept] = codes[j]
            scores[kept] = scores[j]
            kept += 1
    return kept


@njit(nogil=True, cache=True)
def scan(scores, half, rows, screen_norms, pair, sub, state, count, candidates, candidate_scores):
    """Compare a block's screen scores (``scores[half, r, c] + screen_norms[pair, c]``, rows ``sub + r``
    of the task) with the rows' thresholds, and keep the codes within them.

    ``state``: the task's thresholds, lowest screen scores and margins (float32 rows 0, 1, 2). A row with
    a score within its threshold first lowers it to the block's lowest score plus the margin, where that
    is lower, then keeps every code still within it. ``count[t]`` goes over the candidates' capacity
    (``candidates.shape[1]``, ``CAPACITY`` in both screens; the threshold to -inf) when they do not fit.
    """
    s = scores.ctypes.data + half * ROWS * CODES * 4
    norms_at = screen_norms.ctypes.data + pair * CODES * 4
    threshold_at = state.ctypes.data                          # row 0 of state
    hit = rows_within(s, norms_at, threshold_at + sub * 4)
    capacity = candidates.shape[1]
    for r in range(rows):
        if not hit >> r & 1:
            continue
        t = sub + r
        low = row_minimum(s + r * CODES * 4, norms_at)
        if low < state[1, t]:
            state[1, t] = low
            state[0, t] = low + state[2, t]
        lanes = lanes_within(s + r * CODES * 4, norms_at, state[0, t])
        while lanes:
            c = lowest_bit(lanes)
            lanes &= lanes - np.uint32(1)
            if count[t] == capacity:
                count[t] = keep(candidates[t], candidate_scores[t], count[t], state[0, t])
                if count[t] == capacity:
                    count[t] = capacity + 1
                    state[0, t] = -np.inf
                    break
            candidates[t, count[t]] = pair * CODES + c
            candidate_scores[t, count[t]] = scores[half, r, c] + screen_norms[pair, c]    # what the masks compared
            count[t] += 1


@njit(nogil=True, cache=True, fastmath={"contract"})
def decide(x, first, rows, neg2e, norms, candidates, candidate_scores, count, threshold, out, spilled):
    """Each row's code from its candidates within its final threshold: the only one, or else the lowest
    float32 score (the fused kernel's arithmetic), ties to the lowest index as in the fused kernel.

    The exact scores of all the task's rows run together, eight (row, code) chains at a time, so the FMA's
    latency is hidden even where a row has two candidates.
    """
    dim = x.shape[1]
    capacity = candidates.shape[1]
    pair_rows = np.empty(rows * capacity, dtype=np.int64)
    pair_codes = np.empty(rows * capacity, dtype=np.int64)
    pairs = 0
    for t in range(rows):
        if count[t] > capacity:
            spilled[first + t] = True
        if spilled[first + t]:
            continue
        kept = keep(candidates[t], candidate_scores[t], count[t], threshold[t])
        count[t] = kept
        if kept == 0:                      # cannot happen (the lowest score is always within): left, not guessed
            spilled[first + t] = True
        elif kept == 1:
            out[first + t] = candidates[t, 0]
        else:
            for j in range(kept):
                pair_rows[pairs] = first + t
                pair_codes[pairs] = candidates[t, j]
                pairs += 1
    exact = np.empty(pairs, dtype=np.float32)
    acc = _stack_buffer(8, np.float32)
    row = _stack_buffer(8, np.int64)
    code = _stack_buffer(8, np.int64)
    for j0 in range(0, pairs, 8):
        width = min(8, pairs - j0)
        for j in range(8):
            row[j] = pair_rows[j0 + min(j, width - 1)]
            code[j] = pair_codes[j0 + min(j, width - 1)]
            acc[j] = norms[code[j]]
        for d in range(dim):               # one FMA per feature in order, as the fused kernel scores
            for j in range(8):
                acc[j] += x[row[j], d] * neg2e[code[j], d]
        for j in range(width):
            exact[j0 + j] = acc[j]
    j = 0
    while j < pairs:                       # the pairs of a row are consecutive, in code order
        i = pair_rows[j]
        best = j
        j += 1
        while j < pairs and pair_rows[j] == i:
            if exact[j] < exact[best]:     # strict: the lowest index of a tie stays
                best = j
            j += 1
        out[i] = pair_codes[best]
