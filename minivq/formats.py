"""Readers of the dataset file formats: IDX, CIFAR-10 (binary and python), .npy and .npz.

Each reader takes paths and returns raw arrays, ``(images, labels)``: images as
uint8 ``(N, C, H, W)``, labels as int64 ``(N,)`` or None. Which files make up a
dataset, and the ``Dataset`` built from them, are ``minivq.data``'s business
(its docstring lists the layouts accepted). Every parser here runs on untrusted
bytes: sizes are checked against the file before anything is allocated, and
every failure is a ``DataFormatError`` (a ValueError) with a one-line message
saying what was expected and how to get it.
"""
import contextlib
import gzip
import os

import numpy as np

from .cifar_unpickle import RefusedGlobal, load_cifar_batch
from .io import FileFormatError, npy_array, one_line, open_archive, read_npz_member

SPLITS = ("train", "test")

_FASHION_HINT = "expected Fashion-MNIST from `apt-get install dataset-fashion-mnist` or pass --data DIR"
_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
_CIFAR_BIN_HINT = (f"expected the CIFAR-10 binary version (cifar-10-binary.tar.gz from {_CIFAR_URL}, "
                   "unpacked with `tar xzf`) or pass --data DIR")
_CIFAR_PY_HINT = (f"expected the CIFAR-10 python version (cifar-10-python.tar.gz from {_CIFAR_URL}, "
                  "unpacked with `tar xzf`) or pass --data DIR")
_NPY_HINT = ("expected images saved with numpy.save/savez: uint8 (N,H,W), (N,C,H,W) or (N,H,W,C) "
             "with C 1 or 3, or floats in [0, 1]")

_CHUNK = 1 << 22               # bytes handled at a time when streaming or scanning
_MAX_DEFLATE_RATIO = 1100      # deflate cannot expand data more than 1032:1 (gzip'd IDX files)



class DataFormatError(FileFormatError):
    """A dataset file is malformed, truncated or not what was expected (a ValueError)."""


# ------------------------------------------------------------------ helpers
@contextlib.contextmanager
def _parsing(path, what, hint):
    """Report any failure of a library parser (gzip, zipfile, NumPy's .npy header,
    the unpickler) on untrusted bytes as one DataFormatError.

    Those parsers raise open-ended sets of types on bad input (OSError, EOFError,
    zlib.error, BadZipFile, LZMAError, UnpicklingError, KeyError, MemoryError, ...);
    the contract here is ValueError, always. The files are opened before this
    block, so a missing file still surfaces as FileNotFoundError.
    """
    try:
        yield
    except DataFormatError:
        raise
    except FileFormatError as exc:     # minivq.io's checks name the file already
        raise DataFormatError(f"{exc}; {hint}") from None
    except Exception as exc:
        raise DataFormatError(f"{path} is not a valid {what} ({one_line(exc)}); {hint}") from exc


def _read_into(stream, out):
    """Fill the 1-D uint8 array ``out`` from ``stream`` in chunks; return the byte count read."""
    view = memoryview(out)
    pos = 0
    while pos < len(out):
        got = stream.readinto(view[pos:pos + _CHUNK])
        if not got:
            break
        pos += got
    return pos



def _as_uint8_nchw(images, where, hint=""):
    """Images in any accepted layout and dtype -> C-contiguous uint8 (N, C, H, W)."""
    tail = f"; {hint}" if hint else ""
    a = np.asarray(images)
    if a.dtype.kind not in "uif":
        raise DataFormatError(f"{where}: images must be integers in 0..255 or floats in [0, 1], "
                              f"got dtype {a.dtype}{tail}")
    if a.ndim == 3:
        a = a[:, None]
    elif a.ndim == 4:
        if a.shape[1] in (1, 3):
            pass                                   # (N, C, H, W)
        elif a.shape[3] in (1, 3):
            a = a.transpose(0, 3, 1, 2)            # (N, H, W, C) -> (N, C, H, W)
        else:
            raise DataFormatError(f"{where}: cannot tell the channel axis of shape {a.shape}; expected "
                                  f"(N, C, H, W) or (N, H, W, C) with C 1 or 3{tail}")
    else:
        raise DataFormatError(f"{where}: images must be (N, H, W), (N, C, H, W) or (N, H, W, C), "
                              f"got shape {a.shape}{tail}")
    if 0 in a.shape:
        raise DataFormatError(f"{where}: holds no images (shape {a.shape}){tail}")
    if a.dtype == np.uint8:
        return np.ascontiguousarray(a)
    out = np.empty(a.shape, dtype=np.uint8)
    step = max(1, _CHUNK // (a[0].size * a.dtype.itemsize))   # bounded temporaries
    for start in range(0, a.shape[0], step):
        part = a[start:start + step]
        if a.dtype.kind == "f":
            if not np.isfinite(part).all():
                raise DataFormatError(f"{where}: float images hold NaN or infinity{tail}")
            lo, hi = float(part.min()), float(part.max())
            if lo < 0.0 or hi > 1.0:
                raise DataFormatError(f"{where}: float images must lie in [0, 1], found values in "
                                      f"[{lo:g}, {hi:g}] (divide by 255, or store uint8){tail}")
            out[start:start + step] = np.rint(part.astype(np.float64) * 255.0)
        else:
            lo, hi = int(part.min()), int(part.max())
            if lo < 0 or hi > 255:
                raise DataFormatError(f"{where}: integer images must lie in 0..255, found values in "
                                      f"[{lo}, {hi}]{tail}")
            out[start:start + step] = part
    return out


def _as_labels(labels, n, where, hint=""):
    """Labels -> int64 (n,), or None."""
    if labels is None:
        return None
    tail = f"; {hint}" if hint else ""
    a = np.asarray(labels)
    if a.dtype.kind not in "iu" or a.ndim != 1:
        raise DataFormatError(f"{where}: labels must be a 1-D integer array, got {a.dtype} {a.shape}{tail}")
    if a.shape[0] != n:
        raise DataFormatError(f"{where}: {a.shape[0]} labels for {n} images; they must match one to one{tail}")
    return a.astype(np.int64)


# ------------------------------------------------------------------ dataset

# ------------------------------------------------------------------ IDX
_IDX_TYPES = {0x08: "unsigned byte", 0x09: "signed byte", 0x0B: "int16", 0x0C: "int32",
              0x0D: "float32", 0x0E: "float64"}
_IDX_PREFIX = {"train": "train", "test": "t10k"}


def idx_names(prefix, kind):
    """File names tried for one IDX file; ``kind`` is "images" or "labels"."""
    tag = "idx3" if kind == "images" else "idx1"
    stems = (f"{prefix}-{kind}-{tag}-ubyte", f"{prefix}-{kind}.{tag}-ubyte")
    return [stem + ext for stem in stems for ext in ("", ".gz")]


def _read_idx(path, ndim, hint=_FASHION_HINT):
    """One IDX file of unsigned bytes with ``ndim`` dimensions -> uint8 array, strictly checked."""
    kind = "image" if ndim == 3 else "label"
    with open(path, "rb") as raw:
        file_size = os.fstat(raw.fileno()).st_size
        packed = raw.read(2) == b"\x1f\x8b"
        raw.seek(0)
        what = f"gzip-compressed IDX {kind} file" if packed else f"IDX {kind} file"
        with _parsing(path, what, hint):
            stream = gzip.GzipFile(fileobj=raw, mode="rb") if packed else raw
            header = stream.read(4)
            if len(header) < 4:
                raise DataFormatError(f"{path} is too short to be an IDX {kind} file "
                                      f"({len(header)} bytes); {hint}")
            magic = int.from_bytes(header, "big")
            if header[:2] != b"\0\0" or header[2] not in _IDX_TYPES:
                raise DataFormatError(f"{path} is not an IDX {kind} file (bad magic 0x{magic:08x}, "
                                      f"expected 0x{0x800 | ndim:08x}); {hint}")
            if header[2] != 0x08:
                raise DataFormatError(f"{path} holds IDX {_IDX_TYPES[header[2]]} data (magic 0x{magic:08x}); "
                                      f"only unsigned bytes (0x{0x800 | ndim:08x}) are read; {hint}")
            if header[3] != ndim:
                raise DataFormatError(f"{path} is an IDX file with {header[3]} dimension(s) (magic 0x{magic:08x}); "
                                      f"an IDX {kind} file has {ndim} (magic 0x{0x800 | ndim:08x}); {hint}")
            dim_bytes = stream.read(4 * ndim)
            if len(dim_bytes) < 4 * ndim:
                raise DataFormatError(f"{path} is truncated inside its IDX header; {hint}")
            dims = tuple(int.from_bytes(dim_bytes[4 * i:4 * i + 4], "big") for i in range(ndim))
            if 0 in dims:
                raise DataFormatError(f"{path} declares an empty array {dims}; {hint}")
            count = 1
            for d in dims:
                count *= d
            if packed:
                if count > _MAX_DEFLATE_RATIO * file_size:
                    raise DataFormatError(f"{path} declares {' x '.join(map(str, dims))} = {count} bytes, "
                                          f"more than a {file_size}-byte gzip file can hold; {hint}")
            elif file_size - 4 - 4 * ndim != count:
                raise DataFormatError(f"{path} holds {file_size - 4 - 4 * ndim} data bytes but its header "
                                      f"declares {' x '.join(map(str, dims))} = {count}; {hint}")
            data = np.empty(count, dtype=np.uint8)
            got = _read_into(stream, data)
            if got < count:
                raise DataFormatError(f"{path} is truncated: {got} of the {count} declared data bytes; {hint}")
            if stream.read(1):   # for gzip this also reaches the end of stream and checks the CRC
                raise DataFormatError(f"{path} has data after the {count} bytes its header declares; {hint}")
    return data.reshape(dims)


def read_idx_split(images_path, labels_path):
    images = _read_idx(images_path, 3)
    labels = None
    if labels_path is not None:
        labels = _read_idx(labels_path, 1)
        if labels.shape[0] != images.shape[0]:
            raise DataFormatError(f"{images_path} holds {images.shape[0]} images but {labels_path} holds "
                                  f"{labels.shape[0]} labels; both must come from the same split; {_FASHION_HINT}")
    return images[:, None], labels


# ------------------------------------------------------------------ CIFAR-10
_CIFAR_RECORD = 1 + 3 * 32 * 32
_CIFAR_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}


def _read_cifar_bin(paths):
    """CIFAR-10 binary batches -> (uint8 (N, 3, 32, 32), int64 (N,))."""
    sizes = []
    for path in paths:
        size = os.path.getsize(path)
        if size == 0 or size % _CIFAR_RECORD:
            raise DataFormatError(f"{path} is not a CIFAR-10 binary batch ({size} bytes is not a whole number "
                                  f"of {_CIFAR_RECORD}-byte records: 1 label byte + 3072 pixel bytes); "
                                  f"{_CIFAR_BIN_HINT}")
        sizes.append(size)
    total = sum(sizes) // _CIFAR_RECORD
    images = np.empty((total, 3, 32, 32), dtype=np.uint8)
    labels = np.empty(total, dtype=np.int64)
    start = 0
    for path, size in zip(paths, sizes):
        n = size // _CIFAR_RECORD
        records = np.empty(size, dtype=np.uint8)
        with open(path, "rb") as f:
            if _read_into(f, records) != size:
                raise DataFormatError(f"{path} changed size while being read; {_CIFAR_BIN_HINT}")
        records = records.reshape(n, _CIFAR_RECORD)
        bad = np.flatnonzero(records[:, 0] > 9)
        if bad.size:
            raise DataFormatError(f"{path} is not a CIFAR-10 binary batch: record {bad[0]} has label "
                                  f"{records[bad[0], 0]}, CIFAR-10 labels are 0..9; {_CIFAR_BIN_HINT}")
        labels[start:start + n] = records[:, 0]
        images[start:start + n] = records[:, 1:].reshape(n, 3, 32, 32)   # 1024 R, 1024 G, 1024 B, rows
        start += n
    return images, labels


def _read_cifar_py_batch(path):
    """One CIFAR-10 python batch -> (uint8 (n, 3, 32, 32), int64 (n,))."""
    with open(path, "rb") as f:
        payload = f.read()
    with _parsing(path, "CIFAR-10 python batch", _CIFAR_PY_HINT):
        try:
            batch = load_cifar_batch(payload)
        except RefusedGlobal as exc:
            raise DataFormatError(f"{path} refused: {exc}; CIFAR-10 batches hold only dicts, lists, strings, "
                                  f"ints and numpy arrays and nothing else is ever loaded; {_CIFAR_PY_HINT}") from None

    def bad(what):
        return DataFormatError(f"{path} is not a CIFAR-10 python batch: {what}; {_CIFAR_PY_HINT}")

    if not isinstance(batch, dict):
        raise bad(f"it holds a {type(batch).__name__}, not a dict")
    entries = {}
    for key, value in batch.items():
        if isinstance(key, bytes):
            key = key.decode("latin-1")
        if isinstance(key, str):
            entries[key] = value
    if "data" not in entries or "labels" not in entries:
        raise bad(f"no 'data' and 'labels' entries (keys: {sorted(entries)})")
    data, labels = entries["data"], entries["labels"]
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
            and data.shape[0] > 0 and data.shape[1] == 3072):
        found = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise bad(f"'data' should be a uint8 array (N, 3072), found {found}")
    if isinstance(labels, np.ndarray) and labels.dtype.kind in "iu" and labels.ndim == 1:
        ok = labels.size == 0 or (int(labels.min()) >= 0 and int(labels.max()) <= 9)
    elif isinstance(labels, (list, tuple)):
        ok = all(type(v) is int and 0 <= v <= 9 for v in labels)
    else:
        ok = False
    if not ok:
        raise bad("'labels' should be a list of ints in 0..9")
    if len(labels) != data.shape[0]:
        raise bad(f"{len(labels)} labels for {data.shape[0]} images")
    return data.reshape(-1, 3, 32, 32), np.asarray(labels, dtype=np.int64)


def read_cifar(paths, binary):
    if binary:
        images, labels = _read_cifar_bin(paths)
    else:
        parts = [_read_cifar_py_batch(p) for p in paths]
        images = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
    return images, labels


def cifar_files(folder, split, binary):
    """The split's batch files if ``folder`` (or its cifar-10-batches-* subfolder) holds
    CIFAR-10 of that version; None if it holds none; FileNotFoundError if some are missing."""
    sub, ext, hint = ("cifar-10-batches-bin", ".bin", _CIFAR_BIN_HINT) if binary else \
        ("cifar-10-batches-py", "", _CIFAR_PY_HINT)
    for root in (folder, os.path.join(folder, sub)):
        if not any(os.path.isfile(os.path.join(root, name + ext)) for s in SPLITS for name in _CIFAR_FILES[s]):
            continue
        wanted = [os.path.join(root, name + ext) for name in _CIFAR_FILES[split]]
        missing = [os.path.basename(p) for p in wanted if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"{root} holds CIFAR-10 batches but not {', '.join(missing)} "
                                    f"(the {split} split); {hint}")
        return wanted
    return None


# ------------------------------------------------------------------ .npy / .npz
_NPY_MAGIC = b"\x93NUMPY"


def _npy_from_bytes(payload, where, kinds):
    """Parse one .npy payload (``minivq.io.npy_array``: no pickle, sizes checked before anything is made)
    and check its dtype is one of ``kinds``."""
    with _parsing(where, ".npy array", _NPY_HINT):
        array = npy_array(payload, where)
    return _of_kinds(array, where, kinds)


def _of_kinds(array, where, kinds):
    """``array`` if its dtype is a plain one of ``kinds`` ("uif" pixels, "iu" labels); DataFormatError otherwise."""
    dtype = array.dtype
    if dtype.kind not in kinds or dtype.fields is not None or dtype.subdtype is not None:
        wanted = "integer labels" if kinds == "iu" else "integer or float pixels"
        raise DataFormatError(f"{where} holds {dtype} data, expected {wanted}; {_NPY_HINT}")
    return array


def _read_npy(path, kinds="uif"):
    with open(path, "rb") as f:
        payload = f.read()
    return _npy_from_bytes(payload, path, kinds)


def _npz_keys(keys, split):
    for images, labels in ((f"x_{split}", f"y_{split}"), (split, f"{split}_labels"), ("images", "labels")):
        if images in keys:
            return images, (labels if labels in keys else None)
    if len(keys) == 1:
        return next(iter(keys)), None
    return None, None


def read_npz(path, split):
    """The images and labels of ``split`` in an .npz; every member's declared size and compression ratio
    is checked before any is inflated, and inflation never produces more than declared (``minivq.io``)."""
    with open(path, "rb") as f:
        with _parsing(path, ".npz archive", _NPY_HINT):
            members = {}
            for info in open_archive(f, path):
                key = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
                members[key] = info
        images, labels, labels_key = _read_npz_members(path, f, members, split)
    return images, _as_labels(labels, images.shape[0], f"{path}[{labels_key}]", _NPY_HINT)


def _read_npz_members(path, f, members, split):
    """The images (uint8 NCHW) and raw labels (or None) of ``split`` in an open .npz."""
    images_key, labels_key = _npz_keys(members, split)
    if images_key is None:
        raise DataFormatError(f"{path} holds the arrays {sorted(members)}; for split {split!r} expected "
                              f"x_{split} (+ y_{split}), {split} (+ {split}_labels), images (+ labels) "
                              f"or a single array; {_NPY_HINT}")
    images = _npz_member(f, members[images_key], path, "uif")
    images = _as_uint8_nchw(images, f"{path}[{images_key}]", _NPY_HINT)
    labels = None
    if labels_key is not None:
        labels = _npz_member(f, members[labels_key], path, "iu")
    return images, labels, labels_key


def _npz_member(f, info, path, kinds):
    """One array of an .npz (a .npy inside a zip), inflated within its declared size."""
    where = f"{path}[{info.filename[:-4] if info.filename.endswith('.npy') else info.filename}]"
    with _parsing(where, ".npz member", _NPY_HINT):
        _key, array = read_npz_member(f, info, path)
    return _of_kinds(array, where, kinds)


def read_npy(path, labels_path=None):
    images = _as_uint8_nchw(_read_npy(path), path, _NPY_HINT)
    labels = None
    if labels_path is not None:
        labels = _as_labels(_read_npy(labels_path, "iu"), images.shape[0], labels_path, _NPY_HINT)
    return images, labels
