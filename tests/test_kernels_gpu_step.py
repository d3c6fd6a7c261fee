"""The CUDA window copies and Adam's fused step on a GPU, against the NumPy references to the bit.

Skipped without CuPy or a GPU (tests/test_cuda_emulated.py runs the same sources on the CPU).
"""
import numpy as np
import pytest

import minivq as mv
from minivq import kernels, optim
from minivq.kernels import windows_numpy

pytestmark = pytest.mark.gpu

cp = pytest.importorskip("cupy")
try:
    _devices = cp.cuda.runtime.getDeviceCount()
except Exception:          # CuPy installed, but no driver or no device
    _devices = 0
if _devices == 0:
    pytest.skip("no CUDA GPU visible to CuPy", allow_module_level=True)

DTYPES = [np.float32, np.float64]


def test_auto_takes_the_cuda_kernels_for_cupy_arrays():
    a = cp.zeros((1, 4, 4, 2), dtype=cp.float32)
    assert kernels.window_backend(a) == "cupy", kernels._load("cuda-windows")
    p, g = cp.ones(3, dtype=cp.float32), cp.ones(3, dtype=cp.float32)
    m, v = cp.zeros(3, dtype=cp.float32), cp.zeros(3, dtype=cp.float32)
    assert kernels.adam_step(p, g, m, v, 1e-3, (0.9, 0.999), 1e-8, 0.0, 1), kernels._load("cuda-adam")
    assert kernels.window_backend(np.zeros((1, 4, 4, 2))) in ("numba", "numpy")


@pytest.mark.parametrize("dtype", DTYPES)
def test_windows_equal_the_reference_on_random_geometries(dtype):
    rng = np.random.default_rng(3)
    for _ in range(40):
        kh, kw = rng.integers(1, 6, 2)
        sh, sw = rng.integers(1, 4, 2)
        ph, pw = rng.integers(0, 3, 2)
        h, w = rng.integers(max(1, kh - 2 * ph), 20), rng.integers(max(1, kw - 2 * pw), 20)
        n, c = rng.integers(1, 5), rng.integers(1, 70)
        geometry = ((int(kh), int(kw)), (int(sh), int(sw)), (int(ph), int(pw)))
        nchw = rng.standard_normal((n, c, h, w)).astype(dtype)
        image = nchw.transpose(0, 2, 3, 1)
        expected = windows_numpy.im2col_numpy(image, *geometry)
        cols = kernels.im2col(cp.asarray(nchw).transpose(0, 2, 3, 1), *geometry)
        np.testing.assert_array_equal(cp.asnumpy(cols), expected)
        grad = rng.standard_normal(expected.shape).astype(dtype)
        reference = windows_numpy.col2im_numpy(grad, np.empty(image.shape, dtype), *geometry)
        out = cp.full((n, c, h, w), cp.nan, dtype=dtype).transpose(0, 2, 3, 1)        # strided and poisoned
        kernels.col2im(cp.asarray(grad), out, *geometry)
        np.testing.assert_array_equal(cp.asnumpy(out), reference)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("settings", [dict(), dict(lr=0.01, betas=(0.8, 0.95), eps=1e-6), dict(weight_decay=0.1)],
                         ids=["default", "betas", "decay"])
def test_the_fused_adam_step_equals_the_cpu_step_to_the_bit(dtype, settings):
    rng = np.random.default_rng(9)
    shapes = [(64, 3, 4, 4), (1000,), ()]
    start = [rng.standard_normal(s).astype(dtype) for s in shapes]
    runs = {}
    for device in ("cpu", "cuda"):
        params = [mv.tensor(a.copy(), requires_grad=True, device=device) for a in start]
        runs[device] = (params, optim.Adam(params, **settings))
    for _ in range(5):
        grads = [(rng.standard_normal(s) * 10.0 ** rng.uniform(-3, 1)).astype(dtype) for s in shapes]
        for device, (params, opt) in runs.items():
            for p, g in zip(params, grads):
                p.grad = g if device == "cpu" else cp.asarray(g)
            opt.step()
    (cpu, opt_cpu), (gpu, opt_gpu) = runs["cpu"], runs["cuda"]
    for i, (a, b) in enumerate(zip(cpu, gpu)):
        np.testing.assert_array_equal(cp.asnumpy(b.data), a.data)
        for name in ("exp_avg", "exp_avg_sq"):
            np.testing.assert_array_equal(cp.asnumpy(opt_gpu.state[i][name]), opt_cpu.state[i][name])
