import numpy as np
import pytest


def _gpu_available():
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    """Skip every `gpu`-marked test, naming why, where CuPy or a GPU is missing."""
    if _gpu_available():
        return
    skip = pytest.mark.skip(reason="needs CuPy and a CUDA GPU (pip install -e .[cuda])")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def read_log(folder):
    """The records of a run folder's metrics.jsonl."""
    import os
    from minivq.plot import read_metrics
    return read_metrics(os.path.join(folder, "metrics.jsonl"))


@pytest.fixture
def one_numba_thread():
    """The calling thread at one Numba thread (as a --workers worker), put back afterwards; nothing
    where Numba does not import."""
    try:
        import numba
    except ImportError:
        yield
        return
    before = numba.get_num_threads()
    numba.set_num_threads(1)
    yield
    numba.set_num_threads(before)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def write_blobs(path, n_train, n_test, labels=True, seed=0):
    """A tiny dataset of white discs on black, 16x16, as an .npz with train and test splits.

    Small enough that a few training steps of a tiny VQ-VAE take a fraction of a second.
    """
    rng = np.random.default_rng(seed)

    def images(n):
        yy, xx = np.mgrid[:16, :16]
        cy, cx = rng.uniform(4, 12, (2, n, 1, 1))
        r = rng.uniform(2, 5, (n, 1, 1))
        return (255 * (((yy - cy) ** 2 + (xx - cx) ** 2) < r ** 2)).astype(np.uint8)

    arrays = {"x_train": images(n_train), "x_test": images(n_test)}
    if labels:
        arrays.update(y_train=rng.integers(0, 3, n_train), y_test=rng.integers(0, 3, n_test))
    np.savez(path, **arrays)
    return str(path)
