"""Reader fuzzing (issue 9): whatever bytes a dataset file holds, the readers either
return a well-formed Dataset or raise ValueError, and never run code from a file.

Each reader gets a few hundred seeded mutations of a valid small file: random
truncations, bit flips (anywhere, and concentrated on the header), overwritten
runs, inserted or deleted bytes, and random bytes (with and without the valid
first bytes). The `slow` variant runs many more.
"""
import gzip
import os
import pickle
import subprocess

import numpy as np
import pytest

from minivq import cifar_unpickle
from minivq.data import Dataset, load_dataset
from test_data import cifar_records, idx_bytes, py2_cifar_pickle, write

FAST_CASES = 300
SLOW_CASES = 4000


def _base_files(fmt, tmp_path):
    """(good bytes, path the bytes are written to, bytes -> file content, path to load)."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 3).astype(np.uint8)
    same = (lambda b: b)
    if fmt.startswith("idx"):
        folder = tmp_path / "idx"
        folder.mkdir(exist_ok=True)
        packed = "gz" in fmt
        name = lambda stem: folder / (stem + (".gz" if packed else ""))  # noqa: E731
        other = idx_bytes(labels) if "images" in fmt else idx_bytes(images)
        other_name = "train-labels-idx1-ubyte" if "images" in fmt else "train-images-idx3-ubyte"
        write(name(other_name), gzip.compress(other) if packed else other)
        target = name("train-images-idx3-ubyte" if "images" in fmt else "train-labels-idx1-ubyte")
        good = idx_bytes(images) if "images" in fmt else idx_bytes(labels)
        if fmt.endswith("gz-inner"):         # mutate the IDX bytes, then compress them properly
            return good, target, gzip.compress, folder
        if packed:
            good = gzip.compress(good)
        return good, target, same, folder
    if fmt == "cifar-bin":
        x = rng.integers(0, 256, (3, 3, 32, 32), dtype=np.uint8)
        return cifar_records(x, [1, 5, 9]), tmp_path / "test_batch.bin", same, tmp_path / "test_batch.bin"
    if fmt.startswith("cifar-py"):
        x = rng.integers(0, 256, (2, 3072), dtype=np.uint8)
        if fmt == "cifar-py2":
            good = py2_cifar_pickle(x, [4, 2])
        else:
            good = pickle.dumps({b"batch_label": b"t", b"labels": [4, 2], b"data": x, b"filenames": [b"a", b"b"]},
                                protocol=4)
        return good, tmp_path / "test_batch", same, tmp_path / "test_batch"
    if fmt.startswith("npy"):
        array = images if fmt == "npy" else images / 255.0
        path = tmp_path / "a.npy"
        np.save(path, array)
        return path.read_bytes(), path, same, path
    if fmt.startswith("npz"):
        path = tmp_path / "a.npz"
        (np.savez_compressed if fmt == "npz-compressed" else np.savez)(path, x_train=images, y_train=labels)
        return path.read_bytes(), path, same, path
    raise AssertionError(fmt)


def _mutations(rng, good, count):
    """Yield (description, bytes) for ``count`` seeded mutations of ``good``."""
    n = len(good)
    for i in range(count):
        kind = i % 6
        out = bytearray(good)
        if kind == 0:
            cut = int(rng.integers(0, n))
            yield f"truncated to {cut} of {n} bytes", bytes(out[:cut])
        elif kind in (1, 5):
            span = n if kind == 1 else min(n, 64)        # kind 5: the header region
            where = rng.integers(0, span, int(rng.integers(1, 5)))
            for pos in where:
                out[pos] ^= 1 << int(rng.integers(0, 8))
            yield f"bits flipped at {sorted(where.tolist())}", bytes(out)
        elif kind == 2:
            pos, run = int(rng.integers(0, n)), int(rng.integers(1, 9))
            out[pos:pos + run] = rng.integers(0, 256, len(out[pos:pos + run]), dtype=np.uint8).tobytes()
            yield f"{run} bytes overwritten at {pos}", bytes(out)
        elif kind == 3:
            pos, run = int(rng.integers(0, n + 1)), int(rng.integers(1, 17))
            if rng.random() < 0.5:
                out[pos:pos] = rng.integers(0, 256, run, dtype=np.uint8).tobytes()
                yield f"{run} bytes inserted at {pos}", bytes(out)
            else:
                del out[pos:pos + run]
                yield f"{run} bytes deleted at {pos}", bytes(out)
        else:
            noise = rng.integers(0, 256, int(rng.integers(0, min(2 * n, 4096))), dtype=np.uint8).tobytes()
            prefix = good[:int(rng.integers(0, 17))] if rng.random() < 0.5 else b""
            yield f"random bytes after a {len(prefix)}-byte valid prefix", prefix + noise


def _load_or_value_error(load_path, case):
    """Load; return the Dataset, or None if it raised ValueError; fail on anything else."""
    try:
        ds = load_dataset(load_path)
    except ValueError as exc:
        assert "\n" not in str(exc), f"{case}: message is not one line: {exc!r}"
        return None
    except Exception as exc:  # the contract under test: nothing but ValueError
        pytest.fail(f"{case}: raised {type(exc).__name__}: {exc}")
    assert isinstance(ds, Dataset), case
    assert ds.images.dtype == np.uint8 and ds.images.ndim == 4 and len(ds) > 0, case
    assert ds.labels is None or (ds.labels.dtype == np.int64 and ds.labels.shape == (len(ds),)), case
    return ds


FORMATS = ["idx-images", "idx-labels", "idx-gz-images", "idx-gz-labels", "idx-gz-inner-images",
           "cifar-bin", "cifar-py2", "cifar-py-protocol4", "npy", "npy-float", "npz", "npz-compressed"]
STRICT_SIZE = {"idx-images", "idx-labels", "idx-gz-inner-images"}   # every size change must be caught


def _fuzz(fmt, tmp_path, count, seed):
    good, target, encode, load_path = _base_files(fmt, tmp_path)
    write(target, encode(good))
    assert _load_or_value_error(load_path, "the unmutated file") is not None
    rng = np.random.default_rng([seed, FORMATS.index(fmt)])
    rejected = 0
    for case, payload in _mutations(rng, good, count):
        write(target, encode(payload))
        ds = _load_or_value_error(load_path, f"{fmt}: {case}")
        rejected += ds is None
        if fmt in STRICT_SIZE and len(payload) != len(good):
            assert ds is None, f"{fmt}: {case}: a file of the wrong size was accepted"
    assert rejected >= count // 3, f"{fmt}: only {rejected} of {count} mutations rejected"


@pytest.mark.parametrize("fmt", FORMATS)
def test_fuzzed_files_raise_only_value_error(fmt, tmp_path):
    _fuzz(fmt, tmp_path, FAST_CASES, seed=0)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMATS)
def test_fuzzed_files_raise_only_value_error_long(fmt, tmp_path, request):
    # ~40 s in all: runs only when slow tests are asked for (pytest -m slow)
    expr = request.config.getoption("markexpr") or ""
    if "slow" not in expr or "not slow" in expr:
        pytest.skip("long fuzz run: select it with -m slow")
    _fuzz(fmt, tmp_path, SLOW_CASES, seed=1)


def test_files_without_a_telling_name_are_sniffed_safely(tmp_path):
    # a neutral name sends every file through the content sniffing (zip, .npy, pickle, gzip, IDX)
    rng = np.random.default_rng(2)
    blob = tmp_path / "blob"
    outcomes = set()
    for fmt in ("idx-images", "idx-gz-labels", "cifar-py2", "npy", "npz-compressed"):
        folder = tmp_path / fmt
        folder.mkdir()
        good, _, encode, _ = _base_files(fmt, folder)
        for case, payload in [("unmutated", good)] + list(_mutations(rng, good, 60)):
            write(blob, encode(payload))
            outcomes.add(_load_or_value_error(blob, f"{fmt} as blob: {case}") is None)
    assert outcomes == {True, False}


def test_missing_files_raise_file_not_found(tmp_path):
    for path in (tmp_path / "absent", tmp_path / "absent.npy", tmp_path / "absent.npz"):
        with pytest.raises(FileNotFoundError):
            load_dataset(path)


# ----------------------------------------------------------------- hostile pickles
class _Shell:
    """Unpickling this runs a shell command (with plain pickle)."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class _Exec:
    def __init__(self, source):
        self.source = source

    def __reduce__(self):
        return (exec, (self.source,))


class _Popen:
    def __init__(self, argv):
        self.argv = argv

    def __reduce__(self):
        return (subprocess.call, (self.argv,))


def _hostile(marker):
    return [_Shell(f"touch {marker}"), _Exec(f"open({str(marker)!r}, 'w').close()"), _Popen(["touch", str(marker)])]


def test_hostile_payloads_really_run_under_plain_pickle(tmp_path):
    # the control: unpickled without restriction, each payload does write its marker
    for i in range(len(_hostile(tmp_path))):
        marker = tmp_path / f"control{i}"
        pickle.loads(pickle.dumps(_hostile(marker)[i]))
        assert marker.exists()


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_malicious_cifar_pickle_is_refused_without_running(tmp_path, protocol):
    marker = tmp_path / "pwned"
    path = tmp_path / "data_batch_1"
    for payload in _hostile(marker):
        for batch in ({b"data": payload, b"labels": [0]}, payload, [payload]):
            write(path, pickle.dumps(batch, protocol=protocol))
            with pytest.raises(ValueError, match="refused: its pickle names the global"):
                load_dataset(path)
            assert not marker.exists()


def _p2_global(module, name):
    return b"c" + module + b"\n" + name + b"\n"


@pytest.mark.parametrize("stream, message", [
    # numpy.ndarray is admitted only as _reconstruct's first argument, not as a callable
    (b"\x80\x02" + _p2_global(b"numpy", b"ndarray") + b"J\x00\x00\x00\x40J\x00\x00\x00\x40\x86\x85R.",
     "not callable"),
    # _reconstruct with a shape NumPy never writes (here 2**30 elements)
    (b"\x80\x02" + _p2_global(b"numpy.core.multiarray", b"_reconstruct") + _p2_global(b"numpy", b"ndarray")
     + b"J\x00\x00\x00\x40\x85U\x01b\x87R.", "arguments NumPy never writes"),
    # object dtypes (whose arrays unpickle arbitrary objects) are refused
    (b"\x80\x02" + _p2_global(b"numpy", b"dtype") + b"U\x02O8K\x00K\x01\x87R.", "not a plain numeric type"),
    # a pickle may not set attributes on the admitted callables
    (b"\x80\x02" + _p2_global(b"numpy", b"dtype") + b"}U\x08__call__K\x01sb.", "dict"),
    (b"\x80\x02" + _p2_global(b"numpy", b"dtype") + b"N}X\x08\x00\x00\x00__call__K\x01s\x86b.", "__call__"),
])
def test_admitted_numpy_names_cannot_be_abused(tmp_path, stream, message):
    path = tmp_path / "test_batch"
    write(path, stream)
    with pytest.raises(ValueError, match=message):
        load_dataset(path)
    assert cifar_unpickle._ADMITTED_GLOBALS[("numpy", "dtype")] is cifar_unpickle._PickledDtype
    assert not hasattr(cifar_unpickle._PickledDtype(), "__dict__")


def test_pickled_object_arrays_in_npy_and_npz_are_refused(tmp_path):
    marker = tmp_path / "pwned"
    hostile = np.empty(1, dtype=object)
    hostile[0] = _Shell(f"touch {marker}")
    np.save(tmp_path / "a.npy", hostile, allow_pickle=True)
    np.savez(tmp_path / "b.npz", images=hostile)
    np.savez(tmp_path / "c.npz", images=np.zeros((1, 4, 4), np.uint8), labels=hostile)
    for name in ("a.npy", "b.npz", "c.npz"):
        with pytest.raises(ValueError, match="object"):
            load_dataset(tmp_path / name)
    assert not marker.exists()


def test_a_npy_header_numpy_refuses_in_several_lines_is_one_line(tmp_path):
    """NumPy refuses a header longer than 10,000 bytes with a three-line message; ours stays one line
    (a case the slow fuzz test found by flipping a bit of the header's length)."""
    header = b"{'descr': '<f4', 'fortran_order': False, 'shape': (2, 4, 4), }".ljust(16501) + b"\n"
    path = tmp_path / "long.npy"
    path.write_bytes(b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + bytes(2 * 16 * 4))
    with pytest.raises(ValueError) as info:
        load_dataset(path)
    assert "\n" not in str(info.value) and "long.npy" in str(info.value)
