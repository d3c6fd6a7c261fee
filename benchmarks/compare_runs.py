"""Compare finished `minivq train` runs: each one's configuration and its test-split quality over training.

    python benchmarks/compare_runs.py runs/fmnist-2000 runs/fmnist-ema-2000 runs/fmnist-restart-2000

For every run folder it reads the checkpoint's record of the model and training
options (what differs between the runs is printed) and every test-split record
of metrics.jsonl (one per --eval-every steps and one at the end, each on the
whole test split unless the run set --eval-size), then prints a table of the
final test normalised MSE (MSE / training-set pixel variance), perplexity and
codes used, and writes it all, with the machine, as JSON (default
benchmarks/results/runs-<date>.json). It trains nothing: start the runs with
`minivq train` (they differ only in the flags under comparison).
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _machine import describe_machine  # noqa: E402


def read_run(folder):
    from minivq.plot import read_metrics
    from minivq.checkpoint import read_checkpoint
    try:
        meta, _ = read_checkpoint(os.path.join(folder, "checkpoint.npz"), "minivq-vqvae")
        tests = [r for r in read_metrics(os.path.join(folder, "metrics.jsonl")) if r["split"] == "test"]
    except (OSError, ValueError) as e:
        print(f"compare_runs: {folder}: {e}; pass folders of finished `minivq train` runs", file=sys.stderr)
        raise SystemExit(2) from None
    if not tests:
        print(f"compare_runs: {folder}: metrics.jsonl has no test-split record; let the run finish first",
              file=sys.stderr)
        raise SystemExit(2)
    return {"folder": folder, "step": meta["step"], "model": meta["model"], "train": meta["train"],
            "test": [{k: r[k] for k in ("step", "nmse", "perplexity", "codes_used", "images")} for r in tests]}


def differing(runs):
    """The option names (model.* / train.*) whose values are not the same in every run."""
    keys = sorted({f"{part}.{k}" for r in runs for part in ("model", "train") for k in r[part]})
    def value(r, key):
        part, k = key.split(".", 1)
        return r[part].get(k)
    return [k for k in keys if len({json.dumps(value(r, k)) for r in runs}) > 1]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", help="finished `minivq train` run folders")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    runs = [read_run(folder) for folder in args.runs]
    options = differing(runs)
    print(f"{'run':32} {'steps':>6} {'test nmse':>10} {'perplexity':>11} {'codes':>6}  options that differ")
    for r in runs:
        final = r["test"][-1]
        shown = ", ".join(f"{k}={r[k.split('.')[0]].get(k.split('.', 1)[1])}" for k in options)
        print(f"{os.path.basename(os.path.normpath(r['folder'])):32} {r['step']:>6} {final['nmse']:>10.4f} "
              f"{final['perplexity']:>11.1f} {final['codes_used']:>6}  {shown}")
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"runs-{time.strftime('%Y-%m-%d')}.json")
    with open(out, "w") as f:
        json.dump({"benchmark": "compare_runs", "differing_options": options, "runs": runs,
                   "machine": describe_machine()}, f, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
