"""Dataset readers and batching (minivq.data).

Every file here is written byte by byte from the published format descriptions
(struct-packed IDX headers, CIFAR-10 records, a Python 2 cPickle stream written
opcode by opcode), never by the reader under test.
"""
import gzip
import os
import pickle
import pickletools
import struct

import numpy as np
import pytest

from minivq import backend
from minivq.data import BatchSampler, Dataset, default_data_dir, load_dataset

FASHION_DIR = "/usr/share/datasets/fashion-mnist"


# ----------------------------------------------------------------- file writers
def idx_bytes(array, magic=None):
    """An IDX file of unsigned bytes: magic 0x0000_08_<ndim>, big-endian uint32 sizes, data."""
    array = np.asarray(array, dtype=np.uint8)
    magic = 0x0800 | array.ndim if magic is None else magic
    return struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def write_idx_folder(folder, split_arrays, gz=False):
    """split_arrays: {"train": (images, labels), "t10k": (...)}; labels may be None."""
    os.makedirs(folder, exist_ok=True)
    for prefix, (images, labels) in split_arrays.items():
        for kind, tag, array in (("images", "idx3", images), ("labels", "idx1", labels)):
            if array is None:
                continue
            payload = idx_bytes(array)
            name = f"{prefix}-{kind}-{tag}-ubyte"
            if gz:
                payload, name = gzip.compress(payload), name + ".gz"
            with open(os.path.join(folder, name), "wb") as f:
                f.write(payload)
    return folder


def cifar_records(images, labels):
    """CIFAR-10 binary: per image 1 label byte, then the 1024 red, 1024 green, 1024 blue bytes."""
    out = bytearray()
    for image, label in zip(images, labels):
        out.append(int(label))
        for channel in range(3):
            out += np.asarray(image[channel], dtype=np.uint8).tobytes()   # 32 rows of 32
    return bytes(out)


def _pint(v):
    """A non-negative int as cPickle protocol 2 writes it."""
    if v < 256:
        return b"K" + bytes([v])
    if v < 65536:
        return b"M" + struct.pack("<H", v)
    return b"J" + struct.pack("<i", v)


def _pstr(b):
    """A Python 2 str: SHORT_BINSTRING or BINSTRING (bytes under encoding='bytes')."""
    return (b"U" + bytes([len(b)]) + b) if len(b) < 256 else (b"T" + struct.pack("<I", len(b)) + b)


def _pyarray(a):
    """A uint8 ndarray as NumPy 1.x on Python 2 pickled it: _reconstruct(ndarray, (0,), 'b')
    followed by BUILD with (1, shape, dtype('u1') with its state, False, raw bytes)."""
    shape = b"".join(_pint(d) for d in a.shape) + {1: b"\x85", 2: b"\x86", 3: b"\x87"}[a.ndim]
    dtype = (b"cnumpy\ndtype\n" + _pstr(b"u1") + b"K\x00K\x01\x87R"
             + b"(K\x03" + _pstr(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb")
    return (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + _pstr(b"b") + b"\x87R"
            + b"(K\x01" + shape + dtype + b"\x89" + _pstr(a.tobytes()) + b"tb")


def py2_cifar_pickle(data, labels, batch_label=b"training batch 1 of 5"):
    """The stream Python 2 cPickle.dump(batch, f, 2) gives for a CIFAR-10 batch dict
    {'data': uint8 (N, 3072) array, 'labels': [ints], 'batch_label': str, 'filenames': [str]}."""
    data = np.ascontiguousarray(data, dtype=np.uint8)
    out = b"\x80\x02}("
    out += _pstr(b"data") + _pyarray(data)
    out += _pstr(b"labels") + b"](" + b"".join(_pint(int(v)) for v in labels) + b"e"
    out += _pstr(b"batch_label") + _pstr(batch_label)
    out += _pstr(b"filenames") + b"](" + b"".join(_pstr(b"img_%05d.png" % i) for i in range(len(labels))) + b"e"
    return out + b"u."


def random_images(rng, n, shape):
    return rng.integers(0, 256, size=(n,) + shape, dtype=np.uint8)


def write(path, payload):
    with open(path, "wb") as f:
        f.write(payload)
    return path


# ----------------------------------------------------------------- IDX
@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip_pads_28_to_32(tmp_path, gz):
    rng = np.random.default_rng(0)
    train_x, test_x = random_images(rng, 7, (28, 28)), random_images(rng, 3, (28, 28))
    train_y, test_y = rng.integers(0, 10, 7), rng.integers(0, 10, 3)
    folder = write_idx_folder(str(tmp_path / "mnist"), {"train": (train_x, train_y), "t10k": (test_x, test_y)}, gz)
    for split, x, y in (("train", train_x, train_y), ("test", test_x, test_y)):
        ds = load_dataset(folder, split)
        assert ds.images.dtype == np.uint8 and ds.images.shape == (len(x), 1, 32, 32)
        assert ds.num_channels == 1 and ds.image_size == (32, 32) and len(ds) == len(x)
        np.testing.assert_array_equal(ds.images[:, 0, 2:30, 2:30], x)
        border = np.ones((32, 32), bool)
        border[2:30, 2:30] = False
        assert (ds.images[:, 0][:, border] == 0).all()
        assert ds.labels.dtype == np.int64
        np.testing.assert_array_equal(ds.labels, y)
        assert ds.name == "mnist" and ds.split == split


def test_idx_other_sizes_are_not_padded_and_labels_are_optional(tmp_path):
    rng = np.random.default_rng(1)
    x = random_images(rng, 4, (16, 20))
    folder = write_idx_folder(str(tmp_path), {"train": (x, None)})
    ds = load_dataset(folder)
    assert ds.images.shape == (4, 1, 16, 20) and ds.labels is None
    np.testing.assert_array_equal(ds.images[:, 0], x)


def test_idx_dotted_names_and_single_file(tmp_path):
    rng = np.random.default_rng(2)
    x, y = random_images(rng, 5, (28, 28)), rng.integers(0, 10, 5)
    write(tmp_path / "train-images.idx3-ubyte", idx_bytes(x))
    write(tmp_path / "train-labels.idx1-ubyte.gz", gzip.compress(idx_bytes(y)))
    ds = load_dataset(tmp_path)
    np.testing.assert_array_equal(ds.labels, y)
    single = load_dataset(tmp_path / "train-images.idx3-ubyte")   # finds the labels beside it
    np.testing.assert_array_equal(single.images, ds.images)
    np.testing.assert_array_equal(single.labels, y)
    with pytest.raises(ValueError, match="labels file"):
        load_dataset(tmp_path / "train-labels.idx1-ubyte.gz")


def test_idx_gzip_detected_by_content_not_name(tmp_path):
    rng = np.random.default_rng(3)
    x = random_images(rng, 2, (28, 28))
    write(tmp_path / "train-images-idx3-ubyte", gzip.compress(idx_bytes(x)))   # gzipped, no .gz
    np.testing.assert_array_equal(load_dataset(tmp_path).images[:, 0, 2:30, 2:30], x)


def test_idx_errors_say_what_and_how(tmp_path):
    rng = np.random.default_rng(4)
    x, y = random_images(rng, 6, (28, 28)), rng.integers(0, 10, 6)
    folder = tmp_path / "d"
    write_idx_folder(str(folder), {"train": (x, y)})
    images = folder / "train-images-idx3-ubyte"
    labels = folder / "train-labels-idx1-ubyte"
    good = images.read_bytes()

    write(images, b"\x1f\x8c" + good[2:])                       # foreign first bytes
    with pytest.raises(ValueError, match=r"not an IDX image file \(bad magic 0x1f8c.*apt-get install "
                                         r"dataset-fashion-mnist.*--data DIR"):
        load_dataset(folder)
    write(images, idx_bytes(x, magic=0x0D03))                    # float32 IDX
    with pytest.raises(ValueError, match="float32"):
        load_dataset(folder)
    write(images, idx_bytes(x, magic=0x0801))                    # wrong dimension count
    with pytest.raises(ValueError, match="1 dimension"):
        load_dataset(folder)
    write(images, good[:-1])                                     # one byte short
    with pytest.raises(ValueError, match="declares 6 x 28 x 28 = 4704"):
        load_dataset(folder)
    write(images, good + b"\0")                                  # one byte too many
    with pytest.raises(ValueError, match="4705 data bytes"):
        load_dataset(folder)
    write(images, good)
    write(labels, idx_bytes(y[:5]))                              # counts differ
    with pytest.raises(ValueError, match="6 images but .* 5 labels"):
        load_dataset(folder)
    write(labels, gzip.compress(idx_bytes(y))[:-6])              # truncated gzip
    with pytest.raises(ValueError, match="gzip"):
        load_dataset(folder)
    packed = bytearray(gzip.compress(idx_bytes(y)))
    packed[-8] ^= 1                                              # CRC no longer matches
    write(labels, bytes(packed))
    with pytest.raises(ValueError, match="CRC"):
        load_dataset(folder)


def test_missing_data_raises_file_not_found_with_the_way_out(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_dataset(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"looked for train-images-idx3-ubyte\[\.gz\].*data_batch_1"):
        load_dataset(tmp_path)
    write_idx_folder(str(tmp_path), {"train": (np.zeros((1, 28, 28)), None)})
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte"):
        load_dataset(tmp_path, "test")
    with pytest.raises(ValueError, match="split"):
        load_dataset(tmp_path, "validation")


def test_packed_cifar_archive_gets_an_unpack_hint(tmp_path):
    write(tmp_path / "cifar-10-binary.tar.gz", b"\x1f\x8b")
    with pytest.raises(FileNotFoundError, match="tar xzf"):
        load_dataset(tmp_path)


def test_default_data_dir(tmp_path, monkeypatch):
    import minivq.data as data
    monkeypatch.setenv("MINIVQ_DATA", str(tmp_path))
    assert default_data_dir() == str(tmp_path)
    monkeypatch.setenv("MINIVQ_DATA", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="MINIVQ_DATA"):
        default_data_dir()
    monkeypatch.delenv("MINIVQ_DATA")
    monkeypatch.setattr(data, "_debian_fashion_dirs", lambda: [str(tmp_path / "not-installed")])
    with pytest.raises(FileNotFoundError, match=r"apt-get install dataset-fashion-mnist.*--data DIR.*MINIVQ_DATA"):
        default_data_dir()


@pytest.mark.skipif(not os.path.isdir(FASHION_DIR), reason="dataset-fashion-mnist is not installed")
def test_default_data_dir_finds_the_debian_package(monkeypatch):
    monkeypatch.delenv("MINIVQ_DATA", raising=False)
    assert os.path.samefile(default_data_dir(), FASHION_DIR)


# ----------------------------------------------------------------- real Fashion-MNIST
@pytest.fixture(scope="module")
def fashion():
    if not os.path.isfile(os.path.join(FASHION_DIR, "train-images-idx3-ubyte.gz")):
        pytest.skip("dataset-fashion-mnist is not installed")
    return load_dataset(FASHION_DIR, "train"), load_dataset(FASHION_DIR, "test")


def test_real_fashion_mnist(fashion):
    train, test = fashion
    for ds, n in ((train, 60000), (test, 10000)):
        assert ds.images.shape == (n, 1, 32, 32) and ds.images.dtype == np.uint8
        assert ds.labels.shape == (n,) and ds.labels.dtype == np.int64
        # the published class balance: 6000 / 1000 images of each of the 10 classes
        np.testing.assert_array_equal(np.bincount(ds.labels, minlength=10), np.full(10, n // 10))
        assert ds.images.min() == 0 and ds.images.max() == 255
        inner = ds.images[:, :, 2:30, 2:30].copy()
        ds_border = ds.images.copy()
        ds_border[:, :, 2:30, 2:30] = 0
        assert not ds_border.any() and inner.any()
        x, y = ds.batch(np.arange(256))
        assert x.dtype == np.float32 and x.shape == (256, 1, 32, 32)
        assert x.min() == -0.5 and x.max() <= 0.5 and x[:, :, :2].max() == -0.5
        np.testing.assert_array_equal(y, ds.labels[:256])


def test_real_fashion_mnist_pixel_variance(fashion):
    # Widely quoted Fashion-MNIST train statistics of x/255 on 28x28: mean 0.2860, std 0.3530.
    # Padding 784 pixels to 1024 with zeros scales E[x] and E[x^2] by 784/1024.
    mean28, std28, f = 0.2860, 0.3530, 784 / 1024
    expected = (std28 ** 2 + mean28 ** 2) * f - (mean28 * f) ** 2
    assert fashion[0].pixel_variance() == pytest.approx(expected, abs=2e-4)


# ----------------------------------------------------------------- CIFAR-10
def _cifar_splits(rng, sizes=(3, 2, 4, 1, 2), test_size=3):
    train = [(random_images(rng, n, (3, 32, 32)), rng.integers(0, 10, n)) for n in sizes]
    test = (random_images(rng, test_size, (3, 32, 32)), rng.integers(0, 10, test_size))
    return train, test


@pytest.mark.parametrize("subfolder", [False, True])
def test_cifar_binary_round_trip(tmp_path, subfolder):
    rng = np.random.default_rng(5)
    train, test = _cifar_splits(rng)
    folder = tmp_path / "cifar-10-batches-bin" if subfolder else tmp_path
    folder.mkdir(exist_ok=True)
    for i, (x, y) in enumerate(train, 1):
        write(folder / f"data_batch_{i}.bin", cifar_records(x, y))
    write(folder / "test_batch.bin", cifar_records(*test))
    ds = load_dataset(tmp_path, "train")
    assert ds.images.shape == (12, 3, 32, 32) and ds.name == "cifar-10"
    np.testing.assert_array_equal(ds.images, np.concatenate([x for x, _ in train]))
    np.testing.assert_array_equal(ds.labels, np.concatenate([y for _, y in train]))
    ts = load_dataset(tmp_path, "test")
    np.testing.assert_array_equal(ts.images, test[0])
    np.testing.assert_array_equal(ts.labels, test[1])
    one = load_dataset(folder / "test_batch.bin")                 # a single batch file
    np.testing.assert_array_equal(one.images, test[0])


def test_cifar_binary_channel_layout(tmp_path):
    # record byte 1 + c*1024 + r*32 + col is channel c (R, G, B), row r, column col
    record = bytearray(3073)
    record[0] = 7
    record[1 + 0 * 1024 + 5 * 32 + 9] = 11      # red at row 5, col 9
    record[1 + 2 * 1024 + 31 * 32 + 0] = 222    # blue at row 31, col 0
    write(tmp_path / "test_batch.bin", bytes(record))
    ds = load_dataset(tmp_path / "test_batch.bin")
    assert ds.labels.tolist() == [7]
    assert ds.images[0, 0, 5, 9] == 11 and ds.images[0, 2, 31, 0] == 222 and ds.images.sum() == 233


def test_cifar_binary_errors(tmp_path):
    rng = np.random.default_rng(6)
    train, test = _cifar_splits(rng)
    for i, (x, y) in enumerate(train, 1):
        write(tmp_path / f"data_batch_{i}.bin", cifar_records(x, y))
    write(tmp_path / "test_batch.bin", cifar_records(*test))
    good = (tmp_path / "data_batch_2.bin").read_bytes()
    write(tmp_path / "data_batch_2.bin", good[:-1])
    with pytest.raises(ValueError, match=r"data_batch_2.bin is not a CIFAR-10 binary batch.*3073.*cifar-10-binary"):
        load_dataset(tmp_path)
    write(tmp_path / "data_batch_2.bin", b"\x0a" + good[1:])                 # label 10
    with pytest.raises(ValueError, match="record 0 has label 10"):
        load_dataset(tmp_path)
    os.remove(tmp_path / "data_batch_2.bin")
    os.remove(tmp_path / "data_batch_5.bin")
    with pytest.raises(FileNotFoundError, match="data_batch_2.bin, data_batch_5.bin"):
        load_dataset(tmp_path)
    assert len(load_dataset(tmp_path, "test")) == 3          # the test split is complete


def test_py2_pickle_writer_matches_pickle(tmp_path):
    # the hand-written stream is a well-formed pickle that plain (trusted) pickle reads as intended
    x = random_images(np.random.default_rng(7), 2, (3072,))
    stream = py2_cifar_pickle(x, [3, 9])
    globals_named = {arg for op, arg, _ in pickletools.genops(stream) if op.name == "GLOBAL"}
    assert globals_named == {"numpy.core.multiarray _reconstruct", "numpy ndarray", "numpy dtype"}
    batch = pickle.loads(stream, encoding="bytes")
    np.testing.assert_array_equal(batch[b"data"], x)
    assert batch[b"labels"] == [3, 9] and batch[b"filenames"][1] == b"img_00001.png"


@pytest.mark.parametrize("writer", ["py2-cpickle", "py3-protocol4"])
def test_cifar_python_round_trip(tmp_path, writer):
    rng = np.random.default_rng(8)
    train, test = _cifar_splits(rng)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()

    def dump(path, x, y):
        data = x.reshape(len(x), 3072)
        if writer == "py2-cpickle":
            write(path, py2_cifar_pickle(data, y))
        else:   # as re-saved by Python 3 with its default protocol: bytes keys, numpy array, list
            write(path, pickle.dumps({b"batch_label": b"x", b"labels": [int(v) for v in y], b"data": data,
                                      b"filenames": [b"a"] * len(y)}, protocol=4))

    for i, (x, y) in enumerate(train, 1):
        dump(folder / f"data_batch_{i}", x, y)
    dump(folder / "test_batch", *test)
    ds = load_dataset(tmp_path)
    np.testing.assert_array_equal(ds.images, np.concatenate([x for x, _ in train]))
    np.testing.assert_array_equal(ds.labels, np.concatenate([y for _, y in train]))
    ts = load_dataset(folder / "test_batch")
    np.testing.assert_array_equal(ts.images, test[0])
    np.testing.assert_array_equal(ts.labels, test[1])


def test_cifar_python_structure_is_validated(tmp_path):
    x = random_images(np.random.default_rng(9), 2, (3072,))
    path = tmp_path / "test_batch"
    cases = [
        ({b"data": x}, "no 'data' and 'labels'"),
        ({b"data": x[:, :100], b"labels": [1, 2]}, r"uint8 array \(N, 3072\)"),
        ({b"data": x.astype(np.int16), b"labels": [1, 2]}, r"uint8 array \(N, 3072\)"),
        ({b"data": x, b"labels": [1, 10]}, "ints in 0..9"),
        ({b"data": x, b"labels": [1, 2.0]}, "ints in 0..9"),
        ({b"data": x, b"labels": [1]}, "1 labels for 2 images"),
        ([x], "holds a list"),
    ]
    for obj, message in cases:
        write(path, pickle.dumps(obj, protocol=4))
        with pytest.raises(ValueError, match=message):
            load_dataset(path)
    # str keys and a numpy label array are fine too
    write(path, pickle.dumps({"data": x, "labels": np.array([4, 5])}, protocol=4))
    assert load_dataset(path).labels.tolist() == [4, 5]


def test_cifar_python_refuses_what_the_official_files_do_not_need(tmp_path):
    x = random_images(np.random.default_rng(10), 2, (3072,))
    path = tmp_path / "test_batch"
    # Python 3 writing protocol 2 encodes bytes through _codecs.encode: not a global we admit
    write(path, pickle.dumps({b"data": x, b"labels": [0, 1]}, protocol=2))
    with pytest.raises(ValueError, match=r"_codecs\.encode.*re-written by Python 3"):
        load_dataset(path)
    # protocol 5 pickles numpy arrays through numpy._core.numeric._frombuffer
    write(path, pickle.dumps({b"data": x, b"labels": [0, 1]}, protocol=5))
    with pytest.raises(ValueError, match="_frombuffer"):
        load_dataset(path)


# ----------------------------------------------------------------- .npy / .npz
def test_npy_layouts_and_dtypes(tmp_path):
    rng = np.random.default_rng(11)
    nchw = random_images(rng, 4, (3, 8, 6))
    np.save(tmp_path / "a.npy", nchw)
    np.testing.assert_array_equal(load_dataset(tmp_path / "a.npy").images, nchw)
    np.save(tmp_path / "b.npy", nchw.transpose(0, 2, 3, 1))          # NHWC
    np.testing.assert_array_equal(load_dataset(tmp_path / "b.npy").images, nchw)
    gray = random_images(rng, 4, (28, 28))
    np.save(tmp_path / "c.npy", gray)                                  # (N, H, W), padded
    ds = load_dataset(tmp_path / "c.npy")
    assert ds.images.shape == (4, 1, 32, 32)
    np.testing.assert_array_equal(ds.images[:, 0, 2:30, 2:30], gray)
    np.save(tmp_path / "d.npy", nchw / 255.0)                          # floats in [0, 1]
    np.testing.assert_array_equal(load_dataset(tmp_path / "d.npy").images, nchw)
    np.save(tmp_path / "e.npy", np.asfortranarray(nchw.astype(np.int64)))
    np.testing.assert_array_equal(load_dataset(tmp_path / "e.npy").images, nchw)
    np.save(tmp_path / "f.npy", nchw.astype(np.float32) - 0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        load_dataset(tmp_path / "f.npy")
    np.save(tmp_path / "g.npy", nchw.astype(np.int16) * 2)
    with pytest.raises(ValueError, match="0..255"):
        load_dataset(tmp_path / "g.npy")
    np.save(tmp_path / "h.npy", np.zeros((4, 5, 6, 7), np.uint8))
    with pytest.raises(ValueError, match="channel axis"):
        load_dataset(tmp_path / "h.npy")
    np.save(tmp_path / "i.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="object"):
        load_dataset(tmp_path / "i.npy")


def test_npz_keys(tmp_path):
    rng = np.random.default_rng(12)
    xtr, xte = random_images(rng, 5, (16, 16)), random_images(rng, 2, (16, 16))
    ytr, yte = rng.integers(0, 10, 5), rng.integers(0, 10, 2)
    np.savez_compressed(tmp_path / "keras.npz", x_train=xtr, y_train=ytr, x_test=xte, y_test=yte)
    ds = load_dataset(tmp_path / "keras.npz", "test")
    np.testing.assert_array_equal(ds.images[:, 0], xte)
    np.testing.assert_array_equal(ds.labels, yte)
    np.savez(tmp_path / "named.npz", train=xtr, train_labels=ytr, test=xte)
    ds = load_dataset(tmp_path / "named.npz")
    np.testing.assert_array_equal(ds.labels, ytr)
    assert load_dataset(tmp_path / "named.npz", "test").labels is None
    np.savez(tmp_path / "plain.npz", images=xtr, labels=ytr)
    np.testing.assert_array_equal(load_dataset(tmp_path / "plain.npz", "test").labels, ytr)
    np.savez(tmp_path / "one.npz", xtr)                                 # arr_0
    np.testing.assert_array_equal(load_dataset(tmp_path / "one.npz").images[:, 0], xtr)
    np.savez(tmp_path / "bad.npz", foo=xtr, bar=ytr)
    with pytest.raises(ValueError, match=r"\['bar', 'foo'\].*x_train"):
        load_dataset(tmp_path / "bad.npz")
    np.savez(tmp_path / "badlabels.npz", images=xtr, labels=ytr[:3])
    with pytest.raises(ValueError, match="3 labels for 5 images"):
        load_dataset(tmp_path / "badlabels.npz")
    np.savez(tmp_path / "floatlabels.npz", images=xtr, labels=ytr.astype(float))
    with pytest.raises(ValueError, match="float64"):
        load_dataset(tmp_path / "floatlabels.npz")


def test_npy_folder(tmp_path):
    rng = np.random.default_rng(13)
    x, y = random_images(rng, 3, (8, 8)), rng.integers(0, 10, 3)
    np.save(tmp_path / "train.npy", x)
    np.save(tmp_path / "train_labels.npy", y)
    np.savez(tmp_path / "test.npz", images=x[:1])
    ds = load_dataset(tmp_path)
    np.testing.assert_array_equal(ds.labels, y)
    assert ds.name == "train"
    assert len(load_dataset(tmp_path, "test")) == 1


def test_from_arrays_validates():
    rng = np.random.default_rng(14)
    x = random_images(rng, 3, (1, 4, 4))
    ds = Dataset.from_arrays(x, labels=[1, 2, 3], name="toy")
    assert ds.labels.dtype == np.int64 and ds.name == "toy"
    with pytest.raises(ValueError, match="2 labels for 3 images"):
        Dataset.from_arrays(x, labels=[1, 2])
    with pytest.raises(ValueError, match="1-D integer"):
        Dataset.from_arrays(x, labels=[0.5, 1, 2])
    with pytest.raises(ValueError, match="shape"):
        Dataset.from_arrays(x[0, 0])
    with pytest.raises(ValueError, match="no images"):
        Dataset.from_arrays(x[:0])
    with pytest.raises(ValueError, match="dtype bool"):
        Dataset.from_arrays(x > 3)
    with pytest.raises(ValueError, match="from_arrays"):
        Dataset(x.astype(np.float32))


# ----------------------------------------------------------------- batches and statistics
def test_batch_scaling_and_indices():
    rng = np.random.default_rng(15)
    x = random_images(rng, 10, (3, 5, 5))
    x[0] = 0
    x[1] = 255
    ds = Dataset.from_arrays(x, labels=np.arange(10))
    idx = np.array([1, 0, 7, 7])
    xb, yb = ds.batch(idx)
    assert xb.dtype == np.float32 and xb.shape == (4, 3, 5, 5)
    np.testing.assert_allclose(xb, x[idx].astype(np.float64) / 255 - 0.5, rtol=0, atol=6e-8)
    assert xb[0].min() == 0.5 and xb[1].max() == -0.5
    np.testing.assert_array_equal(yb, idx)
    x64, _ = ds.batch([2], dtype=np.float64)
    assert x64.dtype == np.float64
    np.testing.assert_array_equal(x64, x[[2]] / 255.0 - 0.5)
    assert Dataset.from_arrays(x).batch([0])[1] is None
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        ds.batch([10])
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        ds.batch([-1])
    with pytest.raises(TypeError, match="integers"):
        ds.batch([0.0])
    with pytest.raises(ValueError, match="float"):
        ds.batch([0], dtype=np.int32)


@pytest.mark.gpu
@pytest.mark.skipif(not backend.cuda_available(), reason="needs CuPy and a CUDA GPU")
def test_batch_on_gpu_matches_cpu():
    rng = np.random.default_rng(16)
    ds = Dataset.from_arrays(random_images(rng, 20, (1, 32, 32)), labels=rng.integers(0, 10, 20))
    idx = rng.permutation(20)[:8]
    x_gpu, y_gpu = ds.batch(idx, device="cuda")
    x_cpu, y_cpu = ds.batch(idx)
    assert backend.array_device(x_gpu) == "cuda:0" and backend.array_device(y_gpu) == "cuda:0"
    np.testing.assert_array_equal(backend.to_numpy(x_gpu), x_cpu)
    np.testing.assert_array_equal(backend.to_numpy(y_gpu), y_cpu)


def test_pixel_variance_against_the_formula():
    rng = np.random.default_rng(17)
    x = random_images(rng, 37, (3, 9, 7))
    ds = Dataset.from_arrays(x)
    assert ds.pixel_variance() == pytest.approx(np.var(x.astype(np.float64) / 255 - 0.5), rel=1e-12)
    skewed = (rng.random((50, 1, 32, 32)) < 0.1).astype(np.uint8) * 200
    assert Dataset.from_arrays(skewed).pixel_variance() == pytest.approx(
        np.var(skewed / 255.0 - 0.5), rel=1e-12)
    assert Dataset.from_arrays(np.full((4, 1, 3, 3), 77, np.uint8)).pixel_variance() == 0.0


# ----------------------------------------------------------------- BatchSampler
def test_sampler_follows_the_documented_permutation():
    n, bs, seed = 23, 5, 42
    s = BatchSampler(n, bs, seed)
    assert len(s) == s.batches_per_epoch == 4
    for step in range(13):
        epoch, b = divmod(step, 4)
        perm = np.random.default_rng([seed, epoch]).permutation(n)
        got = s.indices(step)
        assert got.dtype == np.int64
        np.testing.assert_array_equal(got, perm[b * bs:(b + 1) * bs])


def test_sampler_resume_is_exact_and_epochs_are_permutations():
    n, bs = 50, 8
    run = BatchSampler(n, bs, seed=3, drop_last=False)
    assert len(run) == 7
    straight = [run.indices(step) for step in range(40)]
    for step in (39, 0, 17, 6, 7, 21):          # fresh samplers, any order: same batches
        np.testing.assert_array_equal(BatchSampler(n, bs, seed=3, drop_last=False).indices(step), straight[step])
    for epoch in range(5):
        batches = straight[epoch * 7:(epoch + 1) * 7]
        assert [len(b) for b in batches] == [8] * 6 + [2]
        np.testing.assert_array_equal(np.sort(np.concatenate(batches)), np.arange(n))
    first, second = np.concatenate(straight[:7]), np.concatenate(straight[7:14])
    assert not np.array_equal(first, second)                       # each epoch reshuffles
    dropping = BatchSampler(n, bs, seed=3)
    assert len(dropping) == 6
    seen = np.concatenate([dropping.indices(s) for s in range(6)])
    assert len(np.unique(seen)) == 48                               # 6 distinct full batches per epoch
    assert not np.array_equal(BatchSampler(n, bs, seed=4).indices(0), dropping.indices(0))


def test_sampler_without_shuffle_and_validation():
    s = BatchSampler(10, 4, seed=0, shuffle=False, drop_last=False)
    assert [s.indices(i).tolist() for i in range(4)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9], [0, 1, 2, 3]]
    assert s.epoch(7) == 2
    assert len(BatchSampler(3, 10, seed=0, drop_last=False).indices(5)) == 3
    with pytest.raises(ValueError, match="larger than the dataset"):
        BatchSampler(3, 10, seed=0)
    with pytest.raises(ValueError, match="batch_size"):
        BatchSampler(10, 0, seed=0)
    with pytest.raises(ValueError, match="seed"):
        BatchSampler(10, 2, seed=-1)
    with pytest.raises(ValueError, match="step"):
        s.indices(-1)
    s2 = BatchSampler(10, 4, seed=1)
    batch = s2.indices(0)
    batch[:] = -1                                                   # callers cannot corrupt the cache
    assert (s2.indices(1) >= 0).all() and (s2.indices(0) >= 0).all()
