"""The reference window copies of a convolution, on channels-last images: im2col and col2im.

``im2col`` copies every kH x kW window of an image (n, H, W, C) into one row
of a matrix (n*OH*OW, kH*kW*C), columns ordered (kh, kw, c); ``col2im`` is its
adjoint, adding each row back over its window. minivq.functional.conv turns
both convolutions into these copies plus one matrix product (see its
docstring for how the two ops share them).

Channels-last keeps a window row ``(kw, c)`` one contiguous run of ``kW*C``
numbers of the padded image, so im2col is one copy of long runs out of a
strided view. The same code runs on CuPy arrays (``xp`` from the data).
windows_numba.py is the parallel CPU version of the same two functions.
"""
import numpy as np

from minivq.backend import get_array_module

COL2IM_BLOCK_BYTES = 512 * 2 ** 10         # col2im adds into this much padded image at a time (about L2)


def output_size(size, kernel, stride, padding):
    """Windows along one axis: (size + 2 padding - kernel) // stride + 1."""
    return (size + 2 * padding - kernel) // stride + 1


def padded_image(image, padding):
    """``image`` (n, H, W, C) zero-padded to a new contiguous (n, H + 2 ph, W + 2 pw, C): one copy."""
    xp = get_array_module(image)
    n, h, w, c = image.shape
    ph, pw = padding
    padded = xp.empty((n, h + 2 * ph, w + 2 * pw, c), dtype=image.dtype)
    padded[:, :ph], padded[:, ph + h:] = 0, 0           # only the border is zeroed
    padded[:, :, :pw], padded[:, :, pw + w:] = 0, 0
    padded[:, ph:ph + h, pw:pw + w, :] = image
    return padded


def im2col_numpy(image, kernel, stride, padding):
    """Every window of ``image`` (n, H, W, C) as one row: contiguous (n*OH*OW, kH*kW*C), columns (kh, kw, c)."""
    xp = get_array_module(image)
    n, h, w, c = image.shape
    (kh, kw), (sh, sw) = kernel, stride
    oh, ow = output_size(h, kh, sh, padding[0]), output_size(w, kw, sw, padding[1])
    padded = padded_image(image, padding)
    s_n, s_h, s_w, s_c = padded.strides
    windows = xp.lib.stride_tricks.as_strided(
        padded, shape=(n, oh, ow, kh, kw, c), strides=(s_n, s_h * sh, s_w * sw, s_h, s_w, s_c))
    # one copy ((kw, c) is a contiguous run of the image); reshape can hand back a view (1x1 windows), hence
    # ascontiguousarray, which copies only then
    return xp.ascontiguousarray(windows.reshape(n * oh * ow, kh * kw * c))


def col2im_numpy(cols, out, kernel, stride, padding):
    """The adjoint of im2col: ``out`` (n, H, W, C) = the sum of every row of ``cols`` over its window.

    On the CPU, images are done a few at a time so that the block being added into stays
    in cache through its kH*kW passes. On a GPU every pass is one kernel launch, so the
    whole batch is done at once (kH*kW launches). Returns ``out``.
    """
    xp = get_array_module(cols)
    n, h, w, c = out.shape
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    oh, ow = output_size(h, kh, sh, ph), output_size(w, kw, sw, pw)
    hp, wp = h + 2 * ph, w + 2 * pw
    windows = cols.reshape(n, oh, ow, kh, kw, c)
    h_span, w_span = sh * (oh - 1) + 1, sw * (ow - 1) + 1
    block = n if xp is not np else max(1, COL2IM_BLOCK_BYTES // (hp * wp * c * cols.dtype.itemsize))
    for start in range(0, n, block):
        stop = min(n, start + block)
        target = xp.zeros((stop - start, hp, wp, c), dtype=cols.dtype)
        source = windows[start:stop]
        for i in range(kh):
            for j in range(kw):
                target[:, i:i + h_span:sh, j:j + w_span:sw, :] += source[:, :, :, i, j, :]
        out[start:stop] = target[:, ph:ph + h, pw:pw + w, :]
    return out
