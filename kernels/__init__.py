"""minivq.kernels: the batched nearest-codebook search behind the vector quantisers.

``nearest_code(x, codebook, backend="auto", metric="l2")`` returns, for every
row of ``x`` (N, D), the index of the nearest row of ``codebook`` (K, D) in
squared L2 distance, as int64 (N,). With ``metric="ip"`` it is the code of
largest inner product ``x.e`` instead (a maximum-inner-product search: the
nearest code in cosine similarity when the codes are l2-normalised). Ties go
to the lowest index on every backend, for either metric.

Every backend scores a code as ``||e||^2 - 2 x.e`` and takes the argmin; the
inner-product search is the same kernel with the norms set to zero (its score
``-2 x.e`` is smallest where ``x.e`` is largest, and the factor -2 is exact).

Backends:

- ``"numpy"``: the reference, the GEMM expansion ``||e||^2 - 2 x.e`` in row
  chunks (nearest_numpy.py). It runs on whichever array module the inputs
  live in, so it is also the GEMM-based path for CuPy arrays.
- ``"numba"``: a fused, parallel CPU kernel that never materialises the
  N x K distance matrix (nearest_numba.py). Needs ``pip install -e .[numba]``.
  float32 searches are first screened (nearest_screened.py): in bf16 on the
  AMX tiles where the CPU has them (Intel Xeons since Sapphire Rapids;
  nearest_amx.py, amx.py), else in int16 (nearest_int16.py: VNNI's products,
  or AVX2's on CPUs without AVX-512). A screen rules out all but a few codes a
  row with a proof, and those few are scored as the fused kernel scores them
  (screen.py): the same indices, 4.0-4.3x sooner at K = 4096, D = 256 with AMX
  and 1.3-1.9x with int16 on the Xeon of benchmarks/NOTES.md rounds 11-12.
  ``MINIVQ_NUMBA_AMX=0`` and ``MINIVQ_NUMBA_INT16=0`` turn them off.
- ``"cupy"``: a fused CUDA kernel loaded from nearest_code.cu through CuPy
  (nearest_cuda.py). Needs ``pip install -e .[cuda]`` and a GPU.
- ``"auto"``: CuPy arrays go to ``"cupy"``; otherwise ``"numba"`` when it
  imports, else ``"numpy"``.

The window copies of a convolution live here too, for the same reason (one
NumPy reference that also runs on CuPy, one compiled Numba version):
``im2col(image, kernel, stride, padding)`` and ``col2im(cols, out, kernel,
stride, padding)`` on channels-last images (windows_numpy.py,
windows_numba.py, windows_cuda.py); "auto" takes Numba for NumPy arrays when
it imports and the CUDA kernels for CuPy arrays when they compile. ReLU's
gradient ``relu_grad(g, y)`` is one compiled pass on the CPU when Numba
imports (elementwise_numba.py), the expression ``g * (y > 0)`` elsewhere; it,
ReLU itself (``relu(x)``), the sum of two activations (``add(a, b)``), the MSE
loss's pass (``squared_error(a, b)``) and a bias gradient's sums
(``column_sums(rows)``) are split over the threads where the convolutions split
each batch over them (inside ``conv_threads``), NumPy's passes elsewhere. Rows
added by index (``index_add``: the embedding's gradient, the EMA sums) are one
compiled pass over the rows (scatter_numba.py), ``backend.index_add`` (a sort
and ``np.add.reduceat``; CuPy's atomic adds) elsewhere. And Adam's
update of a parameter as one pass (``adam_step``): a Numba loop on the CPU
(adam_numba.py; the array ops' dozen passes cost ~2 ms a step), one launch on a
GPU (adam_cuda.py; a training step there is bound by kernel launches, not
arithmetic). Both equal the array ops of ``optim.Adam`` to the bit. And a
convolution's products without its windows (``correlate`` and
``correlate_weight_grad``): Numba micro-kernels that read every window in
place from a padded copy of the image, where im2col would copy them all
first (conv_numba.py; a 3x3 stride-1 conv's by Winograd's F(4x4, 3x3) where both
sides have channels enough, winograd_numba.py; the references are ``im2col(image) @ wmat.T`` and
``grid_rows.T @ im2col(image)``, which also run on CuPy). ``"auto"`` takes them
where the calling thread has one Numba thread, or where BLAS runs one thread
(``conv_threads``, the block ``minivq train`` runs in): they then split each
batch over the calling thread's Numba threads.

Numba and CuPy are imported on first use only, so ``import minivq.kernels``
needs NumPy alone. This package and ``minivq.backend`` are the only places
that look at whether arrays are NumPy or CuPy.
"""
import contextlib
import math

import numpy as np

from minivq import backend as _backend

BACKENDS = ("auto", "numpy", "numba", "cupy")
METRICS = ("l2", "ip")

# Lazily imported backend modules, or the reason they could not be imported.
_loaded = {}


def _load(name):
    """The backend module for ``name`` (``"numba"``, ``"numba-screen"``, ``"cupy"``, ``"numba-windows"``,
    ``"numba-elementwise"``, ``"numba-scatter"``, ``"numba-adam"``, ``"numba-conv"``, ``"cuda-windows"``,
    ``"cuda-adam"``), or a string saying why it is unusable."""
    if name not in _loaded:
        try:
            on_cpu = ("numba", "numba-screen", "numba-windows", "numba-elementwise", "numba-scatter", "numba-adam",
                      "numba-conv")
            if name not in on_cpu and not _backend.cuda_available():
                raise ImportError("CuPy is not importable or sees no CUDA GPU")
            if name == "numba":
                from . import nearest_numba as module
            elif name == "numba-screen":
                from . import nearest_screened as module
            elif name == "numba-windows":
                from . import windows_numba as module
            elif name == "numba-elementwise":
                from . import elementwise_numba as module
            elif name == "numba-scatter":
                from . import scatter_numba as module
            elif name == "numba-adam":
                from . import adam_numba as module
            elif name == "numba-conv":
                from . import conv_numba as module
            elif name == "cupy":
                from . import nearest_cuda as module
            else:
                if name == "cuda-windows":
                    from . import windows_cuda as module
                else:
                    from . import adam_cuda as module
                module.compile()        # usable only where its source compiles (not on the tests' fake CuPy)
            _loaded[name] = module
        except Exception as exc:  # ImportError, or a broken install raising anything
            _loaded[name] = f"{type(exc).__name__}: {exc}"
    return _loaded[name]


def available_backends():
    """Names of the backends usable here, always starting with ``"numpy"``."""
    names = ["numpy"]
    for name in ("numba", "cupy"):
        if not isinstance(_load(name), str):
            names.append(name)
    return names


_INSTALL = {"numba": "pip install -e .[numba]", "cupy": "pip install -e .[cuda]"}


def _unavailable(name):
    return ValueError(f"backend {name!r} is not available here ({_load(name)}); "
                      f"install it with `{_INSTALL[name]}`, or use one of {available_backends()}")


def _as_array(a, what):
    """The raw array behind ``a`` (a minivq Tensor is unwrapped); a clear TypeError for anything else."""
    if hasattr(a, "requires_grad") and hasattr(a, "data"):
        a = a.data
    if isinstance(a, np.ndarray) or _backend.array_device(a) != "cpu":
        return a
    raise TypeError(f"{what} must be a NumPy or CuPy array, got {type(a).__name__}")


class NonFiniteError(ValueError):
    """An input of the nearest-code search holds NaN or inf (so a training loop can tell a divergence)."""


def _check_finite(named):
    """NonFiniteError (a ValueError) naming the first NaN or inf in any of the ``(array, name)`` pairs."""
    xp = _backend.get_array_module(named[0][0])
    # A finite sum proves there is no NaN and no inf, in one pass and without a temporary, and one
    # sum over all the arrays costs one wait for a GPU; only when it is not finite (a NaN, an inf,
    # or a sum that merely overflowed) look element by element.
    sums = [a.sum() for a, _ in named if a.size]
    if not sums or bool(xp.isfinite(sum(sums[1:], sums[0]))):
        return
    for a, what in named:
        bad = ~xp.isfinite(a)
        if bool(bad.any()):
            row, col = (int(i) for i in xp.argwhere(bad)[0])
            raise NonFiniteError(f"{what} {tuple(a.shape)} contains NaN or inf: first at row {row}, "
                                 f"column {col} ({float(a[row, col])})")


def _all_finite(a):
    """Whether ``a`` (a NumPy array) holds no NaN and no inf."""
    return bool(np.isfinite(a).all())


def _validate(x, codebook):
    x = _as_array(x, "x")
    codebook = _as_array(codebook, "codebook")
    x_dev, cb_dev = _backend.array_device(x), _backend.array_device(codebook)
    if x_dev != cb_dev:
        raise TypeError(f"x and codebook must live on the same device, got x on {x_dev} and codebook on {cb_dev}")
    for a, what, shape in ((x, "x", "(N, D)"), (codebook, "codebook", "(K, D)")):
        if a.ndim != 2:
            raise ValueError(f"{what} must be 2-D {shape}, got shape {tuple(a.shape)}")
        if a.dtype not in (np.float32, np.float64):
            raise TypeError(f"{what} must be float32 or float64, got {a.dtype}")
    if x.dtype != codebook.dtype:
        raise TypeError(f"x and codebook must have the same dtype, got x {x.dtype} and codebook {codebook.dtype}")
    if x.shape[1] != codebook.shape[1]:
        raise ValueError(f"x has D={x.shape[1]} but codebook has D={codebook.shape[1]}: "
                         f"shapes {tuple(x.shape)} and {tuple(codebook.shape)}")
    if codebook.shape[0] == 0:
        raise ValueError(f"codebook {tuple(codebook.shape)} has no codes (K = 0)")
    return x, codebook, x_dev


def _resolve(name, device):
    """The concrete backend for ``name`` and arrays on ``device``; every refusal is a clear error."""
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}: use one of {list(BACKENDS)}")
    on_gpu = device != "cpu"
    if name == "auto":
        if on_gpu:
            name = "cupy"
        else:
            return "numba" if not isinstance(_load("numba"), str) else "numpy"
    if name == "numba" and on_gpu:
        raise TypeError(f"backend 'numba' runs on the CPU but the arrays are CuPy arrays on {device}; "
                        "use backend='cupy' (or 'auto'), or move them with minivq.backend.to_numpy")
    if name in ("numba", "cupy") and isinstance(_load(name), str):
        raise _unavailable(name)
    if name == "cupy" and not on_gpu:
        raise TypeError("backend 'cupy' needs CuPy arrays but got NumPy arrays; move them with "
                        "minivq.backend.to_device(a, 'cuda'), or use backend='auto'")
    return name


def nearest_code(x, codebook, backend="auto", metric="l2"):
    """Index of the nearest code for every row of ``x``; ties go to the lowest index.

    ``x``: (N, D), ``codebook``: (K, D), NumPy or CuPy arrays (minivq Tensors are
    unwrapped), both float32 or both float64, finite. Returns int64 (N,) on the
    device of the inputs. ``backend``: ``"auto"``, ``"numpy"``, ``"numba"`` or
    ``"cupy"`` (see the module docstring). ``metric``: ``"l2"``, the smallest
    squared L2 distance, or ``"ip"``, the largest inner product ``x.e``.
    Raises ValueError/TypeError naming the offending shape, dtype, value,
    backend or metric.
    """
    if not isinstance(metric, str) or metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}: use one of {list(METRICS)}")
    x, codebook, device = _validate(x, codebook)
    name = _resolve(backend, device)
    both = ((x, "x"), (codebook, "codebook"))
    if name == "numba":
        # the kernel finds a NaN or an inf of x itself (a row whose best score is not finite); only the
        # codebook is checked first. Either way the error is the one both checks give, x's first
        if not _all_finite(codebook):
            _check_finite(both)
    else:
        _check_finite(both)
    if x.shape[0] == 0:
        return _backend.get_array_module(x).empty(0, dtype=np.int64)
    # the metric is passed only when it is not the default, so a stand-in written for the
    # L2 search (the tests' fake GPU kernels) keeps working
    options = {} if metric == "l2" else {"metric": metric}
    if name == "numpy":
        from .nearest_numpy import nearest_code_numpy
        return nearest_code_numpy(x, codebook, **options)
    if name == "numba":
        screen = _load("numba-screen")      # a screen where the CPU has one (AMX or int16), else the fused kernel
        search = _load("numba").nearest_code_numba if isinstance(screen, str) else screen.nearest_code
        return search(x, codebook, **options, check_x=lambda: _check_finite(both))
    return _load("cupy").nearest_code_cupy(x, codebook, **options)


# ---------------------------------------------------------------- the window copies of a convolution
WINDOW_BACKENDS = ("auto", "numpy", "numba", "cupy")


def window_backend(a, backend="auto"):
    """The backend that copies the windows of ``a``: ``"auto"`` takes Numba for NumPy arrays when it
    imports and the CUDA kernels (windows.cu) for CuPy arrays when they compile, else the NumPy
    reference (which runs on either); an explicit backend that cannot run here is a clear error."""
    if backend not in WINDOW_BACKENDS:
        raise ValueError(f"unknown backend {backend!r} for the window copies: use one of {list(WINDOW_BACKENDS)}")
    on_gpu = _backend.get_array_module(a) is not np
    name = {"numba": "numba-windows", "cupy": "cuda-windows"}
    if backend == "auto":
        backend = "cupy" if on_gpu else "numba"
        return backend if not isinstance(_load(name[backend]), str) else "numpy"
    if backend == "numba" and on_gpu:
        raise TypeError("backend 'numba' copies windows of NumPy arrays, got CuPy arrays; use 'cupy' or 'auto'")
    if backend == "cupy" and not on_gpu:
        raise TypeError("backend 'cupy' copies windows of CuPy arrays, got NumPy arrays; use 'numba' or 'auto'")
    if backend != "numpy" and isinstance(_load(name[backend]), str):
        raise ValueError(f"backend {backend!r} is not available here ({_load(name[backend])}); install it with "
                         f"`{_INSTALL[backend]}`, or use 'numpy' or 'auto'")
    return backend


def im2col(image, kernel, stride, padding, backend="auto"):
    """Every kH x kW window of ``image`` (n, H, W, C) as one row of a new contiguous (n*OH*OW, kH*kW*C).

    Columns are ordered (kh, kw, c); windows reaching past the edge read ``padding`` zeros.
    ``kernel``, ``stride``, ``padding``: pairs of ints, already checked by the caller.
    """
    name = window_backend(image, backend)
    if name == "numba":
        return _load("numba-windows").im2col_numba(image, kernel, stride, padding)
    if name == "cupy":
        return _load("cuda-windows").im2col_cupy(image, kernel, stride, padding)
    from .windows_numpy import im2col_numpy
    return im2col_numpy(image, kernel, stride, padding)


def col2im(cols, out, kernel, stride, padding, backend="auto"):
    """The adjoint of ``im2col``: ``out`` (n, H, W, C) = every row of ``cols`` added over its window.

    ``out``'s old contents are ignored (overwritten); returns ``out``.
    """
    name = window_backend(cols, backend)
    if name == "numba":
        if out.flags.c_contiguous:
            return _load("numba-windows").col2im_numba(cols, out, kernel, stride, padding)
        out[...] = _load("numba-windows").col2im_numba(cols, np.empty(out.shape, out.dtype), kernel, stride, padding)
        return out
    if name == "cupy":
        return _load("cuda-windows").col2im_cupy(cols, out, kernel, stride, padding)
    from .windows_numpy import col2im_numpy
    return col2im_numpy(cols, out, kernel, stride, padding)


# ---------------------------------------------------------------- the product without the windows
def _conv_kernels(a):
    """conv_numba where its kernels can run on arrays like ``a`` (NumPy float32/float64, Numba importable),
    else None."""
    if _backend.get_array_module(a) is not np or a.dtype not in (np.float32, np.float64):
        return None
    module = _load("numba-conv")
    return None if isinstance(module, str) else module


def direct_correlation(a, window_row=None, pointwise=False):
    """Whether ``"auto"`` runs ``correlate``'s compiled kernel for arrays like ``a``: NumPy float32 (the tiles
    are sized for float32 registers; in float64 the GEMM path is 10 % faster), Numba importable, and either
    one Numba thread in the calling thread or BLAS held to one thread per call (``conv_threads``): the
    kernels then split each batch over the calling thread's Numba count of threads, where BLAS threads of
    its own would spin on those cores after every GEMM (conv_numba.py). With ``window_row`` (kW*C of the
    image), whether ``correlate_weight_grad``'s and ``correlate_adjoint``'s are worth running too: their
    vector lanes run along a window row, so a row shorter than one tile of lanes (a 1-channel image)
    would leave most idle. ``pointwise``, for ``correlate`` and ``correlate_weight_grad`` of 1x1 windows
    at stride 1 without padding (their reference is one GEMM on the image's rows, nothing copied): only
    where the kernels split the batch over more than one thread. On one thread OpenBLAS's GEMM is as
    fast (the prior's step 1.02x through the kernels, the VQ-VAE's 0.99x); on two the kernels' two
    shares beat its one thread (0.91-0.95x; benchmarks/NOTES.md, round 8). ``correlate_adjoint`` of
    1x1 windows is not pointwise in this sense: its reference adds the GEMM's rows into the image
    (col2im), a pass the kernel saves at any thread count.

    Where it says no, a caller should rather copy the windows a few images at a time and
    multiply each chunk (functional/conv.py does), which is what the reference does in one piece.
    """
    module = _conv_kernels(a)
    return (module is not None and a.dtype == np.float32 and module.threads_here() > (1 if pointwise else 0)
            and (window_row is None or window_row >= module.LANES))


def winograd_correlation(a, image_shape, c_grid, kernel, stride, padding):
    """Whether ``"auto"`` runs ``correlate`` of this geometry by Winograd's F(4x4, 3x3) for arrays like ``a``
    (winograd_numba.py; ``MINIVQ_NUMBA_WINOGRAD=0`` turns it off)."""
    return direct_correlation(a) and _load("numba-conv").winograd_applies(image_shape, c_grid, kernel, stride, padding)


def _is_pointwise(kernel, stride, padding):
    return tuple(kernel) == (1, 1) and tuple(stride) == (1, 1) and tuple(padding) == (0, 0)


def _correlate_backend(name, image, backend, window_row=None, pointwise=False):
    if backend not in ("auto", "numpy", "numba"):
        raise ValueError(f"unknown backend {backend!r} for {name}: use 'auto', 'numpy' or 'numba'")
    if backend == "numba" and _conv_kernels(image) is None:
        raise ValueError(f"backend 'numba' for {name} needs NumPy float32/float64 arrays and Numba "
                         f"(`{_INSTALL['numba']}`); use 'numpy' or 'auto'")
    auto = backend == "auto" and direct_correlation(image, window_row, pointwise)
    return "numba" if backend == "numba" or auto else "numpy"


def _check_product(name, image_shape, kernel, stride, padding, wmat=None, grid_rows=None):
    """One line naming the mismatch when the operands of a correlation do not fit its geometry: the
    compiled kernels index without bounds checks, so a wrong size must never reach them."""
    from .windows_numpy import output_size
    if len(image_shape) != 4:
        raise ValueError(f"{name}: the image must be channels-last (n, H, W, C), got shape {tuple(image_shape)}")
    n, h, w, c = image_shape
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    if wmat is not None and (wmat.ndim != 2 or wmat.shape[1] != kh * kw * c):
        raise ValueError(f"{name}: wmat must be (C_grid, kH*kW*C) = (C_grid, {kh * kw * c}) for a {kh}x{kw} "
                         f"window over {c} channels, got shape {wmat.shape}")
    windows = n * output_size(h, kh, sh, ph) * output_size(w, kw, sw, pw)
    if grid_rows is not None and (grid_rows.ndim != 2 or grid_rows.shape[0] != windows
                                  or (wmat is not None and grid_rows.shape[1] != wmat.shape[0])):
        raise ValueError(f"{name}: grid_rows must have one row per window ({windows}) and one column per grid "
                         f"channel, got shape {grid_rows.shape}")


def correlate(image, wmat, kernel, stride, padding, bias=None, backend="auto"):
    """``im2col(image) @ wmat.T`` (+ ``bias``) as new contiguous rows (n*OH*OW, C_grid), for a channels-last
    ``image`` (n, H, W, C) and ``wmat`` (C_grid, kH*kW*C) with columns ordered as im2col's.

    ``"numba"`` (what ``"auto"`` takes where ``direct_correlation`` says so) never writes the
    windows: its micro-kernel reads them from a padded copy of the image (conv_numba.py);
    ``"numpy"``, the reference, is the product as written (NumPy or CuPy arrays).
    """
    _check_product("correlate", image.shape, kernel, stride, padding, wmat=wmat)
    if _correlate_backend("correlate", image, backend, pointwise=_is_pointwise(kernel, stride, padding)) == "numba":
        return _load("numba-conv").correlate_numba(image, wmat, kernel, stride, padding, bias)
    out = im2col(image, kernel, stride, padding, backend="numpy") @ wmat.T
    if bias is not None:
        out += bias
    return out


def correlate_weight_grad(image, grid_rows, kernel, stride, padding, backend="auto"):
    """``grid_rows.T @ im2col(image)`` (C_grid, kH*kW*C): a convolution's weight gradient, for a channels-last
    ``image`` (n, H, W, C) and ``grid_rows`` (n*OH*OW, C_grid).

    ``"numba"`` (what ``"auto"`` takes where ``direct_correlation`` says so) reads the windows in
    place, as ``correlate`` does, summing over the pixels in blocks (conv_numba.py); ``"numpy"``,
    the reference, is the product as written.
    """
    _check_product("correlate_weight_grad", image.shape, kernel, stride, padding, grid_rows=grid_rows)
    if _correlate_backend("correlate_weight_grad", image, backend, window_row=kernel[1] * image.shape[3],
                          pointwise=_is_pointwise(kernel, stride, padding)) == "numba":
        return _load("numba-conv").correlate_weight_grad_numba(image, grid_rows, kernel, stride, padding)
    return (im2col(image, kernel, stride, padding, backend="numpy").T @ grid_rows).T


def correlate_adjoint(grid_rows, wmat, image_shape, kernel, stride, padding, bias=None, backend="auto"):
    """``col2im(grid_rows @ wmat)`` (+ ``bias``) as a new channels-last image of ``image_shape`` (n, H, W, C):
    the adjoint of ``correlate`` (conv2d's input gradient, conv_transpose2d's forward), for ``grid_rows``
    (n*OH*OW, C_grid) and ``wmat`` (C_grid, kH*kW*C).

    ``"numba"`` (what ``"auto"`` takes where ``direct_correlation`` says so for a window row of kW*C)
    never writes the columns (conv_numba.py); ``"numpy"``, the reference, is the product then col2im.
    """
    _check_product("correlate_adjoint", tuple(image_shape), kernel, stride, padding, wmat=wmat, grid_rows=grid_rows)
    window_row = kernel[1] * image_shape[3]
    if _correlate_backend("correlate_adjoint", grid_rows, backend, window_row=window_row) == "numba":
        return _load("numba-conv").correlate_adjoint_numba(grid_rows, wmat, image_shape, kernel, stride, padding,
                                                           bias)
    xp = _backend.get_array_module(grid_rows)
    image = col2im(grid_rows @ wmat, xp.empty(image_shape, dtype=grid_rows.dtype), kernel, stride, padding,
                   backend="numpy")
    if bias is not None:
        image += bias
    return image


@contextlib.contextmanager
def conv_threads(dtype):
    """A block in which this thread's CPU convolutions of ``dtype`` arrays spread over the cores themselves.

    Where the compiled kernels take such arrays (float32, Numba imports) and the calling thread's Numba
    count is above 1, BLAS is held to one thread per call inside the block (threadpoolctl, the
    ``threads`` extra), so ``direct_correlation`` says yes and each convolution splits its batch over
    that count of threads, instead of im2col and GEMMs threaded by the BLAS: on a 2-core AVX-512 VM
    the training step in 0.78x the time at batch 128, 0.80x at 32 and for the prior (benchmarks/NOTES.md,
    round 8). The few GEMMs left (the backward of 1-channel layers, the quantiser's) run on one thread.
    Elsewhere (one thread, float64, no Numba, no threadpoolctl) a block that changes nothing.
    ``minivq train``, ``train-prior``, ``eval`` and ``sample`` run inside one (``workers.one_process``).
    BLAS's count is the process's, so other threads' GEMMs run on one thread too while it lasts.
    """
    module = _load("numba-conv") if np.dtype(dtype) == np.float32 else "float64 keeps the GEMMs"
    if isinstance(module, str) or module.get_num_threads() == 1:
        yield
        return
    try:
        one_blas_thread = _backend.blas_threads(1)
    except ImportError:
        yield
        return
    with one_blas_thread:
        yield


# ---------------------------------------------------------------- rows added by index
def index_add(indices, values, num_rows):
    """``out[indices[i]] += values[i]`` for rows, into a fresh ``(num_rows, ...)`` array: the embedding's
    gradient and the EMA quantiser's sums. The reference is ``backend.index_add`` (a sort and
    ``np.add.reduceat``; atomic adds on CuPy); for NumPy float32/float64 rows, where Numba imports, one
    compiled pass over the rows in their order (scatter_numba.py: 0.07 ms against 2.4 for 8,192 rows of
    64 into 512), equal to the reference to float tolerance. An index out of range raises IndexError;
    operands of the wrong shapes get the reference's ValueError.
    """
    if _backend.get_array_module(values) is np and not isinstance(_load("numba-scatter"), str):
        out = _load("numba-scatter").index_add_numba(indices, values, num_rows)
        if out is not None:
            return out
    return _backend.index_add(indices, values, num_rows)


# ---------------------------------------------------------------- elementwise passes
def _elementwise(a):
    """elementwise_numba.py for NumPy arrays where Numba imports, else None."""
    if _backend.get_array_module(a) is not np:
        return None
    module = _load("numba-elementwise")
    return None if isinstance(module, str) else module


def relu(x):
    """``max(x, 0)``, the reference ``xp.maximum(x, 0)`` (NaN stays NaN).

    For NumPy float32/float64 arrays of one dense layout, when Numba imports, one compiled pass
    (elementwise_numba.py, equal to the reference to the bit; faster than NumPy's ``maximum`` on one
    thread), split over the threads where the convolutions split each batch over them too
    (``conv_threads``); elsewhere (CuPy arrays, no Numba, strided layouts) the reference.
    """
    module = _elementwise(x)
    out = module.relu_numba(x) if module is not None else None
    return out if out is not None else _backend.get_array_module(x).maximum(x, 0)


def relu_grad(g, y):
    """dL/dx of ``y = relu(x)`` from dL/dy = ``g``: the reference ``g * (y > 0)``.

    For NumPy arrays of one dense layout, when Numba imports, it is one compiled pass instead of
    two (elementwise_numba.py), split over the threads as ``relu``'s, equal to the reference to
    the bit; elsewhere (CuPy arrays, no Numba, mixed or strided layouts) the reference itself.
    """
    module = _elementwise(g)
    out = module.relu_grad_numba(g, y) if module is not None else None
    return out if out is not None else g * (y > 0)


def add(a, b):
    """``a + b``, the reference; for two NumPy arrays of one shape, dtype and dense layout, split over
    the threads as ``relu``'s where that applies (elementwise_numba.py, equal to the reference to the bit)."""
    module = _elementwise(a)
    out = (module.add_numba(a, b) if module is not None and isinstance(b, np.ndarray)
           and a.shape == b.shape else None)
    return out if out is not None else a + b


def squared_error(a, b):
    """``(a - b, mean((a - b) ** 2))``: the reference ``diff = a - b`` and ``(diff * diff).mean()``; for two NumPy
    arrays of one shape, dtype and dense layout, one pass split over the threads as ``relu``'s where that
    applies (elementwise_numba.py: the mean summed in float64, equal to the reference to float tolerance)."""
    module = _elementwise(a)
    made = (module.squared_error_numba(a, b) if module is not None and isinstance(b, np.ndarray)
            and a.shape == b.shape else None)
    if made is not None:
        return made
    diff = a - b
    return diff, (diff * diff).mean()


def column_sums(rows):
    """The sum of ``rows`` (M, C) over M: the reference ``ones(M) @ rows`` (one GEMV, threaded by the BLAS, a
    third of the time of ``rows.sum(axis=0)`` on one core: NOTES.md, round 3); for C-contiguous NumPy rows,
    split over the threads as ``relu``'s where that applies (elementwise_numba.py; equal to the reference
    to float tolerance)."""
    module = _elementwise(rows)
    out = module.column_sums_numba(rows) if module is not None else None
    if out is not None:
        return out
    return _backend.get_array_module(rows).ones(rows.shape[0], dtype=rows.dtype) @ rows


# ---------------------------------------------------------------- threads
def set_cpu_threads(count):
    """Let the parallel CPU kernel (Numba's nearest-code search) use ``count`` threads when this thread calls it.

    Numba's thread count belongs to the calling thread, so each data-parallel worker thread
    (``minivq.workers``) sets its own. Does nothing where Numba does not import. Capped at the
    threads Numba started with.
    """
    if isinstance(_load("numba"), str):
        return
    import numba
    numba.set_num_threads(max(1, min(int(count), numba.config.NUMBA_NUM_THREADS)))


# ---------------------------------------------------------------- Adam's step
def adam_fits(param, grad, exp_avg, exp_avg_sq):
    """Whether a fused Adam kernel can update these arrays: float32 or float64, one shape and dtype,
    param and moments contiguous (they are written in place through flat views; ``grad`` is made
    contiguous by the kernel if it is not)."""
    updated = (param, exp_avg, exp_avg_sq)
    return param.dtype in (np.float32, np.float64) \
        and all(a.dtype == param.dtype and a.shape == param.shape for a in updated + (grad,)) \
        and all(a.flags.c_contiguous for a in updated)


def adam_scalars(lr, betas, eps, weight_decay, step):
    """The per-step scalars both fused kernels take, in double precision as NumPy forms them: 1 - b1, b2,
    1 - b2, step_size = lr / (1 - b1^t), bias2_root = sqrt(1 - b2^t), eps, weight decay."""
    b1, b2 = betas
    return (1 - b1, b2, 1 - b2, lr / (1 - b1 ** step), math.sqrt(1 - b2 ** step), eps, weight_decay)


def adam_step(param, grad, exp_avg, exp_avg_sq, lr, betas, eps, weight_decay, step):
    """Adam's update of one parameter in place as one pass, where it can run: for NumPy arrays a Numba
    loop (adam_numba.py, when Numba imports), for CuPy arrays one CUDA launch (adam.cu, where it
    compiles); param and moments contiguous and of one float dtype.

    Returns whether it ran; where it did not, the caller's array operations (optim.Adam, the
    reference, whose arithmetic both kernels repeat to the bit) do the update.
    """
    name = "numba-adam" if _backend.get_array_module(param) is np else "cuda-adam"
    if not adam_fits(param, grad, exp_avg, exp_avg_sq) or isinstance(_load(name), str):
        return False
    update = _load(name).adam_numba if name == "numba-adam" else _load(name).adam_cupy
    update(param, grad, exp_avg, exp_avg_sq, lr, betas, eps, weight_decay, step)
    return True


__all__ = ["nearest_code", "available_backends", "im2col", "col2im", "window_backend", "relu", "relu_grad", "add",
           "squared_error", "column_sums", "index_add", "adam_step", "set_cpu_threads", "correlate",
           "correlate_weight_grad", "direct_correlation", "winograd_correlation",
           "BACKENDS", "METRICS", "WINDOW_BACKENDS", "NonFiniteError"]
