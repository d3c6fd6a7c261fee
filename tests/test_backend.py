"""Device names, array modules, the CUDA error message, the seeded generator, the scatter, host memory."""
import os
import subprocess
import sys

import numpy as np
import pytest

import minivq as mv
from minivq import backend


def test_device_names():
    assert backend.parse_device("cpu") == ("cpu", None)
    assert backend.parse_device("cuda") == ("cuda", 0)
    assert backend.parse_device("CUDA:3") == ("cuda", 3)
    for bad in ("gpu0", "cuda:x", "tpu", ""):
        with pytest.raises(ValueError, match="unknown device"):
            backend.parse_device(bad)
    with pytest.raises(TypeError):
        backend.parse_device(3)


def test_numpy_arrays_use_numpy():
    a = np.zeros(2)
    assert backend.get_array_module(a) is np
    assert backend.get_array_module(mv.tensor(a)) is np
    assert backend.array_device(a) == "cpu"
    assert backend.to_device(a, "cpu") is a


@pytest.mark.skipif(backend.cuda_available(), reason="checks the message given where no GPU exists")
def test_cuda_without_gpu_names_the_fix():
    with pytest.raises(RuntimeError) as info:
        mv.tensor(np.zeros(2), device="cuda")
    message = str(info.value)
    assert "\n" not in message and "--device cpu" in message


def test_manual_seed_reproduces_draws():
    mv.manual_seed(5)
    a = backend.rng().standard_normal(4)
    mv.manual_seed(5)
    np.testing.assert_array_equal(a, backend.rng().standard_normal(4))
    state = backend.get_rng_state()
    b = backend.rng().standard_normal(3)
    backend.set_rng_state(state)
    np.testing.assert_array_equal(b, backend.rng().standard_normal(3))
    with pytest.raises(ValueError):
        mv.manual_seed(-1)


def test_index_add_matches_add_at():
    rng = np.random.default_rng(0)
    for n, k, d in [(1, 1, 1), (50, 7, 3), (1000, 300, 8), (0, 4, 2)]:
        idx = rng.integers(0, k, n)
        vals = rng.standard_normal((n, d))
        expected = np.zeros((k, d))
        np.add.at(expected, idx, vals)
        np.testing.assert_allclose(backend.index_add(idx, vals, k), expected, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="index_add"):
        backend.index_add(np.zeros((2, 2), np.int64), np.zeros((2, 3)), 3)


@pytest.mark.gpu
def test_cupy_round_trip():
    import cupy as cp
    a = np.arange(6.0).reshape(2, 3)
    g = backend.to_device(a, "cuda")
    assert backend.get_array_module(g) is cp and backend.array_device(g) == "cuda:0"
    np.testing.assert_array_equal(backend.to_numpy(g), a)
    # ToDevice's backward takes the gradient back to where the input lives
    leaf = mv.tensor(a, requires_grad=True)
    t = leaf.to("cuda")
    assert t.device == "cuda:0" and t.requires_grad
    (t * mv.tensor(np.array([1.0, 2.0, 3.0]), device="cuda")).sum().backward()
    assert isinstance(leaf.grad, np.ndarray)
    np.testing.assert_array_equal(leaf.grad, [[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    # and from the GPU to the host and back
    g_leaf = mv.tensor(a, requires_grad=True, device="cuda")
    (g_leaf.to("cpu") * 3.0).sum().backward()
    assert backend.array_device(g_leaf.grad) == "cuda:0"
    np.testing.assert_array_equal(backend.to_numpy(g_leaf.grad), np.full((2, 3), 3.0))


_FAULTS_PER_ROUND = """
import resource, sys
import numpy as np
from minivq import backend
kept = backend.keep_freed_host_memory() if sys.argv[1] == "keep" else None
count, size = int(sys.argv[2]), int(sys.argv[3])
def round_():       # blocks allocated and freed as a training step's activations are
    blocks = [np.ones(size // 4, np.float32) for _ in range(count)]
    del blocks
round_()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    round_()
print(kept, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
"""

# whether this glibc takes an mmap threshold of argv[1] bytes (mallopt's answer: 1 yes, 0 no)
_ACCEPTS = f"import ctypes, sys; print(ctypes.CDLL(None).mallopt({backend._M_MMAP_THRESHOLD}, int(sys.argv[1])))"


def _faults(mode, count, size):
    """Minor page faults a round of ``count`` blocks of ``size`` bytes costs, after one round; 4 KiB pages
    (NumPy asks for 2 MiB pages for large arrays unless told not to, which would count 512 times fewer faults)."""
    env = dict(os.environ, NUMPY_MADVISE_HUGEPAGE="0")
    out = subprocess.run([sys.executable, "-c", _FAULTS_PER_ROUND, mode, str(count), str(size)], env=env,
                         capture_output=True, text=True, check=True).stdout.split()
    return out[0], float(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="page-fault counts and glibc: Linux")
def test_keeping_freed_host_memory_ends_page_faults_of_repeated_allocations():
    import platform
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc")
    kept, with_setting = _faults("keep", 10, 4 * 2 ** 20)
    _, without = _faults("default", 10, 4 * 2 ** 20)
    assert kept == "True"
    assert with_setting < 50                  # the blocks come back from the heap: no fresh pages
    assert without > 10 * max(with_setting, 50)      # glibc's default hands them back, 40 MB of fresh pages
    # a block over 32 MiB (as a batch-512 step has) too, where this glibc takes a larger threshold
    accepts = subprocess.run([sys.executable, "-c", _ACCEPTS, str(backend.HOST_MMAP_THRESHOLDS[0])],
                             capture_output=True, text=True, check=True).stdout.strip() == "1"
    _, big = _faults("keep", 1, 64 * 2 ** 20)
    if accepts:
        assert big < 50
    else:
        assert big > 10000                    # mapped fresh each round: 16,384 pages of 4 KiB


def test_keeping_freed_host_memory_elsewhere_changes_nothing(monkeypatch):
    def no_libc(name):
        raise OSError("no C library here")
    monkeypatch.setattr(backend.ctypes, "CDLL", no_libc)
    assert backend.keep_freed_host_memory() is False
