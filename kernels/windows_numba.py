"""im2col and col2im on the CPU as compiled Numba loops (the reference: windows_numpy.py).

Both read and write channels-last rows, so the innermost loop is a contiguous
run of C numbers (a vectorised copy or add). im2col writes the padding as zeros
itself instead of copying the image into a padded buffer first, which saves
that pass; col2im adds each image's windows while the image (at most H*W*C
numbers) sits in cache, with no padded buffer and no final crop.

Serial on purpose. A ``prange`` version split the batch across the cores and
made the training step slower (785 ms against 621 for NumPy's copies, batch
128, two threads): OpenBLAS's threads keep spinning for a while after every
GEMM, so Numba's threads fought them for the cores. The serial loops beat
NumPy's copies by about 10 % of the whole step (benchmarks/NOTES.md).
"""
import numpy as np
from numba import njit

from .windows_numpy import output_size


@njit(nogil=True, cache=True)
def _im2col(image, kh, kw, sh, sw, ph, pw, oh, ow, out):
    n, h, w, c = image.shape
    for task in range(n * oh):                  # one row of windows of one image per iteration
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


@njit(nogil=True, cache=True)
def _col2im(cols, kh, kw, sh, sw, ph, pw, oh, ow, out):
    n, h, w, c = out.shape
    for b in range(n):
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
    """The loops' geometry arguments: kernel, stride, padding, then the window counts OH, OW."""
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    return kh, kw, sh, sw, ph, pw, output_size(h, kh, sh, ph), output_size(w, kw, sw, pw)


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
