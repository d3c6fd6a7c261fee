"""Time minivq's conv2d / conv_transpose2d against PyTorch's CPU convolution on the VQ-VAE's own layers.

Each step is forward + backward in float32 with a fixed upstream gradient, as in
training; the first layer's input (the data batch) needs no gradient. minivq and
PyTorch run interleaved in one process, PyTorch with as many threads as NumPy's
BLAS; the order alternates every repeat, and each timed call waits ``--gap``
seconds first, because either library's idle threads keep spinning after a call
(OpenBLAS's for 2^28 TSC cycles, 0.13 s here) and would otherwise slow the
other one down by up to 3x. Medians are reported (minima too: on a shared
machine the minimum is the least disturbed run). Also measured: NumPy's SGEMM
rate, which with the layers' GEMM FLOPs gives the time that a perfect
im2col+GEMM implementation could not beat.

    python benchmarks/bench_conv.py                 # batches 32 and 128, 10 repeats
    python benchmarks/bench_conv.py --quick         # batch 32, 3 repeats
    python benchmarks/bench_conv.py --batches 64 --repeats 20 --out /tmp/conv.json
    python benchmarks/bench_conv.py --ablate cpu   # each optimisation switched off in turn (benchmarks/NOTES.md, conv section)
"""
import contextlib
import argparse
import os
import statistics
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))      # run from a checkout without installing
sys.path.insert(0, HERE)

import minivq as mv                                              # noqa: E402
from minivq.functional import conv as conv_module                # noqa: E402
from minivq.functional.conv import conv2d, conv_transpose2d      # noqa: E402
from _machine import describe_machine, sgemm_rate, slug, timed, write_record  # noqa: E402

# name, transposed, c_in, c_out, kernel, stride, padding, input size, input needs a gradient
LAYERS = [
    ("enc1 1->64 k4s2", False, 1, 64, 4, 2, 1, 32, False),
    ("enc2 64->128 k4s2", False, 64, 128, 4, 2, 1, 16, True),
    ("enc3 128->128 k3", False, 128, 128, 3, 1, 1, 8, True),
    ("res 128->32 k3", False, 128, 32, 3, 1, 1, 8, True),
    ("res 32->128 k1", False, 32, 128, 1, 1, 0, 8, True),
    ("pre-vq 128->64 k1", False, 128, 64, 1, 1, 0, 8, True),
    ("dec T 128->64 k4s2", True, 128, 64, 4, 2, 1, 8, True),
    ("dec T 64->1 k4s2", True, 64, 1, 4, 2, 1, 16, True),
]


def blas_threads():
    try:
        import threadpoolctl
        for info in threadpoolctl.threadpool_info():
            if info.get("user_api") == "blas":
                return int(info["num_threads"])
    except ImportError:
        pass
    return os.cpu_count()


def gemm_flops(layer, n):
    """FLOPs of the GEMMs of one forward + backward (x W for each product: 2 M N K)."""
    _, transposed, c_in, c_out, k, s, p, size, x_grad = layer
    if transposed:    # the grid of windows is the input; the image is the output
        grid_pixels, c_grid, c_img = size * size, c_in, c_out
    else:
        out = (size + 2 * p - k) // s + 1
        grid_pixels, c_grid, c_img = out * out, c_out, c_in
    one = 2 * n * grid_pixels * c_grid * c_img * k * k
    return one * (3 if x_grad else 2)


def make_case(layer, n, gen):
    name, transposed, c_in, c_out, k, s, p, size, x_grad = layer
    x = gen.standard_normal((n, c_in, size, size)).astype(np.float32)
    wshape = (c_in, c_out, k, k) if transposed else (c_out, c_in, k, k)
    fan_in = (c_out if transposed else c_in) * k * k
    w = gen.uniform(-1, 1, wshape).astype(np.float32) / np.float32(np.sqrt(fan_in))
    b = gen.uniform(-0.1, 0.1, c_out).astype(np.float32)
    out = (size - 1) * s - 2 * p + k if transposed else (size + 2 * p - k) // s + 1
    gy = gen.standard_normal((n, c_out, out, out)).astype(np.float32)
    return x, w, b, gy


def minivq_step(layer, x, w, b, gy):
    _, transposed, *_, k, s, p, size, x_grad = layer
    X = mv.tensor(x, requires_grad=x_grad)
    W, B = mv.tensor(w, requires_grad=True), mv.tensor(b, requires_grad=True)

    def step():
        X.grad = W.grad = B.grad = None
        y = conv_transpose2d(X, W, B, s, p) if transposed else conv2d(X, W, B, s, p)
        y.backward(gy)
    return step


def torch_step(torch, layer, x, w, b, gy):
    _, transposed, *_, k, s, p, size, x_grad = layer
    X = torch.tensor(x, requires_grad=x_grad)
    W, B = torch.tensor(w, requires_grad=True), torch.tensor(b, requires_grad=True)
    G = torch.tensor(gy)
    fn = torch.nn.functional.conv_transpose2d if transposed else torch.nn.functional.conv2d

    def step():
        X.grad = W.grad = B.grad = None
        fn(X, W, B, s, p).backward(G)
    return step


def timed_ms(step, gap):
    return 1e3 * timed(step, gap=gap)[0]


def numpy_sgemm_rate():
    """NumPy's float32 GEMM (2048^2) in GFLOP/s, the median over 7 products."""
    return sgemm_rate("cpu", repeats=7, size=2048, pick=statistics.median)["gflops"]


def run(batches, repeats, warmup, gap, use_torch):
    torch = None
    threads = blas_threads()
    if use_torch:
        try:
            import torch
            torch.set_num_threads(threads)
        except ImportError:
            torch = None
    gen = np.random.default_rng(0)
    sgemm_before = numpy_sgemm_rate()
    results = []
    for n in batches:
        rows = []
        for layer in LAYERS:
            x, w, b, gy = make_case(layer, n, gen)
            mine = minivq_step(layer, x, w, b, gy)
            theirs = torch_step(torch, layer, x, w, b, gy) if torch else None
            for _ in range(warmup):
                mine()
                if theirs:
                    theirs()
            t_mine, t_theirs = [], []
            for r in range(repeats):
                order = [(mine, t_mine), (theirs, t_theirs)] if theirs else [(mine, t_mine)]
                for step, sink in (order if r % 2 == 0 else order[::-1]):
                    sink.append(timed_ms(step, gap))
            flops = gemm_flops(layer, n)
            row = dict(layer=layer[0], batch=n, transposed=layer[1], c_in=layer[2], c_out=layer[3],
                       kernel=layer[4], stride=layer[5], padding=layer[6], size=layer[7], input_grad=layer[8],
                       gemm_gflop=flops / 1e9, minivq_ms=statistics.median(t_mine), minivq_all_ms=t_mine,
                       torch_ms=statistics.median(t_theirs) if t_theirs else None, torch_all_ms=t_theirs or None)
            row["minivq_min_ms"], row["torch_min_ms"] = min(t_mine), min(t_theirs) if t_theirs else None
            row["ratio"] = row["minivq_ms"] / row["torch_ms"] if t_theirs else None
            row["ratio_of_min"] = row["minivq_min_ms"] / row["torch_min_ms"] if t_theirs else None
            rows.append(row)
            print_row(row)
        total = dict(batch=n, minivq_ms=sum(r["minivq_ms"] for r in rows),
                     minivq_min_ms=sum(r["minivq_min_ms"] for r in rows),
                     gemm_gflop=sum(r["gemm_gflop"] for r in rows))
        if torch:
            total["torch_ms"] = sum(r["torch_ms"] for r in rows)
            total["torch_min_ms"] = sum(r["torch_min_ms"] for r in rows)
            total["ratio"] = total["minivq_ms"] / total["torch_ms"]
            total["ratio_of_min"] = total["minivq_min_ms"] / total["torch_min_ms"]
        results.append(dict(batch=n, layers=rows, total=total))
        print_total(total)
    sgemm_after = numpy_sgemm_rate()
    return dict(threads=threads, torch_threads=torch.get_num_threads() if torch else None,
                sgemm_gflops_before=sgemm_before, sgemm_gflops_after=sgemm_after, results=results)


# ---------------------------------------------------------------- ablation
ABLATIONS = ["current", "no-flip", "no-block", "no-keep", "no-winograd"]


@contextlib.contextmanager
def ablation(name):
    """Switch one optimisation of minivq.functional.conv off (see NOTES.md, conv section)."""
    from minivq.kernels import windows_numpy     # where col2im's block lives since the windows moved to kernels/
    saved = (conv_module._flipped_geometry, windows_numpy.COL2IM_BLOCK_BYTES, conv_module._im2col_pass)
    switch = os.environ.get("MINIVQ_NUMBA_WINOGRAD")
    original_pass = conv_module._im2col_pass
    if name == "no-flip":         # stride-1 input gradients through col2im
        conv_module._flipped_geometry = lambda g: None
    elif name == "no-block":      # col2im over the whole chunk at once
        windows_numpy.COL2IM_BLOCK_BYTES = 1 << 62
    elif name == "no-keep":       # rebuild the windows of x in backward
        conv_module._im2col_pass = lambda *a, **k: original_pass(*a, **dict(k, keep_cols=False))
    elif name == "no-winograd":   # the 3x3 stride-1 products by the direct kernels (kernels/winograd_numba.py)
        os.environ["MINIVQ_NUMBA_WINOGRAD"] = "0"
    try:
        yield
    finally:
        conv_module._flipped_geometry, windows_numpy.COL2IM_BLOCK_BYTES, conv_module._im2col_pass = saved
        if switch is None:
            os.environ.pop("MINIVQ_NUMBA_WINOGRAD", None)
        else:
            os.environ["MINIVQ_NUMBA_WINOGRAD"] = switch


def run_ablation(batches, repeats, mode):
    """CPU time at one BLAS thread (median) or wall time at the default threads (minimum), interleaved."""
    import threadpoolctl
    clock = time.process_time if mode == "cpu" else time.perf_counter
    limits = threadpoolctl.threadpool_limits(1, user_api="blas") if mode == "cpu" else contextlib.nullcontext()
    gen = np.random.default_rng(0)
    report = {}
    with limits:
        for n in batches:
            print(f"batch {n}, {'CPU ms at 1 BLAS thread, median' if mode == 'cpu' else 'wall ms, minimum'}")
            print(f"{'layer':<20}" + "".join(f"{a:>12}" for a in ABLATIONS))
            totals = dict.fromkeys(ABLATIONS, 0.0)
            for layer in LAYERS:
                x, w, b, gy = make_case(layer, n, gen)
                times = {a: [] for a in ABLATIONS}
                for r in range(repeats + 1):          # the first round warms up
                    for name in (ABLATIONS if r % 2 == 0 else ABLATIONS[::-1]):
                        with ablation(name):
                            step = minivq_step(layer, x, w, b, gy)
                            t0 = clock()
                            step()
                            if r:
                                times[name].append((clock() - t0) * 1e3)
                pick = statistics.median if mode == "cpu" else min
                row = {a: pick(t) for a, t in times.items()}
                for a in ABLATIONS:
                    totals[a] += row[a]
                report.setdefault(n, []).append(dict(layer=layer[0], **row))
                print(f"{layer[0]:<20}" + "".join(f"{row[a]:12.1f}" for a in ABLATIONS), flush=True)
            print(f"{'total':<20}" + "".join(f"{totals[a]:12.1f}" for a in ABLATIONS) + "\n")
    return report


def print_header():
    print(f"{'':<20} {'':>4} {'GEMM':>6} {'--------- median ---------':>27} {'---------- min ---------':>26}")
    print(f"{'layer':<20} {'N':>4} {'GFLOP':>6} {'minivq ms':>10} {'torch ms':>9} {'ratio':>6} "
          f"{'minivq':>8} {'torch':>8} {'ratio':>6} {'GF/s':>6}")


def _line(name, r, min_key_mine, min_key_theirs, ratio_min):
    def cell(v, width, digits=1):
        return f"{v:{width}.{digits}f}" if v is not None else f"{'-':>{width}}"
    return (f"{name:<20} {r['batch']:>4} {r['gemm_gflop']:6.2f} {r['minivq_ms']:10.1f} {cell(r.get('torch_ms'), 9)} "
            f"{cell(r.get('ratio'), 6, 2)} {r[min_key_mine]:8.1f} {cell(r.get(min_key_theirs), 8)} "
            f"{cell(r.get(ratio_min), 6, 2)} {r['gemm_gflop'] / r['minivq_ms'] * 1e3:6.1f}")


def print_row(r):
    print(_line(r["layer"], r, "minivq_min_ms", "torch_min_ms", "ratio_of_min"), flush=True)


def print_total(t):
    print(_line("total", t, "minivq_min_ms", "torch_min_ms", "ratio_of_min") + "\n", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="32,128", help="comma-separated batch sizes (default 32,128)")
    parser.add_argument("--repeats", type=int, default=10, help="timed repeats per layer and library")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--gap", type=float, default=0.25,
                        help="seconds to pause before each timed call, so that the other library's idle threads "
                             "have stopped spinning (default 0.25; OpenBLAS spins about 0.13 s here)")
    parser.add_argument("--quick", action="store_true", help="batch 32, 3 repeats, 1 warm-up")
    parser.add_argument("--no-torch", action="store_true", help="time minivq alone")
    parser.add_argument("--out", help="JSON path (default benchmarks/results/conv-<host>-<date>.json)")
    parser.add_argument("--ablate", choices=["cpu", "wall"],
                        help="instead: time minivq with each optimisation switched off in turn (no JSON)")
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    repeats, warmup = args.repeats, args.warmup
    if args.quick:
        batches, repeats, warmup = [32], 3, 1
    if min(batches) <= 0 or repeats <= 0:
        parser.error("batches and repeats must be positive")
    if args.ablate:
        run_ablation(batches, repeats, args.ablate)
        return

    machine = describe_machine()
    blas = ", ".join(f"{b.get('internal_api')} {b.get('version')} {b.get('architecture')} x{b.get('num_threads')}"
                     for b in machine["blas"] or [])
    print(f"{machine['cpu_model']}, {machine['usable_cores']} cores; numpy {machine['numpy']} ({blas}); "
          f"OPENBLAS_CORETYPE={machine['env']['OPENBLAS_CORETYPE']}; torch {machine['torch']}")
    print_header()
    report = run(batches, repeats, warmup, args.gap, not args.no_torch)
    print(f"numpy SGEMM 2048^2: {report['sgemm_gflops_before']:.1f} GF/s before, "
          f"{report['sgemm_gflops_after']:.1f} GF/s after")
    for res in report["results"]:
        bound = res["total"]["gemm_gflop"] / report["sgemm_gflops_before"] * 1e3
        print(f"batch {res['batch']}: the GEMMs alone at that rate would take {bound:.0f} ms "
              f"(minivq {res['total']['minivq_ms']:.0f} ms)")
    report.update(machine=machine, repeats=repeats, warmup=warmup, gap_s=args.gap, batches=batches,
                  benchmark="conv2d/conv_transpose2d forward+backward, float32, VQ-VAE layer shapes")
    out = args.out or os.path.join(HERE, "results", f"conv-{slug(machine)}.json")
    write_record(report, out)


if __name__ == "__main__":
    main()
