"""Time minivq's nearest-code search against FAISS and PyTorch, interleaved in one process.

For each (N, K, D) in the sweep, float32 x (N, D) and codebook (K, D) of
standard normals, every implementation below is called once to warm up
(Numba compiles or loads its cache, CuPy compiles the CUDA source), then the
implementations take turns, the order rotating every repeat, with a short
pause before each timed call so the previous library's idle threads have
stopped spinning (OpenBLAS and OpenMP pools busy-wait after a call and would
otherwise steal the cores from the next one). Medians are reported.

CPU (``--device cpu``):
    minivq-numba   kernels.nearest_code(backend="numba"): a certified screen and the float32 decision of
                   the few codes it leaves (bf16 on AMX tiles, nearest_amx.py, or else int16 with VNNI
                   or AVX2's vpmaddwd, nearest_int16.py); the fused kernel alone on CPUs with neither
    minivq-numba-fp32  the fused float32 kernel alone (listed where a screen runs; it gives the same
                   indices as minivq-numba, which the JSON records per case as ``screen_equals_fused``;
                   ``machine.screen`` names the screen)
    minivq-numpy   kernels.nearest_code(backend="numpy"): the chunked GEMM reference
    faiss          faiss.IndexFlatL2(D) holding the codebook (added outside the timing), search(x, 1)
    torch-cdist    torch.cdist(x, e).argmin(1)
    torch-addmm    torch.addmm(||e||^2, x, e.T, alpha=-2).argmin(1): the GEMM expansion, scale and
                   norms fused into the GEMM call (the fastest way to write it in PyTorch)
CUDA (``--device cuda``): minivq-cupy (the fused kernel), minivq-numpy on CuPy arrays (cuBLAS
GEMM + argmin), torch-cdist and torch-addmm on the GPU; every call is bracketed by device
synchronisations.

Reported per implementation: median time, GFLOP/s = 2NKD / t, the share of an
SGEMM peak measured in the same run (NumPy float32 2048^3 on the CPU, CuPy
float32 8192^3 on the GPU, before and after the sweep, the higher taken), the
ratio to the best peer (best peer time / this time: above 1 is faster), and
the fraction of rows on which it agrees with minivq's reference. Threads are
set once for every library: numba.set_num_threads, torch.set_num_threads,
faiss.omp_set_num_threads and threadpoolctl for BLAS.

The full CPU sweep is long on a small machine (N=262144, K=8192, D=256 is 1.1
TFLOP per call): each case gets as many repeats as fit in --case-seconds
(at least one, at most --repeats), priced by a second call of each
implementation after its warm-up (the first may hold its compile), pause
included, and PyTorch is skipped where its N x K
score matrix would exceed --max-scores-gb. JSON goes to
benchmarks/results/quantizer-<device>-<date>.json with the machine described.

    python benchmarks/bench_quantizer.py --quick                 # 4 small CPU cases
    python benchmarks/bench_quantizer.py                         # the full CPU sweep
    python benchmarks/bench_quantizer.py --n 65536 --k 512 --d 64 --repeats 15
    python benchmarks/bench_quantizer.py --device cuda           # on a GPU machine
"""
import argparse
import datetime
import gc
import os
import statistics
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))      # run from a checkout without installing
sys.path.insert(0, HERE)

from minivq import kernels                      # noqa: E402

from _machine import describe_machine, sgemm_rate, timed, write_record     # noqa: E402

FULL = {"n": [8192, 65536, 262144], "k": [512, 1024, 8192], "d": [64, 256]}
QUICK = {"n": [8192, 65536], "k": [512, 1024], "d": [64]}


def machine_description():
    machine = describe_machine()
    try:
        import threadpoolctl
        machine["blas_architecture"] = [i.get("architecture") for i in threadpoolctl.threadpool_info()
                                        if i.get("user_api") == "blas"]
    except ImportError:
        machine["blas_architecture"] = None
    machine["OPENBLAS_CORETYPE"] = os.environ.get("OPENBLAS_CORETYPE")
    try:
        from minivq.kernels import nearest_screened
        machine["screen"] = nearest_screened.screen_name()
    except ImportError:                           # no Numba
        machine["screen"] = None
    return machine


# ----------------------------------------------------------------- threads
def set_threads(threads):
    """One thread count for every library present; returns what each reports back."""
    applied = {}
    try:
        import threadpoolctl
        threadpoolctl.threadpool_limits(threads)
        applied["blas"] = [i["num_threads"] for i in threadpoolctl.threadpool_info()]
    except ImportError:
        applied["blas"] = None
    try:
        import numba
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        applied["numba"] = numba.get_num_threads()
    except ImportError:
        pass
    try:
        import torch
        torch.set_num_threads(threads)
        applied["torch"] = torch.get_num_threads()
    except ImportError:
        pass
    try:
        import faiss
        faiss.omp_set_num_threads(threads)
        applied["faiss"] = threads
    except ImportError:
        pass
    return applied


# ----------------------------------------------------------------- implementations
class Impl:
    """A named implementation: ``prepare(x, codebook)`` returns a zero-argument call giving indices."""

    def __init__(self, name, kind, prepare, sync=None):
        self.name, self.kind, self.prepare, self.sync = name, kind, prepare, sync


def cpu_impls():
    impls = []
    if "numba" in kernels.available_backends():
        impls.append(Impl("minivq-numba", "minivq",
                          lambda x, e: (lambda: kernels.nearest_code(x, e, backend="numba"))))
        from minivq.kernels import nearest_numba, nearest_screened
        if nearest_screened.screen_name():
            impls.append(Impl("minivq-numba-fp32", "minivq",
                              lambda x, e: (lambda: nearest_numba.nearest_code_numba(x, e))))
    impls.append(Impl("minivq-numpy", "minivq", lambda x, e: (lambda: kernels.nearest_code(x, e, backend="numpy"))))
    try:
        import faiss

        def prepare_faiss(x, e):
            index = faiss.IndexFlatL2(e.shape[1])
            index.add(e)
            return lambda: index.search(x, 1)[1][:, 0]
        impls.append(Impl("faiss", "peer", prepare_faiss))
    except ImportError:
        pass
    try:
        import torch

        def prepare_cdist(x, e):
            xt, et = torch.from_numpy(x), torch.from_numpy(e)
            return lambda: torch.cdist(xt, et).argmin(1).numpy()

        def prepare_addmm(x, e):
            xt, et = torch.from_numpy(x), torch.from_numpy(e)
            return lambda: torch.addmm((et * et).sum(1), xt, et.T, alpha=-2).argmin(1).numpy()
        impls += [Impl("torch-cdist", "peer", prepare_cdist), Impl("torch-addmm", "peer", prepare_addmm)]
    except ImportError:
        pass
    return impls


def cuda_impls():
    import cupy as cp

    def sync():
        cp.cuda.runtime.deviceSynchronize()

    def on_gpu(backend):
        def prepare(x, e):
            xc, ec = cp.asarray(x), cp.asarray(e)
            return lambda: kernels.nearest_code(xc, ec, backend=backend)
        return prepare

    impls = [Impl("minivq-cupy", "minivq", on_gpu("cupy"), sync), Impl("minivq-numpy", "minivq", on_gpu("numpy"), sync)]
    try:
        import torch
        if torch.cuda.is_available():
            def tsync():
                torch.cuda.synchronize()
                cp.cuda.runtime.deviceSynchronize()

            def prepare_cdist(x, e):
                xt, et = torch.as_tensor(x, device="cuda"), torch.as_tensor(e, device="cuda")
                return lambda: torch.cdist(xt, et).argmin(1)

            def prepare_addmm(x, e):
                xt, et = torch.as_tensor(x, device="cuda"), torch.as_tensor(e, device="cuda")
                return lambda: torch.addmm((et * et).sum(1), xt, et.T, alpha=-2).argmin(1)
            impls += [Impl("torch-cdist", "peer", prepare_cdist, tsync),
                      Impl("torch-addmm", "peer", prepare_addmm, tsync)]
    except ImportError:
        pass
    return impls


def to_host(indices):
    if hasattr(indices, "get"):
        return indices.get()
    if hasattr(indices, "cpu"):
        return indices.cpu().numpy()
    return np.asarray(indices)


# ----------------------------------------------------------------- one case
def run_case(impls, n, k, d, args, peak):
    rng = np.random.default_rng(n + 7 * k + 13 * d)
    x = rng.standard_normal((n, d), dtype=np.float32)
    e = rng.standard_normal((k, d), dtype=np.float32)
    flop = 2 * n * k * d
    case = {"n": n, "k": k, "d": d, "dtype": "float32", "flop": flop, "results": {}, "skipped": {}}
    calls = []
    for impl in impls:
        if impl.name.startswith("torch") and args.device == "cpu" and n * k * 4 > args.max_scores_gb * 1e9:
            case["skipped"][impl.name] = f"its {n}x{k} float32 score matrix exceeds --max-scores-gb {args.max_scores_gb}"
            continue
        call = impl.prepare(x, e)
        warm, indices = timed(call, impl.sync)       # warm-up: compile, caches, thread pools
        # a second call prices a repeat: the first can hold seconds of compiling, which once cut a case's
        # repeats to three (Zen 5, K = 512, D = 64: 4.8 s of Numba's compile in a 20 s budget)
        settled, again = timed(call, impl.sync)
        del again
        calls.append((impl, call, warm, to_host(indices).astype(np.int64), settled))
        del indices
        gc.collect()
    reference = next((c[3] for c in calls if c[0].name == "minivq-numpy"), calls[0][3])
    ours = {c[0].name: c[3] for c in calls}
    if "minivq-numba-fp32" in ours:
        case["screen_equals_fused"] = bool(np.array_equal(ours["minivq-numba"], ours["minivq-numba-fp32"]))
    one_round = sum(c[4] + args.pause for c in calls)
    repeats = max(1, min(args.repeats, int(args.case_seconds // max(one_round, 1e-9))))
    times = {c[0].name: [] for c in calls}
    for r in range(repeats):
        order = calls[r % len(calls):] + calls[:r % len(calls)]
        for impl, call, *_ in order:
            elapsed, result = timed(call, impl.sync, args.pause)
            times[impl.name].append(elapsed)
            del result
    for impl, _, warm, indices, _ in calls:
        median = statistics.median(times[impl.name])
        case["results"][impl.name] = {
            "kind": impl.kind, "median_s": median, "times_s": times[impl.name], "warmup_s": warm,
            "gflops": flop / median / 1e9, "share_of_sgemm_peak": flop / median / 1e9 / peak,
            "agreement_with_reference": float((indices == reference).mean()),
        }
    peers = [r["median_s"] for r in case["results"].values() if r["kind"] == "peer"]
    best_peer = min(peers) if peers else None
    for name, result in case["results"].items():
        result["ratio_to_best_peer"] = best_peer / result["median_s"] if best_peer else None
    case["best_peer"] = min((r for r in case["results"].items() if r[1]["kind"] == "peer"),
                            key=lambda item: item[1]["median_s"], default=(None,))[0]
    case["repeats"] = repeats
    return case


def print_case(case):
    print(f"\nN={case['n']} K={case['k']} D={case['d']}  ({case['flop'] / 1e9:.1f} GFLOP, "
          f"{case['repeats']} repeats, best peer: {case['best_peer']})")
    print(f"  {'implementation':17s} {'ms':>10s} {'GF/s':>8s} {'%SGEMM':>7s} {'vs best peer':>13s} {'agree':>7s}")
    for name, r in sorted(case["results"].items(), key=lambda item: item[1]["median_s"]):
        ratio = f"{r['ratio_to_best_peer']:.2f}x" if r["ratio_to_best_peer"] else "-"
        print(f"  {name:17s} {r['median_s'] * 1e3:10.1f} {r['gflops']:8.1f} {100 * r['share_of_sgemm_peak']:6.0f}% "
              f"{ratio:>13s} {r['agreement_with_reference']:7.4f}")
    for name, why in case["skipped"].items():
        print(f"  {name:17s} skipped: {why}")
    if "screen_equals_fused" in case:
        print(f"  minivq-numba's indices equal the fused kernel's: {case['screen_equals_fused']}")
    sys.stdout.flush()


def print_summary(cases, ours):
    """One line per case: our fused kernel against the best peer."""
    print(f"\n{'N':>7s} {'K':>5s} {'D':>4s} | {ours + ' ms':>16s} {'GF/s':>6s} {'%SGEMM':>6s} | "
          f"{'best peer':>12s} {'ms':>9s} | {'speed-up':>8s}")
    for case in cases:
        mine = case["results"].get(ours)
        peer = case["results"].get(case["best_peer"]) if case["best_peer"] else None
        if mine is None:
            continue
        peer_text = f"{case['best_peer']:>12s} {peer['median_s'] * 1e3:9.1f}" if peer else f"{'-':>12s} {'-':>9s}"
        ratio = f"{mine['ratio_to_best_peer']:.2f}x" if mine["ratio_to_best_peer"] else "-"
        print(f"{case['n']:7d} {case['k']:5d} {case['d']:4d} | {mine['median_s'] * 1e3:16.1f} {mine['gflops']:6.1f} "
              f"{100 * mine['share_of_sgemm_peak']:5.0f}% | {peer_text} | {ratio:>8s}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--quick", action="store_true", help="N in {8192, 65536}, K in {512, 1024}, D = 64")
    parser.add_argument("--n", type=int, nargs="+", help="rows of x to sweep")
    parser.add_argument("--k", type=int, nargs="+", help="codebook sizes to sweep")
    parser.add_argument("--d", type=int, nargs="+", help="dimensions to sweep")
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per implementation and case (at most)")
    parser.add_argument("--case-seconds", type=float, default=60.0,
                        help="at most as many repeats as rounds of calls (one call each, pauses "
                             "included) fit in this many seconds")
    parser.add_argument("--threads", type=int, default=None, help="threads for every library (default: usable cores)")
    parser.add_argument("--pause", type=float, default=None,
                        help="seconds of rest before each timed call (default 0.2 on the CPU, 0 on the GPU)")
    parser.add_argument("--max-scores-gb", type=float, default=4.0,
                        help="on the CPU, skip PyTorch where its N x K score matrix would be larger")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/quantizer-<device>-<date>.json)")
    args = parser.parse_args(argv)
    if args.pause is None:
        args.pause = 0.2 if args.device == "cpu" else 0.0
    sweep = dict(QUICK if args.quick else FULL)
    for key in ("n", "k", "d"):
        if getattr(args, key):
            sweep[key] = getattr(args, key)
    threads = args.threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    applied = set_threads(threads)

    impls = cpu_impls() if args.device == "cpu" else cuda_impls()
    machine = machine_description()
    if args.device == "cuda":
        import cupy as cp
        props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
        machine["gpu"] = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        machine["gpu_sm_count"] = props["multiProcessorCount"]
    print(f"device {args.device}, threads {applied}, implementations {[i.name for i in impls]}")
    if args.device == "cpu":
        print(f"minivq-numba's screen here: {machine['screen'] or 'none (the fused kernel alone)'}")
    peak_before = sgemm_rate(args.device, repeats=5, pick=min, gap=0.2)
    print(f"SGEMM peak: {peak_before['gflops']:.1f} GF/s ({peak_before['size']}^3 float32)")

    cases = []
    for n in sweep["n"]:
        for k in sweep["k"]:
            for d in sweep["d"]:
                case = run_case(impls, n, k, d, args, peak_before["gflops"])
                cases.append(case)
                print_case(case)
    peak_after = sgemm_rate(args.device, repeats=5, pick=min, gap=0.2)
    peak = max(peak_before["gflops"], peak_after["gflops"])
    for case in cases:                                   # shares against the higher of the two peaks
        for r in case["results"].values():
            r["share_of_sgemm_peak"] = r["gflops"] / peak
    print(f"\nSGEMM peak before/after the sweep: {peak_before['gflops']:.1f} / {peak_after['gflops']:.1f} GF/s; "
          f"shares below are of {peak:.1f}")
    print_summary(cases, "minivq-cupy" if args.device == "cuda" else "minivq-numba")

    date = datetime.date.today().isoformat()
    out = args.out or os.path.join(HERE, "results", f"quantizer-{args.device}-{date}.json")
    record = {
        "benchmark": "nearest-code search (bench_quantizer.py)",
        "device": args.device, "date": date, "argv": sys.argv[1:],
        "threads": threads, "threads_applied": applied, "pause_s": args.pause,
        "sgemm_peak_gflops": peak, "sgemm_before": peak_before, "sgemm_after": peak_after,
        "sweep": sweep, "machine": machine, "cases": cases,
    }
    write_record(record, out)
    return record


if __name__ == "__main__":
    main()
