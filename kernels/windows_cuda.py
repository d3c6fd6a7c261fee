"""im2col and col2im as one CUDA launch each (windows.cu), for convolutions on CuPy arrays.

The reference (windows_numpy.py) runs on CuPy arrays too, but as a padded copy, a strided view and
a copy for im2col, and kH*kW read-modify-write passes for col2im: launches that cost the host more
than the GPU. Here each is one launch that reads the image through its strides (an NCHW tensor's
NHWC view needs no copy first), with the reference's results to the bit (windows.cu says how).
"""
import numpy as np

from .cuda_modules import SUFFIX, THREADS, blocks, module
from .windows_numpy import output_size

SOURCE = "windows.cu"


def compile():
    """Compile windows.cu for the current device now (an error here means these copies are unusable)."""
    module(SOURCE)


def _geometry(shape, kernel, stride, padding):
    n, h, w, c = shape
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    oh, ow = output_size(h, kh, sh, ph), output_size(w, kw, sw, pw)
    return n, oh, ow, tuple(np.int32(v) for v in (h, w, c, kh, kw, sh, sw, ph, pw, oh, ow))


def _element_strides(a):
    return tuple(np.int64(s // a.itemsize) for s in a.strides)


def im2col_cupy(image, kernel, stride, padding):
    """Every window of ``image`` (n, H, W, C; any strides) as one row: contiguous (n*OH*OW, kH*kW*C)."""
    import cupy as cp
    n, oh, ow, geometry = _geometry(image.shape, kernel, stride, padding)
    with image.device:
        cols = cp.empty((n * oh * ow, kernel[0] * kernel[1] * image.shape[3]), dtype=image.dtype)
        if cols.size:
            module(SOURCE).get_function("im2col_" + SUFFIX[np.dtype(image.dtype)])(
                blocks(cols.size), (THREADS,), (image, cols, np.int64(cols.size), *geometry, *_element_strides(image)))
    return cols


def col2im_cupy(cols, out, kernel, stride, padding):
    """``out`` (n, H, W, C; any strides) = every row of ``cols`` added over its window; returns ``out``."""
    import cupy as cp
    _, _, _, geometry = _geometry(out.shape, kernel, stride, padding)
    with out.device:
        cols = cp.ascontiguousarray(cols)
        if out.size:
            module(SOURCE).get_function("col2im_" + SUFFIX[np.dtype(out.dtype)])(
                blocks(out.size), (THREADS,), (cols, out, np.int64(out.size), *geometry, *_element_strides(out)))
    return out
