"""What the benchmark scripts share: the machine description and the timing helpers.

``describe_machine()`` gives the machine a benchmark ran on as a JSON-able
dict; it needs nothing beyond the standard library. NumPy, threadpoolctl,
torch, numba, faiss and cupy are described when present. Versions come from
the installed package metadata, so describing a machine never imports torch
or cupy. ``timed(call)`` times one call; ``sgemm_rate(device)`` measures the
float32 GEMM rate that the scripts hold their GFLOP/s against;
``write_record(record, out)`` saves a run's JSON;
``run_single_threaded(commands, jobs)`` runs training processes side by side, and
``run_training_jobs`` is the training studies' ``run`` command on top of it.
"""
import datetime
import json
import os
import platform
import socket
import subprocess
import sys
import time


# /proc/cpuinfo's names of the features the screens' products rest on (kernels/nearest_screened.py)
INT_DOT_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"})


def _cpuinfo():
    """(model name, set of flags, identity) from /proc/cpuinfo, or what platform knows elsewhere.

    The identity (vendor, family, model, stepping, and the "cache size" line: a core's L2 on AMD, the L3
    on Intel) tells apart CPUs that a VM names alike:
    "AMD EPYC" is family 25 (Zen 4) on one machine and family 26 (Zen 5) on the next.
    """
    model, flags, identity = None, set(), {}
    names = {"vendor_id": "vendor", "cpu family": "family", "model": "model", "stepping": "stepping",
             "cache size": "cache_size"}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model is None:
                    model = value.strip()
                elif key == "flags" and not flags:
                    flags = set(value.split())
                elif key in names and names[key] not in identity:
                    identity[names[key]] = value.strip()
    except OSError:
        pass
    return model or platform.processor() or platform.machine(), flags, identity


def _version(*dists):
    """The installed version of the first distribution found among ``dists``, or None."""
    try:
        from importlib import metadata
    except ImportError:      # Python < 3.8
        return None
    for dist in dists:
        try:
            return metadata.version(dist)
        except Exception:
            continue
    return None


def _blas():
    """threadpoolctl's view of the loaded BLAS / OpenMP libraries (needs numpy imported)."""
    try:
        import numpy  # noqa: F401  (loads numpy's BLAS so threadpoolctl can see it)
        import threadpoolctl
    except ImportError:
        return None
    keep = ("user_api", "internal_api", "version", "num_threads", "threading_layer", "architecture", "prefix")
    return [{k: info[k] for k in keep if k in info} for info in threadpoolctl.threadpool_info()]


def describe_machine():
    """A dict describing this machine and its numerical stack (stable keys; values may be None)."""
    model, flags, identity = _cpuinfo()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    try:
        import numpy
        numpy_version = numpy.__version__
    except ImportError:
        numpy_version = None
    return {
        "hostname": socket.gethostname(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu_model": model,
        "cpu_identity": identity,
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "avx2": "avx2" in flags,
        "avx512": any(f.startswith("avx512") for f in flags),
        "fma": "fma" in flags,
        "int_dot_flags": sorted(flags & INT_DOT_FLAGS),
        "numpy": numpy_version,
        "blas": _blas(),
        "env": {k: os.environ.get(k) for k in ("OPENBLAS_CORETYPE", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS",
                                              "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "OPENBLAS_THREAD_TIMEOUT")},
        # what restricts the engines' instruction sets below the CPU's (an AVX2 run on an AVX-512 CPU)
        "isa_env": {k: os.environ[k] for k in ("MINIVQ_NUMBA_WIDE", "MINIVQ_NUMBA_AMX", "MINIVQ_NUMBA_INT16",
                                               "NUMBA_CPU_NAME", "NUMBA_CPU_FEATURES", "ATEN_CPU_CAPABILITY",
                                               "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS",
                                               "FAISS_SIMD_LEVEL")
                    if k in os.environ},
        "torch": _version("torch"),
        "numba": _version("numba"),
        "faiss": _version("faiss-cpu", "faiss-gpu", "faiss"),
        "cupy": _version("cupy", "cupy-cuda13x", "cupy-cuda12x", "cupy-cuda11x"),
        "threadpoolctl": _version("threadpoolctl"),
    }


def write_record(record, out):
    """Write a benchmark's JSON record to ``out`` (its folder made if missing) and say where."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(record, f, indent=1)
    print(f"wrote {out}")


def slug(machine=None):
    """``<hostname-or-cpu>-<date>`` for result file names: letters, digits and dashes only."""
    machine = machine or describe_machine()
    name = machine.get("hostname") or machine.get("cpu_model") or "cpu"
    name = "".join(c if c.isalnum() else "-" for c in name).strip("-").lower() or "cpu"
    return f"{name}-{machine['date'][:10]}"


def timed(call, sync=None, gap=0.0):
    """``(seconds, result)`` of one ``call()``.

    ``gap``: seconds of rest first, so the idle threads of the library that ran
    before have stopped spinning (OpenBLAS and OpenMP pools busy-wait after a
    call). ``sync``: called before and after, to wait for a GPU's queue.
    """
    if gap:
        time.sleep(gap)
    if sync is not None:
        sync()
    start = time.perf_counter()
    result = call()
    if sync is not None:
        sync()
    return time.perf_counter() - start, result


def sgemm_rate(device="cpu", repeats=5, size=None, pick=min, gap=0.0):
    """GFLOP/s of a float32 square matrix product: NumPy on the CPU, CuPy on ``device="cuda"``.

    One warm-up product, then ``repeats`` timed ones, each after ``gap`` seconds
    of rest; ``pick`` chooses the time the rate is computed from (``min``: a
    peak; ``statistics.median``: a typical rate). ``size`` defaults to 2048 on
    the CPU, 8192 on the GPU. Returns ``{"size", "gflops", "times_s"}``.
    """
    if device == "cpu":
        import numpy as np
        size = size or 2048
        a = np.random.default_rng(0).standard_normal((size, size), dtype=np.float32)
        sync = None
    else:
        import cupy as cp
        size = size or 8192
        a = cp.random.default_rng(0).standard_normal((size, size), dtype=cp.float32)
        sync = cp.cuda.runtime.deviceSynchronize
    timed(lambda: a @ a, sync)
    times = [timed(lambda: a @ a, sync, gap)[0] for _ in range(repeats)]
    return {"size": size, "gflops": 2 * size ** 3 / pick(times) / 1e9, "times_s": times}


if __name__ == "__main__":
    print(json.dumps(describe_machine(), indent=2))


def run_single_threaded(commands, jobs, name):
    """Run ``commands`` (argument lists), ``jobs`` at a time, each process on one BLAS/OpenMP/Numba thread.

    How the training studies use both cores: one run per core. Stops at the first command that
    fails (SystemExit naming it, ``name`` the calling script).
    """
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", NUMBA_NUM_THREADS="1",
               MKL_NUM_THREADS="1")
    pending, running = list(commands), []
    while pending or running:
        while pending and len(running) < jobs:
            running.append(subprocess.Popen(pending.pop(0), env=env))
        time.sleep(2)
        failed = [p for p in running if p.poll() not in (None, 0)]
        if failed:
            raise SystemExit(f"{name}: {failed[0].args} exited with {failed[0].returncode}")
        running = [p for p in running if p.poll() is None]


def run_training_jobs(script, train_one, names, known, seeds, steps, jobs):
    """A study's ``run`` command: train ``names`` (comma-separated, each a key of ``known``) for every seed
    of ``seeds`` (comma-separated), ``steps`` steps each; in this process when ``jobs`` is 1, else as
    ``script one NAME SEED STEPS`` processes, ``jobs`` at a time, one thread each."""
    study = os.path.splitext(os.path.basename(script))[0]
    names = names.split(",")
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"{study}: unknown {', '.join(unknown)}; known: {', '.join(known)}")
    runs = [(name, int(seed)) for seed in seeds.split(",") for name in names]
    if jobs == 1:
        for name, seed in runs:
            train_one(name, seed, steps)
        return
    run_single_threaded([[sys.executable, script, "one", name, str(seed), str(steps)] for name, seed in runs],
                        jobs, study)
