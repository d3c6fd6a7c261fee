"""One core's arithmetic peaks, side by side: AMX's bf16 tile product, VNNI's int16 block, float32 FMAs, SGEMM.

Why the nearest-code search screens in bf16 on the tiles (kernels/nearest_amx.py, benchmarks/NOTES.md
round 10): the fused float32 kernel and SGEMM both stop near two thirds of the FMA units' peak, while
the tiles multiply bf16 many times faster. All three are measured on one thread, in one process:

    amx-bf16     tiles 0-3 accumulate ``tdpbf16ps`` of tiles 4-7, loaded once: 4 x 16 x 16 x 32
                 multiply-adds a step, nothing read from memory (the rate the tiles allow)
    int16-vnni-512  the int16 screen's block products (simd.PRODUCTS: 32 rows x 32 codes x 64
    int16-vnni-256  features, in L1), counted as 2 operations a multiply-add (nearest_int16.py):
    int16-madd-256  VNNI's ``vpdpwssd`` in zmm or ymm registers, AVX2's ``vpmaddwd`` and ``vpaddd``
    fma-float32  256 (AVX-512) or 96 (AVX2) independent float32 multiply-adds a step, in registers (Numba, the
                 same flags as the fused kernel; LLVM turns them into vector FMAs)
    sgemm        NumPy float32 2048^3 (``_machine.sgemm_rate``), BLAS held to one thread

    python benchmarks/amx_peak.py [--out benchmarks/results/amx-peak-<date>.json]

Where the CPU or the kernel has no AMX (or no VNNI of a width), its row says so and the others still run.
Under ``benchmarks/as_avx2.sh [--vnni]`` the FMAs are ymm ones and only the ymm product can run.
"""
import argparse
import datetime
import functools
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from _machine import describe_machine, sgemm_rate, write_record     # noqa: E402


def amx_rate(steps):
    """bf16 FLOP/s of the tile product on resident tiles, or None without AMX."""
    from numba import njit
    from minivq.kernels import amx
    if not amx.available():
        return None

    @njit(nogil=True)
    def products(config, a, b, steps):
        amx.tile_config(config.ctypes.data)
        amx.tile_zero(0)
        amx.tile_zero(1)
        amx.tile_zero(2)
        amx.tile_zero(3)
        amx.tile_load(4, a.ctypes.data, 64)
        amx.tile_load(5, a.ctypes.data, 64)
        amx.tile_load(6, b.ctypes.data, 64)
        amx.tile_load(7, b.ctypes.data, 64)
        for _ in range(steps):
            amx.tile_dot_bf16(0, 4, 6)
            amx.tile_dot_bf16(1, 4, 7)
            amx.tile_dot_bf16(2, 5, 6)
            amx.tile_dot_bf16(3, 5, 7)
        amx.tile_release()

    ones = np.full(512, 0x3F80, dtype=np.uint16)          # bf16 1.0: 16 rows of 64 bytes
    products(amx.tile_config_bytes(), ones, ones, 10)
    start = time.perf_counter()
    products(amx.tile_config_bytes(), ones, ones, steps)
    return steps * 4 * 16 * 16 * 32 * 2 / (time.perf_counter() - start)


def int16_rate(name, steps):
    """Operations a second of the int16 block product ``name`` (simd.PRODUCTS) on blocks held in L1, or
    None where Numba cannot compile it here."""
    from numba import njit
    from minivq.kernels import nearest_int16, simd
    if name not in nearest_int16.compiled_products():
        return None
    @njit(nogil=True)
    def products(q, codes, scales, out, steps):
        for _ in range(steps):
            simd.named_block_product(name, q.ctypes.data, 128, 32, codes.ctypes.data, 32, scales.ctypes.data,
                                     out.ctypes.data)

    q = np.ones((32, 64), dtype=np.int16)
    codes = np.ones((32, 2, 16, 2), dtype=np.int16)
    scales, out = np.ones(32, dtype=np.float32), np.empty((32, 32), dtype=np.float32)
    products(q, codes, scales, out, 10)
    start = time.perf_counter()
    products(q, codes, scales, out, steps)
    return steps * 32 * 32 * 64 * 2 / (time.perf_counter() - start)


@functools.lru_cache(maxsize=None)
def fma_kernel():
    """The FMA peak's loop, compiled, and its number of chains: independent multiply-adds in a stack buffer
    that LLVM keeps in vector registers. With AVX-512 (``_vector_width_hint``: full width) 256 chains fill 16
    of the 32 zmm registers; with AVX2 96 chains fill 12 of the 16 ymm ones (256 would need 32 and spill to
    memory: a third of the peak on a Zen 3, NOTES.md round 15). Twelve independent chains or more cover the
    FMA latency (4-5 cycles) of two FMA pipes."""
    from numba import njit
    from minivq.kernels.nearest_numba import WIDE, _stack_buffer, _vector_width_hint
    chains = 256 if WIDE else 96

    @njit(nogil=True, fastmath={"contract"})
    def multiply_adds(a, b, steps):
        _vector_width_hint()
        acc = _stack_buffer(chains, np.float32)
        for j in range(chains):
            acc[j] = 0
        for _ in range(steps):
            for j in range(chains):
                acc[j] = acc[j] * a + b
        total = np.float32(0)
        for j in range(chains):
            total += acc[j]
        return total

    multiply_adds(np.float32(0.999), np.float32(1e-3), 10)
    return multiply_adds, chains


def fma_rate(steps):
    """float32 FLOP/s of ``fma_kernel``'s independent multiply-adds, held in registers."""
    multiply_adds, chains = fma_kernel()
    start = time.perf_counter()
    multiply_adds(np.float32(0.999), np.float32(1e-3), steps)
    return steps * chains * 2 / (time.perf_counter() - start)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="about how long each peak runs")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/amx-peak-<date>.json)")
    args = parser.parse_args(argv)
    import numba
    import threadpoolctl
    numba.set_num_threads(1)
    threadpoolctl.threadpool_limits(1)
    rates = {}
    amx_probe = amx_rate(1000)
    rates["amx-bf16"] = amx_rate(max(1000, int(args.seconds * amx_probe / 65536))) if amx_probe else None
    from minivq.kernels import simd
    for product in simd.PRODUCTS:
        probe = int16_rate(product, 1000)
        steps = max(1000, int(args.seconds * probe / 131072)) if probe else 0
        rates[f"int16-{product}"] = int16_rate(product, steps) if probe else None
    fma_probe = fma_rate(1000)
    rates["fma-float32"] = fma_rate(max(1000, int(args.seconds * fma_probe / 256)))
    rates["sgemm"] = sgemm_rate("cpu", repeats=5, pick=min, gap=0.2)["gflops"] * 1e9
    for name, rate in rates.items():
        missing = "no AMX here" if name == "amx-bf16" else "not on this CPU"
        print(f"{name:15s} " + (missing if rate is None else f"{rate / 1e9:9.1f} G operations/s, one core"))
    if rates["amx-bf16"]:
        print(f"the tiles are {rates['amx-bf16'] / rates['sgemm']:.1f}x SGEMM")
    date = datetime.date.today().isoformat()
    out = args.out or os.path.join(HERE, "results", f"amx-peak-{date}.json")
    record = {"benchmark": "one core's peaks (amx_peak.py)", "date": date, "argv": sys.argv[1:],
              "flops_per_s": rates, "machine": describe_machine()}
    write_record(record, out)
    return record


if __name__ == "__main__":
    main()
