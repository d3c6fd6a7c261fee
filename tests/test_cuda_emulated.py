"""windows.cu and adam.cu *run* on the CPU, through the CUDA emulation of test_cuda_compile.py.

The launch code of windows_cuda.py and adam_cuda.py drives the emulated kernels through the
same stand-in for CuPy (arrays as pointers, NumPy scalars as values of their own type), and
the results must equal the NumPy references to the bit: col2im gathers its taps in the order
the reference adds them, and Adam's kernel repeats optim.Adam's operations one by one (g++
contracts no multiply-add here, as --fmad=false stops NVRTC from doing on the GPU). What this
cannot check (NVRTC itself, speed) is left to tests/test_kernels_gpu.py on a GPU.
"""
import re
import sys

import numpy as np
import pytest

import minivq as mv
from minivq import optim
from minivq.kernels import adam_cuda, cuda_modules, windows_cuda, windows_numpy

from test_cuda_compile import EMULATOR, GXX, KERNELS, build_emulator, fake_cupy

PRELUDE, _, rest = EMULATOR.partition('#include "KERNEL_SOURCE"')
LAUNCHER = rest.split('extern "C" int emulate_launch')[0]
GEOMETRY = ", ".join(f"arg<int>(a[{i}])" for i in range(3, 14)) + ", " + \
    ", ".join(f"arg<long long>(a[{i}])" for i in range(14, 18))
DISPATCH = r"""
extern "C" int emulate_launch(const char* name, unsigned grid_x, unsigned grid_y, unsigned threads, void** a) {
    const std::string kernel(name);
    if (kernel == "im2col_f32")
        launch(grid_x, grid_y, threads, [&] { im2col_f32(arg<const float*>(a[0]), arg<float*>(a[1]), arg<long long>(a[2]), GEOMETRY); });
    else if (kernel == "im2col_f64")
        launch(grid_x, grid_y, threads, [&] { im2col_f64(arg<const double*>(a[0]), arg<double*>(a[1]), arg<long long>(a[2]), GEOMETRY); });
    else if (kernel == "col2im_f32")
        launch(grid_x, grid_y, threads, [&] { col2im_f32(arg<const float*>(a[0]), arg<float*>(a[1]), arg<long long>(a[2]), GEOMETRY); });
    else if (kernel == "col2im_f64")
        launch(grid_x, grid_y, threads, [&] { col2im_f64(arg<const double*>(a[0]), arg<double*>(a[1]), arg<long long>(a[2]), GEOMETRY); });
    else if (kernel == "adam_f32")
        launch(grid_x, grid_y, threads, [&] {
            adam_f32(arg<float*>(a[0]), arg<const float*>(a[1]), arg<float*>(a[2]), arg<float*>(a[3]), arg<long long>(a[4]),
                     arg<float>(a[5]), arg<float>(a[6]), arg<float>(a[7]), arg<float>(a[8]), arg<float>(a[9]),
                     arg<float>(a[10]), arg<float>(a[11]));
        });
    else if (kernel == "adam_f64")
        launch(grid_x, grid_y, threads, [&] {
            adam_f64(arg<double*>(a[0]), arg<const double*>(a[1]), arg<double*>(a[2]), arg<double*>(a[3]), arg<long long>(a[4]),
                     arg<double>(a[5]), arg<double>(a[6]), arg<double>(a[7]), arg<double>(a[8]), arg<double>(a[9]),
                     arg<double>(a[10]), arg<double>(a[11]));
        });
    else
        return 1;
    return 0;
}
""".replace("GEOMETRY", GEOMETRY)


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    if GXX is None:
        pytest.skip("g++ not found: cannot run the CUDA source on the CPU")
    return build_emulator(tmp_path_factory.mktemp("cuda_emulator_small"),
                          PRELUDE + f'#include "{KERNELS / "windows.cu"}"\n#include "{KERNELS / "adam.cu"}"\n'
                          + LAUNCHER + DISPATCH)


@pytest.fixture
def cp(library, monkeypatch):
    """The stand-in CuPy, its kernels run by the emulator; the compiled-module cache emptied."""
    fake = fake_cupy(library, 132)
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setattr(cuda_modules, "_modules", {})
    return fake


GEOMETRIES = [  # (n, h, w, c, kernel, stride, padding): the VQ-VAE's, and odd ones
    (2, 8, 8, 3, (4, 4), (2, 2), (1, 1)),
    (1, 5, 7, 2, (3, 3), (1, 1), (1, 1)),
    (3, 4, 4, 5, (1, 1), (1, 1), (0, 0)),
    (2, 6, 5, 1, (3, 2), (2, 3), (2, 0)),
    (1, 3, 3, 4, (5, 5), (1, 1), (2, 2)),      # windows wider than the image
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: f"{g[4]}s{g[5]}p{g[6]}")
def test_emulated_windows_equal_the_reference_to_the_bit(cp, dtype, geometry):
    n, h, w, c, kernel, stride, padding = geometry
    rng = np.random.default_rng(sum(map(hash, (n, h, w, c))) % 2 ** 32)
    nchw = rng.standard_normal((n, c, h, w)).astype(dtype)
    image = nchw.transpose(0, 2, 3, 1)                         # what conv hands over: an NHWC view of NCHW
    cols = windows_cuda.im2col_cupy(image.view(cp.ndarray), kernel, stride, padding)
    expected = windows_numpy.im2col_numpy(image, kernel, stride, padding)
    assert cols.shape == expected.shape and cols.flags.c_contiguous
    np.testing.assert_array_equal(np.asarray(cols), expected)

    grad = rng.standard_normal(expected.shape).astype(dtype)
    out = np.full((n, c, h, w), np.nan, dtype).transpose(0, 2, 3, 1).view(cp.ndarray)     # strided, poisoned
    windows_cuda.col2im_cupy(grad.view(cp.ndarray), out, kernel, stride, padding)
    reference = windows_numpy.col2im_numpy(grad, np.empty((n, h, w, c), dtype), kernel, stride, padding)
    np.testing.assert_array_equal(np.asarray(out), reference)        # every element written, bit for bit


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("settings", [dict(lr=0.01, betas=(0.8, 0.95), eps=1e-6),
                                      dict(lr=3e-3, weight_decay=0.1), dict()], ids=["betas", "decay", "default"])
def test_emulated_adam_equals_the_array_ops_to_the_bit(cp, dtype, settings):
    rng = np.random.default_rng(11)
    shapes = [(37, 5), (300,), ()]
    start = [rng.standard_normal(s).astype(dtype) for s in shapes]
    reference = optim.Adam([mv.tensor(a.copy(), requires_grad=True) for a in start], **settings)
    defaults = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    params = [a.copy().view(cp.ndarray) for a in start]
    moments = [(np.zeros_like(a).view(cp.ndarray), np.zeros_like(a).view(cp.ndarray)) for a in start]
    for step in range(1, 5):
        grads = [(rng.standard_normal(s) * 10.0 ** rng.uniform(-3, 1)).astype(dtype) for s in shapes]
        for p, g in zip(reference.params, grads):
            p.grad = g
        reference.step()
        for p, g, (m, v) in zip(params, grads, moments):
            adam_cuda.adam_cupy(p, g.view(cp.ndarray), m, v, step=step, **dict(defaults, **settings))
    for i, (p, (m, v)) in enumerate(zip(params, moments)):
        np.testing.assert_array_equal(np.asarray(p), reference.params[i].data)
        np.testing.assert_array_equal(np.asarray(m), reference.state[i]["exp_avg"])
        np.testing.assert_array_equal(np.asarray(v), reference.state[i]["exp_avg_sq"])


@pytest.mark.parametrize("loader", [windows_cuda, adam_cuda], ids=lambda m: m.__name__.split(".")[-1])
def test_the_kernels_each_loader_launches_are_entry_points_of_its_source(loader):
    from pathlib import Path
    from test_cuda_compile import entry_points
    prefixes = re.findall(r'get_function\(\s*"(\w+)"\s*\+\s*SUFFIX', Path(loader.__file__).read_text())
    assert prefixes, loader.__name__
    wanted = {prefix + suffix for prefix in prefixes for suffix in cuda_modules.SUFFIX.values()}
    assert wanted == set(entry_points(KERNELS / loader.SOURCE))
