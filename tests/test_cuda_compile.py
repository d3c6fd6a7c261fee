"""The CUDA sources, checked without a GPU.

1. nvcc compiles every .cu in kernels/ to PTX and to SASS (cubin) for sm_90 with ``-Xptxas -v``;
   no kernel may spill or use a stack frame, and the search kernels must fit the register budget
   that gives two 256-thread blocks per SM (the occupancy nearest_cuda.py plans for). The
   pre-sm_80 path (plain loads instead of cp.async) is compiled for sm_75 as well.
2. nearest_code.cu is *run* on the CPU: a small emulation of CUDA's execution model (one OS thread
   per CUDA thread, a real barrier for __syncthreads, warp shuffles through a per-warp board,
   blocks one after another) compiled with g++ into a shared library, driven by nearest_cuda.py
   itself through a stand-in for the few CuPy calls it makes, and held against the NumPy
   reference. This checks the tiling, bounds, pipeline, reductions and the host code's launch
   arguments; what it cannot check (NVRTC, cp.async itself, speed) is left to
   tests/test_kernels_gpu.py on a machine with a GPU.

Both parts are skipped, with the reason, where nvcc or a C++20 g++ is missing.
"""
import contextlib
import ctypes
import os
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from minivq.kernels import cuda_modules, nearest_cuda, nearest_numpy

KERNELS = Path(__file__).resolve().parents[1] / "kernels"
CU_FILES = sorted(KERNELS.glob("*.cu"))
NVCC = shutil.which("nvcc")
GXX = shutil.which("g++")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (CUDA toolkit not installed)")


def test_every_cu_source_is_shipped_beside_its_loader(tmp_path):
    """setuptools' own build of a copy of the tree puts every kernels/*.cu into minivq/kernels/, next to
    nearest_cuda.py, which reads its source from its own folder: an installed package finds its kernels."""
    pytest.importorskip("setuptools")
    root = KERNELS.parent
    assert KERNELS / "nearest_code.cu" in CU_FILES and Path(nearest_cuda.SOURCE).name == "nearest_code.cu"
    assert Path(nearest_cuda.SOURCE).is_file()
    tree = tmp_path / "tree"
    tree.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md", "LICENSE"):
        if (root / name).exists():
            shutil.copy(root / name, tree / name)
    for folder in ("minivq", "kernels"):
        shutil.copytree(root / folder, tree / folder, ignore=shutil.ignore_patterns("__pycache__"))
    build = subprocess.run([sys.executable, "-c", "from setuptools import setup; setup()", "-q", "build_py",
                            "--build-lib", str(tmp_path / "lib")], cwd=tree, capture_output=True, text=True,
                           timeout=120)
    assert build.returncode == 0, build.stderr
    installed = tmp_path / "lib" / "minivq" / "kernels"
    shipped = sorted(p.name for p in installed.glob("*.cu"))
    assert shipped == [cu.name for cu in CU_FILES]
    for cu in CU_FILES:
        assert (installed / cu.name).read_bytes() == cu.read_bytes(), cu.name
    assert (installed / "nearest_cuda.py").is_file()


def test_the_kernels_the_loader_launches_are_entry_points_of_the_source():
    """nearest_cuda.py asks the compiled module for "<name>_" + suffix; each must be an extern "C"
    __global__ function of nearest_code.cu (a misspelling would only show on a GPU, at first use)."""
    loader = Path(nearest_cuda.__file__).read_text()
    prefixes = set(re.findall(r'get_function\(\s*"(\w+)"\s*\+\s*suffix\s*\)', loader))
    assert prefixes == {"code_norms_", "nearest_code_", "reduce_splits_"}, prefixes
    wanted = {prefix + suffix for prefix in prefixes for suffix in nearest_cuda.SUFFIX.values()}
    assert len(wanted) == 6
    assert wanted == set(entry_points(Path(nearest_cuda.SOURCE)))


def entry_points(cu):
    return re.findall(r'extern\s+"C"\s+__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)\s*\(',
                      cu.read_text())


def ptxas_report(text):
    """{kernel: {registers, stack, spill_stores, spill_loads, smem}} from ``ptxas -v`` output."""
    report, name = {}, None
    for line in text.splitlines():
        m = re.search(r"Function properties for (\w+)", line)
        if m:
            name = m.group(1)
            report[name] = {"smem": 0}
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and name:
            report[name].update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m and name:
            report[name]["registers"] = int(m.group(1))
            smem = re.search(r"(\d+) bytes smem", line)
            report[name]["smem"] = int(smem.group(1)) if smem else 0
    return report


@needs_nvcc
@pytest.mark.parametrize("cu", CU_FILES, ids=lambda p: p.name)
def test_compiles_to_ptx(cu, tmp_path):
    ptx = tmp_path / (cu.stem + ".ptx")
    subprocess.run([NVCC, "-arch=sm_90", "-std=c++17", "-ptx", str(cu), "-o", str(ptx)],
                   check=True, capture_output=True, text=True)
    text = ptx.read_text()
    for name in entry_points(cu):
        assert f".entry {name}(" in text, name


@needs_nvcc
@pytest.mark.parametrize("arch", ["sm_90", "sm_75"])
@pytest.mark.parametrize("cu", CU_FILES, ids=lambda p: p.name)
def test_compiles_to_sass_without_spills(cu, arch, tmp_path):
    run = subprocess.run([NVCC, f"-arch={arch}", "-std=c++17", "-cubin", "-Xptxas", "-v", str(cu),
                          "-o", str(tmp_path / (cu.stem + ".cubin"))], check=True, capture_output=True, text=True)
    report = ptxas_report(run.stdout + run.stderr)
    print(f"\nptxas -v, {cu.name}, {arch}:")
    for name, props in sorted(report.items()):
        print(f"  {name}: {props}")
    assert set(report) == set(entry_points(cu))
    for name, props in report.items():
        assert props["spill_stores"] == 0 and props["spill_loads"] == 0, (name, props)
        assert props["stack"] == 0, (name, props)
    budget = 65536 // (nearest_cuda.THREADS * nearest_cuda.BLOCKS_PER_SM)
    for name in ("nearest_code_f32", "nearest_code_f64"):
        if name in report:
            assert report[name]["registers"] <= budget, (name, report[name], budget)
            assert report[name]["smem"] * nearest_cuda.BLOCKS_PER_SM <= 100 * 1024


def test_python_geometry_matches_the_source():
    source = (KERNELS / "nearest_code.cu").read_text()
    for ctype, dtype in (("float", np.float32), ("double", np.float64)):
        tm, tn, _ = map(int, re.search(rf"nearest_code_body<{ctype}, (\d+), (\d+), (\d+)>", source).groups())
        assert nearest_cuda.GEOMETRY[np.dtype(dtype)] == (16 * tm, 16 * tn)
    assert f"__launch_bounds__(MINIVQ_THREADS, {nearest_cuda.BLOCKS_PER_SM})" in source
    assert f"#define MINIVQ_THREADS {nearest_cuda.THREADS}" in source


@pytest.mark.parametrize("n,k,sm", [(1, 1, 132), (100, 8192, 132), (262144, 8192, 132), (8192, 512, 132),
                                    (5000, 100000, 114), (128, 129, 1), (10 ** 6, 3, 132)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_code_splits_cover_the_codebook(n, k, sm, dtype):
    rows, codes = nearest_cuda.GEOMETRY[np.dtype(dtype)]
    tiles = -(-k // codes)
    splits, per_split = nearest_cuda.code_splits(n, k, dtype, sm)
    assert 1 <= splits <= 65535 and per_split >= 1
    assert (splits - 1) * per_split < tiles <= splits * per_split      # every tile once, no empty split
    if -(-n // rows) >= 2 * nearest_cuda.BLOCKS_PER_SM * sm:
        assert splits == 1


# ----------------------------------------------------------------- running the kernel on the CPU
EMULATOR = r"""
// A minimal emulation of the CUDA execution model, enough for nearest_code.cu.
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

struct uint3 { unsigned x, y, z; };
static thread_local uint3 threadIdx;
static uint3 blockIdx, blockDim, gridDim;
#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(16) double2 { double x, y; };
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline double __longlong_as_double(long long i) { double f; std::memcpy(&f, &i, 8); return f; }
inline float __fmaf_rn(float a, float b, float c) { return std::fmaf(a, b, c); }
inline double __fma_rn(double a, double b, double c) { return std::fma(a, b, c); }

static std::barrier<>* block_barrier;
static std::barrier<>* warp_barriers[32];
static unsigned long long shuffle_board[32][32];
inline void __syncthreads() { block_barrier->arrive_and_wait(); }
template <typename T> T __shfl_xor_sync(unsigned, T value, int lane_mask) {
    const unsigned warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    unsigned long long bits = 0;
    std::memcpy(&bits, &value, sizeof(T));
    shuffle_board[warp][lane] = bits;
    warp_barriers[warp]->arrive_and_wait();
    bits = shuffle_board[warp][lane ^ lane_mask];
    warp_barriers[warp]->arrive_and_wait();
    T out;
    std::memcpy(&out, &bits, sizeof(T));
    return out;
}

#include "KERNEL_SOURCE"

static void launch(unsigned grid_x, unsigned grid_y, unsigned threads, const std::function<void()>& kernel) {
    gridDim = {grid_x, grid_y, 1};
    blockDim = {threads, 1, 1};
    for (unsigned by = 0; by < grid_y; ++by)
        for (unsigned bx = 0; bx < grid_x; ++bx) {
            blockIdx = {bx, by, 0};
            std::barrier<> block(threads);
            std::vector<std::unique_ptr<std::barrier<>>> warps;
            for (unsigned w = 0; w < threads / 32; ++w) {
                warps.emplace_back(new std::barrier<>(32));
                warp_barriers[w] = warps.back().get();
            }
            block_barrier = &block;
            std::vector<std::thread> pool;
            for (unsigned t = 0; t < threads; ++t)
                pool.emplace_back([&kernel, t] { threadIdx = {t, 0, 0}; kernel(); });
            for (auto& th : pool) th.join();
        }
}

// kernelParams-style entry point, as cuLaunchKernel takes them: args[i] points to argument i.
template <typename T> static T arg(void* p) { return *static_cast<T*>(p); }

extern "C" int emulate_launch(const char* name, unsigned grid_x, unsigned grid_y, unsigned threads, void** a) {
    const std::string kernel(name);
    if (kernel == "code_norms_f32")
        launch(grid_x, grid_y, threads, [&] { code_norms_f32(arg<const float*>(a[0]), arg<int>(a[1]), arg<int>(a[2]), arg<float*>(a[3])); });
    else if (kernel == "code_norms_f64")
        launch(grid_x, grid_y, threads, [&] { code_norms_f64(arg<const double*>(a[0]), arg<int>(a[1]), arg<int>(a[2]), arg<double*>(a[3])); });
    else if (kernel == "nearest_code_f32")
        launch(grid_x, grid_y, threads, [&] {
            nearest_code_f32(arg<const float*>(a[0]), arg<const float*>(a[1]), arg<const float*>(a[2]), arg<int>(a[3]),
                             arg<int>(a[4]), arg<int>(a[5]), arg<int>(a[6]), arg<long long*>(a[7]), arg<float*>(a[8]),
                             arg<int*>(a[9]));
        });
    else if (kernel == "nearest_code_f64")
        launch(grid_x, grid_y, threads, [&] {
            nearest_code_f64(arg<const double*>(a[0]), arg<const double*>(a[1]), arg<const double*>(a[2]), arg<int>(a[3]),
                             arg<int>(a[4]), arg<int>(a[5]), arg<int>(a[6]), arg<long long*>(a[7]), arg<double*>(a[8]),
                             arg<int*>(a[9]));
        });
    else if (kernel == "reduce_splits_f32")
        launch(grid_x, grid_y, threads, [&] {
            reduce_splits_f32(arg<const float*>(a[0]), arg<const int*>(a[1]), arg<int>(a[2]), arg<int>(a[3]), arg<long long*>(a[4]));
        });
    else if (kernel == "reduce_splits_f64")
        launch(grid_x, grid_y, threads, [&] {
            reduce_splits_f64(arg<const double*>(a[0]), arg<const int*>(a[1]), arg<int>(a[2]), arg<int>(a[3]), arg<long long*>(a[4]));
        });
    else
        return 1;
    return 0;
}
"""


@pytest.fixture(scope="module")
def emulator_library(tmp_path_factory):
    """The emulator, built as a shared library exposing ``emulate_launch``."""
    if GXX is None:
        pytest.skip("g++ not found: cannot run the CUDA source on the CPU")
    return build_emulator(tmp_path_factory.mktemp("cuda_emulator"),
                          EMULATOR.replace("KERNEL_SOURCE", str(KERNELS / "nearest_code.cu")))


def build_emulator(folder, text):
    """The C++ ``text`` (an emulator with its kernels included) built into ``folder`` and loaded;
    skipped where g++ lacks C++20's <barrier>."""
    source = folder / "emulator.cpp"
    source.write_text(text)
    library = folder / "emulator.so"
    build = subprocess.run([GXX, "-std=c++20", "-O2", "-pthread", "-shared", "-fPIC", str(source), "-o", str(library)],
                           capture_output=True, text=True)
    if build.returncode != 0:
        if "barrier" in build.stderr:
            pytest.skip("g++ without C++20 <barrier>: cannot run the CUDA source on the CPU")
        raise AssertionError(build.stderr)
    return ctypes.CDLL(str(library))


def fake_cupy(library, sm_count):
    """Just enough of CuPy for nearest_cuda.py, over NumPy arrays, launching into the emulator.

    Kernel arguments are passed the way CuPy passes them: arrays as device pointers, NumPy scalars
    as values of their own type, so an argument in the wrong place or of the wrong kind breaks.
    """
    class ndarray(np.ndarray):
        @property
        def device(self):
            return contextlib.nullcontext()

    class RawKernel:
        def __init__(self, name):
            self.name = name

        def __call__(self, grid, block, args):
            grid = tuple(grid) + (1,) * (3 - len(grid))
            keep, pointers = [], []
            for a in args:
                if isinstance(a, np.ndarray):
                    holder = ctypes.c_void_p(a.ctypes.data)
                elif isinstance(a, np.generic):
                    holder = np.array([a])
                else:
                    raise TypeError(f"argument {a!r} of {self.name}: CuPy takes arrays and NumPy scalars")
                keep.append(holder)
                pointers.append(ctypes.addressof(holder) if isinstance(holder, ctypes.c_void_p) else holder.ctypes.data)
            params = (ctypes.c_void_p * len(pointers))(*pointers)
            assert grid[2] == 1 and len(block) == 1
            status = library.emulate_launch(self.name.encode(), grid[0], grid[1], block[0], params)
            assert status == 0, f"no kernel named {self.name}"

    class RawModule:
        def __init__(self, code, options=()):
            self.code = code

        def get_function(self, name):
            assert f"void {name}(" in self.code or f"\n{name}(" in self.code, name
            return RawKernel(name)

    cp = types.ModuleType("cupy")
    cp.ndarray, cp.RawModule = ndarray, RawModule
    cp.int32, cp.int64, cp.float32, cp.float64 = np.int32, np.int64, np.float32, np.float64
    cp.ascontiguousarray = lambda a: np.ascontiguousarray(a).view(ndarray)
    cp.empty = lambda shape, dtype: np.full(shape, -1, dtype=dtype).view(ndarray)   # garbage, like the GPU
    device = types.SimpleNamespace(id=0, attributes={"MultiProcessorCount": sm_count})
    cp.cuda = types.SimpleNamespace(Device=lambda *a: device)
    return cp


@pytest.fixture
def emulator(emulator_library, monkeypatch, tmp_path):
    """``run(x, codebook, sm_count)``: nearest_cuda.nearest_code_cupy, kernels run by the emulator."""
    def run(x, codebook, sm_count=132):
        monkeypatch.setitem(sys.modules, "cupy", fake_cupy(emulator_library, sm_count))
        monkeypatch.setattr(cuda_modules, "_modules", {})
        cp = sys.modules["cupy"]
        # in a forked child, so that a kernel writing out of bounds fails this test, not the session
        result = tmp_path / "indices.npy"
        child = os.fork()
        if child == 0:
            try:
                got = nearest_cuda.nearest_code_cupy(cp.ascontiguousarray(x), cp.ascontiguousarray(codebook))
                np.save(result, np.asarray(got))
            finally:
                os._exit(0)
        _, status = os.waitpid(child, 0)
        if os.WIFSIGNALED(status) or not result.exists():
            pytest.fail(f"the emulated kernel crashed (wait status {status})")
        splits, _ = nearest_cuda.code_splits(x.shape[0], codebook.shape[0], x.dtype, sm_count)
        return np.load(result), splits

    return run


def _nearest_within_rounding(x, codebook, got):
    """Chosen codes are nearest within rounding; where the nearest is clear, exactly it."""
    x64, e64 = x.astype(np.float64), codebook.astype(np.float64)
    dist = ((x64[:, None, :] - e64[None, :, :]) ** 2).sum(-1)
    eps = np.finfo(x.dtype).eps
    slack = 4 * (x.shape[1] + 2) * eps * ((x64 ** 2).sum(1) + (e64 ** 2).sum(1).max())
    rows = np.arange(x.shape[0])
    assert np.all(dist[rows, got] <= dist.min(1) + slack)
    if codebook.shape[0] > 1:
        two = np.partition(dist, 1, axis=1)[:, :2]
        clear = two[:, 1] - two[:, 0] > 2 * slack
        np.testing.assert_array_equal(got[clear], dist.argmin(1)[clear])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n,k,d,sm_count", [
    (1, 1, 1, 132),          # one row, one code, one column: almost everything is padding
    (130, 200, 9, 1),        # rows and codes past one tile, D not a multiple of BK, one split
    (70, 300, 20, 132),      # few rows: the codebook is split over gridDim.y and reduced
    (5, 129, 0, 132),        # D = 0: every score is 0, index 0
])
def test_emulated_kernel_matches_reference(emulator, dtype, n, k, d, sm_count):
    rng = np.random.default_rng(n * 1000 + k + d)
    x = rng.standard_normal((n, d)).astype(dtype)
    codebook = rng.standard_normal((k, d)).astype(dtype)
    got, splits = emulator(x, codebook, sm_count)
    assert splits > 1 or sm_count == 1 or n == 1 or d == 0
    assert got.shape == (n,) and got.min() >= 0 and got.max() < k
    if d == 0:
        np.testing.assert_array_equal(got, 0)
        return
    _nearest_within_rounding(x, codebook, got)
    reference = nearest_numpy.nearest_code_numpy(x, codebook)
    assert (got == reference).mean() > 0.9


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("sm_count", [1, 132])
def test_emulated_kernel_ties_go_to_the_lowest_index(emulator, dtype, sm_count):
    rng = np.random.default_rng(5)
    distinct = rng.integers(-20, 20, size=(6, 11)).astype(dtype) * 5
    codebook = distinct[rng.integers(0, 6, 260)]          # duplicates in every tile and split
    codebook[-1] = codebook[0]
    x = np.concatenate([rng.standard_normal((60, 11)).astype(dtype) * 30, codebook[[259, 100, 7]]])
    got, _ = emulator(x, codebook, sm_count)
    unique, first = np.unique(codebook, axis=0, return_index=True)
    first_copy = first[np.unique(codebook, axis=0, return_inverse=True)[1].reshape(-1)]
    np.testing.assert_array_equal(got, first_copy[got])                 # always the first copy
    np.testing.assert_array_equal(got[-3:], [first_copy[259], first_copy[100], first_copy[7]])
    which_unique = np.array([np.flatnonzero(first == g)[0] for g in got])     # got, as a row of `unique`
    _nearest_within_rounding(x, unique, which_unique)
