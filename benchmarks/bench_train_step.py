"""Time one VQ-VAE training step (forward, backward, Adam) in minivq and in PyTorch, interleaved.

Both models have the paper's architecture (benchmarks/torch_vqvae.py mirrors
minivq.models.VQVAE layer for layer) and train on the same batch of
Fashion-MNIST images (random images if the dataset is absent). Repeats
alternate between the two, so load on the machine hits both alike, with a
short pause before each timed step (``--pause``) so the other engine's idle
threads have stopped spinning; every library gets the same thread count
(BLAS, OpenMP, PyTorch and Numba). Medians and the ratio minivq / PyTorch
are reported.

    python benchmarks/bench_train_step.py [--batches 32 128] [--repeats 15] [--device cpu|cuda]
    python benchmarks/bench_train_step.py --model prior [--batches 64]     # the gated PixelCNN prior

minivq's whole-batch step runs as ``minivq train`` runs one process (``workers.one_process``): on the
CPU its convolutions split each batch over the Numba threads themselves, with BLAS held to one thread
(float32, Numba and threadpoolctl installed; benchmarks/NOTES.md, round 8). ``--blas-threads-too``
also times it the way it ran before round 8 (im2col and GEMMs threaded by the BLAS), interleaved.

``--workers N`` also times minivq's step with the batch split over N data-parallel worker
threads of one process (``minivq.workers``, as ``minivq train --workers N`` and
``minivq train-prior --workers N`` train: each
worker a replica of the model with one BLAS thread, gradients averaged), interleaved with
the rest; the same update as the whole batch in one thread (the tests hold the two equal).

``--model prior`` times the prior's training step (minivq's default GatedPixelCNN, K = 512, on
8x8 grids of random codes) against its PyTorch twin (benchmarks/torch_pixelcnn.py, same layout
and size), the same way.

Writes JSON to benchmarks/results/train-step-<device>-<date>.json with the machine described.
"""
import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _machine import describe_machine, timed  # noqa: E402

import minivq as mv  # noqa: E402
from minivq import backend, functional as F, workers  # noqa: E402
from minivq.models import PAPER_QUANTIZER, VQVAE  # noqa: E402


def load_images(n):
    try:
        from minivq.data import load_dataset
        ds = load_dataset(None, "train")
        x, _ = ds.batch(np.arange(n))
        return x, float(ds.pixel_variance()), ds.name
    except (OSError, ValueError):
        rng = np.random.default_rng(0)
        return rng.uniform(-0.5, 0.5, (n, 1, 32, 32)).astype(np.float32), 1 / 12, "uniform noise"


def as_one_process_trains(device, step, blas_threads=False):
    """``step`` inside the block ``minivq train`` runs one process in (``workers.one_process``: on the CPU
    the convolutions split each batch over the Numba threads themselves, BLAS at one thread);
    ``blas_threads``: outside it, as before round 8 (im2col and GEMMs threaded by the BLAS)."""
    if blas_threads:
        return step

    def in_block():
        with workers.one_process(device, np.float32):
            step()
    return in_block


def minivq_step(device, x_host, variance, blas_threads=False):
    mv.manual_seed(0)
    model = VQVAE(decay=0.0, quantizer=PAPER_QUANTIZER).to(device)     # the paper's, as the PyTorch twin
    opt = mv.optim.Adam(model.parameters(), lr=1e-3)
    x = mv.tensor(backend.to_device(x_host, device))
    sync = _sync(device)

    def step():
        x_recon, vq = model(x)
        loss = F.mse_loss(x_recon, x) / variance + vq.loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sync()
    return as_one_process_trains(device, step, blas_threads)


def workers_step(device, batch, count, replica, loss_of):
    """minivq's step with the batch split over ``count`` worker threads, as ``--workers`` trains.

    Each worker holds a replica of the model (``replica()``, the same seed) and its own Adam, and
    takes 1/count of the batch (``batch``, an array); ``loss_of(model, part, comm)`` is its loss.
    After backward the gradients are averaged over the workers (``minivq.distributed``). Threads
    are started (and BLAS held to one thread) for each step here, once per run in training:
    ~0.5 ms more.
    """
    from minivq import distributed
    if device != "cpu" or len(batch) % count:
        raise SystemExit(f"--workers {count}: the CPU only, and a batch that splits evenly")
    local = len(batch) // count
    replicas = []
    for rank in range(count):
        mv.manual_seed(0)
        model = replica()
        replicas.append((model, mv.optim.Adam(model.parameters(), lr=1e-3),
                         np.ascontiguousarray(batch[rank * local:(rank + 1) * local])))

    def rank_step(comm):
        model, opt, part = replicas[comm.rank]
        loss = loss_of(model, part, comm)
        opt.zero_grad()
        loss.backward()
        distributed.GradientAverager(comm, opt.params)()
        opt.step()

    def step():
        workers.run(rank_step, count)
    return step


def minivq_workers_step(device, x_host, variance, count):
    """The VQ-VAE's step over ``count`` workers; the quantiser's statistics reduced through them."""
    from minivq import distributed

    def loss_of(model, part, comm):
        model.vq.reducer = distributed.BatchReducer(comm)
        x = mv.tensor(part)
        x_recon, vq = model(x)
        return F.mse_loss(x_recon, x) / variance + vq.loss
    return workers_step(device, x_host, count, lambda: VQVAE(decay=0.0, quantizer=PAPER_QUANTIZER), loss_of)


def minivq_prior_workers_step(device, codes, count):
    """The prior's step over ``count`` workers, as ``minivq train-prior --workers`` takes it."""
    return workers_step(device, codes, count, lambda: mv.models.GatedPixelCNN(**PRIOR),
                        lambda model, part, comm: model.loss(part))


def torch_float32(dev):
    """On a GPU, PyTorch's convolutions default to TF32 (10-bit mantissas); minivq computes in
    float32 through cuBLAS, so the peer is held to float32 too, for a like-for-like step."""
    import torch
    if dev == "cuda":
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False


def torch_step(device, x_host, variance):
    import torch
    from torch_vqvae import VQVAE as TorchVQVAE, train_step
    torch.manual_seed(0)
    dev = "cuda" if device.startswith("cuda") else "cpu"
    torch_float32(dev)
    model = TorchVQVAE().to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.from_numpy(x_host).to(dev)

    def step():
        train_step(model, opt, x, variance)
        if dev == "cuda":
            torch.cuda.synchronize()
    return step


PRIOR = dict(num_embeddings=512)        # minivq train-prior's default prior for a default VQ-VAE
GRID = 8                                 # the latent grid of a 32x32 image


def random_codes(batch):
    return np.random.default_rng(0).integers(0, PRIOR["num_embeddings"], (batch, GRID, GRID))


def minivq_prior_step(device, codes, blas_threads=False):
    mv.manual_seed(0)
    model = mv.models.GatedPixelCNN(**PRIOR).to(device)
    opt = mv.optim.Adam(model.parameters(), lr=1e-3)
    idx = backend.to_device(codes, device)
    sync = _sync(device)

    def step():
        loss = model.loss(idx)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sync()
    return as_one_process_trains(device, step, blas_threads)


def torch_prior_step(device, codes):
    import torch
    from torch_pixelcnn import GatedPixelCNN
    torch.manual_seed(0)
    dev = "cuda" if device.startswith("cuda") else "cpu"
    torch_float32(dev)
    model = GatedPixelCNN(**PRIOR).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    idx = torch.from_numpy(codes).to(dev)

    def step():
        loss = model.loss(idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if dev == "cuda":
            torch.cuda.synchronize()
    return step


def prior_flops_per_step(batch):
    """Multiply-adds x 2 of the prior's convolutions (masked taps counted), forward and backward."""
    c, k, head, layers = 32, 5, 128, 6
    per_layer = (c * 2 * c * (k // 2 + 1) * k + c * 2 * c * (k // 2 + 1) + 2 * c * 2 * c + c * c)
    fwd = 2 * GRID * GRID * batch * (layers * per_layer + c * head + head * PRIOR["num_embeddings"])
    return 3 * fwd


def without_cuda_kernels(step):
    """``step`` run with minivq's own CUDA kernels for the window copies and Adam turned off, so it
    takes the array-op versions (the references, one launch per NumPy-style operation) instead."""
    from minivq import kernels

    def run():
        saved = {name: kernels._load(name) for name in ("cuda-windows", "cuda-adam")}
        kernels._loaded.update({name: "turned off for the comparison" for name in saved})
        try:
            step()
        finally:
            kernels._loaded.update(saved)
    return run


def threads_in_step(device):
    """(BLAS's threads, the threads the convolutions split the batch over; 0: im2col + GEMMs) in the block
    minivq's whole-batch step runs in."""
    with workers.one_process(device, np.float32):
        blas = backend.blas_thread_count()
        if not device.startswith("cpu") or "numba" not in mv.kernels.available_backends():
            return blas, 0
        from minivq.kernels import conv_numba
        return blas, conv_numba.threads_here()


def _sync(device):
    if device.startswith("cuda"):
        import cupy
        return cupy.cuda.get_current_stream().synchronize
    return lambda: None


def flops_per_step(batch):
    """Multiply-adds x 2 of the convolutions, forward and backward (backward = 2 x forward)."""
    layers = [  # (C_in, C_out, k, output H*W) at 32x32 input
        (1, 64, 4, 16 * 16), (64, 128, 4, 8 * 8), (128, 128, 3, 64),
        (128, 32, 3, 64), (32, 128, 1, 64), (128, 32, 3, 64), (32, 128, 1, 64), (128, 64, 1, 64),
        (64, 128, 3, 64), (128, 32, 3, 64), (32, 128, 1, 64), (128, 32, 3, 64), (32, 128, 1, 64),
        (128, 64, 4, 8 * 8), (64, 1, 4, 16 * 16)]   # transposed convs: cost measured on their input grid
    fwd = sum(2 * ci * co * k * k * hw for ci, co, k, hw in layers) * batch
    return 3 * fwd


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=["vqvae", "prior"], default="vqvae")
    ap.add_argument("--batches", type=int, nargs="+", default=None, help="default: 32 128 (vqvae), 64 (prior)")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="BLAS/torch threads (default: all cores)")
    ap.add_argument("--pause", type=float, default=None,
                    help="seconds of rest before each timed step, so the other engine's idle threads stop "
                         "spinning (default 0.2 on the CPU, 0 on a GPU)")
    ap.add_argument("--malloc", choices=["keep", "default"], default="keep",
                    help="keep: the C library keeps freed host memory for the next step, as the minivq CLI "
                         "asks it to (backend.keep_freed_host_memory; every engine in this process alike); "
                         "default: the C library's own thresholds")
    ap.add_argument("--array-ops-too", action="store_true",
                    help="on a GPU, also time minivq with its CUDA kernels for the window copies and Adam turned "
                         "off (their array-op versions), interleaved with the rest")
    ap.add_argument("--workers", type=int, default=None,
                    help="also time minivq's step split over this many worker threads (on the CPU)")
    ap.add_argument("--blas-threads-too", action="store_true",
                    help="on the CPU, also time minivq's whole-batch step as before round 8: im2col and GEMMs "
                         "threaded by the BLAS, instead of its kernels splitting the batch over the threads")
    ap.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/train-step-...)")
    args = ap.parse_args()
    memory_kept = args.malloc == "keep" and backend.keep_freed_host_memory()

    threads = args.threads or os.cpu_count()
    if args.pause is None:
        args.pause = 0.0 if args.device.startswith("cuda") else 0.2
    try:
        from threadpoolctl import threadpool_limits
        threadpool_limits(threads)
    except ImportError:
        pass
    try:
        import numba
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))     # the nearest-code kernel
    except ImportError:
        pass
    try:
        import torch
        torch.set_num_threads(threads)
        have_torch = True
    except ImportError:
        have_torch = False
        print("PyTorch not installed: timing minivq alone", file=sys.stderr)

    rows = []
    batches = args.batches or ([64] if args.model == "prior" else [32, 128])
    for batch in batches:
        if args.model == "prior":
            codes, source = random_codes(batch), "random codes"
            impls = {"minivq": minivq_prior_step(args.device, codes)}
            if args.blas_threads_too:
                impls["minivq_blas_threads"] = minivq_prior_step(args.device, codes, blas_threads=True)
            if args.workers:
                impls["minivq_workers"] = minivq_prior_workers_step(args.device, codes, args.workers)
            if args.array_ops_too:
                impls["minivq_array_ops"] = without_cuda_kernels(minivq_prior_step(args.device, codes))
            if have_torch:
                impls["pytorch"] = torch_prior_step(args.device, codes)
        else:
            x, variance, source = load_images(batch)
            impls = {"minivq": minivq_step(args.device, x, variance)}
            if args.blas_threads_too:
                impls["minivq_blas_threads"] = minivq_step(args.device, x, variance, blas_threads=True)
            if args.workers:
                impls["minivq_workers"] = minivq_workers_step(args.device, x, variance, args.workers)
            if args.array_ops_too:
                impls["minivq_array_ops"] = without_cuda_kernels(minivq_step(args.device, x, variance))
            if have_torch:
                impls["pytorch"] = torch_step(args.device, x, variance)
        times = {name: [] for name in impls}
        for _ in range(args.warmup):
            for fn in impls.values():
                fn()
        for _ in range(args.repeats):
            for name, fn in impls.items():          # interleaved: both see the same machine state
                times[name].append(timed(fn, gap=args.pause)[0])
        flops = prior_flops_per_step(batch) if args.model == "prior" else flops_per_step(batch)
        row = {"model": args.model, "batch": batch, "data": source, "flops": flops}
        for name, ts in times.items():
            row[f"{name}_ms"] = 1e3 * float(np.median(ts))
            row[f"{name}_all_ms"] = [round(1e3 * t, 3) for t in ts]
            row[f"{name}_gflops"] = row["flops"] / float(np.median(ts)) / 1e9
        if have_torch:
            row["ratio"] = row["minivq_ms"] / row["pytorch_ms"]
            if "minivq_workers_ms" in row:
                row["workers_ratio"] = row["minivq_workers_ms"] / row["pytorch_ms"]
        if "minivq_blas_threads_ms" in row:
            row["kernel_threads_over_blas_threads"] = row["minivq_ms"] / row["minivq_blas_threads_ms"]
            if have_torch:
                row["blas_threads_ratio"] = row["minivq_blas_threads_ms"] / row["pytorch_ms"]
        if "minivq_array_ops_ms" in row:
            row["array_ops_over_kernels"] = row["minivq_array_ops_ms"] / row["minivq_ms"]
        rows.append(row)

    print(f"{'batch':>6} {'minivq ms':>10} {'GF/s':>6} {'pytorch ms':>11} {'GF/s':>6} {'ratio':>6}")
    for r in rows:
        print(f"{r['batch']:>6} {r['minivq_ms']:>10.1f} {r['minivq_gflops']:>6.1f} "
              f"{r.get('pytorch_ms', float('nan')):>11.1f} {r.get('pytorch_gflops', float('nan')):>6.1f} "
              f"{r.get('ratio', float('nan')):>6.2f}")
    for r in rows:
        if "minivq_workers_ms" in r:
            print(f"batch {r['batch']}: minivq over {args.workers} worker threads (--workers) "
                  f"{r['minivq_workers_ms']:.1f} ms, {r.get('workers_ratio', float('nan')):.2f}x PyTorch's step")
    for r in rows:
        if "minivq_blas_threads_ms" in r:
            print(f"batch {r['batch']}: minivq with im2col and BLAS's threads (before round 8) "
                  f"{r['minivq_blas_threads_ms']:.1f} ms, {r.get('blas_threads_ratio', float('nan')):.2f}x PyTorch's "
                  f"step; the kernels' threads take {r['kernel_threads_over_blas_threads']:.2f}x its time")
    for r in rows:
        if "array_ops_over_kernels" in r:
            print(f"batch {r['batch']}: minivq with its CUDA kernels off {r['minivq_array_ops_ms']:.1f} ms "
                  f"({r['array_ops_over_kernels']:.2f}x the step with them)")
    blas_in_step, kernel_threads = threads_in_step(args.device)     # what minivq's whole-batch steps ran with
    machine = describe_machine()
    result = {"benchmark": "train_step", "model": args.model, "device": args.device, "threads": threads,
              "workers": args.workers,
              "minivq_blas_threads_in_step": blas_in_step,
              "minivq_conv_kernel_threads": kernel_threads,
              "pause_s": args.pause, "repeats": args.repeats,
              "host_memory_kept": memory_kept,
              "machine": machine, "rows": rows}
    if args.device.startswith("cuda"):
        import cupy
        name = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"]
        result["gpu"] = name.decode() if isinstance(name, bytes) else name
        result["pytorch_tf32"] = False if have_torch else None
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"{'prior' if args.model == 'prior' else 'train'}-step-{args.device.replace(':', '')}-"
                                   f"{time.strftime('%Y%m%d')}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
