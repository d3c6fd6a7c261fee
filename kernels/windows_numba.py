"""im2col and col2im on the CPU as parallel Numba loops (the reference: windows_numpy.py).

NumPy's copies run on one core; in a training step with two threads the
second core then waits through every im2col and col2im (a third of the step
at batch 128, benchmarks/NOTES.md). These loops split the batch across the
cores. Both read and write channels-last rows, so the innermost loop is a
contiguous run of C numbers (a vectorised copy or add); padding is written as
zeros here instead of being copied from a padded image, which saves that pass.

col2im adds each image's windows into that image only, so images are
independent and need no atomics: ``prange`` over images, and one image
(at most H*W*C numbers) stays in cache while its kH*kW passes add into it.
"""
import numpy as np
from numba import njit, prange


@njit(parallel=True, nogil=True, cache=True)
def _im2col(image, kh, kw, sh, sw, ph, pw, oh, ow, out):
    n, h, w, c = image.shape
    for task in prange(n * oh):                 # one output row of windows of one image per task
        b, i = task // oh, task % oh
        for j in range(ow):
            row = (b * oh + i) * ow + j
            for p in range(kh):
                y = i * sh - ph + p
                for q in range(kw):
                    x = j * sw - pw + q
                    base = (p * kw + q) * c
                    if 0 <= y < h and 0 <= x < w:
                        for ch in range(c):
                            out[row, base + ch] = image[b, y, x, ch]
                    else:
                        for ch in range(c):
                            out[row, base + ch] = 0


@njit(parallel=True, nogil=True, cache=True)
def _col2im(cols, kh, kw, sh, sw, ph, pw, oh, ow, out):
    n, h, w, c = out.shape
    for b in prange(n):
        for y in range(h):
            for x in range(w):
                for ch in range(c):
                    out[b, y, x, ch] = 0
        for i in range(oh):
            for j in range(ow):
                row = (b * oh + i) * ow + j
                for p in range(kh):
                    y = i * sh - ph + p
                    if y < 0 or y >= h:
                        continue
                    for q in range(kw):
                        x = j * sw - pw + q
                        if x < 0 or x >= w:
                            continue
                        base = (p * kw + q) * c
                        for ch in range(c):
                            out[b, y, x, ch] += cols[row, base + ch]


def _sizes(h, w, kernel, stride, padding):
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    return kh, kw, sh, sw, ph, pw, (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1


def im2col_numba(image, kernel, stride, padding):
    """As windows_numpy.im2col_numpy, for NumPy arrays."""
    n, h, w, c = image.shape
    sizes = _sizes(h, w, kernel, stride, padding)
    out = np.empty((n * sizes[-2] * sizes[-1], kernel[0] * kernel[1] * c), dtype=image.dtype)
    if out.size:
        _im2col(np.ascontiguousarray(image), *sizes, out)
    return out


def col2im_numba(cols, out, kernel, stride, padding):
    """As windows_numpy.col2im_numpy, for NumPy arrays (``out`` C-contiguous); returns ``out``."""
    n, h, w, c = out.shape
    if out.size:
        _col2im(np.ascontiguousarray(cols), *_sizes(h, w, kernel, stride, padding), out)
    return out
