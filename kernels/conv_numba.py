"""A convolution's forward product without the im2col copy, compiled with Numba (the reference: im2col + GEMM).

``correlate_numba`` computes ``im2col(image) @ wmat.T + bias`` for a channels-last
image, the product behind conv2d's forward and (on the mirror geometry)
the input gradient of a stride-1 conv, but never writes the windows: the
micro-kernel reads each window straight from a zero-padded copy of the image.
Measured on one core of an AVX-512 Xeon, caches cold as in a training step
(benchmarks/NOTES.md, round 6): a 3x3 conv 128->128 at 8x8, batch 128,
27.7 ms with im2col and OpenBLAS's SGEMM, 21.2 ms here; 64->128 14.7 -> 9.1 ms.
The windows of a 3x3 conv are 9x its input, written and read back from beyond
the caches; the padded copy is 1.6x at 8x8, written once.

Micro-kernel (the nearest-code kernel's, nearest_numba.py, with gathered rows)
    ``ROWS`` output pixels against ``LANES`` output channels: the running sums
    sit in a stack buffer that LLVM keeps in vector registers (with AVX-512 8
    pixels x 32 channels, 16 zmm; otherwise 4 x 16, 8 ymm). For every tap
    (kh, kw) and input channel, it broadcasts one number of each pixel's
    window and does 2 * ROWS FMAs against LANES packed weights. The pixels of
    a tile may lie in different rows or images: each has its own base offset
    into the padded image, and a tap adds the same offset to all of them.
    Offsets are unsigned, so Numba emits no negative-index wraparound (it
    did, and it cost a fifth of the speed).

Layout (``pack_weight``)
    ``wmat`` (C_grid, kH*kW*C) is cut into tiles of LANES output channels,
    each stored transposed, ``packed[t, k, l] = wmat[LANES t + l, k]``, so a
    step of the inner loop reads LANES contiguous weights; the last tile is
    padded with zero channels and only the real ones are stored.

Rounding. Each output is a sum over (kh, kw, c) in that order, one FMA per
term (``fastmath={"contract"}`` and nothing more), started from the bias, so
it is deterministic and independent of the tile a pixel falls in, but not
bit-equal to a BLAS GEMM (which sums in blocks): the tests compare to the
reference with float tolerances, and every op's float64 gradcheck runs
through this kernel.

Threads: ``prange`` over blocks of ``ROW_BLOCK`` pixels, Numba's thread count
(``kernels.set_cpu_threads``); with one thread (each data-parallel worker) the same loops compiled
serially (``nearest_numba.one_thread``).
"""
import numpy as np
from numba import njit, prange

from .nearest_numba import _CACHE, WIDE, _stack_buffer, _vector_width_hint, one_thread

ROWS = 8 if WIDE else 4         # output pixels per micro-tile
LANES = 32 if WIDE else 16      # output channels per micro-tile: two vector registers per pixel
ROW_BLOCK = 64                  # pixels per parallel task (a multiple of ROWS)
_ACC_SLOTS = ROWS * LANES


@njit(nogil=True, cache=_CACHE)
def _pad(image, ph, pw, out):
    """``out`` (n, H + 2 ph, W + 2 pw, C) = ``image`` (n, H, W, C) with a border of zeros, written once."""
    n, h, w, c = image.shape
    wp = out.shape[2]
    for b in range(n):
        for y in range(out.shape[1]):
            inside = ph <= y < ph + h
            for x in range(wp):
                if inside and pw <= x < pw + w:
                    for ch in range(c):
                        out[b, y, x, ch] = image[b, y - ph, x - pw, ch]
                else:
                    for ch in range(c):
                        out[b, y, x, ch] = 0


def _correlate_loops(blocks):
    """The kernel, its pixel blocks handed out by ``blocks``: ``prange`` (parallel) or ``range`` (serial, see one_thread)."""
    def kernel(flat, padded_shape, window, packed, bias, out):
        # flat: the padded image (n, hp, wp, c) as one contiguous run; window: (kh, kw, sh, sw, oh, ow);
        # out: (n*oh*ow, C_grid) rows
        n, hp, wp, c = padded_shape
        kh, kw, sh, sw, oh, ow = window
        total = n * oh * ow
        per_image = oh * ow
        run = kw * c
        c_grid = out.shape[1]
        for block in blocks((total + ROW_BLOCK - 1) // ROW_BLOCK):
            _vector_width_hint()
            base = _stack_buffer(ROWS, np.uint64)       # where each pixel's window starts in ``flat``
            xd = _stack_buffer(ROWS, flat.dtype)
            first = block * ROW_BLOCK
            for q in range(first, min(first + ROW_BLOCK, total), ROWS):
                for r in range(ROWS):
                    p = min(q + r, total - 1)            # past the end: repeat the last pixel, never stored
                    b = p // per_image
                    i = (p - b * per_image) // ow
                    j = p - b * per_image - i * ow
                    base[r] = np.uint64(((b * hp + i * sh) * wp + j * sw) * c)
                for t in range(packed.shape[0]):
                    acc = _stack_buffer(_ACC_SLOTS, flat.dtype)     # acc[r * LANES + l]: pixel r, channel l
                    for r in range(ROWS):
                        for lane in range(LANES):
                            acc[r * LANES + lane] = bias[t * LANES + lane]
                    for a in range(kh):         # a window row (kw, c) is one contiguous run of the padded image
                        row = np.uint64(a * wp * c)
                        k0 = a * run
                        for u in range(run):
                            at = row + np.uint64(u)
                            for r in range(ROWS):
                                xd[r] = flat[base[r] + at]
                            for lane in range(LANES):
                                e = packed[t, k0 + u, lane]
                                for r in range(ROWS):
                                    acc[r * LANES + lane] += xd[r] * e
                    c0 = t * LANES
                    for r in range(min(ROWS, total - q)):
                        for lane in range(min(LANES, c_grid - c0)):
                            out[q + r, c0 + lane] = acc[r * LANES + lane]
    return kernel


_correlate = njit(parallel=True, nogil=True, cache=_CACHE, fastmath={"contract"})(_correlate_loops(prange))
_correlate_serial = njit(nogil=True, cache=_CACHE, fastmath={"contract"})(_correlate_loops(range))   # one thread: no threading layer


def pack_weight(wmat):
    """(C_grid, K) -> (tiles, K, LANES): tiles of LANES output channels, transposed, zero-padded (module doc)."""
    c_grid, k = wmat.shape
    tiles = -(-c_grid // LANES)
    padded = np.zeros((tiles * LANES, k), dtype=wmat.dtype)
    padded[:c_grid] = wmat
    return np.ascontiguousarray(padded.reshape(tiles, LANES, k).transpose(0, 2, 1))


def _padded(image, kernel, stride, padding):
    """The image zero-padded as one flat run, its padded height and width, and the grid's size (OH, OW)."""
    n, h, w, c = image.shape
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    hp, wp = h + 2 * ph, w + 2 * pw
    flat = np.empty(n * hp * wp * c, dtype=image.dtype)
    _pad(image, ph, pw, flat.reshape(n, hp, wp, c))
    return flat, hp, wp, ((hp - kh) // sh + 1, (wp - kw) // sw + 1)


def correlate_numba(image, wmat, kernel, stride, padding, bias, out):
    """``out`` (n*OH*OW, C_grid) = ``im2col(image) @ wmat.T`` (+ ``bias``) for a channels-last NumPy ``image``
    (n, H, W, C); ``out`` C-contiguous, of the image's dtype. Returns ``out``."""
    n, _, _, c = image.shape
    flat, hp, wp, (oh, ow) = _padded(image, kernel, stride, padding)
    packed = pack_weight(np.asarray(wmat, dtype=image.dtype))
    lanes = np.zeros(packed.shape[0] * LANES, dtype=image.dtype)
    if bias is not None:
        lanes[:wmat.shape[0]] = bias
    if out.size:
        compiled = _correlate_serial if one_thread() else _correlate
        compiled(flat, (n, hp, wp, c), (kernel[0], kernel[1], stride[0], stride[1], oh, ow), packed, lanes, out)
    return out
