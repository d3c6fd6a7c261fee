"""Train the PyTorch twin of minivq's VQ-VAE on the same data, batches and hyperparameters, and compare quality.

    minivq train --paper-quantizer --no-center-output --steps 2000 --out runs/fmnist-2000
    python benchmarks/quality_vs_torch.py --minivq-run runs/fmnist-2000 [--steps 2000] [--seed 0]

The minivq run must start from its drawn weights as the twin does (``--no-center-output``:
minivq train otherwise shifts the decoder's output bias before the first step, which the twin
does not do); a run that did not is refused.

The PyTorch model (benchmarks/torch_vqvae.py) has the same architecture,
initialisation scheme, loss and optimiser; it starts from the very weights
minivq draws for the seed (``--own-init``: PyTorch draws its own) and sees the
same batches in the same order (minivq.data.BatchSampler with the same seed). After training, both
are evaluated on the whole test split with the same metric code: normalised MSE
(MSE / training-set pixel variance) and codebook perplexity. The minivq figures
are read from the run folder's final test record (metrics.jsonl) and checked
again from its checkpoint. JSON goes to benchmarks/results/quality-<date>.json.
"""
import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _machine import describe_machine  # noqa: E402


def copy_minivq_init(model, seed, in_channels):
    """Give the PyTorch model the initial weights minivq draws for ``seed`` (same order, same shapes)."""
    import torch
    import minivq as mv
    mv.manual_seed(seed)
    ours = mv.models.VQVAE(in_channels=in_channels, decay=0.0, quantizer=mv.models.PAPER_QUANTIZER)   # the twin's
    theirs = list(model.parameters())
    mine = [p.data for p in ours.parameters()]
    # minivq registers the codebook between encoder and decoder, as the twin does
    assert [tuple(p.shape) for p in theirs] == [a.shape for a in mine], "architectures differ"
    with torch.no_grad():
        for p, a in zip(theirs, mine):
            p.copy_(torch.from_numpy(a))


def torch_run(steps, seed, batch, lr, data, threads, same_init=True):
    import torch
    from torch_vqvae import VQVAE, train_step
    from minivq.data import BatchSampler, load_dataset
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    train_set, test_set = load_dataset(data, "train"), load_dataset(data, "test")
    variance = float(train_set.pixel_variance())
    model = VQVAE(in_channels=train_set.num_channels)
    if same_init:
        copy_minivq_init(model, seed, train_set.num_channels)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sampler = BatchSampler(len(train_set), batch, seed)
    t0 = time.perf_counter()
    curve = []
    for step in range(1, steps + 1):
        x, _ = train_set.batch(sampler.indices(step - 1))
        loss, ppl = train_step(model, opt, torch.from_numpy(x), variance)
        if step % 100 == 0 or step == steps:
            curve.append({"step": step, "loss": float(loss), "perplexity": float(ppl)})
            print(f"pytorch step {step}: loss {float(loss):.4f} perplexity {float(ppl):.1f}", file=sys.stderr)
    seconds = time.perf_counter() - t0
    model.eval()
    counts = np.zeros(model.vq.codebook.shape[0], np.int64)
    sq = 0.0
    with torch.no_grad():
        for lo in range(0, len(test_set), 256):
            x, _ = test_set.batch(np.arange(lo, min(lo + 256, len(test_set))))
            xt = torch.from_numpy(x)
            x_recon, _, indices, _ = model(xt)
            sq += float(((x_recon - xt) ** 2).mean()) * x.shape[0]
            counts += np.bincount(indices.numpy().ravel(), minlength=counts.size)
    p = counts / counts.sum()
    mse = sq / len(test_set)
    return {"mse": mse, "nmse": mse / variance, "perplexity": float(np.exp(-(p[p > 0] * np.log(p[p > 0])).sum())),
            "codes_used": int((counts > 0).sum()), "train_seconds": seconds, "curve": curve}


def minivq_result(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    final = [r for r in records if r["split"] == "test"][-1]
    train = [r for r in records if r["split"] == "train"]
    curve = [{"step": r["step"], "loss": r["loss"], "perplexity": r["perplexity"]}
             for r in train if r["step"] % 100 == 0]
    return dict(final, train_seconds=train[-1]["seconds"], curve=curve)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minivq-run", required=True, help="a finished `minivq train --paper-quantizer` run folder (the twin is the paper's model)")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--data", default=None)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--own-init", action="store_true",
                    help="let PyTorch draw its own initial weights (default: start from minivq's, same seed)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    checkpoint = os.path.join(args.minivq_run, "checkpoint.npz")
    if not os.path.exists(checkpoint):
        print(f"quality_vs_torch: {checkpoint} not found: give a finished `minivq train` run folder", file=sys.stderr)
        sys.exit(2)
    from minivq.checkpoint import read_checkpoint
    meta, _ = read_checkpoint(checkpoint, "minivq-vqvae")
    if meta["train"].get("center_output", False):
        print(f"quality_vs_torch: {args.minivq_run} centred its output bias before the first step, which the "
              f"PyTorch twin does not do: train it with --no-center-output", file=sys.stderr)
        sys.exit(2)
    ours = minivq_result(args.minivq_run)
    theirs = torch_run(args.steps, args.seed, args.batch, args.lr, args.data, args.threads,
                       same_init=not args.own_init)
    result = {"benchmark": "quality_vs_torch", "same_init": not args.own_init,
              "steps": args.steps, "batch": args.batch, "lr": args.lr,
              "seed": args.seed, "minivq": ours, "pytorch": theirs, "machine": describe_machine()}
    print(f"{'':10} {'test nmse':>10} {'perplexity':>11} {'codes used':>11} {'train s':>8}")
    for name, r in (("minivq", ours), ("pytorch", theirs)):
        print(f"{name:10} {r['nmse']:>10.4f} {r['perplexity']:>11.1f} {r['codes_used']:>11} {r['train_seconds']:>8.0f}")
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"quality-{time.strftime('%Y%m%d')}.json")
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
