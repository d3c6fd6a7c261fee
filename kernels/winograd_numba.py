"""A 3x3 stride-1 convolution's products by Winograd's minimal filtering F(4x4, 3x3), compiled with Numba.

A 3x3 correlation gives each 4x4 block ("tile") of output pixels from the 6x6 block of input pixels
under it. Lavin and Gray (2016, "Fast algorithms for convolutional neural networks") write that as 36
element-wise products in a transformed space:

    Y = A^T [ (G W G^T) * (B^T X B) ] A        X: 6x6 input block, W: 3x3 taps, Y: 4x4 outputs

with the constant matrices ``BT`` (B^T, 6x6), ``G`` (6x3) and ``AT`` (A^T, 4x6) below. Summed over the
input channels, the 36 products of a tile become 36 matrix products, one per point xi of the
transformed 6x6 block: ``M[xi] = U[xi] @ V[xi]``, U[xi] (tiles, C) the transformed input blocks and
V[xi] (C, C_grid) the transformed taps: 36 multiply-adds per tile and channel pair where the direct
product takes 144 (16 pixels of nine taps), 4x fewer, for the transforms of the activations (a few
small products with constant matrices per tile, about a tenth of the products' work) and of the taps.

The three products of a training step:
- forward: ``Y = out(U(x) @ V(W))``, each ``U(x)[xi] @ V[xi]`` by the direct kernel's micro-kernels as a
  1x1 product (conv_numba._correlate), all 36 planes and the threads' shares of the batch in one compiled
  loop; the transforms split the batch over the threads as the direct kernels do;
- input gradient: a stride-1 conv's input gradient is itself a 3x3 correlation (the mirror geometry,
  functional/conv.py), so the forward again;
- weight gradient: the adjoint of the forward's map W -> Y at fixed x, ``dW = G^T (sum over tiles of
  U(x)[xi]^T dM[xi]) G`` with ``dM = A dY A^T`` the gradient's tiles, the sums by the direct kernel's
  1x1 weight gradient over the threads' shares, or by OpenBLAS's GEMM where the batch is one share.

Tiles. The output (OH, OW) is covered by ceil(OH/4) x ceil(OW/4) tiles; a tile reaching past the last
row or column reads zeros beyond the padded image, and its outputs there are dropped (forward) or its
gradient is zero there (weight gradient). Each image is padded one at a time into a buffer that stays
in cache (conv_numba._fill). The 36 planes of U and M lie in one buffer, each a cache line further on
than its size, since the transforms touch all 36 at once (``_planes``), and with their rows rounded up
to whole blocks of ``GROUP`` (zeros), so that the 1x1 products always see blocks of pixels long enough
for their tiles.

Chunks. Where the batch runs as one share (one thread, a ``--workers`` worker) the forward takes it a GROUP
of tiles at a time (16 images at 8x8): transforms, products and output for one chunk before the next, so that
a chunk's planes (1.2 MB of U for 128 channels) are read back from the caches where the whole batch's (9.4 MB)
went to memory and back, the weights' 36 transformed planes read again from L3 for each chunk. One core of a
Zen 3, caches flushed before each call as a training step leaves them, batch 128 at 8x8: the forwards 0.81-0.84x
the time (128 -> 128 12.0 ms against 14.3), the one-thread step 0.94x (pairs 0.90-0.97; batch 32, whose planes
fit in L3 anyway, 0.99). Not over threads' shares: there each chunk enters Numba's threading layer three times,
and the two-thread forwards took 0.97-1.11x the time (NOTES.md, round 19). Nor the weight gradient, whose
one-share GEMM then sums 64 rows a call and reads and writes its 36 dV blocks once a chunk: 1.11x the time
for 128 -> 128, 1.24x for 256 channels.

Where (``applies``): 3x3 windows at stride 1, with 32 channels or more on both sides, and for a weight
gradient split over threads 64 or more on the image's side. In the VQ-VAE that is every 3x3 conv's products
(128 -> 128, the decoder's first 64 -> 128, the residual blocks' 128 -> 32 and their input gradients'
mirror 32 -> 128), but for the residual blocks' weight gradients (taken in the mirror, from 32 channels)
where the batch is split over threads. One core of a Zen 3, batch 128 at 8x8, against the direct kernel:
a 128 -> 128 conv's forward 2.1x faster, its weight gradient 2.2x; 64 -> 128 1.7x and 2.0x; the residual
128 -> 32 forward 1.1x and its mirror 32 -> 128 1.4x; the training step 0.74-0.89x the time on one thread
and 0.83-0.89x on two at batch 128, 0.86-0.93x and 0.88-0.95x at batch 32 (alternated in one process;
benchmarks/NOTES.md, round 18).

Rounding. Exact in exact arithmetic, not in float32: the transforms scale inputs by up to 8 and G holds
sixths. Measured against float64 on layers of 64 and 128 channels, an output is off by up to about 3e-6 of
the sum of its terms' magnitudes, where the direct kernel stays near 3e-7 (tests/test_kernels_winograd.py
holds it to 2e-5 of that sum, taken over what the transforms mix). ``MINIVQ_NUMBA_WINOGRAD=0`` turns this
path off: the direct kernel then runs every 3x3 conv.
"""
import os

import numpy as np
from numba import njit, prange

from . import conv_numba
from .conv_numba import _CACHE, _bounds, _fill

TILE = 4                            # output pixels a tile, along each side
ALPHA = TILE + 2                    # input pixels a tile, along each side
BT = np.array([[4, 0, -5, 0, 1, 0],
               [0, -4, -4, 1, 1, 0],
               [0, 4, -4, -1, 1, 0],
               [0, -2, -1, 2, 1, 0],
               [0, 2, -1, -2, 1, 0],
               [0, 4, 0, -5, 0, 1]], dtype=np.float64)
G = np.array([[1 / 4, 0, 0],
              [-1 / 6, -1 / 6, -1 / 6],
              [-1 / 6, 1 / 6, -1 / 6],
              [1 / 24, 1 / 12, 1 / 6],
              [1 / 24, -1 / 12, 1 / 6],
              [0, 0, 1]], dtype=np.float64)
AT = np.array([[1, 1, 1, 1, 1, 0],
               [0, 1, -1, 2, -2, 0],
               [0, 1, 1, 4, 4, 0],
               [0, 1, -1, 8, -8, 1]], dtype=np.float64)
POINTS = ALPHA * ALPHA              # planes xi of U and M
GG = np.kron(G, G)                  # (POINTS, 9): GG[ALPHA a + b, 3 k + l] = G[a, k] G[b, l], the taps' transform
MIN_CHANNELS = 32                   # fewer channels on either side: the direct kernel (``applies``)
MIN_IMAGE_CHANNELS = 64             # the same for the image's side of a weight gradient split over threads
SKEW = 64                           # bytes between one plane's end and the next one's start
GROUP = 64                          # a plane's rows come in blocks of this many (one image of its 1x1 products)


def enabled():
    """Whether the Winograd path may run (``MINIVQ_NUMBA_WINOGRAD=0`` turns it off)."""
    return os.environ.get("MINIVQ_NUMBA_WINOGRAD", "1") != "0"


def applies(image_shape, c_grid, kernel, stride, padding, weight_grad=False):
    """Whether this path takes ``correlate`` (or with ``weight_grad``, ``correlate_weight_grad``) of this geometry:
    3x3 windows at stride 1, padding of at most 2 (every tile's block then starts inside the padded image), an
    output at least one pixel wide, and enough channels for the products to outweigh the transforms: at least
    MIN_CHANNELS on both sides, and for a weight gradient split over threads MIN_IMAGE_CHANNELS on the image's
    (the kernels' 1x1 sums run their vector lanes along it: from 32 channels they were 0.93-1.07x the direct
    kernel's time; one share goes to BLAS's GEMM, 1.6-2.3x faster there; benchmarks/NOTES.md, round 18)."""
    _, h, w, c = image_shape
    narrow_image = weight_grad and c < MIN_IMAGE_CHANNELS and conv_numba._share_count() > 1
    wide = min(c, c_grid) >= MIN_CHANNELS and not narrow_image
    return (enabled() and tuple(kernel) == (3, 3) and tuple(stride) == (1, 1) and wide
            and all(0 <= p <= 2 for p in padding) and h + 2 * padding[0] >= 3 and w + 2 * padding[1] >= 3)


def _tiles(h, w, padding):
    """(OH, OW, TH, TW): the output and its tiles."""
    oh, ow = h + 2 * padding[0] - 2, w + 2 * padding[1] - 2
    return oh, ow, -(-oh // TILE), -(-ow // TILE)


# ---------------------------------------------------------------- the transforms of the activations
# Each transform runs along the block's columns into a small buffer in L1, then along its rows, each step over
# runs of C channels (views, indexed with an unsigned ``ch``: no negative-index wraparound, so the loops
# vectorise). ``f``: the coefficients 2, 4, 5 and 8 in the arrays' dtype (a float32 times a Python number
# would be computed in float64).
@njit(inline="always", fastmath={"contract"})
def _bt_rows(outs, ins, f, c):
    # outs[k] = (B^T ins)[k]: six runs of C numbers from six
    o0, o1, o2, o3, o4, o5 = outs
    x0, x1, x2, x3, x4, x5 = ins
    f2, f4, f5 = f[0], f[1], f[2]
    for ch in range(np.uint64(c)):
        a, b, d, e = x1[ch], x2[ch], x3[ch], x4[ch]
        o0[ch] = f4 * x0[ch] - f5 * b + e
        o1[ch] = e + d - f4 * (a + b)
        o2[ch] = e - d + f4 * (a - b)
        o3[ch] = e - b + f2 * (d - a)
        o4[ch] = e - b - f2 * (d - a)
        o5[ch] = f4 * a - f5 * d + x5[ch]


@njit(inline="always", fastmath={"contract"})
def _at_rows(outs, ins, f, c):
    # outs[k] = (A^T ins)[k]: four runs of C numbers from six
    o0, o1, o2, o3 = outs
    m0, m1, m2, m3, m4, m5 = ins
    f2, f4, f8 = f[0], f[1], f[3]
    for ch in range(np.uint64(c)):
        a, b, d, e = m1[ch], m2[ch], m3[ch], m4[ch]
        o0[ch] = m0[ch] + a + b + d + e
        o1[ch] = a - b + f2 * (d - e)
        o2[ch] = a + b + f4 * (d + e)
        o3[ch] = a - b + f8 * (d - e) + m5[ch]


@njit(inline="always", fastmath={"contract"})
def _a_rows(outs, ins, f, c):
    # outs[k] = (A ins)[k]: six runs of C numbers from four
    o0, o1, o2, o3, o4, o5 = outs
    g0, g1, g2, g3 = ins
    f2, f4, f8 = f[0], f[1], f[3]
    for ch in range(np.uint64(c)):
        a, b, d, e = g0[ch], g1[ch], g2[ch], g3[ch]
        o0[ch] = a
        o1[ch] = a + b + d + e
        o2[ch] = a - b + d - e
        o3[ch] = a + f2 * b + f4 * d + f8 * e
        o4[ch] = a - f2 * b + f4 * d - f8 * e
        o5[ch] = e


@njit(nogil=True, cache=_CACHE, fastmath={"contract"})
def _input_tiles(image, padding, th, tw, f, planes, span):
    # planes (POINTS, >= tiles C): row (img TH + i) TW + j of plane ALPHA a + b (C numbers) = (B^T X B)[a, b], X the
    # ALPHA x ALPHA block at (TILE i, TILE j) of image img padded
    _, h, w, c = image.shape
    pitch = (tw * TILE + 2) * c
    flat = np.zeros((th * TILE + 2) * pitch, dtype=image.dtype)     # zeros past the padded image stay zero
    t = np.empty((ALPHA, ALPHA, c), dtype=image.dtype)              # B^T X: t[k, b] a run of C numbers
    for img in range(span[0], span[1]):
        _fill(image, img, padding[0], padding[1], pitch, flat)
        for i in range(th):
            for j in range(tw):
                o = TILE * i * pitch + TILE * j * c
                for b in range(ALPHA):                  # B^T down column b of the block
                    x = o + b * c
                    _bt_rows((t[0, b], t[1, b], t[2, b], t[3, b], t[4, b], t[5, b]),
                             (flat[x:x + c], flat[x + pitch:x + pitch + c], flat[x + 2 * pitch:x + 2 * pitch + c],
                              flat[x + 3 * pitch:x + 3 * pitch + c], flat[x + 4 * pitch:x + 4 * pitch + c],
                              flat[x + 5 * pitch:x + 5 * pitch + c]), f, c)
                at = ((img * th + i) * tw + j) * c        # the tile's row in every plane
                for k in range(ALPHA):                  # then B along row k, into planes ALPHA k .. ALPHA k + 5
                    p = ALPHA * k
                    _bt_rows((planes[p, at:at + c], planes[p + 1, at:at + c], planes[p + 2, at:at + c],
                              planes[p + 3, at:at + c], planes[p + 4, at:at + c], planes[p + 5, at:at + c]),
                             (t[k, 0], t[k, 1], t[k, 2], t[k, 3], t[k, 4], t[k, 5]), f, c)


@njit(nogil=True, cache=_CACHE, fastmath={"contract"})
def _output_tiles(planes, th, tw, f, bias, out, span):
    # out (n, OH, OW, C) = A^T M A of every tile (+ bias), M in planes as _input_tiles writes U; a tile's outputs
    # past OH, OW dropped
    _, oh, ow, c = out.shape
    s = np.empty((TILE, ALPHA, c), dtype=out.dtype)                 # A^T M: s[k, b] a run of C numbers
    y = np.empty((TILE, c), dtype=out.dtype)                        # one row of the tile's outputs
    for img in range(span[0], span[1]):
        for i in range(th):
            for j in range(tw):
                at = ((img * th + i) * tw + j) * c        # the tile's row in every plane
                for b in range(ALPHA):                  # A^T down column b
                    _at_rows((s[0, b], s[1, b], s[2, b], s[3, b]),
                             (planes[b, at:at + c], planes[ALPHA + b, at:at + c], planes[2 * ALPHA + b, at:at + c],
                              planes[3 * ALPHA + b, at:at + c], planes[4 * ALPHA + b, at:at + c],
                              planes[5 * ALPHA + b, at:at + c]), f, c)
                for k in range(min(TILE, oh - TILE * i)):   # then A along row k, the pixels inside the output
                    _at_rows((y[0], y[1], y[2], y[3]), (s[k, 0], s[k, 1], s[k, 2], s[k, 3], s[k, 4], s[k, 5]), f, c)
                    for m in range(min(TILE, ow - TILE * j)):
                        pixel, value = out[img, TILE * i + k, TILE * j + m], y[m]
                        for ch in range(np.uint64(c)):
                            pixel[ch] = value[ch] + bias[ch]


@njit(nogil=True, cache=_CACHE, fastmath={"contract"})
def _grad_tiles(grad, th, tw, f, planes, span):
    # planes as _output_tiles reads M: dM = A dY A^T of every tile dY of grad (n, OH, OW, C), zeros past OH, OW
    # (the adjoint of _output_tiles)
    _, oh, ow, c = grad.shape
    g = np.zeros((TILE, TILE, c), dtype=grad.dtype)                 # the tile's gradient, zeros outside
    s = np.empty((ALPHA, TILE, c), dtype=grad.dtype)                # A dY: s[a, m] a run of C numbers
    for img in range(span[0], span[1]):
        for i in range(th):
            for j in range(tw):
                inside_h, inside_w = min(TILE, oh - TILE * i), min(TILE, ow - TILE * j)
                if inside_h < TILE or inside_w < TILE:
                    g[:] = 0
                for k in range(inside_h):
                    for m in range(inside_w):
                        pixel, row = grad[img, TILE * i + k, TILE * j + m], g[k, m]
                        for ch in range(np.uint64(c)):
                            row[ch] = pixel[ch]
                for m in range(TILE):                   # A down column m
                    _a_rows((s[0, m], s[1, m], s[2, m], s[3, m], s[4, m], s[5, m]),
                            (g[0, m], g[1, m], g[2, m], g[3, m]), f, c)
                at = ((img * th + i) * tw + j) * c        # the tile's row in every plane
                for a in range(ALPHA):                  # then A^T along row a, into planes ALPHA a .. ALPHA a + 5
                    p = ALPHA * a
                    _a_rows((planes[p, at:at + c], planes[p + 1, at:at + c], planes[p + 2, at:at + c],
                             planes[p + 3, at:at + c], planes[p + 4, at:at + c], planes[p + 5, at:at + c]),
                            (s[a, 0], s[a, 1], s[a, 2], s[a, 3]), f, c)


@njit(parallel=True, nogil=True, cache=_CACHE)
def _input_tiles_shares(image, padding, th, tw, f, planes, bounds):
    for s in prange(bounds.size - 1):
        _input_tiles(image, padding, th, tw, f, planes, (bounds[s], bounds[s + 1]))


@njit(parallel=True, nogil=True, cache=_CACHE)
def _output_tiles_shares(planes, th, tw, f, bias, out, bounds):
    for s in prange(bounds.size - 1):
        _output_tiles(planes, th, tw, f, bias, out, (bounds[s], bounds[s + 1]))


@njit(parallel=True, nogil=True, cache=_CACHE)
def _grad_tiles_shares(grad, th, tw, f, planes, bounds):
    for s in prange(bounds.size - 1):
        _grad_tiles(grad, th, tw, f, planes, (bounds[s], bounds[s + 1]))


def _run(serial, shares, n, *args):
    """``serial(*args, span)`` over the whole batch as one share, else ``shares`` over the threads' shares."""
    bounds = _bounds(n, conv_numba._share_count())
    if bounds.size == 2:
        serial(*args, (0, n))
    else:
        shares(*args, bounds)


# ---------------------------------------------------------------- the 36 products of a pass, in one call
# Each plane's rows are split into shares of whole GROUPs (``bounds``), and the POINTS x shares jobs run in one
# loop (``prange``; the forward's ``range`` for one share): one parallel region for all 36 products where a call
# per plane entered Numba's threading layer 36 times, a cost the small batches felt (NOTES.md, round 18).
def _product_loops(jobs):
    def products(u, packed, bias, depth_block, m, c_grid, bounds):
        # plane xi of m (its first rows x C_grid) = plane xi of u (rows x C) @ V[xi] (packed by conv_numba.pack_weight)
        c = packed.shape[2]
        shares = bounds.size - 1
        rows = bounds[-1] * GROUP
        for job in jobs(POINTS * shares):
            xi, s = job // shares, job % shares
            run = u[xi, :rows * c]
            conv_numba._correlate(run.reshape(rows // GROUP, 1, GROUP, c), run, (0, 0), (1, 1, 1, 1, 1, GROUP),
                                  packed[xi], bias, depth_block, m[xi, :rows * c_grid].reshape(rows, c_grid),
                                  (bounds[s], bounds[s + 1]))
    return products


@njit(parallel=True, nogil=True, cache=_CACHE)
def _weight_grads(u, c, dm, c_grid, sums, bounds):
    # sums[xi, s]: share s's dM[xi]^T U[xi] in conv_numba._weight_grad's order of tiles (one share takes BLAS's
    # GEMM instead: weight_grad_winograd)
    shares = bounds.size - 1
    rows = bounds[-1] * GROUP
    for job in prange(POINTS * shares):
        xi, s = job // shares, job % shares
        conv_numba._weight_grad(u[xi, :rows * c].reshape(rows // GROUP, 1, GROUP, c), (0, 0), (1, 1, 1, 1, 1, GROUP),
                                dm[xi, :rows * c_grid].reshape(rows, c_grid), sums[xi, s], (bounds[s], bounds[s + 1]))


_products = njit(parallel=True, nogil=True, cache=_CACHE)(_product_loops(prange))
_products_serial = njit(nogil=True, cache=_CACHE)(_product_loops(range))


def _split(rows):
    """Shares of a plane's ``rows`` (whole GROUPs) for this thread, and the matching drivers' choice."""
    bounds = _bounds(rows // GROUP, conv_numba._share_count())
    return bounds, bounds.size == 2


# ---------------------------------------------------------------- the products
def _coefficients(dtype):
    """The transforms' coefficients 2, 4, 5 and 8 in ``dtype``."""
    return np.array([2, 4, 5, 8], dtype=dtype)


def _planes(tiles, c, dtype):
    """``(buffer, rows)``: POINTS planes of ``tiles`` rows of ``c`` numbers in one buffer (POINTS, stride), each
    plane's rows rounded up to whole GROUPs (``rows``, the ones past ``tiles`` zero) and then one cache line
    more."""
    rows = -(-tiles // GROUP) * GROUP
    buffer = np.empty((POINTS, rows * c + SKEW // np.dtype(dtype).itemsize), dtype=dtype)
    buffer[:, tiles * c:] = 0
    return buffer, rows


def _transformed_input(image, padding, th, tw):
    n, _, _, c = image.shape
    buffer, rows = _planes(n * th * tw, c, image.dtype)
    _run(_input_tiles, _input_tiles_shares, n, np.ascontiguousarray(image), tuple(padding), th, tw,
         _coefficients(image.dtype), buffer)
    return buffer, rows


def _chunks(n, tiles_per_image):
    """The forward's batch as (start, stop) runs of images: about one GROUP of tiles each where the batch runs as
    one share, else the whole batch (module doc, Chunks)."""
    if conv_numba._share_count() > 1:
        return [(0, n)]
    images = max(1, GROUP // tiles_per_image)
    return [(start, min(start + images, n)) for start in range(0, n, images)]


def correlate_winograd(image, wmat, padding, bias):
    """``conv_numba.correlate_numba(image, wmat, (3, 3), (1, 1), padding, bias)``: rows (n*OH*OW, C_grid)."""
    n, h, w, c = image.shape
    c_grid = wmat.shape[0]
    oh, ow, th, tw = _tiles(h, w, padding)
    # V[xi] transposed (C_grid, C), the weight matrix of the 1x1 product U[xi] @ V[xi], G W G^T of every channel
    # pair: the nine taps packed as the direct kernel packs a weight (conv_numba.pack_weight), then one product
    # with GG over them (a fixed combination of each packed number's nine taps: the packing commutes with it)
    taps = np.asarray(wmat, dtype=image.dtype).reshape(c_grid, 9, c).transpose(1, 0, 2)
    packed9 = conv_numba.pack_weight(taps)                       # (9, tiles, C, LANES)
    packed = (GG.astype(image.dtype) @ packed9.reshape(9, -1)).reshape(POINTS, *packed9.shape[1:])
    tiles = packed.shape[1]
    depth_block = max(1, conv_numba.WEIGHT_BLOCK_BYTES // (conv_numba.LANES * packed.itemsize))
    zeros = np.zeros(tiles * conv_numba.LANES, dtype=image.dtype)
    out = np.empty((n, oh, ow, c_grid), dtype=image.dtype)
    lanes = np.zeros(c_grid, dtype=image.dtype) if bias is None else np.asarray(bias, dtype=image.dtype)
    image, f = np.ascontiguousarray(image), _coefficients(image.dtype)
    for start, stop in _chunks(n, th * tw):
        u, rows = _transformed_input(image[start:stop], padding, th, tw)
        m, _ = _planes((stop - start) * th * tw, c_grid, image.dtype)
        bounds, serial = _split(rows)
        if rows:
            (_products_serial if serial else _products)(u, packed, zeros, depth_block, m, c_grid, bounds)
        _run(_output_tiles, _output_tiles_shares, stop - start, m, th, tw, f, lanes, out[start:stop])
    return out.reshape(n * oh * ow, c_grid)


def weight_grad_winograd(image, grid_rows, padding):
    """``conv_numba.correlate_weight_grad_numba(image, grid_rows, (3, 3), (1, 1), padding)``: (C_grid, 9 C)."""
    n, h, w, c = image.shape
    c_grid = grid_rows.shape[1]
    oh, ow, th, tw = _tiles(h, w, padding)
    u, rows = _transformed_input(image, padding, th, tw)
    dm, _ = _planes(n * th * tw, c_grid, image.dtype)
    grad = np.ascontiguousarray(grid_rows, dtype=image.dtype).reshape(n, oh, ow, c_grid)
    _run(_grad_tiles, _grad_tiles_shares, n, grad, th, tw, _coefficients(image.dtype), dm)
    # dV[xi] transposed (C_grid, C) = dM[xi]^T U[xi], summed over the tiles. One share: OpenBLAS's GEMM, which
    # takes 0.55-0.8x the direct kernel's time on these small in-cache products (benchmarks/NOTES.md, round 18)
    bounds, serial = _split(rows)
    if serial:
        dv = np.matmul(dm[:, :rows * c_grid].reshape(POINTS, rows, c_grid).transpose(0, 2, 1),
                       u[:, :rows * c].reshape(POINTS, rows, c))
        taps = (GG.T.astype(image.dtype) @ dv.reshape(POINTS, -1)).reshape(9, c_grid, c)
        return np.ascontiguousarray(taps.transpose(1, 0, 2)).reshape(c_grid, 9 * c)
    # Several: per share in the direct kernel's order of tiles (u_tiles, tiles, ROWS, LANES), then the shares in
    # order (the same bits for the same number of shares)
    tiles, u_tiles = -(-c_grid // conv_numba.ROWS), -(-c // conv_numba.LANES)
    sums = np.zeros((POINTS, bounds.size - 1, u_tiles, tiles, conv_numba.ROWS, conv_numba.LANES), dtype=image.dtype)
    _weight_grads(u, c, dm, c_grid, sums, bounds)
    total = sums[:, 0]
    for share in range(1, bounds.size - 1):
        total = total + sums[:, share]
    # dW = G^T dV G of every channel pair, the adjoint of V's transform: one product with GG^T over the points,
    # in the kernel's order still, which is then the direct kernel's for a window of nine taps
    taps = (GG.T.astype(image.dtype) @ total.reshape(POINTS, -1)).reshape(9 * u_tiles, tiles, conv_numba.ROWS,
                                                                          conv_numba.LANES)
    return conv_numba.weight_grad_matrix(taps, c_grid, 9, c)
