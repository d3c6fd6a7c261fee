"""Saving and loading state dicts as ``.npz``: atomic writes, no pickle on read, bounded inflation.

Writing never goes through a symbolic link and never into anything but a
regular file: a FIFO, a device node, a socket or a link at the target path is
refused (ValueError naming it). Reading checks every member of an archive
(its declared size, its compression ratio, whatever the method: stored,
deflate, bzip2 or lzma) before inflating it, then inflates it in bounded
chunks that may never produce more than the declared size: a compression
bomb is refused without the memory it asks for.
"""
import bz2
import lzma
import os
import stat
import struct
import tempfile
import zipfile
import zlib

import numpy as np
from numpy.lib import format as _npy_format

from . import backend
from .autograd import Tensor


TEMP_PREFIX = ".minivq-tmp-"   # temporary files of atomic_write; a killed writer may leave one behind
MAX_RATIO = 1100               # deflate expands at most 1032:1; no file minivq reads needs more, whatever the method
MAX_STATE_BYTES = 8 << 30      # what load() inflates at most from one file (a checkpoint, a code cache)
_CHUNK = 1 << 22               # bytes inflated or read at a time
_METHODS = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflate", zipfile.ZIP_BZIP2: "bzip2",
            zipfile.ZIP_LZMA: "lzma"}


class FileFormatError(ValueError):
    """A file is malformed, truncated, or declares more than it can plausibly hold."""


def one_line(exc):
    """``Type: message`` of an exception on one line (NumPy's parsers write several), cut to a readable length."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= 160 else text[:157] + "..."


# ---------------------------------------------------------------- output paths
def _kind(mode):
    """What a file of this ``st_mode`` is, in words."""
    for test, words in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                        (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                        (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return words
    return "not a regular file"


def check_output_path(path, folder=False):
    """Refuse (ValueError) to write at ``path`` if it exists and is not a regular file (a folder, if ``folder``).

    A symbolic link at ``path`` is refused too (for a folder, only one that does not lead
    to a folder): minivq never writes through a link it did not create, nor into a
    device, a pipe or a socket.
    """
    try:
        mode = os.lstat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return                      # nothing there (writing it will say why it cannot, if it cannot)
    if folder and (stat.S_ISDIR(mode) or (stat.S_ISLNK(mode) and os.path.isdir(path))):
        return
    if not folder and stat.S_ISREG(mode):
        return
    wanted = "a folder" if folder else "a regular file"
    raise ValueError(f"{path} exists and is {_kind(mode)}, not {wanted}; minivq writes only regular files, "
                     f"never through a link nor into a device, pipe or socket: remove it or choose another path")


def open_regular(path, mode="r"):
    """Open ``path`` as text ("r", "w" or "a"), refusing (ValueError) anything but a regular file.

    Never follows a symbolic link (O_NOFOLLOW) and never blocks on a FIFO (O_NONBLOCK);
    the opened file is checked again (fstat), so a file swapped in meanwhile is refused too.
    """
    check_output_path(path)
    flags = {"r": os.O_RDONLY, "w": os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
             "a": os.O_WRONLY | os.O_CREAT | os.O_APPEND}[mode]
    flags |= getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags, 0o666)
    except OSError:
        check_output_path(path)     # a link or a FIFO put there since the check: say so
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise ValueError(f"{path} is {_kind(st.st_mode)}, not a regular file; remove it or choose another path")
    return os.fdopen(fd, mode)


# ---------------------------------------------------------------- temporaries
def _temp_prefix():
    """Temporaries carry their writer's pid, so start-up cleanup spares those of live processes."""
    return f"{TEMP_PREFIX}p{os.getpid()}-"


def _owner_alive(name):
    """Whether the process named in a temporary's name still runs (names without a pid: no)."""
    pid, sep, _ = name[len(TEMP_PREFIX):].partition("-")
    if not (sep and pid[:1] == "p" and pid[1:].isdigit()):
        return False
    pid = int(pid[1:])
    if pid == os.getpid() or os.name != "posix":
        return True                 # elsewhere os.kill(pid, 0) is no harmless probe: keep the file
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OverflowError, ValueError):
        return False
    except OSError:
        return True                 # EPERM: alive, someone else's
    return True


def remove_stale_temporaries(folder):
    """Delete the temporary files that killed writers left in ``folder``; returns how many.

    A temporary whose writer (the pid in its name) still runs is left alone.
    """
    removed = 0
    for name in os.listdir(folder):
        if name.startswith(TEMP_PREFIX) and not _owner_alive(name):
            try:
                os.unlink(os.path.join(folder, name))
                removed += 1
            except OSError:
                pass
    return removed


def make_temporary(folder, suffix=""):
    """(fd, path) of a new temporary file in ``folder``: created exclusively (never through a link), 0600."""
    return tempfile.mkstemp(prefix=_temp_prefix(), suffix=suffix, dir=folder)


# ---------------------------------------------------------------- writing
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
    ``path`` must not exist or be a regular file (``check_output_path``).
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"cannot write {path}: folder {folder} does not exist")
    check_output_path(path)
    fd, tmp = make_temporary(folder, suffix=os.path.splitext(path)[1])
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)      # mkstemp makes 0600; give the file the usual permissions
        check_output_path(path)            # nothing but a regular file is replaced, even if put there meanwhile
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


# ---------------------------------------------------------------- reading archives, bounded
def check_members(infos, where, file_size, max_bytes=None):
    """Refuse (FileFormatError) an archive whose members declare implausible sizes, before any is inflated.

    Every member: a known method, not encrypted, its compressed bytes inside the file, and
    at most ``MAX_RATIO`` times as large inflated as compressed (stored: exactly as large);
    all of them together at most ``max_bytes`` inflated, if given.
    """
    total = 0
    for info in infos:
        name = f"{where}[{info.filename}]"
        method = _METHODS.get(info.compress_type)
        if method is None:
            raise FileFormatError(f"{name} uses compression method {info.compress_type}, which minivq does not "
                                  f"read (stored, deflate, bzip2 or lzma only)")
        if info.flag_bits & 0x1:
            raise FileFormatError(f"{name} is encrypted")
        if info.header_offset + info.compress_size > file_size:
            raise FileFormatError(f"{name} declares {info.compress_size} compressed bytes at offset "
                                  f"{info.header_offset}, past the end of the {file_size}-byte file; "
                                  f"it is truncated or corrupt")
        if (method == "stored" and info.file_size != info.compress_size) or \
                info.file_size > MAX_RATIO * info.compress_size + 1024:
            raise FileFormatError(f"{name} claims {info.file_size} bytes from {info.compress_size} "
                                  f"{method}-compressed ones, more than {MAX_RATIO}:1; refused as a possible "
                                  f"compression bomb")
        total += info.file_size
    if max_bytes is not None and total > max_bytes:
        raise FileFormatError(f"{where} declares {total} bytes of arrays, more than the {max_bytes} "
                              f"minivq reads from one file")


class _Inflate:
    """zlib's raw inflater behind the interface of bz2's and lzma's decompressors (needs_input, eof)."""

    def __init__(self):
        self._z = zlib.decompressobj(-15)

    @property
    def needs_input(self):
        return not self._z.unconsumed_tail

    @property
    def eof(self):
        return self._z.eof

    def decompress(self, data, max_length):
        return self._z.decompress(self._z.unconsumed_tail + data, max_length)


def _lzma_decompressor(raw, info):
    """A raw LZMA1 decompressor from the 4-byte header and the properties that open a zip's lzma member."""
    head = raw.read(4)
    if len(head) < 4 or struct.unpack("<H", head[2:4])[0] != 5:
        raise FileFormatError("bad lzma header")
    props = raw.read(5)
    if len(props) < 5 or props[0] >= 9 * 5 * 5:
        raise FileFormatError("bad lzma properties")
    pb, rest = divmod(props[0], 45)
    lp, lc = divmod(rest, 9)
    # the dictionary is allocated up front: never larger than the output can use
    dict_size = min(int.from_bytes(props[1:5], "little"), max(info.file_size, 4096))
    filters = [{"id": lzma.FILTER_LZMA1, "dict_size": max(dict_size, 4096), "lc": lc, "lp": lp, "pb": pb}]
    return lzma.LZMADecompressor(lzma.FORMAT_RAW, filters=filters), 9


def read_member(raw, info, where):
    """The bytes of one archive member, read from the open binary file ``raw``.

    Inflated chunk by chunk into a buffer of the declared size: however the compressed
    data lies, no more than ``info.file_size`` bytes are ever produced (the caller checked
    that size with ``check_members``); the CRC is checked at the end.
    """
    name = f"{where}[{info.filename}]"
    raw.seek(info.header_offset)
    header = raw.read(30)
    if len(header) < 30 or header[:4] != b"PK\x03\x04":
        raise FileFormatError(f"{name}: bad local header; the archive is corrupt")
    flags, = struct.unpack("<H", header[6:8])
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    # the central directory's name must be the local header's (as zipfile checks): the CRC covers the data
    # only, so a damaged name would otherwise load as another key
    local = raw.read(name_len).decode("utf-8" if flags & 0x800 else "cp437")
    if local != info.orig_filename:
        raise FileFormatError(f"{name}: the local header names it {local!r}; the archive is corrupt")
    raw.seek(info.header_offset + 30 + name_len + extra_len)
    size, left = info.file_size, info.compress_size
    out = bytearray(size)
    view = memoryview(out)
    pos = 0
    if info.compress_type == zipfile.ZIP_STORED:
        while pos < size:
            got = raw.readinto(view[pos:pos + _CHUNK])
            if not got:
                break
            pos += got
    else:
        if info.compress_type == zipfile.ZIP_LZMA:
            inflater, used = _lzma_decompressor(raw, info)
            left -= used
        else:
            inflater = _Inflate() if info.compress_type == zipfile.ZIP_DEFLATED else bz2.BZ2Decompressor()
        while not inflater.eof:
            data = b""
            if inflater.needs_input:
                if left <= 0:
                    break
                data = raw.read(min(_CHUNK, left))
                if not data:
                    break
                left -= len(data)
            chunk = inflater.decompress(data, min(_CHUNK, size - pos + 1))
            if pos + len(chunk) > size:
                raise FileFormatError(f"{name} inflates to more than the {size} bytes it declares; refused as a "
                                      f"possible compression bomb")
            view[pos:pos + len(chunk)] = chunk
            pos += len(chunk)
    if pos != size:
        raise FileFormatError(f"{name} holds {pos} of the {size} bytes it declares; the archive is truncated "
                              f"or corrupt")
    if zlib.crc32(out) != info.CRC:
        raise FileFormatError(f"{name} fails its CRC check; the archive is corrupt")
    return out


def npy_array(payload, where):
    """The array in a ``.npy`` payload (bytes or a bytearray, shared, not copied).

    The header goes through NumPy's own parser, never pickle: object arrays are refused,
    and the declared size must match the bytes present before anything is made.
    """
    try:
        f = _BytesReader(payload)
        major, _minor = _npy_format.read_magic(f)
        if major == 1:
            shape, fortran, dtype = _npy_format.read_array_header_1_0(f)
        elif major in (2, 3):   # 3.0 differs from 2.0 only in allowing utf-8 field names
            shape, fortran, dtype = _npy_format.read_array_header_2_0(f)
        else:
            raise FileFormatError(f"{where} has unknown .npy format version {major}")
    except FileFormatError:
        raise
    except Exception as exc:
        raise FileFormatError(f"{where} is not a .npy array ({one_line(exc)})") from None
    if dtype.hasobject:
        raise FileFormatError(f"{where} holds pickled Python objects (dtype {dtype}), which are never loaded")
    if any(d < 0 for d in shape):
        raise FileFormatError(f"{where} declares the negative shape {shape}")
    count = 1
    for d in shape:
        count *= d
    if len(payload) - f.pos != count * dtype.itemsize:
        raise FileFormatError(f"{where} declares {dtype} {shape} = {count * dtype.itemsize} bytes but holds "
                              f"{len(payload) - f.pos}")
    array = np.frombuffer(payload, dtype=dtype, count=count, offset=f.pos)
    return array.reshape(shape, order="F" if fortran else "C")


class _BytesReader:
    """The ``read`` NumPy's header parser needs, over a buffer, without copying it."""

    def __init__(self, payload):
        self.payload, self.pos = payload, 0

    def read(self, n):
        data = bytes(self.payload[self.pos:self.pos + n])
        self.pos += len(data)
        return data


def open_archive(raw, where, max_bytes=None):
    """The members (``ZipInfo``) of the zip archive in the open binary file ``raw``, checked (``check_members``)."""
    try:
        with zipfile.ZipFile(raw) as archive:
            infos = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, KeyError, IndexError,
            struct.error, UnicodeDecodeError, OverflowError, NotImplementedError) as exc:
        raise FileFormatError(f"{where} is not a readable zip archive ({type(exc).__name__}: {exc})") from None
    check_members(infos, where, os.fstat(raw.fileno()).st_size, max_bytes)
    return infos


def read_npz_member(raw, info, where):
    """One array of an ``.npz`` whose members ``open_archive`` checked, inflated within its declared size."""
    try:
        payload = read_member(raw, info, where)
    except FileFormatError:
        raise
    except (zlib.error, lzma.LZMAError, OSError, EOFError, ValueError, struct.error) as exc:
        raise FileFormatError(f"{where}[{info.filename}] cannot be inflated ({type(exc).__name__}: {exc}); "
                              f"the archive is corrupt") from None
    key = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
    return key, npy_array(payload, f"{where}[{info.filename}]")


def load(path, max_bytes=MAX_STATE_BYTES):
    """Read a state dict written by ``save``; arrays come back on the CPU.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` for one that is
    not a regular file, truncated, corrupt, not an ``.npz`` of plain arrays, or that
    declares more than ``max_bytes`` bytes or an implausible compression ratio.
    """
    path = os.fspath(path)
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        raise FileNotFoundError(f"no such file: {path}") from None
    if not stat.S_ISREG(mode):
        raise ValueError(f"{path} is {_kind(mode)}, not a minivq state file (.npz)")
    with open(path, "rb") as raw:
        if raw.read(6) == b"\x93NUMPY":
            raise ValueError(f"{path} holds a single array, not a state dict (.npz)")
        raw.seek(0)
        try:
            infos = open_archive(raw, path, max_bytes)
            return dict(read_npz_member(raw, info, path) for info in infos)
        except FileFormatError as exc:
            raise FileFormatError(f"{exc}; not a readable minivq state file (.npz of plain arrays): "
                                  f"use an intact checkpoint") from None
