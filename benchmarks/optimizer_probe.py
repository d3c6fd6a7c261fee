"""Does the optimiser, not the quantiser, hold the default model back? Train `minivq train`'s defaults with one
optimiser setting changed and measure the test split, as codebook_study.py does.

    python benchmarks/optimizer_probe.py run --probes control,cosine,lr2e-3 --seeds 0,1 --steps 500
    python benchmarks/optimizer_probe.py report        # benchmarks/results/optimizer-probe-<date>.json

A probe is the default run (``minivq.train.train_vqvae`` with ``TrainConfig(steps, seed)`` and
``ModelConfig()``) at a constant learning rate (``lr_anneal=0``, as minivq train ran before it
annealed by default) with one of: the Adam learning rate, a cosine decay of it from its peak to
zero over the run (lr_t = lr (1 + cos(pi (t - 1) / (steps - 1))) / 2 at step t), the peak held
for the run's first three quarters and then such a cosine over the last (``anneal``: minivq
train's ``--lr-anneal 0.25``, today's default), Adam's second-moment decay, or the commitment
cost. The report says of each run whether it centred its output before the first step (the
default run does since that option came; the 500-step probes of
results/optimizer-probe-2026-11-30.json ran before it, the ``anneal`` ones after). The whole-run
cosine and Adam's betas are not options of minivq train, so this script hands the trainer an
Adam subclass that sets them; nothing else of the run changes. One uninterrupted run per probe
and seed (no segments), measured at its last step on the whole test split: MSE / training-set
variance, codes used, perplexity. ``--jobs 2`` trains two at once, one thread each. Runs live in
runs/optimizer-probe/<probe>-s<seed>-<steps>/.
"""
import argparse
import json
import math
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from _machine import describe_machine, run_training_jobs  # noqa: E402

RUNS = os.path.join(ROOT, "runs", "optimizer-probe")

# name -> what changes from minivq train's defaults (Adam lr 1e-3 constant, betas (0.9, 0.999), beta 0.25)
PROBES = {
    "control": {},
    "cosine": {"schedule": "cosine"},                 # lr 1e-3 decayed to 0 over the run
    "anneal": {"lr_anneal": 0.25},                    # lr 1e-3, then a cosine to 0 over the run's last quarter
    "lr2e-3": {"lr": 2e-3},
    "lr5e-4": {"lr": 5e-4},
    "beta2-0.99": {"betas": (0.9, 0.99)},
    "commitment-0.1": {"model": {"commitment_cost": 0.1}},
}


def cosine_lr(peak, step, steps):
    """The learning rate of step ``step`` (1-based) of ``steps`` under a cosine decay from ``peak`` to 0."""
    progress = (step - 1) / max(steps - 1, 1)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


def run_folder(probe, seed, steps):
    return os.path.join(RUNS, f"{probe}-s{seed}-{steps}")


def train_one(probe, seed, steps):
    """Train one probe from scratch and append its test metrics to the run folder's probe.json."""
    import minivq.train as trainer
    from minivq.config import ModelConfig, TrainConfig
    from minivq.optim import Adam
    from codebook_study import measure

    settings = PROBES[probe]
    lr = settings.get("lr", 1e-3)
    betas = tuple(settings.get("betas", (0.9, 0.999)))
    schedule = {"cosine": cosine_lr}.get(settings.get("schedule"))

    made = []

    class ProbeAdam(Adam):
        """Adam with this probe's betas and, under the whole-run cosine, its learning rate set before every
        step (after the trainer set its own schedule's)."""

        def __init__(self, params, lr):
            super().__init__(params, lr=lr, betas=betas)
            self.steps_taken = 0
            made.append(self)

        def step(self):
            self.steps_taken += 1
            if schedule is not None:
                self.lr = schedule(lr, self.steps_taken, steps)
            super().step()

    folder = run_folder(probe, seed, steps)
    t0 = time.perf_counter()
    trainer.Adam = ProbeAdam
    try:
        trainer.train_vqvae(TrainConfig(out=folder, steps=steps, seed=seed, lr=lr,
                                        lr_anneal=settings.get("lr_anneal", 0.0), eval_every=10 ** 9,
                                        checkpoint_every=10 ** 9, progress=False, overwrite=True),
                            ModelConfig(**settings.get("model", {})))
    finally:
        trainer.Adam = Adam
    record = measure(folder, steps, full=True)
    record.pop("usage")
    record.update(probe=probe, seed=seed, settings=settings, last_lr=made[-1].lr,
                  seconds=round(time.perf_counter() - t0, 1))
    with open(os.path.join(folder, "probe.json"), "w") as f:
        json.dump(record, f)
    print(f"{probe} seed {seed} step {steps}: nmse {record['nmse']:.4f}, {record['codes_used']} codes", flush=True)


def cmd_run(args):
    run_training_jobs(__file__, train_one, args.probes, PROBES, args.seeds, args.steps, args.jobs)


def _centred(checkpoint):
    """The run's TrainConfig.center_output, from its checkpoint (absent in runs older than the option: no)."""
    from minivq.checkpoint import read_checkpoint
    meta, _ = read_checkpoint(checkpoint, "minivq-vqvae")
    return bool(meta["train"].get("center_output", False))


def cmd_report(args):
    records = []
    for entry in sorted(os.listdir(RUNS)) if os.path.isdir(RUNS) else []:
        path = os.path.join(RUNS, entry, "probe.json")
        if os.path.exists(path):
            with open(path) as f:
                record = json.load(f)
            # whether the run centred its output first (minivq train's default since the fourth session)
            record["center_output"] = _centred(os.path.join(RUNS, entry, "checkpoint.npz"))
            records.append(record)
    print(f"{'probe':<16} {'seed':>4} {'steps':>5} {'nmse':>8} {'codes':>5} {'ppl':>6} centred")
    for r in records:
        print(f"{r['probe']:<16} {r['seed']:>4} {r['step']:>5} {r['nmse']:>8.4f} {r['codes_used']:>5} "
              f"{r['perplexity']:>6.0f} {'yes' if r['center_output'] else 'no'}")
    out = args.out or os.path.join(HERE, "results", f"optimizer-probe-{time.strftime('%Y-%m-%d')}.json")
    with open(out, "w") as f:
        json.dump({"benchmark": "optimizer_probe", "probes": PROBES, "records": records,
                   "machine": describe_machine()}, f, indent=1)
    print(f"wrote {out}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="train probes (from scratch) and measure them")
    r.add_argument("--probes", default=",".join(PROBES))
    r.add_argument("--steps", type=int, default=500)
    r.add_argument("--seeds", default="1")
    r.add_argument("--jobs", type=int, default=2, help="runs at once, one thread each (1: one run, all threads)")
    one = sub.add_parser("one", help="one probe and seed (what run --jobs starts)")
    one.add_argument("probe", choices=list(PROBES))
    one.add_argument("seed", type=int)
    one.add_argument("steps", type=int)
    rep = sub.add_parser("report", help="collect the measured probes into results/optimizer-probe-<date>.json")
    rep.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.command == "run":
        cmd_run(args)
    elif args.command == "one":
        train_one(args.probe, args.seed, args.steps)
    else:
        cmd_report(args)


if __name__ == "__main__":
    main()
