"""Saving and loading state dicts as ``.npz``: atomic writes, no pickle on read."""
import os
import tempfile
import zipfile

import numpy as np

from . import backend
from .autograd import Tensor


TEMP_PREFIX = ".minivq-tmp-"   # temporary files of atomic_write; a killed writer may leave one behind


def remove_stale_temporaries(folder):
    """Delete temporary files a killed writer left in ``folder``; returns how many."""
    removed = 0
    for name in os.listdir(folder):
        if name.startswith(TEMP_PREFIX):
            try:
                os.unlink(os.path.join(folder, name))
                removed += 1
            except OSError:
                pass
    return removed


def save(state_dict, path):
    """Write a mapping of names to arrays to ``path`` (an ``.npz``), atomically.

    The file is written to a temporary file in the same folder, flushed to
    disk and renamed over ``path``: a reader (or a crash) never sees half of it.
    """
    if not hasattr(state_dict, "items"):
        raise TypeError(f"save() takes a mapping of names to arrays, got {type(state_dict).__name__}")
    arrays = {}
    for key, value in state_dict.items():
        if not isinstance(key, str) or not key:
            raise TypeError(f"state dict keys must be non-empty strings, got {key!r}")
        if isinstance(value, Tensor):
            value = value.data
        value = backend.to_numpy(value) if hasattr(value, "dtype") else np.asarray(value)
        if value.dtype == object:
            raise TypeError(f"state dict entry '{key}' is an object array, which cannot be saved without pickle")
        arrays[key] = value
    atomic_write(path, lambda f: np.savez(f, **arrays))


def atomic_write(path, write):
    """Call ``write(file)`` on a temporary file beside ``path``, flush it to disk, rename it over ``path``.

    A reader, or a crash at any moment, sees the old file or the new one, never half of one.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"cannot write {path}: folder {folder} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=os.path.splitext(path)[1], dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)      # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:   # make the rename itself durable
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def load(path):
    """Read a state dict written by ``save``; arrays come back on the CPU.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` for one
    that is truncated, corrupt, or not an ``.npz`` of plain arrays.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file: {path}")
    errors = (ValueError, OSError, EOFError, zipfile.BadZipFile, KeyError, IndexError, TypeError,
              RuntimeError, UnicodeDecodeError, MemoryError, OverflowError, NotImplementedError)
    try:
        archive = np.load(path, allow_pickle=False)
    except errors as exc:
        raise ValueError(f"{path} is not a readable minivq state file (.npz of plain arrays): "
                         f"{type(exc).__name__}: {exc}") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"{path} holds a single array, not a state dict (.npz)")
    try:
        with archive:
            return {key: archive[key] for key in archive.files}
    except errors as exc:
        raise ValueError(f"{path} is truncated or corrupt ({type(exc).__name__}: {exc}); "
                         f"use an intact checkpoint") from None
