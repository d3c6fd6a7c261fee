"""Issue 20's CPU benchmarks on this machine, one after another, then its targets beside what they measured.

    python benchmarks/cpu_check.py                      # about 10 minutes on 2 cores
    python benchmarks/cpu_check.py --name zen4 --tag run2
    python benchmarks/cpu_check.py --dry-run            # the commands and where their JSON goes; nothing runs
    python benchmarks/cpu_check.py --summary benchmarks/results/*-zen3-*-round16.json

The runs, each under its own time limit (one that hangs costs its limit and no more), never two at once:
the VQ-VAE's training step at batch 32 and 128 and the prior's at batch 64, each on all cores (also split
over worker threads, ``--workers``) and on one, interleaved with their PyTorch twins; the nearest-code
search for N = 65536, K in {512, 4096}, D in {64, 256} on all cores and on one, against faiss-cpu and
PyTorch; a per-op profile of one batch-128 step; the VQ-VAE's eight conv layers against PyTorch's on one
core; on an AVX-512 CPU also the one-thread VQ-VAE step with the AVX2-sized tiles (``MINIVQ_NUMBA_WIDE=0``,
``-1thread-narrow`` in its name). Each writes ``<benchmark>-cpu-<name>[-1thread]-<date>[-<tag>].json`` into
``--out``, ``<name>`` being the CPU's kind (``cpu_name``: zen3, zen4, zen5, intel-avx512, ...). Where
``OPENBLAS_CORETYPE`` pins Haswell on an AVX-512 CPU, the runs set SkylakeX in their own environment, so
that NumPy's BLAS and every peer run at their best (each JSON records the core type BLAS reports).

Nothing else should run meanwhile: the check says so when it finds the cores busy before a run.
"""
import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _machine import describe_machine  # noqa: E402

STEP_TARGET = 1.0          # minivq's training step at most this times PyTorch's (stretch 0.75)
STEP_STRETCH = 0.75
SEARCH_TARGET = 1.25       # the Numba search at least this many times faster than faiss-cpu


def cpu_name(machine):
    """The CPU's kind for file names, from its vendor, family and model (a VM's model name hides them)."""
    ident = machine.get("cpu_identity") or {}
    vendor = ident.get("vendor")
    try:
        family, model = int(ident.get("family")), int(ident.get("model"))
    except (TypeError, ValueError):
        family = model = -1
    if vendor == "AuthenticAMD":
        if family == 0x17:
            return "zen2" if model >= 0x30 else "zen"
        if family == 0x19:      # Zen 4: Genoa and Bergamo 0x10-0x1f and 0xa0-0xaf, the desktop and mobile 0x60-0x7f
            return "zen4" if 0x10 <= model <= 0x1f or 0x60 <= model <= 0x7f or 0xa0 <= model <= 0xaf else "zen3"
        if family == 0x1a:
            return "zen5"
    isa = "avx512" if machine.get("avx512") else "avx2" if machine.get("avx2") else "x86"
    return f"{'intel' if vendor == 'GenuineIntel' else 'cpu'}-{isa}"


def bench_env(machine, environ):
    """The runs' environment: ``environ``, with OpenBLAS's SkylakeX kernels where Haswell's are pinned on an
    AVX-512 CPU (what the brief asks of every benchmark here)."""
    env = dict(environ)
    if machine.get("avx512") and env.get("OPENBLAS_CORETYPE", "").lower() == "haswell":
        env["OPENBLAS_CORETYPE"] = "SkylakeX"
    return env


def plan(name, date, tag, out, quick=False, avx512=False):
    """[(label, argv, extra environment, time limit in seconds, JSON path)] of the runs, in order. ``avx512``:
    also the one-thread VQ-VAE step with the convolutions' AVX2-sized tiles (``MINIVQ_NUMBA_WIDE=0``), for
    CPUs such as Zen 4 that run a 512-bit instruction as two 256-bit halves."""
    def path(bench, one_thread=False, variant=""):
        return os.path.join(out, f"{bench}-cpu-{name}{'-1thread' if one_thread else ''}{variant}-{date}"
                                 f"{'-' + tag if tag else ''}.json")
    py = [sys.executable]
    one = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"}
    if quick:       # the whole chain in about a minute, to see that it runs: no figure from it means anything
        steps = prior = ["--batches", "2", "--repeats", "1", "--warmup", "1"]
        search = ["--n", "512", "--k", "16", "--d", "8", "--repeats", "1", "--case-seconds", "5"]
        profile, conv = ["--batch", "2", "--steps", "1"], ["--batches", "2", "--repeats", "1", "--warmup", "0"]
    else:
        steps = ["--batches", "32", "128", "--repeats", "15"]
        prior = ["--batches", "64", "--repeats", "15"]
        search = ["--n", "65536", "--k", "512", "4096", "--d", "64", "256", "--repeats", "5", "--case-seconds", "20"]
        profile, conv = ["--batch", "128", "--steps", "5"], ["--batches", "128"]
    workers = ["--workers", str(min(os.cpu_count() or 1, 2))]
    train, quantizer = os.path.join(HERE, "bench_train_step.py"), os.path.join(HERE, "bench_quantizer.py")
    runs = []

    def add(label, argv, json_path, extra=None, limit=1800, flag="--out"):
        runs.append((label, py + argv + [flag, json_path], extra or {}, limit, json_path))

    for model, args, bench in (("vqvae", steps, "train-step"), ("prior", prior, "prior-step")):
        add(f"{model} step, all cores", [train, "--model", model, *args, *workers], path(bench))
        add(f"{model} step, one thread", [train, "--model", model, *args, "--threads", "1"], path(bench, True))
    if avx512:
        add("vqvae step, one thread, AVX2-sized tiles", [train, "--model", "vqvae", *steps, "--threads", "1"],
            path("train-step", True, "-narrow"), {"MINIVQ_NUMBA_WIDE": "0"})
    add("nearest code, all cores", [quantizer, *search], path("quantizer"))
    add("nearest code, one thread", [quantizer, *search, "--threads", "1"], path("quantizer", True))
    add("profile of one step", [os.path.join(HERE, "profile_step.py"), *profile], path("profile-step"),
        limit=900, flag="--json")
    add("conv layers, one thread", [os.path.join(HERE, "bench_conv.py"), *conv], path("conv", True), one)
    return runs


# ---------------------------------------------------------------- the targets beside the records
def target_rows(records):
    """[(what, threads, measured text, met: True/False/None)] for every target a record in ``records`` bears on."""
    rows = []
    for rec in records:
        machine = rec.get("machine") or {}
        threads = rec.get("threads") or machine.get("usable_cores")
        if rec.get("benchmark") == "train_step" and rec.get("device", "cpu") == "cpu":
            held = ", ".join(f"{k}={v}" for k, v in sorted((machine.get("isa_env") or {}).items()))
            for row in rec["rows"]:
                ratio = row.get("ratio")
                what = (f"{'VQ-VAE' if row['model'] == 'vqvae' else 'prior'} step, batch {row['batch']}"
                        f"{' (' + held + ')' if held else ''}: <= {STEP_TARGET:.2f}x PyTorch")
                if ratio is None:
                    rows.append((what, threads, "no PyTorch", None))
                    continue
                text = f"{ratio:.2f}x"
                if row.get("workers_ratio") is not None:
                    text += f" (workers {row['workers_ratio']:.2f}x)"
                best = min(r for r in (ratio, row.get("workers_ratio")) if r is not None)
                text += " stretch" if best <= STEP_STRETCH else ""
                rows.append((what, threads, text, ratio <= STEP_TARGET))
        elif str(rec.get("benchmark", "")).startswith("nearest-code search") and rec.get("device") == "cpu":
            for case in rec["cases"]:
                what = f"nearest code N={case['n']} K={case['k']} D={case['d']}: >= {SEARCH_TARGET:.2f}x faiss"
                mine, faiss = case["results"].get("minivq-numba"), case["results"].get("faiss")
                if not mine or not faiss:
                    rows.append((what, threads, "no faiss" if mine else "no Numba", None))
                    continue
                speedup = faiss["median_s"] / mine["median_s"]
                text = f"{speedup:.2f}x ({mine['share_of_sgemm_peak']:.0%} of SGEMM)"
                rows.append((what, threads, text, speedup >= SEARCH_TARGET))
    return rows


def print_targets(rows):
    """The rows as a table, each target's rows together, fewer threads first; returns how many missed."""
    if not rows:
        print("no record here bears on a target")
        return 0
    rows = sorted(rows, key=lambda r: (r[0], r[1] or 0))
    width = max(len(r[0]) for r in rows)
    print(f"{'target':<{width}}  threads  {'measured':<32}  met")
    for what, threads, text, met in rows:
        mark = "-" if met is None else "yes" if met else "NO"
        print(f"{what:<{width}}  {threads!s:>7}  {text:<32}  {mark}")
    return sum(1 for r in rows if r[3] is False)


def busy_cores(seconds=1.0):
    """How many cores were busy over the next ``seconds`` (from /proc/stat; None where there is none). Sampled
    now, where the load average would still count the run before."""
    def sample():
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        return sum(fields), fields[3] + fields[4]           # all jiffies, idle + iowait
    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    total = total1 - total0
    return (total - (idle1 - idle0)) / total * (os.cpu_count() or 1) if total > 0 else None


def read_records(paths):
    records = []
    for p in paths:
        try:
            with open(p) as f:
                records.append(json.load(f))
        except (OSError, ValueError) as e:
            print(f"cpu_check.py: skipping {p}: {e}", file=sys.stderr)
    return records


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--name", default=None, help="the CPU's kind in file names (default: from /proc/cpuinfo)")
    ap.add_argument("--tag", default="", help="appended to each file name (e.g. run2, round17)")
    ap.add_argument("--out", default=os.path.join(HERE, "results"), help="folder for the JSON files")
    ap.add_argument("--dry-run", action="store_true", help="print the commands and their JSON paths, run nothing")
    ap.add_argument("--quick", action="store_true",
                    help="tiny sizes, one repeat: checks that every run works (its figures mean nothing)")
    ap.add_argument("--summary", nargs="+", metavar="JSON", help="only print the targets table of these records")
    args = ap.parse_args(argv)
    if args.summary:
        print_targets(target_rows(read_records(args.summary)))
        return 0
    machine = describe_machine()
    name = args.name or cpu_name(machine)
    if not name.replace("-", "").isalnum():
        print(f"cpu_check.py: --name {name!r}: use letters, digits and dashes only", file=sys.stderr)
        return 2
    runs = plan(name, machine["date"][:10], args.tag, args.out, args.quick, machine["avx512"])
    taken = [r[4] for r in runs if os.path.exists(r[4])]
    if taken and not args.dry_run:
        print(f"cpu_check.py: {taken[0]} exists ({len(taken)} of the files would be overwritten): "
              f"pass --tag to name this run apart", file=sys.stderr)
        return 2
    env = bench_env(machine, os.environ)
    print(f"{machine['cpu_model']} ({name}), {machine['usable_cores']} usable cores; "
          f"OPENBLAS_CORETYPE for the runs: {env.get('OPENBLAS_CORETYPE') or 'unset (OpenBLAS picks)'}")
    if args.dry_run:
        for label, cmd, extra, _, _ in runs:
            pinned = " ".join(f"{k}={v}" for k, v in extra.items())
            print(f"{label}: {pinned + ' ' if pinned else ''}{' '.join(cmd)}")
        return 0
    os.makedirs(args.out, exist_ok=True)
    failed = []
    for label, cmd, extra, limit, out in runs:
        busy = busy_cores()
        if busy is not None and busy > 0.25:
            print(f"warning: {busy:.1f} cores busy before '{label}': another process is using them, and its "
                  f"times will be off")
        print(f"\n=== {time.strftime('%H:%M:%S')} {label}", flush=True)
        try:
            done = subprocess.run(cmd, env={**env, **extra}, timeout=limit)
            if done.returncode != 0:
                failed.append(f"{label} (exit {done.returncode})")
        except subprocess.TimeoutExpired:
            failed.append(f"{label} (over its {limit} s)")
    print()
    print_targets(target_rows(read_records([r[4] for r in runs if os.path.exists(r[4])])))
    if args.quick:
        print("(--quick: tiny sizes and one repeat; the figures above say only that every run works)")
    if failed:
        print("failed: " + "; ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
