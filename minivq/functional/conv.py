"""2-D convolution and transposed convolution, written by hand: im2col, GEMMs, col2im.

New here? Read conv_reference.py first: the same two ops as plain loops, the tests' reference.
Both ops are one *correlation* seen from its two ends. On one side lies the
**image** ``(N, C_img, H, W)``, which im2col reads windows from and col2im
adds windows back into; on the other lies the **grid** of windows
``(N, C_grid, OH, OW)``, one row of the GEMM per window. The weight, viewed as
a matrix ``wmat (C_grid, kH*kW*C_img)``, links them::

    grid  = im2col(image) @ wmat.T        conv2d forward,  conv_transpose2d input-gradient
    image = col2im(grid @ wmat)           conv2d input-gradient,  conv_transpose2d forward
    dW    = grid.T @ im2col(image)        the weight gradient of both

For ``conv2d`` the input is the image and the output the grid; for
``conv_transpose2d`` (the adjoint) it is the other way round. PyTorch's two
weight layouts, ``(C_out, C_in, kH, kW)`` and ``(C_in, C_out, kH, kW)``, both
put the grid's channels first, so one ``wmat`` serves both.

Layout, chosen by measurement (benchmarks/NOTES.md, conv sections). Activations
are NCHW in shape, as in PyTorch, but channels-last in memory: every conv returns
a view ``(N, C, H, W)`` of a contiguous ``(N, H, W, C)`` buffer, the elementwise
ops between layers keep that layout, and so the next conv reads its input as
rows ``(N*H*W, C)`` without a copy. A GEMM writes its output straight into such
rows, so no transpose runs between layers. On the image side a window row
``(kw, c)`` is one contiguous run of ``kW*C`` numbers, so im2col is one copy of
long runs (``minivq.kernels.im2col``: NumPy, a compiled Numba loop, or one CUDA launch). At
stride 1, col2im is replaced by an im2col of the grid with the kernel flipped
(a copy instead of kH*kW read-modify-write passes over the image). Any input
layout is accepted; a non-channels-last input costs one transposing copy.

Which side's windows. At stride 1 a conv's products can read the windows of either
side (``_mirror``), so the narrower side is copied: a conv2d whose output is the
narrow side runs as the transposed conv of its mirror (``_narrow_grid_geometry``),
and an input gradient reads the windows of gy when that copy is the smaller
(``_flipped_geometry``); the weight gradient then reads the same copy rather than
copying the windows of x again. Strided convs always copy the image's windows.

Without the windows. For float32 arrays, where Numba imports and either the calling thread runs one
Numba thread (a ``--workers`` worker, a one-thread run) or BLAS runs one thread per call (inside
``kernels.conv_threads``, as ``minivq train`` runs one process), ``kernels.direct_correlation`` says yes
and a pass over the windows runs compiled kernels that read each window in place (the image padded one
image at a time, in cache), the batch split over the calling thread's Numba threads:
``kernels.correlate`` for ``im2col(image) @ wmat.T``, ``kernels.correlate_weight_grad`` for
``grid_rows.T @ im2col(image)`` and ``kernels.correlate_adjoint`` for ``col2im(grid_rows @ wmat)``,
so no windows or columns are copied at all (benchmarks/NOTES.md, rounds 6 to 8). A 3x3 stride-1 conv's
``correlate`` and ``correlate_weight_grad`` run there by Winograd's F(4x4, 3x3) where both sides have
channels enough (``kernels.winograd_correlation``; kernels/winograd_numba.py), and an input gradient is
then taken in the mirror geometry, a forward product, rather than by ``correlate_adjoint`` (round 18).
Elsewhere (float64, CuPy, or BLAS with threads of its own) the passes below run as they are.

Memory and cache: one im2col (or col2im) buffer holds at most ``workspace_limit``
bytes (or one image's windows, if more); a batch whose buffer would be larger is
processed a few images at a time. The default is per device: 4 MiB on the CPU,
so a chunk's windows are still in cache when its GEMM reads them (cheaper than
streaming one big buffer through memory, even though the weight gradient then
copies the windows again), and 256 MiB on a GPU. When the batch fits in one
buffer, conv2d keeps the windows of x from forward for the weight gradient.
"""

import numpy as np

from .. import backend, kernels
from ..autograd import Function, Tensor
from ..backend import get_array_module


class _Workspace:
    limit = None        # bytes; None: the device's default (backend.default_workspace_bytes)


def set_workspace_limit(nbytes):
    """Let an im2col buffer hold at most ``nbytes`` (``None``: the device's default); returns the previous limit."""
    previous = _Workspace.limit
    _Workspace.limit = None if nbytes is None else _positive_int(nbytes, "workspace_limit nbytes")
    return previous


def workspace_limit(nbytes):
    """Within this block an im2col buffer holds at most ``nbytes`` (at least one image's worth).

    Batches whose buffer would be larger are processed in chunks of images;
    the results are the same, only the peak memory and the speed change.
    Outside such a block the limit is the device's default: a few MiB on the
    CPU, so that a chunk's windows are still in cache when its GEMM reads
    them, and 256 MiB on a GPU, where every chunk costs kernel launches.
    """
    _positive_int(nbytes, "workspace_limit nbytes")      # checked on entry, before the block runs
    return backend.setting(set_workspace_limit, nbytes)


def get_workspace_limit():
    """The limit set by ``workspace_limit`` / ``set_workspace_limit``, or None for the device's default."""
    return _Workspace.limit


# ---------------------------------------------------------------- geometry
class _Geometry:
    """The sizes of one correlation: image (N, C_img, H, W), grid (N, C_grid, OH, OW), kernel, stride, padding."""

    def __init__(self, n, c_img, h, w, c_grid, kernel, stride, padding):
        self.n, self.c_img, self.h, self.w, self.c_grid = n, c_img, h, w, c_grid
        (self.kh, self.kw), (self.sh, self.sw), (self.ph, self.pw) = kernel, stride, padding
        self.hp, self.wp = h + 2 * self.ph, w + 2 * self.pw          # padded image
        self.oh = (self.hp - self.kh) // self.sh + 1
        self.ow = (self.wp - self.kw) // self.sw + 1
        self.k = self.kh * self.kw * c_img                            # GEMM depth: one window

    def images_per_chunk(self, a):
        """Images per im2col / col2im buffer for arrays like ``a`` under the workspace limit (at least 1)."""
        limit = _Workspace.limit or backend.default_workspace_bytes(a)
        per_image = self.oh * self.ow * self.k * a.dtype.itemsize
        return max(1, limit // max(per_image, 1))


# ---------------------------------------------------------------- layout helpers
def _rows(a):
    """(n, C, H, W) -> (n*H*W, C), one row per pixel: a view when ``a`` is channels-last in memory, else one copy."""
    xp = get_array_module(a)
    n, c, h, w = a.shape
    return xp.ascontiguousarray(a.transpose(0, 2, 3, 1)).reshape(n * h * w, c)


def _from_rows(rows, n, h, w):
    """The inverse of ``_rows``: (n*H*W, C) -> (n, C, H, W), a channels-last view of ``rows`` (no copy)."""
    return rows.reshape(n, h, w, rows.shape[1]).transpose(0, 3, 1, 2)


def _weight_matrix(weight):
    """(C_grid, C_img, kH, kW) -> (C_grid, kH*kW*C_img), columns ordered (kh, kw, c) like an im2col row."""
    return weight.transpose(0, 2, 3, 1).reshape(weight.shape[0], -1)


def _weight_from_matrix(wmat, shape):
    """The inverse of ``_weight_matrix``: (C_grid, kH*kW*C_img) -> contiguous (C_grid, C_img, kH, kW)."""
    xp = get_array_module(wmat)
    c_grid, c_img, kh, kw = shape
    return xp.ascontiguousarray(wmat.reshape(c_grid, kh, kw, c_img).transpose(0, 3, 1, 2))


# ---------------------------------------------------------------- im2col / col2im
def _is_pointwise(g):
    """1x1 windows at stride 1 without padding: each window is one pixel."""
    return g.kh == g.kw == g.sh == g.sw == 1 and g.ph == g.pw == 0


def _im2col(image, g):
    """Every kH x kW window of ``image`` (n, C, H, W) as one row: (n*OH*OW, kH*kW*C), columns (kh, kw, c)."""
    if _is_pointwise(g):
        return _rows(image)                       # 1x1 windows are the pixels
    return kernels.im2col(image.transpose(0, 2, 3, 1), (g.kh, g.kw), (g.sh, g.sw), (g.ph, g.pw))


def _col2im(cols, g, out):
    """The adjoint of ``_im2col``: ``out`` (n, H, W, C) = each row of ``cols`` added back over its window."""
    return kernels.col2im(cols, out, (g.kh, g.kw), (g.sh, g.sw), (g.ph, g.pw))


# ---------------------------------------------------------------- the passes over a batch
def _im2col_pass(image, g, wmat=None, grid_rows=None, bias=None, cols=None, keep_cols=False):
    """Read the windows of ``image`` chunk by chunk and use them for one or two GEMMs.

    ``wmat`` given: the grid ``im2col(image) @ wmat.T`` (+ bias), returned as (N, C_grid, OH, OW)
    (channels-last in memory). ``grid_rows`` (N*OH*OW, C_grid) given: the weight-gradient matrix
    ``grid_rows.T @ im2col(image)``. ``cols``: the windows of the whole batch, already made;
    ``keep_cols``: hand them back for reuse (only when the batch fits in one chunk).
    Returns (grid, dwmat, cols).
    """
    pointwise = _is_pointwise(g)    # its "windows" (cols) are a view of the image: nothing copied to reuse
    if (cols is None or pointwise) and kernels.direct_correlation(
            image, window_row=g.kw * g.c_img if grid_rows is not None else None, pointwise=pointwise):
        # compiled kernels read the windows in place (kernels.correlate, correlate_weight_grad): no copies
        channels_last = image.transpose(0, 2, 3, 1)
        window = (g.kh, g.kw), (g.sh, g.sw), (g.ph, g.pw)
        out = kernels.correlate(channels_last, wmat, *window, bias) if wmat is not None else None
        dwmat = (kernels.correlate_weight_grad(channels_last, grid_rows, *window)
                 if grid_rows is not None else None)
        return (_from_rows(out, g.n, g.oh, g.ow) if out is not None else None), dwmat, None
    xp = get_array_module(image)
    n, rows = g.n, g.oh * g.ow
    out = xp.empty((n * rows, g.c_grid), dtype=image.dtype) if wmat is not None else None
    dwmat = None
    # 1x1 windows are a view of the image: nothing is copied, so there is nothing to chunk
    step = max(n, 1) if cols is not None or _is_pointwise(g) else g.images_per_chunk(image)
    kept = None
    for start in range(0, n, step):
        stop = min(start + step, n)
        chunk_cols = cols if cols is not None else _im2col(image[start:stop], g)
        if wmat is not None:
            block = out[start * rows:stop * rows]
            xp.matmul(chunk_cols, wmat.T, out=block)
            if bias is not None:
                block += bias
        if grid_rows is not None:
            # dW = grid_rows.T @ cols, computed as (cols.T @ grid_rows).T: as fast on an idle machine,
            # and 3x faster when another process holds a core (OpenBLAS's two threads then stall
            # each other on the short-and-deep product; measured in benchmarks/NOTES.md, conv section)
            part = (chunk_cols.T @ grid_rows[start * rows:stop * rows]).T
            if dwmat is None:
                dwmat = part
            else:
                dwmat += part
        if keep_cols and step >= n:
            kept = chunk_cols
    if grid_rows is not None and dwmat is None:       # an empty batch
        dwmat = xp.zeros((g.c_grid, g.k), dtype=image.dtype)
    grid = _from_rows(out, n, g.oh, g.ow) if out is not None else None
    return grid, dwmat, kept


def _mirror(g):
    """For stride 1: the geometry in which the grid is the image and the image is the grid (or None).

    With stride 1, ``col2im(grid @ wmat)`` is itself a correlation: of the grid, padded by
    k - 1 - p, with the kernel flipped and its channel axes swapped (``_flip_matrix``), and
    the other way round. So every product of a stride-1 conv can read the windows of either
    side, and the narrower side's windows are the smaller copy.
    """
    if (g.sh, g.sw) != (1, 1) or g.ph > g.kh - 1 or g.pw > g.kw - 1:
        return None     # strided, or padding wider than the kernel
    return _Geometry(g.n, g.c_grid, g.oh, g.ow, g.c_img, (g.kh, g.kw), (1, 1),
                     (g.kh - 1 - g.ph, g.kw - 1 - g.pw))


def _flipped_geometry(g):
    """The mirror geometry, when an im2col of the grid is a smaller copy than col2im's columns.

    An im2col copy of the grid then replaces col2im's kH*kW read-modify-write passes over the image.
    """
    if g.h * g.w * g.c_grid > g.oh * g.ow * g.c_img:
        return None     # the grid's windows over the image would be a bigger copy than col2im's columns
    return _mirror(g)


def _narrow_grid_geometry(g):
    """The mirror geometry, when conv2d should run as the transposed conv of its mirror (or None).

    That is when the grid is the narrower side (a 3x3 conv from 128 to 32 channels): conv2d's
    forward then adds the image's rows @ W' back over windows (col2im, columns kH*kW*C_grid
    wide) instead of copying the image's windows (kH*kW*C_img wide), and backward reads the
    windows of the narrow gradient once for both the input and the weight gradient.
    """
    if g.h * g.w * g.c_grid >= g.oh * g.ow * g.c_img:
        return None
    return _mirror(g)


def _by_winograd(a, g):
    """Whether ``kernels.correlate`` in geometry ``g`` (None: none) runs by Winograd's F(4x4, 3x3) for arrays
    like ``a``."""
    return g is not None and kernels.winograd_correlation(a, (g.n, g.h, g.w, g.c_img), g.c_grid, (g.kh, g.kw),
                                                          (g.sh, g.sw), (g.ph, g.pw))


def _flip_matrix(wmat, g):
    """(C_grid, kH*kW*C_img) -> the mirror geometry's (C_img, kH*kW*C_grid): taps flipped, channels swapped."""
    c_grid, c_img, kh, kw = g.c_grid, g.c_img, g.kh, g.kw
    flipped = wmat.reshape(c_grid, kh, kw, c_img)[:, ::-1, ::-1, :].transpose(3, 1, 2, 0).reshape(c_img, -1)
    return get_array_module(wmat).ascontiguousarray(flipped)


def _col2im_pass(grid, wmat, g, bias=None, grid_rows=None, may_flip=True):
    """The image ``col2im(grid @ wmat)`` (+ bias) as (N, C_img, H, W), from the grid (N, C_grid, OH, OW).

    This is conv2d's input gradient and conv_transpose2d's forward; the image comes back
    channels-last in memory. ``grid_rows``: the grid as (N*OH*OW, C_grid), when the caller has it.
    """
    xp = get_array_module(grid)
    flipped = _flipped_geometry(g) if may_flip else None
    mirror = _mirror(g) if may_flip and flipped is None else None
    if _by_winograd(grid, mirror):
        flipped = mirror            # F(4x4, 3x3) in the mirror beats the adjoint kernel (NOTES.md, round 18)
    if flipped is not None:
        # image[c] = sum over d, i, j of grid_padded[d] shifted by (i, j), times W[d, c, kH-1-i, kW-1-j]
        image, _, _ = _im2col_pass(grid, flipped, wmat=_flip_matrix(wmat, g), bias=bias)
        return image
    if grid_rows is None:
        grid_rows = _rows(grid)
    if kernels.direct_correlation(grid, window_row=g.kw * g.c_img):
        # a compiled kernel adds each tile of grid @ wmat into the image as it goes: no columns
        image = kernels.correlate_adjoint(grid_rows, wmat, (g.n, g.h, g.w, g.c_img), (g.kh, g.kw), (g.sh, g.sw),
                                          (g.ph, g.pw), bias)
        return image.transpose(0, 3, 1, 2)
    n, rows = g.n, g.oh * g.ow
    image = xp.empty((n, g.h, g.w, g.c_img), dtype=grid.dtype)
    step = g.images_per_chunk(grid)
    for start in range(0, n, step):
        stop = min(start + step, n)
        _col2im(grid_rows[start * rows:stop * rows] @ wmat, g, image[start:stop])
        if bias is not None:
            image[start:stop] += bias
    return image.transpose(0, 3, 1, 2)


# ---------------------------------------------------------------- the ops
class Conv2d(Function):
    """y = conv2d(x, W) + b: x is the image, y the grid of windows."""

    def __init__(self, geometry):
        self.g = geometry

    def forward(self, x, weight, bias=None):
        need_w = self.needs_input_grad[1]
        self.weight_shape = weight.shape
        self.wmat = _weight_matrix(weight)
        self.mirror = _narrow_grid_geometry(self.g)
        self.mirror_wmat = self.x_rows = self.cols = self.x = None
        if self.mirror is not None:     # as the transposed conv of the mirror geometry (see there)
            self.x_rows = _rows(x) if need_w else None
            self.mirror_wmat = _flip_matrix(self.wmat, self.g)      # the mirror's weight, for backward too
            if kernels.direct_correlation(x):       # no copy to save: the kernel in the conv's own geometry
                y, _, _ = _im2col_pass(x, self.g, wmat=self.wmat, bias=bias)   # (NOTES.md, round 6: 0.98-0.995)
                return y
            return _col2im_pass(x, self.mirror_wmat, self.mirror, bias=bias,
                                grid_rows=self.x_rows, may_flip=False)
        y, _, self.cols = _im2col_pass(x, self.g, wmat=self.wmat, bias=bias, keep_cols=need_w)
        self.x = x if need_w else None      # to rebuild the windows when they were too big to keep
        return y

    def backward(self, gy):
        need_x, need_w = self.needs_input_grad[:2]
        need_b = len(self.needs_input_grad) > 2 and self.needs_input_grad[2]
        gx = gw = gb = None
        gy_rows = _rows(gy)
        mirror, mirror_wmat, x_rows = self.mirror, self.mirror_wmat, self.x_rows
        if mirror is None and need_x and need_w and self.cols is None:
            # the input gradient copies the windows of gy when that is the smaller copy (_flipped_geometry);
            # the weight gradient would then copy the windows of x again: one copy of gy's serves both
            mirror = _flipped_geometry(self.g)
            if mirror is not None:
                mirror_wmat, x_rows = _flip_matrix(self.wmat, self.g), _rows(self.x)
        if mirror is not None and (need_x or need_w):
            # both gradients read the windows of gy in the mirror geometry: dx = im2col'(gy) W'.T,
            # dW' = x_rows.T im2col'(gy), and dW is dW' with its taps flipped back
            gx, dwmat, _ = _im2col_pass(gy, mirror, wmat=mirror_wmat if need_x else None,
                                        grid_rows=x_rows if need_w else None)
            if need_w:
                gw = _weight_from_matrix(_flip_matrix(dwmat, mirror), self.weight_shape)
        else:
            if need_x:      # dL/dx = col2im(gy W)
                gx = _col2im_pass(gy, self.wmat, self.g, grid_rows=gy_rows)
            if need_w:      # dL/dW = gy im2col(x), summed over the batch by the GEMM
                _, dwmat, _ = _im2col_pass(self.x, self.g, grid_rows=gy_rows, cols=self.cols)
                gw = _weight_from_matrix(dwmat, self.weight_shape)
        if need_b:
            gb = kernels.column_sums(gy_rows)      # dL/db: gy summed over its pixels
        return gx, gw, gb


class ConvTranspose2d(Function):
    """y = conv_transpose2d(x, W) + b, the adjoint of conv2d: x is the grid, y the image."""

    def __init__(self, geometry):
        self.g = geometry

    def forward(self, x, weight, bias=None):
        self.weight_shape = weight.shape
        self.wmat = _weight_matrix(weight)
        x_rows = _rows(x) if self.needs_input_grad[1] or _flipped_geometry(self.g) is None else None
        self.x_rows = x_rows if self.needs_input_grad[1] else None
        return _col2im_pass(x, self.wmat, self.g, bias=bias, grid_rows=x_rows)

    def backward(self, gy):
        need_x, need_w = self.needs_input_grad[:2]
        need_b = len(self.needs_input_grad) > 2 and self.needs_input_grad[2]
        gx = gw = gb = None
        if need_x or need_w:
            # dL/dx = conv2d(gy, W); dL/dW = x im2col(gy): both read the same windows of gy
            gx, dwmat, _ = _im2col_pass(gy, self.g, wmat=self.wmat if need_x else None,
                                        grid_rows=self.x_rows if need_w else None)
            if need_w:
                gw = _weight_from_matrix(dwmat, self.weight_shape)
        if need_b:
            gb = kernels.column_sums(_rows(gy))
        return gx, gw, gb


# ---------------------------------------------------------------- public functions
def conv2d(x, weight, bias=None, stride=1, padding=0):
    """2-D convolution (cross-correlation, as PyTorch): x (N, C_in, H, W), weight (C_out, C_in, kH, kW)
    -> (N, C_out, (H + 2p - kH) // s + 1, (W + 2p - kW) // s + 1)."""
    x, weight, bias = _check_operands("conv2d", x, weight, bias, weight_in_dim=1, weight_out_dim=0)
    stride, padding = _pair(stride, "stride", 1), _pair(padding, "padding", 0)
    n, c_in, h, w = x.shape
    c_out, _, kh, kw = weight.shape
    if h + 2 * padding[0] < kh or w + 2 * padding[1] < kw:
        raise ValueError(f"conv2d kernel {kh}x{kw} (weight shape {weight.shape}) is larger than the padded "
                         f"input {h + 2 * padding[0]}x{w + 2 * padding[1]} (input shape {x.shape}, padding {padding})")
    g = _Geometry(n, c_in, h, w, c_out, (kh, kw), stride, padding)
    args = (x, weight) if bias is None else (x, weight, bias)
    return Conv2d(g)(*args)


def conv_transpose2d(x, weight, bias=None, stride=1, padding=0, output_padding=0):
    """Transposed 2-D convolution (the adjoint of conv2d, as PyTorch): x (N, C_in, H, W),
    weight (C_in, C_out, kH, kW) -> (N, C_out, (H - 1) s - 2p + kH + output_padding, ...)."""
    x, weight, bias = _check_operands("conv_transpose2d", x, weight, bias, weight_in_dim=0, weight_out_dim=1)
    stride, padding = _pair(stride, "stride", 1), _pair(padding, "padding", 0)
    output_padding = _pair(output_padding, "output_padding", 0)
    if output_padding[0] >= stride[0] or output_padding[1] >= stride[1]:
        raise ValueError(f"conv_transpose2d output_padding {output_padding} must be smaller than stride {stride}")
    n, c_in, h, w = x.shape
    _, c_out, kh, kw = weight.shape
    out_h = (h - 1) * stride[0] - 2 * padding[0] + kh + output_padding[0]
    out_w = (w - 1) * stride[1] - 2 * padding[1] + kw + output_padding[1]
    if out_h <= 0 or out_w <= 0:
        raise ValueError(f"conv_transpose2d output would be {out_h}x{out_w} for input shape {x.shape}, "
                         f"weight shape {weight.shape}, stride {stride}, padding {padding}, "
                         f"output_padding {output_padding}: padding is too large")
    # the grid of windows over the output image is exactly the input
    g = _Geometry(n, c_out, out_h, out_w, c_in, (kh, kw), stride, padding)
    args = (x, weight) if bias is None else (x, weight, bias)
    return ConvTranspose2d(g)(*args)


# ---------------------------------------------------------------- argument checks
def _positive_int(value, name):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
    return int(value)


def _pair(value, name, minimum):
    """An int or a pair of ints -> (int, int), each >= minimum."""
    def is_int(v):
        return isinstance(v, (int, np.integer)) and not isinstance(v, bool)
    items = (value, value) if is_int(value) else value
    if not isinstance(items, (tuple, list)) or len(items) != 2 or not all(is_int(v) for v in items):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(items) < minimum:
        rule = "positive" if minimum == 1 else "non-negative"
        raise ValueError(f"{name} must be {rule}, got {value!r}")
    return int(items[0]), int(items[1])


def _check_operands(op, x, weight, bias, weight_in_dim, weight_out_dim):
    x = x if isinstance(x, Tensor) else Tensor(x)
    weight = weight if isinstance(weight, Tensor) else Tensor(weight)
    layout = "(C_out, C_in, kH, kW)" if weight_in_dim == 1 else "(C_in, C_out, kH, kW)"
    if x.ndim != 4:
        raise ValueError(f"{op} expects input of shape (N, C_in, H, W), got shape {x.shape}")
    if weight.ndim != 4:
        raise ValueError(f"{op} expects weight of shape {layout}, got shape {weight.shape}")
    if x.dtype.kind != "f":
        raise TypeError(f"{op} needs a floating-point input, got dtype {x.dtype}")
    if weight.dtype != x.dtype:
        raise TypeError(f"{op} input dtype {x.dtype} and weight dtype {weight.dtype} differ")
    if weight.shape[weight_in_dim] != x.shape[1]:
        raise ValueError(f"{op}: input shape {x.shape} has {x.shape[1]} channels but weight shape "
                         f"{weight.shape} {layout} expects {weight.shape[weight_in_dim]}")
    if min(weight.shape) == 0 or min(x.shape[1:]) == 0:
        raise ValueError(f"{op} needs non-empty channels, kernel and image, got input shape {x.shape} "
                         f"and weight shape {weight.shape}")
    devices = {backend.array_device(x.data), backend.array_device(weight.data)}
    if bias is not None:
        bias = bias if isinstance(bias, Tensor) else Tensor(bias)
        c_out = weight.shape[weight_out_dim]
        if bias.shape != (c_out,):
            raise ValueError(f"{op} bias must have shape ({c_out},) for weight shape {weight.shape}, "
                             f"got shape {bias.shape}")
        if bias.dtype != x.dtype:
            raise TypeError(f"{op} input dtype {x.dtype} and bias dtype {bias.dtype} differ")
        devices.add(backend.array_device(bias.data))
    if len(devices) > 1:
        raise ValueError(f"{op} operands are on different devices: {sorted(devices)}")
    return x, weight, bias
