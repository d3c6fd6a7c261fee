"""Data-parallel training speed: step time, samples/s, scaling efficiency and the share of time in
communication, for 1 and 2 ranks, through ``minivq train``'s own loop (``train_vqvae``).

Each configuration is a real run: ``mpiexec -n P python bench_data_parallel.py --worker ...`` (P = 1
runs without mpiexec). Every rank trains minivq train's default VQ-VAE on its slice of the global batch
(default 128, float32) of Fashion-MNIST; the step time is read from the metrics log rank 0 writes
(the difference of its cumulative ``seconds``), the time in collectives from its ``comm_seconds``
(which includes waiting for the slower rank). It logs every step, to time each, where ``minivq train``
logs every tenth by default, and a logged step's report is itself a collective: whole runs of
``minivq train`` measure what a user waits for (benchmarks/NOTES.md, round 14). After training, each multi-rank worker also times
bare allreduces of a buffer the size of the gradients (after a barrier): the transfer alone.

On the CPU the BLAS, OpenMP and Numba thread counts are set explicitly per rank. Four
configurations: 1 rank x T threads, 1 rank x 1 thread, P ranks x 1 thread (T = P = 2 by default, for
this 2-core machine), so the scaling efficiency (per-rank throughput of P ranks over that of one
rank with the same single core) and the speed-up over one process using every core can both be read;
and P workers in one process (``minivq train --workers P``: the same ranks as threads, each with one
BLAS thread), against the MPI ranks and the one process with T threads.

    python benchmarks/bench_data_parallel.py [--ranks 2] [--steps 12] [--warmup 2] [--batch 128]
    python benchmarks/bench_data_parallel.py --device cuda     # a multi-GPU node: NCCL, 1 and N GPUs

Writes benchmarks/results/data-parallel-<cpu|nccl>-<date>.json with the machine described.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _machine import describe_machine  # noqa: E402

THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")


def worker(args):
    """One rank of one configuration (run under mpiexec, or alone for one rank)."""
    import numpy as np
    from minivq import distributed
    from minivq.config import TrainConfig
    from minivq.train import train_vqvae

    comm = distributed.from_environment()
    if args.device != "cpu" and comm.size > 1:
        comm = distributed.NCCLCommunicator(comm, distributed.rank_device(args.device, comm))
        comm.timing = True      # synchronise around NCCL calls so their time is counted
    train_vqvae(TrainConfig(out=args.out, data=args.data, steps=args.warmup + args.steps, batch_size=args.batch,
                            device=args.device, eval_every=10 ** 9, eval_size=args.batch, checkpoint_every=10 ** 9,
                            log_every=1, progress=False, dtype="float32", workers=args.workers,
                            comm_backend="nccl" if args.device != "cpu" else "auto"), comm=comm)
    bare = []
    if comm.size > 1:           # the transfer alone: allreduces of a gradient-sized buffer, after a barrier
        from minivq.models import VQVAE
        from minivq import backend
        n = VQVAE().num_parameters()
        buf = backend.to_device(np.ones(n, np.float32), distributed.rank_device(args.device, comm)
                                if args.device != "cpu" else "cpu")
        mpi = comm.mpi if isinstance(comm, distributed.NCCLCommunicator) else comm
        for _ in range(args.allreduces + 2):
            mpi.comm.Barrier()
            start = time.perf_counter()
            buf = comm.allreduce_sum(buf)
            if args.device != "cpu":
                backend.current_stream().synchronize()
            bare.append(time.perf_counter() - start)
        bare = bare[2:]
    if comm.rank == 0:
        with open(os.path.join(args.out, "bare-allreduce.json"), "w") as f:
            json.dump({"seconds": bare, "gradient_floats": None if not bare else int(n)}, f)
    comm.close()


def run_configuration(args, ranks, threads, workers, out):
    """One run of one configuration: its timed steps' seconds, comm seconds and bare allreduce seconds."""
    env = dict(os.environ, **{k: str(threads) for k in THREAD_VARIABLES})
    for k in ("PMI_SIZE", "PMI_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "MINIVQ_DISTRIBUTED"):
        env.pop(k, None)
    me = [sys.executable, os.path.abspath(__file__), "--worker", "--out", out, "--steps", str(args.steps),
          "--warmup", str(args.warmup), "--batch", str(args.batch), "--device", args.device,
          "--allreduces", str(args.allreduces), "--workers", str(workers)] + (["--data", args.data] if args.data else [])
    cmd = me if ranks == 1 else [args.mpiexec, "-n", str(ranks)] + me
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    with open(os.path.join(out, "metrics.jsonl")) as f:
        train = [r for r in map(json.loads, f) if r["split"] == "train"]
    times = [b["seconds"] - a["seconds"] for a, b in zip([{"seconds": 0.0}] + train, train)][args.warmup:]
    comm = [r.get("comm_seconds", 0.0) for r in train][args.warmup:]
    with open(os.path.join(out, "bare-allreduce.json")) as f:
        bare = json.load(f)
    return times, comm, bare, wall


def summarise(args, ranks, threads, workers, runs):
    """Medians over the timed steps of every repeat of one configuration."""
    times = [t for run in runs for t in run[0]]
    comm = [c for run in runs for c in run[1]]
    bare = {"seconds": [b for run in runs for b in run[2]["seconds"]], "gradient_floats": runs[0][2]["gradient_floats"]}
    step = statistics.median(times)
    result = {"ranks": ranks, "threads_per_rank": threads, "workers": workers, "global_batch": args.batch,
              "local_batch": args.batch // (ranks * workers), "timed_steps": len(times),
              "step_seconds_median": step, "step_seconds_min": min(times), "step_seconds": times,
              "samples_per_second": args.batch / step,
              "comm_seconds_median": statistics.median(comm),
              "comm_share_median": statistics.median(c / t for c, t in zip(comm, times)),
              "repeats": len(runs), "wall_seconds_with_startup": [run[3] for run in runs]}
    if bare["seconds"]:
        result.update(bare_allreduce_seconds_median=statistics.median(bare["seconds"]),
                      bare_allreduce_bytes=4 * bare["gradient_floats"],
                      bare_allreduce_share_of_step=statistics.median(bare["seconds"]) / step)
    what = f"{workers} workers in one process" if workers > 1 else f"{ranks} rank(s) x {threads} thread(s)"
    print(f"{what}: step {step:.3f} s (median of {len(times)}), "
          f"{args.batch / step:.1f} samples/s, communication {100 * result['comm_share_median']:.1f}% of a step"
          + (f", bare allreduce {1e3 * result['bare_allreduce_seconds_median']:.2f} ms" if bare["seconds"] else ""),
          file=sys.stderr)
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="threads of the one-process run (default: --ranks)")
    p.add_argument("--steps", type=int, default=12, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=2, help="untimed first steps (compilation, caches)")
    p.add_argument("--repeats", type=int, default=2, help="runs of each configuration, interleaved, pooled")
    p.add_argument("--batch", type=int, default=128, help="global batch")
    p.add_argument("--allreduces", type=int, default=20, help="bare gradient-sized allreduces to time")
    p.add_argument("--device", default="cpu", help="cpu, or cuda for NCCL across the GPUs of this node")
    p.add_argument("--data", default=None)
    p.add_argument("--mpiexec", default=None)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--workers", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    args.mpiexec = args.mpiexec or (beside if os.access(beside, os.X_OK) else shutil.which("mpiexec"))
    if not args.mpiexec:
        sys.exit("bench_data_parallel: no mpiexec found; pip install -e .[mpi]")
    if args.device == "cpu":
        threads = args.threads or args.ranks
        plan = [(1, threads, 1), (1, 1, 1), (args.ranks, 1, 1), (1, 1, args.ranks)]
    else:
        plan = [(1, 1, 1), (args.ranks, 1, 1)]
    machine = describe_machine()
    runs = {config: [] for config in plan}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):     # interleaved, so a burst of load elsewhere hits all alike
            for i, config in enumerate(plan):
                out = os.path.join(tmp, f"run{repeat}-{i}")
                runs[config].append(run_configuration(args, *config, out))
    results = [summarise(args, *config, runs[config]) for config in plan]
    by = {(r["ranks"], r["threads_per_rank"], r["workers"]): r for r in results}
    one = by[(1, 1, 1)]["samples_per_second"]
    many = by[(args.ranks, 1, 1)]["samples_per_second"]
    summary = {"scaling_efficiency": many / (args.ranks * one),
               "speedup_over_one_rank_one_thread": many / one}
    if args.device == "cpu":
        all_threads = by[(1, args.threads or args.ranks, 1)]["samples_per_second"]
        in_process = by[(1, 1, args.ranks)]["samples_per_second"]
        summary["speedup_over_one_process_all_threads"] = many / all_threads
        summary["workers_speedup_over_one_process_all_threads"] = in_process / all_threads
        summary["workers_over_mpi_ranks"] = in_process / many
    record = {"benchmark": "data-parallel", "device": args.device,
              "transport": "MPI (mpi4py, host buffers)" if args.device == "cpu" else "NCCL (cupy.cuda.nccl)",
              "model": "VQVAE() defaults (h=128, K=512, D=64), Adam, float32", "dataset": "Fashion-MNIST (train)",
              "threads_note": "BLAS/OpenMP/Numba threads per rank set through " + ", ".join(THREAD_VARIABLES),
              "comm_note": "comm_seconds: rank 0's time inside collectives per step, including waiting for the "
                           "slower rank; bare_allreduce: a gradient-sized allreduce after a barrier",
              "machine": machine, "results": results, "summary": summary}
    if args.device == "cpu":
        record["gpu_note"] = ("NCCL not measured in this run: rerun with --device cuda on a node with several GPUs")
    folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(folder, exist_ok=True)
    kind = "cpu" if args.device == "cpu" else "nccl"
    path = os.path.join(folder, f"data-parallel-{kind}-{machine['date'][:10]}.json")
    with open(path, "w") as f:
        json.dump(record, f, indent=2)
    print(json.dumps(summary), file=sys.stderr)
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
