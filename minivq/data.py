"""Datasets and batching for the VQ-VAE: which files make up a dataset, and the batches drawn from it.

The file formats themselves are parsed in ``minivq.formats``.

``load_dataset(path, split)`` looks at a folder or a file and reads one of:

* MNIST / Fashion-MNIST IDX files, gzipped or not (told apart by their bytes,
  not their names): ``train-images-idx3-ubyte[.gz]`` + ``train-labels-idx1-ubyte[.gz]``
  for ``split="train"``, ``t10k-...`` for ``"test"`` (the ``...-images.idx3-ubyte``
  spelling is accepted too). Magic numbers, dimensions and sizes are checked
  against the file; the labels file is optional (labels are then ``None``).
* CIFAR-10, binary version: ``data_batch_1.bin`` .. ``data_batch_5.bin`` (train, all
  five needed) or ``test_batch.bin``, in the folder or in ``cifar-10-batches-bin/``;
  records of 1 label byte (0..9) + 3072 pixel bytes (1024 R, 1024 G, 1024 B).
* CIFAR-10, python version: ``data_batch_1`` .. ``data_batch_5`` / ``test_batch``,
  in the folder or in ``cifar-10-batches-py/``. These are Python 2 pickles; they
  are read by an unpickler that admits no global but the four NumPy names an
  array needs (``_reconstruct`` under its two module paths, ``ndarray``, ``dtype``),
  each wrapped so it can be used only the way NumPy's own pickles use it. So no
  code from a file ever runs. The result must be a dict with ``data`` (uint8
  ``(N, 3072)``) and ``labels`` (N ints in 0..9), keys as bytes or str.
* NumPy arrays, read without pickle (object arrays are refused):
  a ``.npy`` file (the whole array is the images, for either split); an ``.npz``
  file, whose arrays for ``split`` are looked up in this order:
  ``x_{split}`` (+ ``y_{split}``), ``{split}`` (+ ``{split}_labels``),
  ``images`` (+ ``labels``), or its only array; a folder with ``{split}.npy``
  (+ ``{split}_labels.npy``) or ``{split}.npz``. Images may be ``(N, H, W)``,
  ``(N, C, H, W)`` (axis 1 of size 1 or 3) or ``(N, H, W, C)`` (last axis of size
  1 or 3), as integers in 0..255 or floats in [0, 1] (rounded to 8 bits);
  labels a 1-D integer array.

When a folder holds several of these, the first in this list wins.

Images are kept compactly as uint8 ``(N, C, H, W)`` (28x28 ones padded once to
32x32 with the background 0); ``Dataset.batch`` scales a batch to floats in
[-0.5, 0.5] (``x / 255 - 0.5``) on the requested device.

Every malformed, truncated or foreign file raises ``ValueError`` (its subclass
``DataFormatError``) with a one-line message saying what was expected and how to
get it; a missing file raises ``FileNotFoundError`` saying what was looked for
and where.
"""
import os
import re
import shutil
import subprocess

import numpy as np

from .backend import to_device, to_numpy
from .formats import (_CIFAR_FILES, _FASHION_HINT, _IDX_PREFIX, _NPY_MAGIC, SPLITS, DataFormatError, _as_labels,
                      _as_uint8_nchw, cifar_files, idx_names, read_cifar, read_idx_split, read_npy, read_npz)

__all__ = ["Dataset", "BatchSampler", "DataFormatError", "default_data_dir", "load_dataset"]

_DEBIAN_FASHION_DIR = "/usr/share/datasets/fashion-mnist"


def _first_file(folder, names):
    for name in names:
        candidate = os.path.join(folder, name)
        if os.path.isfile(candidate):
            return candidate
    return None


def _pad_to_32(images):
    """Pad 28x28 images to 32x32 with the background value 0 (2 pixels each side)."""
    n, c, h, w = images.shape
    if (h, w) != (28, 28):
        return images
    out = np.zeros((n, c, 32, 32), dtype=np.uint8)
    out[:, :, 2:30, 2:30] = images
    return out



class Dataset:
    """Images as uint8 ``(N, C, H, W)``, labels as int64 ``(N,)`` or ``None``.

    Floats exist only per batch: ``batch(indices)`` gives ``x / 255 - 0.5``.
    """

    def __init__(self, images, labels=None, name="dataset", split=None):
        if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError("Dataset wants uint8 images (N, C, H, W), got "
                             f"{getattr(images, 'dtype', type(images).__name__)} "
                             f"{getattr(images, 'shape', '')}; use Dataset.from_arrays for other layouts")
        if 0 in images.shape:
            raise ValueError(f"Dataset holds no images (shape {images.shape})")
        self.images = np.ascontiguousarray(images)
        self.labels = _as_labels(labels, images.shape[0], name)
        self.name = name
        self.split = split

    @classmethod
    def from_arrays(cls, images, labels=None, name="arrays", split=None):
        """A Dataset from in-memory arrays, in any layout and dtype that .npy files may use
        (see the module docstring); no padding is applied. Shares memory with
        ``images`` when it is already uint8 (N, C, H, W) and contiguous."""
        return cls(_as_uint8_nchw(to_numpy(images), name), labels, name=name, split=split)

    def __len__(self):
        return self.images.shape[0]

    @property
    def num_channels(self):
        return self.images.shape[1]

    @property
    def image_size(self):
        """``(H, W)``."""
        return tuple(self.images.shape[2:])

    def __repr__(self):
        labels = "None" if self.labels is None else f"{len(self.labels)}"
        return (f"Dataset(name={self.name!r}, split={self.split!r}, images={self.images.shape} uint8, "
                f"labels={labels})")

    def batch(self, indices, device="cpu", dtype=np.float32):
        """``(x, labels)`` for the given indices: x of ``dtype`` in [-0.5, 0.5], ``(B, C, H, W)``,
        and int64 labels (or None), both on ``device``. The uint8 pixels are what
        crosses to the device; the scaling happens there.

        On the GPU the batch is gathered on the host (one copy of B images), then crosses in
        one copy: ``cupy.asarray`` stages it through a pinned buffer and queues the transfer
        on the current stream without waiting for it, so the host goes on to launch the
        step. A pinned gather buffer of our own would save only the small host memcpy into
        CuPy's staging buffer, so there is none.
        """
        idx = np.asarray(indices)
        if idx.dtype.kind not in "iu":
            raise TypeError(f"batch indices must be integers, got dtype {idx.dtype}")
        if idx.ndim != 1:
            raise ValueError(f"batch indices must be 1-D, got shape {idx.shape}")
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise ValueError(f"batch indices must lie in [0, {len(self)}), got values in "
                             f"[{idx.min()}, {idx.max()}]")
        dtype = np.dtype(dtype)
        if dtype.kind != "f":
            raise ValueError(f"batch dtype must be a float type, got {dtype}")
        x = to_device(self.images[idx], device)
        x = x.astype(dtype)
        x /= 255
        x -= 0.5
        labels = None if self.labels is None else to_device(self.labels[idx], device)
        return x, labels

    def pixel_variance(self):
        """Variance (ddof 0) of the scaled pixels ``x / 255 - 0.5`` over the whole split,
        as a Python float: what the reconstruction loss is divided by in DeepMind's
        Sonnet VQ-VAE example (there ``np.var(x / 255)``, the same number).

        Computed in float64 over chunks of pixels, so no float copy of the data is
        ever made. The pixels are integers 0..255, so the sums of x and x**2 are exact
        in float64 (below 2**53 for up to ~10**11 pixels) and the one-pass formula
        E[x^2] - E[x]^2 is safe; the shift by -0.5 does not change a variance.
        """
        flat = self.images.reshape(-1)
        total = total_sq = 0.0
        step = 1 << 16                       # 512 KiB of float64: stays in cache
        for start in range(0, flat.size, step):
            x = flat[start:start + step].astype(np.float64)
            total += float(x.sum())
            total_sq += float(x @ x)
        mean = total / flat.size
        return (total_sq / flat.size - mean * mean) / 255.0 ** 2


# ------------------------------------------------------------------ sampler
def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


class BatchSampler:
    """Indices of the batch for each global training step, a pure function of (seed, step).

    Epoch ``e = step // batches_per_epoch`` visits the data in the order
    ``np.random.default_rng([seed, e]).permutation(n)`` (or ``arange(n)`` without
    shuffling), cut into consecutive batches. So a run resumed at any step sees
    exactly the batches an uninterrupted run would, with no RNG state saved, and
    a data-parallel rank can take its slice of the global batch.
    ``drop_last`` drops the short batch at the end of each epoch.
    """

    def __init__(self, n, batch_size, seed, shuffle=True, drop_last=True):
        self.n = _check_int("n (dataset size)", n, 1)
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self.seed = _check_int("seed", seed, 0)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        if self.drop_last and self.batch_size > self.n:
            raise ValueError(f"batch_size {self.batch_size} is larger than the dataset ({self.n} items), "
                             "so drop_last would leave no batch; use a smaller batch_size")
        if self.drop_last:
            self.batches_per_epoch = self.n // self.batch_size
        else:
            self.batches_per_epoch = -(-self.n // self.batch_size)
        self._order_cache = (None, None)   # (epoch, order): one permutation reused within an epoch

    def __len__(self):
        return self.batches_per_epoch

    def epoch(self, step):
        return _check_int("step", step, 0) // self.batches_per_epoch

    def order(self, epoch):
        """The visiting order of epoch ``epoch`` (int64, length n, read-only)."""
        epoch = _check_int("epoch", epoch, 0)
        cached_epoch, cached = self._order_cache
        if cached_epoch != epoch:
            if self.shuffle:
                cached = np.random.default_rng([self.seed, epoch]).permutation(self.n).astype(np.int64)
            else:
                cached = np.arange(self.n, dtype=np.int64)
            cached.flags.writeable = False     # shared by every batch of the epoch
            self._order_cache = (epoch, cached)
        return cached

    def indices(self, step):
        """int64 indices of the batch for global step ``step`` (0-based)."""
        epoch, position = divmod(_check_int("step", step, 0), self.batches_per_epoch)
        start = position * self.batch_size
        return self.order(epoch)[start:start + self.batch_size].copy()



# ------------------------------------------------------------------ detection
def _stem(path):
    base = os.path.basename(os.path.normpath(path))
    for ext in (".gz", ".npy", ".npz", ".bin"):
        if base.endswith(ext):
            base = base[:-len(ext)]
    return base or "dataset"


def _finish(arrays, name, split):
    images, labels = arrays
    return Dataset(_pad_to_32(images), labels, name=name, split=split)


def _looked_for(split):
    prefix = _IDX_PREFIX[split]
    cifar = " / ".join(_CIFAR_FILES[split])
    return (f"{prefix}-images-idx3-ubyte[.gz] (MNIST / Fashion-MNIST IDX), {cifar} with .bin "
            f"(CIFAR-10 binary, also under cifar-10-batches-bin/) or without (CIFAR-10 python, also under "
            f"cifar-10-batches-py/), {split}.npy or {split}.npz")


def _load_folder(folder, split):
    name = _stem(folder)
    prefix = _IDX_PREFIX[split]
    if any(_first_file(folder, idx_names(p, "images")) for p in _IDX_PREFIX.values()):
        images = _first_file(folder, idx_names(prefix, "images"))
        if images is None:
            raise FileNotFoundError(f"{folder} holds IDX files but not the {split} images "
                                    f"({prefix}-images-idx3-ubyte[.gz]); {_FASHION_HINT}")
        return _finish(read_idx_split(images, _first_file(folder, idx_names(prefix, "labels"))), name, split)
    for binary in (True, False):
        paths = cifar_files(folder, split, binary)
        if paths is not None:
            return _finish(read_cifar(paths, binary), "cifar-10", split)
    npy = _first_file(folder, [f"{split}.npy"])
    if npy is not None:
        return _finish(read_npy(npy, _first_file(folder, [f"{split}_labels.npy"])), _stem(npy), split)
    npz = _first_file(folder, [f"{split}.npz"])
    if npz is not None:
        return _finish(read_npz(npz, split), _stem(npz), split)
    hint = _FASHION_HINT
    if any(n.startswith("cifar-10-") and n.endswith(".tar.gz") for n in os.listdir(folder)):
        hint = "found a CIFAR-10 archive: unpack it with `tar xzf` first, or pass --data DIR"
    raise FileNotFoundError(f"no {split} dataset in {folder}: looked for {_looked_for(split)}; {hint}")


def _load_file(path, split):
    """One file: told apart by its name first, then by its first bytes."""
    base = os.path.basename(path)
    with open(path, "rb") as f:
        head = f.read(8)
    idx_stem = base[:-3] if base.endswith(".gz") else base
    if base.endswith(".npz"):
        return _finish(read_npz(path, split), _stem(path), split)
    if base.endswith(".npy"):
        return _finish(read_npy(path), _stem(path), split)
    if base.endswith(".bin"):
        return _finish(read_cifar([path], True), "cifar-10", split)
    if re.fullmatch(r"data_batch_\d+|test_batch", base):
        return _finish(read_cifar([path], False), "cifar-10", split)
    if re.search(r"labels[-.]idx1", idx_stem):
        raise DataFormatError(f"{path} is an IDX labels file; pass the images file (...-images-idx3-ubyte) "
                              f"or its folder; {_FASHION_HINT}")
    if re.search(r"images[-.]idx3", idx_stem):
        label_stem = re.sub(r"images([-.])idx3", r"labels\1idx1", idx_stem)
        labels = _first_file(os.path.dirname(path), [label_stem, label_stem + ".gz"])
        return _finish(read_idx_split(path, labels), _stem(path), split)
    if head.startswith(b"PK"):
        return _finish(read_npz(path, split), _stem(path), split)
    if head.startswith(_NPY_MAGIC):
        return _finish(read_npy(path), _stem(path), split)
    if head[:1] == b"\x80":
        return _finish(read_cifar([path], False), "cifar-10", split)
    if head[:2] in (b"\x1f\x8b", b"\0\0"):
        return _finish(read_idx_split(path, None), _stem(path), split)
    raise DataFormatError(f"cannot tell the format of {path}: expected an IDX images file, a CIFAR-10 batch "
                          f"(binary .bin or python pickle), a .npy or a .npz file; {_FASHION_HINT}")


# ------------------------------------------------------------------ entry points
def _debian_fashion_dirs():
    """Folders where Debian's dataset-fashion-mnist package put its files (dpkg first)."""
    dirs = []
    if shutil.which("dpkg"):
        try:
            listing = subprocess.run(["dpkg", "-L", "dataset-fashion-mnist"], capture_output=True,
                                     text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            listing = ""
        for line in listing.splitlines():
            line = line.strip()
            if os.path.basename(line).startswith("train-images-idx3-ubyte"):
                dirs.append(os.path.dirname(line))
    dirs.append(_DEBIAN_FASHION_DIR)
    return dirs


def default_data_dir():
    """Where data is read from when no path is given: ``$MINIVQ_DATA`` if set, else the
    folder of Debian's dataset-fashion-mnist package; FileNotFoundError otherwise."""
    env = os.environ.get("MINIVQ_DATA")
    if env:
        if not os.path.exists(env):
            raise FileNotFoundError(f"MINIVQ_DATA={env} does not exist; point it at a dataset folder or file, "
                                    "or pass --data DIR")
        return env
    for folder in _debian_fashion_dirs():
        if os.path.isdir(folder):
            return folder
    raise FileNotFoundError("no dataset found: MINIVQ_DATA is not set and Fashion-MNIST is not installed "
                            f"(looked in {_DEBIAN_FASHION_DIR}); `apt-get install dataset-fashion-mnist`, "
                            "pass --data DIR, or set MINIVQ_DATA")


def load_dataset(path=None, split="train"):
    """Read the ``split`` ("train" or "test") of the dataset at ``path`` (a folder or a file;
    default ``default_data_dir()``), auto-detecting its format (see the module docstring).

    A single-array file (.npy, an IDX images file, one CIFAR-10 batch) is the split
    itself, whichever ``split`` is asked for.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if path is None:
        path = default_data_dir()
    path = os.fspath(path)
    if os.path.isdir(path):
        return _load_folder(path, split)
    if os.path.isfile(path):
        return _load_file(path, split)
    raise FileNotFoundError(f"no dataset at {path}: no such file or folder; {_FASHION_HINT}")
