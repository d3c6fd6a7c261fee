"""Train minivq's gated PixelCNN prior and its PyTorch twin on the same codes and batches; compare test NLL.

    python benchmarks/prior_vs_torch.py VQVAE_CHECKPOINT [--steps 1500] [--eval-every 250] [--out FILE]

The codes are those ``minivq train-prior`` fits (the cache beside the VQ-VAE
checkpoint, built on first use). Three runs train in lockstep, one batch each
per step, the batch of ``minivq.data.BatchSampler`` over the train codes (the
sampler ``train-prior`` uses, same seed), Adam 1e-3, batch 64, default prior
size (0.34 M parameters at K = 512):

* ``minivq``: ``minivq.models.GatedPixelCNN`` as ``train-prior`` builds and
  trains it (``mv.manual_seed(seed)``, then the model, then Adam);
* ``torch_same_init``: the twin (benchmarks/torch_pixelcnn.py) holding minivq's
  initial weights. A forward or backward difference between the engines would
  show as a loss difference from step 1 (the per-step differences are
  recorded); equal curves leave only the initial weights. It trains for the
  first ``--same-init-steps`` (0: all), after which it only repeats minivq's curve;
* ``torch_own_init``: the twin with PyTorch's own default initialisation
  (``torch.manual_seed(seed)``), what a PyTorch user gets (``--no-own-init``
  leaves it out).

Every ``--eval-every`` steps each run's test NLL (bits per latent) is measured
on the first ``--eval-size`` test grids, at the end on the whole test split,
beside the context-free references (unigram and per-position unigram
cross-entropy, minivq.prior). The checks (exit 1 if one fails): equal weights
give equal losses over the first 10 steps (1e-4 nats) and, at the last
evaluation both ran, minivq's NLL at most the same-weights twin's + ``--drift``;
minivq's final NLL at most the own-init twin's + ``--tolerance`` (default 0).
Different initial draws of the same distribution end about 0.02-0.04 bits
apart at 1,500 steps, so a miss by less than that is the draw: rerun with
another ``--seed``. JSON (with the machine) goes to
benchmarks/results/prior-vs-torch-<date>.json unless ``--out``.
"""
import argparse
import json
import math
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


class MinivqRun:
    """minivq's prior, built and trained exactly as ``minivq train-prior`` does."""

    def __init__(self, prior_config, seed, lr):
        import minivq as mv
        from minivq.optim import Adam
        mv.manual_seed(seed)
        self.model = mv.models.GatedPixelCNN(**prior_config)
        self.optimizer = Adam(self.model.parameters(), lr=lr)
        self.initial_state = {k: v.copy() for k, v in self.model.state_dict().items()}

    def step(self, idx, lab):
        loss = self.model.loss(idx, lab)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return float(loss.item())

    def nll_bits(self, codes, labels, limit=None):
        from minivq.prior import prior_nll_bits
        return prior_nll_bits(self.model, codes, labels, limit=limit)


class TorchRun:
    """The PyTorch twin; ``state``: minivq's initial weights to start from (None: PyTorch's own init)."""

    def __init__(self, prior_config, seed, lr, state=None):
        import torch
        from torch_pixelcnn import GatedPixelCNN, load_minivq_state
        torch.manual_seed(seed)
        self.torch = torch
        self.model = GatedPixelCNN(**prior_config)
        if state is not None:
            load_minivq_state(self.model, state)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=lr)

    def step(self, idx, lab):
        torch = self.torch
        loss = self.model.loss(torch.from_numpy(idx), None if lab is None else torch.from_numpy(lab))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())

    def nll_bits(self, codes, labels, limit=None, batch_size=256):
        import numpy as np
        torch = self.torch
        n = len(codes) if limit is None else min(limit, len(codes))
        total = 0.0
        self.model.eval()
        with torch.no_grad():
            for lo in range(0, n, batch_size):
                idx = torch.from_numpy(codes[lo:min(lo + batch_size, n)].astype(np.int64))
                lab = None if labels is None else torch.from_numpy(labels[lo:min(lo + batch_size, n)].astype(np.int64))
                total += float(self.model.loss(idx, lab)) * idx.shape[0]
        self.model.train()
        return total / n / math.log(2)


def load_codes(vqvae_path, data):
    """(train codes, test codes, train labels, test labels, K): the grids ``train-prior`` fits, from its cache."""
    from minivq.checkpoint import load_vqvae
    from minivq.prior import cached_codes
    vqvae, meta = load_vqvae(vqvae_path)
    data = data if data is not None else meta["train"].get("data")
    codes, cache = cached_codes(vqvae_path, vqvae, data, "cpu")
    print(f"codes: {cache}", file=sys.stderr)
    return codes, vqvae.vq.num_embeddings


def compare(args):
    import numpy as np
    import torch
    from _machine import describe_machine
    from minivq.config import PriorConfig
    from minivq.data import BatchSampler
    from minivq.prior import context_free_references
    torch.set_num_threads(args.threads)

    codes, k = load_codes(args.vqvae, args.data)
    train_codes, test_codes = codes["train_codes"], codes["test_codes"]
    train_labels = test_labels = num_classes = None
    if args.conditional:
        train_labels, test_labels = codes["train_labels"].astype(np.int64), codes["test_labels"].astype(np.int64)
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    prior_config = dict(PriorConfig().model(), num_embeddings=k, num_classes=num_classes)

    runs = {"minivq": MinivqRun(prior_config, args.seed, args.lr)}
    runs["torch_same_init"] = TorchRun(prior_config, args.seed, args.lr, runs["minivq"].initial_state)
    if args.own_init:
        runs["torch_own_init"] = TorchRun(prior_config, args.seed, args.lr)
    same_init_steps = args.same_init_steps or args.steps
    parameters = sum(p.data.size for p in runs["minivq"].model.parameters())
    print(f"{parameters / 1e6:.3f} M parameters, K = {k}, grids {train_codes.shape[1:]}, "
          f"{len(train_codes)} train / {len(test_codes)} test", file=sys.stderr)

    sampler = BatchSampler(len(train_codes), args.batch, args.seed)
    seconds = {name: 0.0 for name in runs}
    steps_run = {name: 0 for name in runs}
    train_curve, eval_curve, same_init_diff = [], [], []
    logged = {name: [] for name in runs}
    t_start = time.perf_counter()
    for step in range(1, args.steps + 1):
        rows = sampler.indices(step - 1)
        idx = train_codes[rows].astype(np.int64)
        lab = None if train_labels is None else train_labels[rows]
        active = {name: run for name, run in runs.items() if name != "torch_same_init" or step <= same_init_steps}
        losses = {}
        for name, run in active.items():
            t0 = time.perf_counter()
            losses[name] = run.step(idx, lab)
            seconds[name] += time.perf_counter() - t0
            steps_run[name] += 1
            logged[name].append(losses[name])
        if "torch_same_init" in losses:
            same_init_diff.append(abs(losses["minivq"] - losses["torch_same_init"]))
        if step % args.log_every == 0 or step == args.steps:
            # the mean training loss of the steps since the last record, in bits per latent
            train_curve.append(dict({"step": step}, **{name: float(np.mean(logged[name])) / math.log(2)
                                                       for name in active}))
            logged = {name: [] for name in runs}
        last = step == args.steps
        if step % args.eval_every == 0 or last:
            limit = None if last else args.eval_size
            row = {"step": step, "grids": len(test_codes) if last else min(args.eval_size, len(test_codes))}
            row.update({name: run.nll_bits(test_codes, test_labels, limit) for name, run in active.items()})
            eval_curve.append(row)
            print(f"step {step:5d} test nll, {row['grids']} grids: "
                  + "  ".join(f"{name} {row[name]:.4f}" for name in active)
                  + f"   [{time.perf_counter() - t_start:.0f} s]", file=sys.stderr)

    references = context_free_references(train_codes, test_codes, k)
    final = eval_curve[-1]
    results = {name: {"nll_bits": final[name], "nll_over_position_unigram": final[name] /
                      references["position_unigram_bits"], "steps": steps_run[name],
                      "seconds_per_step": seconds[name] / steps_run[name]}
               for name in runs if name in final}
    # the same-weights twin: the last evaluation both ran, and the training losses step by step
    shared = [row for row in eval_curve if "torch_same_init" in row]
    both = shared[-1] if shared else None
    diffs = np.asarray(same_init_diff)
    same_init = {
        "steps": len(diffs), "loss_difference_nats": {
            "step_1": float(diffs[0]), "max_first_10": float(diffs[:10].max()),
            "max_first_100": float(diffs[:100].max()), "max": float(diffs.max()),
            "mean_last_100": float(diffs[-100:].mean())},
        "eval_step": both["step"] if both else None,
        "eval_nll_bits": {"minivq": both["minivq"], "torch_same_init": both["torch_same_init"]} if both else None}
    checks = {
        # identical weights and batches: equal losses at step 1 (float32), equal test NLL at the last shared eval
        "same_weights_same_loss": {"value": float(diffs[:10].max()), "limit": 1e-4,
                                   "passed": bool(diffs[:10].max() <= 1e-4)},
    }
    if both:
        gap = both["minivq"] - both["torch_same_init"]
        checks["same_weights_same_nll"] = {"value": gap, "limit": args.drift, "passed": gap <= args.drift}
    if "torch_own_init" in results:
        gap = results["minivq"]["nll_bits"] - results["torch_own_init"]["nll_bits"]
        checks["minivq_at_least_torch_own_init"] = {"value": gap, "limit": args.tolerance,
                                                    "passed": gap <= args.tolerance}
    result = {
        "benchmark": "prior_vs_torch", "vqvae_checkpoint": os.path.abspath(args.vqvae),
        "steps": args.steps, "batch": args.batch, "lr": args.lr, "seed": args.seed,
        "conditional": args.conditional, "eval_every": args.eval_every, "eval_size": args.eval_size,
        "prior": prior_config, "parameters": int(parameters), "num_embeddings": k,
        "latent_shape": list(train_codes.shape[1:]), "train_grids": len(train_codes), "test_grids": len(test_codes),
        "references": dict(references, uniform_bits=math.log2(k)),
        "final": results, "same_init": same_init, "checks": checks,
        "eval_curve": eval_curve, "train_curve": train_curve,
        "threads": args.threads, "wall_seconds": time.perf_counter() - t_start, "machine": describe_machine(),
    }
    print(f"\nafter {args.steps} steps, whole test split ({len(test_codes)} grids), bits per latent:")
    print(f"  uniform {math.log2(k):.3f}   unigram {references['unigram_bits']:.3f}   "
          f"per-position unigram {references['position_unigram_bits']:.3f}")
    for name, r in results.items():
        print(f"  {name:16} nll {r['nll_bits']:.4f}  nll / per-position unigram {r['nll_over_position_unigram']:.4f}"
              f"  {1000 * r['seconds_per_step']:.0f} ms/step")
    if both:
        print(f"  same weights, step {both['step']}: minivq {both['minivq']:.4f}, "
              f"torch_same_init {both['torch_same_init']:.4f}")
    print(f"  same weights, |loss minivq - twin| at step 1 {diffs[0]:.1e} nats, max over the first 10 steps "
          f"{diffs[:10].max():.1e}, over {len(diffs)} steps {diffs.max():.1e}")
    for name, c in checks.items():
        print(f"  check {name}: {c['value']:+.4g} <= {c['limit']:g}: {'passed' if c['passed'] else 'FAILED'}")
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("vqvae", help="the VQ-VAE checkpoint whose codes the priors fit (as for minivq train-prior)")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--eval-size", type=int, default=2000, help="test grids per intermediate evaluation")
    ap.add_argument("--log-every", type=int, default=50, help="steps per averaged training-loss record")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--data", default=None, help="dataset (default: the one the VQ-VAE was trained on)")
    ap.add_argument("--conditional", action="store_true", help="class-conditional priors")
    ap.add_argument("--no-own-init", dest="own_init", action="store_false",
                    help="leave out the twin with PyTorch's own initialisation")
    ap.add_argument("--same-init-steps", type=int, default=500,
                    help="steps the same-weights twin trains (0: all); after them it would only repeat minivq")
    ap.add_argument("--drift", type=float, default=0.01,
                    help="bits per latent minivq's NLL may exceed the same-weights twin's (float32 drift)")
    ap.add_argument("--tolerance", type=float, default=0.0,
                    help="bits per latent minivq's final NLL may exceed the own-init twin's")
    ap.add_argument("--threads", type=int, default=1,
                    help="BLAS/OpenMP threads of each engine (default 1: on cores shared with other jobs, two "
                         "threads of each engine were several times slower than one)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    # both engines' BLAS get the thread count before NumPy or torch is imported
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    result = compare(args)
    out = args.out or os.path.join(HERE, "results", f"prior-vs-torch-{time.strftime('%Y-%m-%d')}.json")
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {out}")
    return 0 if all(c["passed"] for c in result["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
