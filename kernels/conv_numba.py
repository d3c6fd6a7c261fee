"""A convolution's products without the im2col copy, compiled with Numba (the reference: im2col + GEMM).

``correlate_numba`` computes ``im2col(image) @ wmat.T + bias`` (conv2d's forward, and the
input gradient of a stride-1 conv read from the windows of gy) and ``correlate_weight_grad_numba``
``grid_rows.T @ im2col(image)`` (the weight gradient of both ops) for a channels-last image,
without ever writing the windows: the micro-kernels read each window in place from the image,
padded one image at a time into a small buffer that stays in cache (``_fill``: the interior
rewritten per image, the border of zeros written once; a 3x3 conv's windows would be 9x the
input). Measured on one core of an AVX-512 Xeon, caches cold as in a training step (benchmarks/NOTES.md,
round 6): a 3x3 conv 128->128 at 8x8, batch 128, forward 27.7 ms with im2col and OpenBLAS's SGEMM,
21.2 ms here; its weight gradient 32.6 -> 22.2 ms.

The forward micro-kernel (the nearest-code kernel's, nearest_numba.py, with gathered rows)
    ``ROWS`` output pixels against ``LANES`` output channels: the running sums sit in a stack
    buffer that LLVM keeps in vector registers (with AVX-512 8 pixels x 32 channels, 16 zmm;
    otherwise 3 x 32, 12 ymm, as the nearest-code kernel's AVX2 tile: on an AVX-512 Xeon held to AVX2
    the training step took 0.97-0.98x the time of the earlier 4 x 16's, the weight gradient's grid
    padded to 3 channels a tile included; NOTES.md, round 8). For every number of a window row (a row (kw, c) is one contiguous
    run of the padded image) it broadcasts that number of each pixel's window and does 2 * ROWS
    FMAs against LANES packed weights. The pixels of a tile may lie in different rows: each has
    its own base offset into the padded image, and a window row adds the same offset to all of
    them. ``wmat`` is packed in tiles of LANES output channels, transposed
    (``pack_weight``), the last tile padded with zero channels that are never stored.
    Blocked for the caches: a block of ``PIXEL_BLOCK`` pixels sweeps one block of a tile's weights
    (``WEIGHT_BLOCK_BYTES``, read from L1) before the next, its running sums parked in a small
    buffer between blocks, where a whole tile's weights (147 KiB for a 3x3 conv from 128 channels)
    would stream from L2 for every 8 pixels: 3-15 % faster per layer. The sums keep their order,
    so the blocks change no bit. A block holds pixels of one image only.

The weight gradient's micro-kernel
    ``ROWS`` grid channels (broadcast) against ``LANES`` consecutive numbers of a window row
    (two vectors read straight from the padded image), summed over a block of ``CHUNK`` pixels of
    one image (their rows stay in L1 and L2 while every tile sweeps them); the numbers a last tile
    reads past a window row land in lanes that are dropped. Two layouts keep a tile's reads off the
    same few sets of an 8-way 32 KiB L1 (Zen 3 and 4; NOTES.md, round 16; the same bits either way):
    - The chunk's grid rows are packed tile by tile (``gpack``: for each tile of ROWS channels, the
      pixels in order, their ROWS channels side by side, zeros past the last channel), so a tile
      reads its grid numbers in sequence, where read in place they were one line each, a grid row
      apart (512 bytes for 128 float32 channels); and the grid needs no whole copy to pad its
      channels to whole tiles. Zen 3, on top of the skew below: 0.94-0.97x the time on one core.
    - Where the pixels' windows lie a multiple of 512 bytes apart along a grid row (128 float32
      channels at stride 1, 64 at stride 2) and the grid rows are too, the numbers a tile reads
      from an 8x8 grid's windows (two lines a pixel) fall in a quarter of L1's 64 sets, 8 lines a
      set: every way of an 8-way L1 before a grid number or a running sum is counted. Each row of
      the padded image is then one cache line longer (``_skewed_pitch``), which moves each grid row's
      windows to other sets (two lines a set). Zen 3: the 3x3 128->128 weight gradient
      0.76-0.85x the time, the 4x4 stride-2 one 0.83-0.87x.
    Both together on Zen 3: the big layers' weight gradients 0.74-0.89x the time, the training step
    0.94-0.99x.
    Each tile's running sums start from and go back to ``out`` once a chunk; ``out`` holds them tile after
    tile (ROWS x LANES numbers in one run, the tiles in the order they are swept). In the finished
    (C_grid, kH*kW*C) layout a tile's ROWS rows lay a whole matrix row apart (4.6 KB for a 3x3 conv from
    128 channels) and the sweep jumped through a matrix of 590 KB, more than Zen 3's L2; in this order
    the prefetchers see one stream. The wrapper turns it into the matrix at the end. Zen 3: the weight gradients 0.85-0.96x the time on one core, 0.84-0.91x on
    two; the step 0.95-0.99x (NOTES.md, round 16).

``correlate_adjoint_numba`` computes ``col2im(grid_rows @ wmat)`` (+ bias: conv2d's input gradient
where the mirror does not apply, and conv_transpose2d's forward) without the columns: the forward's
tile with the roles turned, ``ROWS`` grid pixels against ``LANES`` numbers of a window row, summed
over the grid's channels (a tile's weights, C_grid x LANES, stay in L1), each finished tile added
into one padded image in cache whose interior becomes the output image. The running sums go out
through a small buffer indexed with unsigned offsets: with signed ones the copy was not unrolled
and the accumulators went back to the stack after every FMA (2.3x slower).

Padding one image at a time instead of the whole batch at once (round 7): the batch's padded copy
(6.5 MB for 128 images of 8x8x128) was written to memory and read back from there, the per-image
buffer (51 KiB) is written and read in L2. Per call up to 13 % faster (the prior's 3x5 weight gradient
3 % slower), the training step 0.95-0.98 on one core. Where a conv has no padding and its input is one
run in memory (the prior's masked convs pad their inputs themselves), the forward reads the image in
place, without that copy either: the prior's step 0.98.

Unsigned offsets for the gathered loads and the tiles' loads and stores: with signed ones Numba
emits a negative-index wraparound per load (it cost a fifth of the forward's speed), and 2-D
indexing of the weight gradient's output kept LLVM from unrolling its tile's loads and stores, so
the accumulators went to memory on every step (3x slower).

Rounding. Each forward output is a sum over (kh, kw, c) in that order, one FMA per term
(``fastmath={"contract"}`` and nothing more), started from the bias; each weight-gradient entry
a sum over the pixels in order. Deterministic, independent of where a pixel falls in a tile, but
not bit-equal to a BLAS GEMM (which sums in blocks): the tests compare to the reference with
float tolerances, and run the convolutions' float64 gradcheck through these kernels.

Threads: one share of the batch each. With more than one Numba thread in the calling thread the batch
is split into contiguous shares of images, one per thread (``_bounds``; ``prange`` over the shares, each
the serial loops over its images with buffers of its own). The forward and the adjoint write each image
alone: the same bits for any split. The weight gradient sums each share into its own buffer and then
the shares in order: deterministic for a given thread count, not bit-equal across counts. This only
pays where BLAS runs one thread per call: OpenBLAS's idle threads spin on the cores for ~0.13 s after
each threaded GEMM, and the shares sharing a core with one of them waited (round 6: the step 1.4-1.6x
slower). So the kernels take the threads where BLAS is held to one (``threads_here``; the trainer's
``kernels.conv_threads`` holds it): on a 2-core AVX-512 VM the batch-128 step in 0.78x the time of
im2col with OpenBLAS's threaded GEMMs, batch 32 and the prior 0.80x (NOTES.md, round 8). One share
calls the serial loops directly, never entering Numba's threading layer (``--workers`` workers).
Numba's threads rather than a pool of Python threads: with a pool the helper slept between calls, and
after a pause (as the benchmarks take between steps) each wake-up of the idle core cost the batch-32
step 70 ms against 51.

Winograd. ``correlate_numba`` and ``correlate_weight_grad_numba`` hand a 3x3 stride-1 geometry with channels
enough to winograd_numba.py (F(4x4, 3x3): 4x fewer multiply-adds, the products by this module's kernels as
1x1 products; ``winograd_applies``; ``MINIVQ_NUMBA_WINOGRAD=0`` keeps them here).

Float32. ``functional/conv.py`` uses them for float32 arrays (``direct_correlation``). In float64 the
tiles, sized for float32 registers, spill (a 3x3 conv's step 10 % slower than the GEMM path), so
``"auto"`` leaves float64 to the GEMMs.
"""

import numpy as np
from numba import get_num_threads, njit, prange

from minivq import backend as _backend

from .nearest_numba import _CACHE, WIDE, _stack_buffer, _vector_width_hint
from .windows_numpy import output_size

ROWS = 8 if WIDE else 3         # output pixels per micro-tile
LANES = 32                      # output channels per micro-tile: two zmm registers per pixel, or four ymm
CHUNK = 64                      # pixels per block of the weight gradient (one 8x8 image): their rows stay in L1 and L2
PIXEL_BLOCK = 64 if WIDE else 48  # pixels per block of the forward product, swept once per block of weights
WEIGHT_BLOCK_BYTES = 24 * 1024  # the forward's block of packed weights: half of a 48 KiB L1 (NOTES.md, round 7)
CACHE_LINE = 64                 # bytes: the weight gradient's padded rows are skewed by one where they would alias
_ACC_SLOTS = ROWS * LANES
# the forward's last tile of a pixel block writes ROWS rows of its sums buffer: a block must hold whole tiles
assert PIXEL_BLOCK % ROWS == 0


# ---------------------------------------------------------------- threads
def threads_here():
    """Over how many threads the kernels split a batch for the calling thread: its Numba count where that
    is 1 or where BLAS runs one thread per call; 0 where BLAS runs more (or its count cannot be read),
    for then each GEMM leaves OpenBLAS's threads spinning on the cores these threads need (module doc)."""
    count = get_num_threads()
    return count if count == 1 or _backend.blas_thread_count() == 1 else 0


def _bounds(n, count):
    """The images 0..n split into at most ``count`` contiguous shares: share s is images bounds[s]..bounds[s+1]."""
    count = max(1, min(count, n))
    return np.array([n * s // count for s in range(count + 1)], dtype=np.int64)


def _share_count():
    """Shares per batch for a call from this thread: ``threads_here``, and 1 where it says 0 (a forced call)."""
    return max(1, threads_here())


@njit(nogil=True, cache=_CACHE)
def _fill(image, b, ph, pw, pitch, flat):
    """Image ``b`` of ``image`` (n, H, W, C) into the interior of ``flat``, one padded image (H + 2 ph, W + 2 pw, C)
    with ``pitch`` numbers to a row, as one run whose border of zeros was written once, when it was allocated."""
    _, h, w, c = image.shape
    for y in range(h):
        o = (y + ph) * pitch + pw * c
        for x in range(w):
            for ch in range(c):
                flat[o + x * c + ch] = image[b, y, x, ch]


@njit(nogil=True, cache=_CACHE)
def _window_starts(first, count, ow, sh, sw, pitch, c, origin, bases):
    """``bases[r]``: where the window of grid pixel ``first + r`` of one image (``ow`` to a grid row) starts in
    that image padded, ``pitch`` numbers to a row, plus ``origin``, for ``r`` < ``count``."""
    for r in range(count):
        i = (first + r) // ow
        j = first + r - i * ow
        bases[r] = origin + np.uint64(i * sh * pitch + j * sw * c)


@njit(nogil=True, cache=_CACHE)
def _skewed_pitch(numbers, step, itemsize):
    """Numbers to a row of the weight gradient's padded image: ``numbers``, and one cache line more where a step
    of ``step`` rows (a grid row's) is a whole multiple of 512 bytes (module doc: the rows' windows would share
    a quarter of L1's sets)."""
    return numbers + (CACHE_LINE // itemsize if numbers * step * itemsize % 512 == 0 else 0)


@njit(nogil=True, cache=_CACHE, fastmath={"contract"})
def _correlate(image, whole, padding, window, packed, bias, depth_block, out, span):
    # image: (n, h, w, c); window: (kh, kw, sh, sw, oh, ow); out: (n*oh*ow, C_grid) rows; span: the images done here.
    # Blocked (module doc): one padded image at a time, PIXEL_BLOCK pixels x depth_block numbers of a window row.
    # ``whole``: the image as one run where it needs no padding (then read in place), else empty
    _, h, w, c = image.shape
    ph, pw = padding
    wp = w + 2 * pw
    kh, kw, sh, sw, oh, ow = window
    _vector_width_hint()
    per_image = oh * ow
    run = kw * c
    c_grid = out.shape[1]
    oflat = out.reshape(-1)
    flat = np.zeros(0 if whole.size else (h + 2 * ph) * wp * c, dtype=image.dtype)  # one padded image at a time
    bases = np.empty(PIXEL_BLOCK, dtype=np.uint64)          # where each pixel's window starts in ``flat``
    sums = np.empty(PIXEL_BLOCK * LANES, dtype=image.dtype)  # the block's running sums between depth blocks
    base = _stack_buffer(ROWS, np.uint64)
    xd = _stack_buffer(ROWS, image.dtype)
    src = whole if whole.size else flat
    for img in range(span[0], span[1]):
        if whole.size:
            origin = np.uint64(img * h * w * c)         # the image itself: its windows need no border
        else:
            _fill(image, img, ph, pw, wp * c, flat)
            origin = np.uint64(0)
        for q0 in range(0, per_image, PIXEL_BLOCK):
            count = min(PIXEL_BLOCK, per_image - q0)
            p0 = img * per_image + q0                       # the block's first output row
            _window_starts(q0, count, ow, sh, sw, wp * c, c, origin, bases)
            for t in range(packed.shape[0]):
                for a in range(kh):         # a window row (kw, c) is one contiguous run of the padded image
                    row = np.uint64(a * wp * c)
                    k0 = a * run
                    for u0 in range(0, run, depth_block):
                        u1 = min(u0 + depth_block, run)
                        for q in range(0, count, ROWS):
                            for r in range(ROWS):
                                base[r] = bases[min(q + r, count - 1)]  # past the end: the last pixel again, never stored
                            acc = _stack_buffer(_ACC_SLOTS, image.dtype)    # acc[r * LANES + l]: pixel q + r, channel l
                            s0 = np.uint64(q * LANES)
                            if a == 0 and u0 == 0:
                                for r in range(ROWS):
                                    for lane in range(LANES):
                                        acc[r * LANES + lane] = bias[t * LANES + lane]
                            else:
                                for r in range(ROWS):
                                    for lane in range(LANES):
                                        acc[r * LANES + lane] = sums[s0 + np.uint64(r * LANES + lane)]
                            for u in range(u0, u1):
                                at = row + np.uint64(u)
                                for r in range(ROWS):
                                    xd[r] = src[base[r] + at]
                                for lane in range(LANES):
                                    e = packed[t, k0 + u, lane]
                                    for r in range(ROWS):
                                        acc[r * LANES + lane] += xd[r] * e
                            for r in range(ROWS):
                                for lane in range(LANES):
                                    sums[s0 + np.uint64(r * LANES + lane)] = acc[r * LANES + lane]
                c0 = t * LANES
                width = min(LANES, c_grid - c0)
                for r in range(count):
                    o0 = np.uint64((p0 + r) * c_grid + c0)
                    for lane in range(width):
                        oflat[o0 + np.uint64(lane)] = sums[r * LANES + lane]


@njit(nogil=True, cache=_CACHE, fastmath={"contract"})
def _weight_grad(image, padding, window, grid, out, span):
    # out (kh*u_tiles, tiles, ROWS, LANES), zeros, one tile's sums after another: for every pixel p of image b
    # in span, window row a and number u of it, with o = t*ROWS + r and u = ut*LANES + l,
    # out[a*u_tiles + ut, t, r, l] += grid[p, o] * (image b padded)[bases[p] + a*row_stride + u]
    _, h, w, c = image.shape
    ph, pw = padding
    wp = w + 2 * pw
    kh, kw, sh, sw, oh, ow = window
    _vector_width_hint()
    per_image = oh * ow
    row_stride = _skewed_pitch(wp * c, sh, image.itemsize)     # numbers to a padded row (module doc)
    # one padded image at a time, its border zeros written once; the last tile of lanes of a window row
    # reads up to LANES numbers past it (into the skew or the LANES zeros at the end; those lanes are dropped)
    flat = np.zeros((h + 2 * ph) * row_stride + LANES, dtype=image.dtype)
    bases = np.empty(per_image, dtype=np.uint64)     # where each pixel's window starts in ``flat``
    _window_starts(0, per_image, ow, sh, sw, row_stride, c, np.uint64(0), bases)
    c_grid = grid.shape[1]
    tiles = out.shape[1]
    u_tiles = out.shape[0] // kh
    # a chunk's grid, tile by tile: gpack[(t * CHUNK + q) * ROWS + r] = grid[chunk pixel q, channel t*ROWS + r];
    # the channels past c_grid stay zero
    gpack = np.zeros(tiles * CHUNK * ROWS, dtype=image.dtype)
    # flat arrays and unsigned offsets: with 2-D indexing (its negative-index checks) the tile's loads and
    # stores were not unrolled, and the accumulators went back to memory on every step (3x slower)
    oflat = out.reshape(-1)
    gd = _stack_buffer(ROWS, image.dtype)
    for img in range(span[0], span[1]):
        _fill(image, img, ph, pw, row_stride, flat)
        for chunk in range(0, per_image, CHUNK):
            count = min(CHUNK, per_image - chunk)
            first = img * per_image + chunk          # the chunk's first row of ``grid``
            for q in range(count):
                for o in range(c_grid):
                    t = o // ROWS
                    gpack[(t * CHUNK + q) * ROWS + o - t * ROWS] = grid[first + q, o]
            for a in range(kh):
                for ut in range(u_tiles):
                    off = np.uint64(a * row_stride + ut * LANES)
                    for ct in range(tiles):
                        o0 = np.uint64(((a * u_tiles + ut) * tiles + ct) * _ACC_SLOTS)    # the tile's sums
                        g0 = np.uint64(ct * CHUNK * ROWS)
                        acc = _stack_buffer(_ACC_SLOTS, image.dtype)    # acc[r * LANES + l]: channel r, lane l
                        for r in range(ROWS):
                            for lane in range(LANES):
                                acc[r * LANES + lane] = oflat[o0 + np.uint64(r * LANES + lane)]
                        for q in range(np.uint64(count)):
                            at = bases[np.uint64(chunk) + q] + off
                            gq = g0 + q * np.uint64(ROWS)
                            for r in range(ROWS):
                                gd[r] = gpack[gq + np.uint64(r)]
                            for lane in range(LANES):
                                e = flat[at + np.uint64(lane)]
                                for r in range(ROWS):
                                    acc[r * LANES + lane] += gd[r] * e
                        for r in range(ROWS):
                            for lane in range(LANES):
                                oflat[o0 + np.uint64(r * LANES + lane)] = acc[r * LANES + lane]


@njit(nogil=True, cache=_CACHE, fastmath={"contract"})
def _adjoint(grid, padding, window, packed, bias, out, span):
    # out (n, h, w, c) = col2im(grid @ wmat) + bias for the images in span, grid (n*oh*ow, C_grid) rows,
    # packed (kh, u_tiles, C_grid, LANES):
    # each finished tile (ROWS grid pixels x LANES numbers of a window row) is added into one padded image
    _, h, w, c = out.shape
    ph, pw = padding
    wp = w + 2 * pw
    kh, kw, sh, sw, oh, ow = window
    _vector_width_hint()
    per_image = oh * ow
    c_grid = grid.shape[1]
    u_tiles = packed.shape[1]
    run = kw * c
    gflat = grid.reshape(-1)
    pflat = packed.reshape(-1)
    flat = np.empty((h + 2 * ph) * wp * c, dtype=out.dtype)     # one padded image at a time, summed into
    bases = np.empty(PIXEL_BLOCK, dtype=np.uint64)          # where each grid pixel's window starts in ``flat``
    rows = _stack_buffer(ROWS, np.uint64)                   # where each pixel of a tile starts in ``grid``
    xd = _stack_buffer(ROWS, out.dtype)
    done = np.empty(ROWS * LANES, dtype=out.dtype)           # a finished tile, on its way into ``flat``
    zero = np.zeros(LANES, dtype=out.dtype)
    for img in range(span[0], span[1]):
        flat[:] = 0
        for q0 in range(0, per_image, PIXEL_BLOCK):
            count = min(PIXEL_BLOCK, per_image - q0)
            p0 = img * per_image + q0
            _window_starts(q0, count, ow, sh, sw, wp * c, c, np.uint64(0), bases)
            for a in range(kh):
                for ut in range(u_tiles):        # a tile of LANES numbers of window row a: its weights stay in L1
                    off = np.uint64(a * wp * c + ut * LANES)
                    width = min(LANES, run - ut * LANES)
                    w0 = np.uint64((a * u_tiles + ut) * c_grid * LANES)
                    for q in range(0, count, ROWS):
                        for r in range(ROWS):
                            rows[r] = np.uint64((p0 + min(q + r, count - 1)) * c_grid)   # past the end: never added
                        acc = _stack_buffer(_ACC_SLOTS, out.dtype)      # acc[r * LANES + l]: pixel q + r, number l
                        for r in range(ROWS):
                            for lane in range(LANES):
                                acc[r * LANES + lane] = zero[np.uint64(lane)]
                        for o in range(c_grid):
                            for r in range(ROWS):
                                xd[r] = gflat[rows[r] + np.uint64(o)]
                            wo = w0 + np.uint64(o * LANES)
                            for lane in range(LANES):
                                e = pflat[wo + np.uint64(lane)]
                                for r in range(ROWS):
                                    acc[r * LANES + lane] += xd[r] * e
                        for r in range(ROWS):
                            for lane in range(LANES):
                                done[np.uint64(r * LANES + lane)] = acc[r * LANES + lane]
                        for r in range(min(ROWS, count - q)):
                            at = bases[q + r] + off
                            for lane in range(width):
                                flat[at + np.uint64(lane)] += done[np.uint64(r * LANES + lane)]
        for y in range(h):
            for x in range(w):
                o = ((y + ph) * wp + x + pw) * c
                for ch in range(c):
                    out[img, y, x, ch] = flat[o + ch] + bias[ch]


# ---------------------------------------------------------------- one share per thread
# The batch split into contiguous shares of images, one per thread (``threads_here``), each share the serial
# kernel over its images with buffers of its own. One share calls the kernel itself: no threading layer
# entered (``--workers`` workers run where Numba's fallback layer aborts when two threads enter it at once).
@njit(parallel=True, nogil=True, cache=_CACHE)
def _correlate_shares(image, whole, padding, window, packed, bias, depth_block, out, bounds):
    for s in prange(bounds.size - 1):
        _correlate(image, whole, padding, window, packed, bias, depth_block, out, (bounds[s], bounds[s + 1]))


@njit(parallel=True, nogil=True, cache=_CACHE)
def _weight_grad_shares(image, padding, window, grid, out, bounds):
    for s in prange(bounds.size - 1):
        _weight_grad(image, padding, window, grid, out[s], (bounds[s], bounds[s + 1]))


@njit(parallel=True, nogil=True, cache=_CACHE)
def _adjoint_shares(grid, padding, window, packed, bias, out, bounds):
    for s in prange(bounds.size - 1):
        _adjoint(grid, padding, window, packed, bias, out, (bounds[s], bounds[s + 1]))


def _winograd():
    from . import winograd_numba        # imported on first use: it builds on this module's kernels
    return winograd_numba


def winograd_applies(image_shape, c_grid, kernel, stride, padding, weight_grad=False):
    """Whether ``correlate_numba`` (or with ``weight_grad``, ``correlate_weight_grad_numba``) of this geometry
    runs by Winograd's F(4x4, 3x3) (winograd_numba.applies: 3x3 windows at stride 1, channels enough)."""
    return _winograd().applies(image_shape, c_grid, kernel, stride, padding, weight_grad)


def pack_weight(wmat):
    """(..., C_grid, K) -> (..., tiles, K, LANES): tiles of LANES output channels, transposed, zero-padded
    (module doc); leading axes, if any, are kept (winograd_numba packs its nine taps at once)."""
    *lead, c_grid, k = wmat.shape
    tiles = -(-c_grid // LANES)
    padded = np.zeros((*lead, tiles * LANES, k), dtype=wmat.dtype)
    padded[..., :c_grid, :] = wmat
    return np.ascontiguousarray(padded.reshape(*lead, tiles, LANES, k).swapaxes(-1, -2))


def weight_grad_matrix(sums, c_grid, kh, run):
    """The weight gradient's sums in ``_weight_grad``'s order of tiles, (kh*u_tiles, tiles, ROWS, LANES), as the
    matrix (C_grid, kh*run) (winograd_numba reads its own sums back this way too)."""
    tiles, u_tiles = sums.shape[1], sums.shape[0] // kh
    by_channel = sums.transpose(1, 2, 0, 3).reshape(tiles * ROWS, kh, u_tiles * LANES)
    return np.ascontiguousarray(by_channel[:c_grid, :, :run]).reshape(c_grid, -1)


def _grid_size(image, kernel, stride, padding):
    """(OH, OW): the grid of windows over ``image`` (n, H, W, C)."""
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    return output_size(image.shape[1], kh, sh, ph), output_size(image.shape[2], kw, sw, pw)


def correlate_numba(image, wmat, kernel, stride, padding, bias):
    """``im2col(image) @ wmat.T`` (+ ``bias``) as new rows (n*OH*OW, C_grid) for a channels-last NumPy
    ``image`` (n, H, W, C)."""
    if winograd_applies(image.shape, wmat.shape[0], kernel, stride, padding):
        return _winograd().correlate_winograd(image, wmat, padding, bias)
    oh, ow = _grid_size(image, kernel, stride, padding)
    out = np.empty((image.shape[0] * oh * ow, wmat.shape[0]), dtype=image.dtype)
    packed = pack_weight(np.asarray(wmat, dtype=image.dtype))
    lanes = np.zeros(packed.shape[0] * LANES, dtype=image.dtype)
    if bias is not None:
        lanes[:wmat.shape[0]] = bias
    depth_block = max(1, WEIGHT_BLOCK_BYTES // (LANES * packed.itemsize))
    # no border to add and one run in memory: the kernel reads the image in place, no per-image copy
    whole = image.reshape(-1) if tuple(padding) == (0, 0) and image.flags.c_contiguous else np.empty(0, image.dtype)
    window, bounds = (*kernel, *stride, oh, ow), _bounds(image.shape[0], _share_count())
    if out.size and bounds.size == 2:
        _correlate(image, whole, padding, window, packed, lanes, depth_block, out, (0, image.shape[0]))
    elif out.size:
        _correlate_shares(image, whole, padding, window, packed, lanes, depth_block, out, bounds)
    return out


def correlate_weight_grad_numba(image, grid_rows, kernel, stride, padding):
    """``grid_rows.T @ im2col(image)`` (C_grid, kH*kW*C) for a channels-last NumPy ``image`` (n, H, W, C) and
    ``grid_rows`` (n*OH*OW, C_grid) of its dtype: the weight gradient, without the windows (module doc)."""
    if winograd_applies(image.shape, grid_rows.shape[1], kernel, stride, padding, weight_grad=True):
        return _winograd().weight_grad_winograd(image, grid_rows, padding)
    kh, kw = kernel
    oh, ow = _grid_size(image, kernel, stride, padding)
    run = kw * image.shape[3]
    u_tiles = -(-run // LANES)
    c_grid = grid_rows.shape[1]
    grid = np.ascontiguousarray(grid_rows, dtype=image.dtype)   # the kernel packs its channels in tiles itself
    bounds = _bounds(image.shape[0], _share_count())
    # one sum per share of the images, added in share order: the same bits for the same number of shares;
    # tile after tile (the kernel's comment), turned into (C_grid, kH*kW*C) at the end
    tiles = -(-c_grid // ROWS)
    out = np.zeros((bounds.size - 1, kh * u_tiles, tiles, ROWS, LANES), dtype=image.dtype)
    window, pixels = (*kernel, *stride, oh, ow), image.shape[0] * oh * ow
    if pixels and bounds.size == 2:
        _weight_grad(image, padding, window, grid, out[0], (0, image.shape[0]))
    elif pixels:
        _weight_grad_shares(image, padding, window, grid, out, bounds)
    total = out[0]
    for share in out[1:]:
        total += share
    return weight_grad_matrix(total, c_grid, kh, run)


def correlate_adjoint_numba(grid_rows, wmat, image_shape, kernel, stride, padding, bias):
    """``col2im(grid_rows @ wmat)`` (+ ``bias``) as a new channels-last image ``image_shape`` (n, H, W, C), from
    ``grid_rows`` (n*OH*OW, C_grid) and ``wmat`` (C_grid, kH*kW*C), without the columns (module doc)."""
    n, h, w, c = image_shape
    kh, kw = kernel
    run = kw * c
    u_tiles = -(-run // LANES)
    dtype = grid_rows.dtype
    out = np.empty(image_shape, dtype=dtype)
    padded = np.zeros((wmat.shape[0], kh, u_tiles * LANES), dtype=dtype)
    padded[:, :, :run] = np.asarray(wmat, dtype=dtype).reshape(wmat.shape[0], kh, run)
    packed = np.ascontiguousarray(padded.reshape(wmat.shape[0], kh, u_tiles, LANES).transpose(1, 2, 0, 3))
    lanes = np.zeros(c, dtype=dtype) if bias is None else np.asarray(bias, dtype=dtype)
    if out.size:
        oh, ow = _grid_size(out, kernel, stride, padding)
        grid, window, bounds = np.ascontiguousarray(grid_rows), (*kernel, *stride, oh, ow), _bounds(n, _share_count())
        if bounds.size == 2:
            _adjoint(grid, padding, window, packed, lanes, out, (0, n))
        else:
            _adjoint_shares(grid, padding, window, packed, lanes, out, bounds)
    return out
