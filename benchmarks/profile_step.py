"""Where the time of one VQ-VAE training step goes: forward and backward of every op, and Adam.

    python benchmarks/profile_step.py [--batch 128] [--steps 5] [--threads N] [--json out.json]
    python benchmarks/profile_step.py --model prior [--batch 64]          # the gated PixelCNN prior
    python benchmarks/profile_step.py --torch                             # then the PyTorch twin's profile

Every graph node (``autograd.Function``) is timed as it runs forward and as it
runs backward; convolutions are named by their geometry (kernel/stride,
channels, output size) and their GFLOP/s is shown, so the rows can be read
against the machine's SGEMM speed. The model is the paper's (the same one
bench_train_step.py times against PyTorch). Times are medians over ``--steps``
steps after one warm-up step; the last row compares the sum of the rows with
the whole step, so work outside any op (the graph walk, Python) shows too.
"""
import argparse
import collections
import contextlib
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _machine import describe_machine  # noqa: E402


def op_label(fn, inputs):
    """A row name: the op's class, and for convolutions their geometry."""
    name = type(fn).__name__
    g = getattr(fn, "g", None)
    if g is None:
        return name
    if name == "Conv2d":
        return f"Conv2d {g.kh}x{g.kw}/{g.sh} {g.c_img}->{g.c_grid} at {g.oh}x{g.ow}"
    return f"ConvTranspose2d {g.kh}x{g.kw}/{g.sh} {g.c_grid}->{g.c_img} at {g.h}x{g.w}"


SEARCH = "nearest code (kernels.nearest_code)"


def conv_flops(fn):
    """Multiply-adds x 2 of one pass (forward, or each of the two backward GEMMs) of a convolution."""
    g = getattr(fn, "g", None)
    return None if g is None else 2.0 * g.n * g.oh * g.ow * g.c_grid * g.k


class Recorder:
    """Times every Function's forward (through __call__) and backward (an instance attribute wrapper)."""

    def __init__(self):
        self.fwd = collections.defaultdict(float)
        self.bwd = collections.defaultdict(float)
        self.flops = collections.defaultdict(float)        # per step: every GEMM of the label's passes

    def install(self):
        """Wrap Function.__call__ and, per op class, its backward; returns the undo.

        The backward wrapper sits on the class and finds the row through ``fn._profile_label``:
        a wrapper stored on each node would make a reference cycle that keeps every node (and
        its im2col buffers) alive until the garbage collector runs, and so time a different program.
        """
        from minivq.autograd import Function
        recorder, original, patched = self, Function.__call__, {}

        def timed_backward_of(cls):
            backward = cls.backward

            def timed_backward(fn, *grads):
                t1 = time.perf_counter()
                result = backward(fn, *grads)
                recorder.bwd[fn._profile_label] += time.perf_counter() - t1
                flops = conv_flops(fn)
                if flops is not None:         # one GEMM per input (image, weight) that wants a gradient
                    recorder.flops[fn._profile_label] += flops * sum(fn.needs_input_grad[:2])
                return result
            return backward, timed_backward

        def timed_call(fn, *inputs):
            cls = type(fn)
            if cls not in patched:
                patched[cls], cls.backward = timed_backward_of(cls)
            t0 = time.perf_counter()
            out = original(fn, *inputs)
            fn._profile_label = label = op_label(fn, inputs)
            recorder.fwd[label] += time.perf_counter() - t0
            flops = conv_flops(fn)
            if flops is not None:
                recorder.flops[label] += flops
            return out

        # the nearest-code search is no graph node (its indices carry no gradient): a row of its own
        from minivq.functional import quantize
        search = quantize.nearest_code

        def timed_search(x, codebook, **options):
            t0 = time.perf_counter()
            out = search(x, codebook, **options)
            recorder.fwd[SEARCH] += time.perf_counter() - t0
            recorder.flops[SEARCH] += 2.0 * x.shape[0] * codebook.shape[0] * codebook.shape[1]
            return out

        def undo():
            Function.__call__ = original
            quantize.nearest_code = search
            for cls, backward in patched.items():
                cls.backward = backward
        Function.__call__ = timed_call
        quantize.nearest_code = timed_search
        return undo

    def reset(self):
        self.fwd.clear()
        self.bwd.clear()
        self.flops.clear()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=["vqvae", "prior"], default="vqvae")
    ap.add_argument("--batch", type=int, default=None, help="default: 128 (vqvae), 64 (prior)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="BLAS and Numba threads (default: all)")
    ap.add_argument("--malloc", choices=["keep", "default"], default="keep",
                    help="keep (as the minivq CLI does): the C library keeps freed host memory for the next step")
    ap.add_argument("--blas-threads", action="store_true",
                    help="run the step as before round 8: im2col and GEMMs threaded by the BLAS (default: as "
                         "`minivq train` runs one process, the convolutions splitting each batch over the threads)")
    ap.add_argument("--json", default=None, help="also write the rows as JSON here")
    ap.add_argument("--torch", action="store_true",
                    help="then profile the PyTorch twin's step too (torch.profiler: self CPU time per op)")
    args = ap.parse_args()
    if args.threads:
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:
            raise SystemExit("profile_step.py: --threads needs threadpoolctl (pip install threadpoolctl)")
        threadpool_limits(args.threads)
        try:
            import numba
            numba.set_num_threads(args.threads)
        except ImportError:
            pass

    import minivq as mv
    from minivq import backend, functional as F
    memory_kept = args.malloc == "keep" and backend.keep_freed_host_memory()
    from minivq.models import PAPER_QUANTIZER, VQVAE
    from bench_train_step import PRIOR, load_images, random_codes
    args.batch = args.batch or (64 if args.model == "prior" else 128)
    mv.manual_seed(0)
    if args.model == "prior":
        model = mv.models.GatedPixelCNN(**PRIOR)
        codes = random_codes(args.batch)
        inputs = (codes,)

        def compute_loss():
            return model.loss(codes)
    else:
        x_host, variance, _ = load_images(args.batch)
        inputs = (x_host, variance)
        model = VQVAE(decay=0.0, quantizer=PAPER_QUANTIZER)
        x = mv.tensor(x_host)

        def compute_loss():
            x_recon, vq = model(x)
            return F.mse_loss(x_recon, x) / variance + vq.loss
    opt = mv.optim.Adam(model.parameters(), lr=1e-3)

    recorder = Recorder()
    uninstall = recorder.install()
    # as `minivq train` runs one process: the convolutions split each batch over the Numba threads (round 8)
    from minivq import workers
    one_process = contextlib.nullcontext() if args.blas_threads else workers.one_process("cpu", np.float32)
    try:
        with one_process:
            per_step, totals, adam = steps(args, compute_loss, opt, recorder)
    finally:
        uninstall()

    rows = []
    for label, pairs in per_step.items():
        fwd = float(np.median([p[0] for p in pairs])) * 1e3
        bwd = float(np.median([p[1] for p in pairs])) * 1e3
        flops = pairs[-1][2]
        gflops = None if not flops else flops / ((fwd + bwd) * 1e-3) / 1e9
        rows.append(dict(op=label, forward_ms=fwd, backward_ms=bwd, gflops=gflops))
    rows.sort(key=lambda r: -(r["forward_ms"] + r["backward_ms"]))
    step_ms = float(np.median(totals)) * 1e3
    adam_ms = float(np.median(adam)) * 1e3
    listed = sum(r["forward_ms"] + r["backward_ms"] for r in rows) + adam_ms

    width = max(len(r["op"]) for r in rows)
    print(f"one training step of the {args.model}, batch {args.batch}, median of {args.steps} steps: "
          f"{step_ms:.1f} ms")
    print(f"{'op (summed over its uses)':<{width}}  forward ms  backward ms   share  GFLOP/s (fwd+bwd)")
    for r in rows:
        share = (r["forward_ms"] + r["backward_ms"]) / step_ms
        rate = "" if r["gflops"] is None else f"{r['gflops']:.0f}"
        print(f"{r['op']:<{width}}  {r['forward_ms']:10.1f}  {r['backward_ms']:11.1f}  {share:6.1%}  {rate}")
    print(f"{'Adam (all parameters)':<{width}}  {adam_ms:10.1f}  {'':11}  {adam_ms / step_ms:6.1%}")
    print(f"{'outside the rows (graph walk, Python)':<{width}}  {step_ms - listed:10.1f}")
    peer = profile_torch(args, inputs) if args.torch else None
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"benchmark": "profile_step", "model": args.model, "batch": args.batch, "steps": args.steps,
                       "step_ms": step_ms, "adam_ms": adam_ms, "host_memory_kept": memory_kept, "rows": rows,
                       "torch": peer, "machine": describe_machine()}, f, indent=1)
        print(f"wrote {args.json}")


def steps(args, compute_loss, opt, recorder):
    """One warm-up step, then ``args.steps`` timed ones: (per op, its (forward, backward, flops) per step;
    the whole steps' seconds; Adam's seconds)."""
    per_step, totals, adam = collections.defaultdict(list), [], []
    for step in range(args.steps + 1):
        recorder.reset()
        t0 = time.perf_counter()
        loss = compute_loss()
        opt.zero_grad()
        loss.backward()
        t1 = time.perf_counter()
        opt.step()
        t2 = time.perf_counter()
        if step == 0:
            continue                      # warm-up: allocations, Numba compilation
        totals.append(t2 - t0)
        adam.append(t2 - t1)
        for label in set(recorder.fwd) | set(recorder.bwd):
            per_step[label].append((recorder.fwd.get(label, 0.0), recorder.bwd.get(label, 0.0),
                                    recorder.flops.get(label)))
    return per_step, totals, adam


def profile_torch(args, inputs, top=12):
    """The PyTorch twin's step on the same ``inputs`` (codes, or images and their variance) under
    torch.profiler: self CPU ms per step of its ops, the convolutions summed."""
    try:
        import torch
        from torch.profiler import ProfilerActivity, profile
    except ImportError:
        raise SystemExit("profile_step.py: --torch needs PyTorch (pip install torch)")
    from bench_train_step import torch_prior_step, torch_step
    if args.threads:
        torch.set_num_threads(args.threads)
    step = (torch_prior_step if args.model == "prior" else torch_step)("cpu", *inputs)
    step()                                    # warm-up
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(args.steps):
            time.sleep(0.2)                   # as bench_train_step.py rests between steps
            step()
    ops = sorted(((e.key, e.self_cpu_time_total / 1e3 / args.steps) for e in prof.key_averages()),
                 key=lambda op: -op[1])
    total = sum(ms for _, ms in ops)
    convolutions = sum(ms for name, ms in ops if "convolution" in name)
    print(f"\nPyTorch twin, torch.profiler, self CPU time per step: {total:.1f} ms, "
          f"of which its convolutions (names with 'convolution') {convolutions:.1f} ms")
    for name, ms in ops[:top]:
        print(f"  {name:<45} {ms:8.1f} ms")
    # per layer: forward (mkldnn_convolution: input, weight) and backward (convolution_backward:
    # grad_output, input) by the shapes of their first two arguments, to set beside minivq's rows above
    layers = sorted(((e.key, str(e.input_shapes[:2]), e.self_cpu_time_total / 1e3 / args.steps)
                     for e in prof.key_averages(group_by_input_shape=True)
                     if e.key in ("aten::mkldnn_convolution", "aten::convolution_backward")),
                    key=lambda layer: -layer[2])
    print("  its convolutions by shape (forward: input, weight; backward: grad_output, input):")
    for name, shapes, ms in layers:
        print(f"    {ms:8.1f} ms  {name:<28} {shapes}")
    return {"step_self_cpu_ms": total, "convolutions_ms": convolutions,
            "ops": [{"op": name, "self_cpu_ms": ms} for name, ms in ops[:top]],
            "convolutions_by_shape": [{"op": name, "shapes": shapes, "self_cpu_ms": ms}
                                      for name, shapes, ms in layers]}


if __name__ == "__main__":
    main()
