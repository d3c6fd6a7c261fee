"""Convolution as plain loops: read this first, then the im2col machinery of conv.py.

``conv.py`` computes the same two functions with im2col, one matrix product and
col2im, which is fast but hides the definition. Here the definition is the code:

* ``conv2d_reference``: slide the kernel over the (zero-padded) input; each output
  pixel is one window of the input times the kernel, summed.
* ``conv_transpose2d_reference``: the other way round; each *input* pixel stamps a
  copy of the kernel, scaled by its value, into the output, and overlapping stamps add.

Forward only (no autograd), raw arrays in and a raw array out, NumPy or CuPy alike
(the array module comes from the input). They are slow, and meant to be: the tests
hold the fast ops against them, so they must stay simple enough to check by eye.
Layouts as PyTorch: NCHW; conv2d weight ``(C_out, C_in, kH, kW)``,
conv_transpose2d weight ``(C_in, C_out, kH, kW)``.
"""
from ..backend import get_array_module


def _pair(value):
    """2 -> (2, 2); (2, 3) -> (2, 3)."""
    return tuple(int(v) for v in value) if isinstance(value, (tuple, list)) else (int(value), int(value))


def conv2d_reference(x, weight, bias=None, stride=1, padding=0):
    """conv2d (cross-correlation, as PyTorch) by a loop over the output pixels.

    x (N, C_in, H, W), weight (C_out, C_in, kH, kW), bias (C_out,) or None
    -> (N, C_out, OH, OW) with OH = (H + 2 pH - kH) // sH + 1, OW likewise.
    """
    xp = get_array_module(x)
    (sh, sw), (ph, pw) = _pair(stride), _pair(padding)
    n, c_in, h, w = x.shape
    c_out, _, kh, kw = weight.shape
    # zero padding: pH rows above and below, pW columns left and right
    x = xp.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    oh, ow = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    y = xp.zeros((n, c_out, oh, ow), dtype=x.dtype)
    for i in range(oh):
        for j in range(ow):
            # the window under output pixel (i, j): kH x kW pixels from (i sH, j sW) of the padded input
            window = x[:, :, i * sh:i * sh + kh, j * sw:j * sw + kw]          # (N, C_in, kH, kW)
            # output channel d = the window times kernel d, summed over input channel c and offsets (a, b)
            y[:, :, i, j] = xp.einsum("ncab,dcab->nd", window, weight)      # (N, C_out)
    if bias is not None:
        y += bias.reshape(1, c_out, 1, 1)                                   # one number per output channel
    return y


def conv_transpose2d_reference(x, weight, bias=None, stride=1, padding=0, output_padding=0):
    """conv_transpose2d (as PyTorch) by scattering each input pixel times the kernel into the output.

    x (N, C_in, H, W), weight (C_in, C_out, kH, kW), bias (C_out,) or None
    -> (N, C_out, OH, OW) with OH = (H - 1) sH - 2 pH + kH + output_padding_H, OW likewise.
    It is the adjoint of conv2d: conv2d gathers a window into one pixel, this spreads one
    pixel over a window, with the same weight array.
    """
    xp = get_array_module(x)
    (sh, sw), (ph, pw), (oph, opw) = _pair(stride), _pair(padding), _pair(output_padding)
    n, c_in, h, w = x.shape
    _, c_out, kh, kw = weight.shape
    # the whole output before cropping; output_padding adds rows (columns) at the bottom (right)
    # that no stamp reaches: they only get the bias, and exist so that the size can match an input
    # of conv2d that a stride > 1 rounded down
    full = xp.zeros((n, c_out, (h - 1) * sh + kh + oph, (w - 1) * sw + kw + opw), dtype=x.dtype)
    for i in range(h):
        for j in range(w):
            # input pixel (i, j), one value per input channel c, times kernel (c, d): a kH x kW stamp per d
            stamp = xp.einsum("nc,cdab->ndab", x[:, :, i, j], weight)       # (N, C_out, kH, kW)
            # ... added where conv2d's window for output pixel (i, j) would have been
            full[:, :, i * sh:i * sh + kh, j * sw:j * sw + kw] += stamp
    # padding p takes p rows (columns) off each side: the transpose of conv2d adding them to its input
    oh = (h - 1) * sh - 2 * ph + kh + oph
    ow = (w - 1) * sw - 2 * pw + kw + opw
    y = xp.ascontiguousarray(full[:, :, ph:ph + oh, pw:pw + ow])
    if bias is not None:
        y += bias.reshape(1, c_out, 1, 1)
    return y
