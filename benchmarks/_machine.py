"""Describe the machine a benchmark ran on, as a JSON-able dict: ``describe_machine()``.

Shared by the benchmark scripts; needs nothing beyond the standard library.
NumPy, threadpoolctl, torch, numba, faiss and cupy are described when
present. Versions come from the installed package metadata, so describing a
machine never imports torch or cupy.
"""
import datetime
import os
import platform
import socket
import sys


def _cpuinfo():
    """(model name, set of flags) from /proc/cpuinfo, or what platform knows elsewhere."""
    model, flags = None, set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model is None:
                    model = value.strip()
                elif key == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return model or platform.processor() or platform.machine(), flags


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
    model, flags = _cpuinfo()
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
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "avx2": "avx2" in flags,
        "avx512": any(f.startswith("avx512") for f in flags),
        "fma": "fma" in flags,
        "numpy": numpy_version,
        "blas": _blas(),
        "env": {k: os.environ.get(k) for k in ("OPENBLAS_CORETYPE", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS",
                                              "MKL_NUM_THREADS", "OMP_WAIT_POLICY")},
        "torch": _version("torch"),
        "numba": _version("numba"),
        "faiss": _version("faiss-cpu", "faiss-gpu", "faiss"),
        "cupy": _version("cupy", "cupy-cuda13x", "cupy-cuda12x", "cupy-cuda11x"),
        "threadpoolctl": _version("threadpoolctl"),
    }


def slug(machine=None):
    """``<hostname-or-cpu>-<date>`` for result file names: letters, digits and dashes only."""
    machine = machine or describe_machine()
    name = machine.get("hostname") or machine.get("cpu_model") or "cpu"
    name = "".join(c if c.isalnum() else "-" for c in name).strip("-").lower() or "cpu"
    return f"{name}-{machine['date'][:10]}"


if __name__ == "__main__":
    import json
    print(json.dumps(describe_machine(), indent=2))
