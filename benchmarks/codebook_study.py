"""Codebook health: train quantiser variants on the same batches and seeds, and compare their codebooks.

    python benchmarks/codebook_study.py run --variants plain,ema,ema-dead --steps 500          # the screen
    python benchmarks/codebook_study.py run --variants ema-dead,cosine-dead --steps 2000 --seeds 0,1
    python benchmarks/codebook_study.py report                                                # JSON + figure

Every run is `minivq train` itself (``minivq.train.train_vqvae``), the defaults
but for the variant's quantiser options and whether the decoder's output is
centred before the first step (``center_output``: off unless the variant says
so, as it was for every run before that option existed), so a variant differs
from another only in those. A run is trained in segments, each one a ``--resume`` of the
last (resuming is exact: the same losses as one uninterrupted run), and after
each segment the study reads the checkpoint: the test split's normalised MSE
(MSE / training-set pixel variance), perplexity, codes used and dead fraction
on the whole test split at the milestones (300, 500, 1,000, 2,000 steps), and
per-code usage on the first 2,000 test images at every segment (for the
heatmap). ``--jobs 2`` trains two runs at once, one thread each.

Runs live in runs/codebook-study/<variant>-s<seed>/ and are reused when the
study is run again (a finished segment is not retrained). ``report`` writes
benchmarks/results/codebook-<date>.json (with the machine) and
docs/codebook-study.png.
"""
import argparse
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from _machine import describe_machine, run_training_jobs  # noqa: E402

RUNS = os.path.join(ROOT, "runs", "codebook-study")
MILESTONES = (300, 500, 1000, 2000)
USAGE_IMAGES = 2000

# name -> the ModelConfig options that make the variant (everything else: minivq train's defaults). Every
# variant names all of the quantiser's options, so a change of the defaults does not change the variants.
PAPER = dict(decay=0.0, kmeans_init=False, dead_code_threshold=0.0, lookup="l2", lookup_dim=None, simvq=False,
             levels=None, estimator="straight_through", decay_warmup=0)
VARIANTS = {
    "plain": dict(PAPER),                                           # the paper's quantiser
    "kmeans": dict(PAPER, kmeans_init=True),
    "dead": dict(PAPER, dead_code_threshold=1.0),
    "ema": dict(PAPER, decay=0.99),                                 # Sonnet's EMA codebook
    "ema-kmeans": dict(PAPER, decay=0.99, kmeans_init=True),
    "ema-dead": dict(PAPER, decay=0.99, dead_code_threshold=1.0),
    "ema-cosine-dead": dict(PAPER, decay=0.99, lookup="cosine", dead_code_threshold=1.0),
    "ema-cosine8-dead": dict(PAPER, decay=0.99, lookup="cosine", lookup_dim=8, dead_code_threshold=1.0),
    "ema-cosine8-dead-kmeans": dict(PAPER, decay=0.99, lookup="cosine", lookup_dim=8, dead_code_threshold=1.0,
                                    kmeans_init=True),
    "ema-cosine8-dead-rotation": dict(PAPER, decay=0.99, lookup="cosine", lookup_dim=8, dead_code_threshold=1.0,
                                      estimator="rotation"),      # the default with the rotation trick
    "ema-cosine8-dead-warmup1000": dict(PAPER, decay=0.99, lookup="cosine", lookup_dim=8, dead_code_threshold=1.0,
                                        decay_warmup=1000),      # the default, its EMA window grown over 1,000 steps
    "ema-cosine8-dead-center": dict(PAPER, decay=0.99, lookup="cosine", lookup_dim=8, dead_code_threshold=1.0,
                                    center_output=True),     # the default, its output bias centred at the start
    "ema-cosine8-dead-center-anneal": dict(PAPER, decay=0.99, lookup="cosine", lookup_dim=8, dead_code_threshold=1.0,
                                           center_output=True, lr_anneal=0.25),   # and the rate annealed at the end
    "ema-cosine16-dead": dict(PAPER, decay=0.99, lookup="cosine", lookup_dim=16, dead_code_threshold=1.0),
    "ema95-cosine8-dead": dict(PAPER, decay=0.95, lookup="cosine", lookup_dim=8, dead_code_threshold=1.0),
    "ema95-cosine16-dead": dict(PAPER, decay=0.95, lookup="cosine", lookup_dim=16, dead_code_threshold=1.0),
    "simvq-dead": dict(PAPER, simvq=True, dead_code_threshold=1.0),
    "fsq-888": dict(PAPER, levels=(8, 8, 8)),
}
# minivq train's default: its quantiser (models.vqvae.DEFAULT_QUANTIZER, decay 0.99), the output centred at the
# start (TrainConfig.center_output) and the learning rate annealed over the run's last quarter (TrainConfig.lr_anneal);
# "ema-cosine8-dead" is the same quantiser from the raw initial weights at a constant rate
DEFAULT = "ema-cosine8-dead-center-anneal"


def segments(steps):
    """Segment ends: every 50 steps to 500, then every 250, and every milestone."""
    ends = set(range(50, min(steps, 500) + 1, 50)) | set(range(750, steps + 1, 250))
    ends |= {m for m in MILESTONES if m <= steps} | {steps}
    return sorted(ends)


def run_folder(variant, seed, planned=None):
    """A run's folder; an annealed run's names the run length its schedule is planned for."""
    return os.path.join(RUNS, f"{variant}-s{seed}" if planned is None else f"{variant}-plan{planned}-s{seed}")


def _done(folder):
    path = os.path.join(folder, "study.jsonl")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return {r["step"]: r for r in map(json.loads, f)}


def measure(folder, step, full):
    """Test metrics of the run's checkpoint at ``step``: per-code usage on the first images, and on the whole
    split (normalised MSE, perplexity, codes used) when ``full``."""
    from minivq.checkpoint import load_vqvae
    from minivq.data import load_dataset
    from minivq.evaluation import evaluate
    model, meta = load_vqvae(os.path.join(folder, "checkpoint.npz"))
    assert meta["step"] == step, (meta["step"], step)
    test = load_dataset(meta["train"]["data"], split="test")
    x, _ = test.batch(np.arange(min(USAGE_IMAGES, len(test))))
    usage = np.bincount(model.encode(x).reshape(-1), minlength=model.vq.num_embeddings)
    record = {"step": step, "usage": usage.tolist()}
    if full:
        metrics = evaluate(model, test, meta["data_variance"])
        k = model.vq.num_embeddings
        record.update({key: metrics[key] for key in ("nmse", "perplexity", "codes_used", "images")},
                      dead_fraction=1.0 - metrics["codes_used"] / k)
    return record


def train_one(variant, seed, steps):
    """Train (or continue) one run segment by segment, measuring after each; returns its folder."""
    from minivq.config import ModelConfig, TrainConfig
    from minivq.train import train_vqvae
    options = dict(VARIANTS[variant])
    center = options.pop("center_output", False)      # training options; the first studies ran without them
    anneal = options.pop("lr_anneal", 0.0)             # (an annealed run is planned for ``steps``)
    folder = run_folder(variant, seed, steps if anneal else None)
    os.makedirs(folder, exist_ok=True)
    done = _done(folder)
    model = ModelConfig(**options)
    for end in segments(steps):
        if end in done:
            continue
        resume = os.path.exists(os.path.join(folder, "checkpoint.npz"))
        config = TrainConfig(out=folder, steps=end, seed=seed, resume=resume, center_output=center,
                             lr_anneal=anneal, planned_steps=steps, eval_every=10 ** 9, eval_size=USAGE_IMAGES,
                             checkpoint_every=10 ** 9, progress=False)
        t0 = time.perf_counter()
        train_vqvae(config, model if not resume else None)
        seconds = time.perf_counter() - t0
        record = dict(measure(folder, end, full=end in MILESTONES or end == steps), variant=variant, seed=seed,
                      planned_steps=steps if anneal else None, segment_seconds=round(seconds, 1))
        with open(os.path.join(folder, "study.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
        shown = {k: record[k] for k in ("nmse", "codes_used") if k in record}
        print(f"{variant} seed {seed} step {end}: {shown} ({seconds:.0f} s)", flush=True)
    return folder


def cmd_run(args):
    run_training_jobs(__file__, train_one, args.variants, VARIANTS, args.seeds, args.steps, args.jobs)


def collect():
    runs = []
    for entry in sorted(os.listdir(RUNS)) if os.path.isdir(RUNS) else []:
        records = sorted(_done(os.path.join(RUNS, entry)).values(), key=lambda r: r["step"])
        if records:
            runs.append({"run": entry, "variant": records[0]["variant"], "seed": records[0]["seed"],
                         "planned_steps": records[0].get("planned_steps"),
                         "options": VARIANTS.get(records[0]["variant"]), "records": records})
    return runs


SEED_STYLES = ("-", "--", ":", "-.")     # line style per seed in the figure


def figure(runs, default, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig = plt.figure(figsize=(13, 8.5))
    grid = fig.add_gridspec(2, 2, height_ratios=[1, 1.1])
    ax_codes, ax_nmse, ax_heat = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1]), fig.add_subplot(grid[1, :])
    palette = plt.get_cmap("tab20")
    hues = [palette(i) for i in list(range(0, 20, 2)) + list(range(1, 20, 2))]    # 10 strong, then 10 light
    colours = {}
    for run in runs:
        name = run["variant"] if not run.get("planned_steps") else f"{run['variant']} (plan {run['planned_steps']})"
        first = name not in colours                      # label each variant once, whichever seed comes first
        colour = colours.setdefault(name, hues[len(colours) % len(hues)])
        style = SEED_STYLES[run["seed"] % len(SEED_STYLES)]
        label = name if first else None
        steps = [r["step"] for r in run["records"]]
        ax_codes.plot(steps, [int(np.count_nonzero(r["usage"])) for r in run["records"]], style, color=colour,
                      label=label, lw=2 if run["variant"] == default else 1.2)
        full = [r for r in run["records"] if "nmse" in r]
        ax_nmse.plot([r["step"] for r in full], [r["nmse"] for r in full], style + "o", color=colour, ms=3,
                     lw=2 if run["variant"] == default else 1.2)
    k = len(runs[0]["records"][0]["usage"])
    ax_codes.axhline(0.9 * k, color="grey", lw=0.8, ls=":")
    ax_codes.set(xlabel="step", ylabel=f"codes used (first {USAGE_IMAGES} test images)", ylim=(0, k * 1.03),
                 title="codebook usage")
    ax_nmse.set(xlabel="step", ylabel="test MSE / variance (whole split)", yscale="log",
               title="reconstruction (seed 0 solid, 1 dashed, 2 dotted, 3 dash-dot)")
    ax_codes.legend(loc="lower right", fontsize=8, ncol=2)
    candidates = [r for r in runs if r["variant"] == default and r["seed"] == 0]     # its longest plan
    chosen = max(candidates, key=lambda r: r.get("planned_steps") or 0) if candidates else None
    if chosen is not None:
        usage = np.array([r["usage"] for r in chosen["records"]], dtype=float)
        order = np.argsort(-usage[-1], kind="stable")        # codes sorted by their final usage
        image = np.log10(1 + usage[:, order].T)
        im = ax_heat.imshow(image, aspect="auto", origin="lower", cmap="viridis", interpolation="nearest",
                            extent=(-0.5, len(usage) - 0.5, 0, k))
        ticks = range(0, len(usage), max(1, len(usage) // 12))
        ax_heat.set_xticks(list(ticks), [str(chosen["records"][i]["step"]) for i in ticks])
        ax_heat.set(xlabel="step", ylabel="code (sorted by final usage)",
                    title=f"per-code usage over training, {default} (log10(1 + count) on {USAGE_IMAGES} test images)")
        fig.colorbar(im, ax=ax_heat, fraction=0.03)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def cmd_report(args):
    runs = collect()
    if not runs:
        raise SystemExit(f"codebook_study: no runs under {RUNS}; start them with `run`")
    print(f"{'run':28} {'step':>5} {'nmse':>8} {'ppl':>7} {'codes':>6} {'dead':>6}")
    for run in runs:
        for r in run["records"]:
            if "nmse" in r:
                print(f"{run['run']:28} {r['step']:>5} {r['nmse']:>8.4f} {r['perplexity']:>7.1f} "
                      f"{r['codes_used']:>6} {r['dead_fraction']:>6.3f}")
    date = time.strftime("%Y-%m-%d")
    out = args.out or os.path.join(HERE, "results", f"codebook-{date}.json")
    with open(out, "w") as f:
        json.dump({"benchmark": "codebook_study", "default": args.default, "milestones": MILESTONES,
                   "usage_images": USAGE_IMAGES, "runs": runs, "machine": describe_machine()}, f)
    print(f"wrote {out}")
    png = args.figure or os.path.join(ROOT, "docs", "codebook-study.png")
    figure(runs, args.default, png)
    print(f"wrote {png}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="train variants (segments already done are kept)")
    r.add_argument("--variants", default=",".join(VARIANTS))
    r.add_argument("--steps", type=int, default=500)
    r.add_argument("--seeds", default="0")
    r.add_argument("--jobs", type=int, default=2, help="runs at once, one thread each (1: one run, all threads)")
    one = sub.add_parser("one")             # one run in this process (what `run --jobs N` starts)
    one.add_argument("variant")
    one.add_argument("seed", type=int)
    one.add_argument("steps", type=int)
    rep = sub.add_parser("report", help="table, JSON and figure of the runs so far")
    rep.add_argument("--default", default=DEFAULT, help="the variant whose usage heatmap is drawn")
    rep.add_argument("--out", default=None)
    rep.add_argument("--figure", default=None)
    args = ap.parse_args()
    if args.command == "run":
        cmd_run(args)
    elif args.command == "one":
        train_one(args.variant, args.seed, args.steps)
    else:
        cmd_report(args)


if __name__ == "__main__":
    main()
