"""Curves from a metrics log (``metrics.jsonl``) as a PNG; needs matplotlib (``pip install -e .[viz]``)."""
import json
import math

from .io import atomic_write


def read_metrics(path):
    records = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except ValueError:
                raise ValueError(f"{path}, line {number}: not JSON; is this a minivq metrics.jsonl?") from None
    if not records or not all(isinstance(r, dict) and "step" in r for r in records):
        raise ValueError(f"{path} holds no minivq metrics records (JSON objects with a 'step')")
    return records


PANELS = [("loss", "training loss"), ("nmse", "MSE / data variance"), ("perplexity", "codebook perplexity"),
          ("codes_used", "codes used"), ("bits_per_latent", "prior NLL (bits / latent)"),
          ("nll_bits", "prior NLL (bits / latent)"), ("z_e_recon_share", "share of z_e's gradient from recon"),
          ("grad_norms", "gradient norm per layer")]


def plot_metrics(path, out):
    """Write one panel per quantity found in the log, train and test curves together."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("plotting needs matplotlib: pip install -e .[viz]") from None
    records = read_metrics(path)
    panels = []
    for key, title in PANELS:
        if any(key in r for r in records) and not any(t == title for _, t in panels):
            panels.append((key, title))
        elif key == "nll_bits" and any(key in r for r in records):
            panels.append((key, title + " (test)"))
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, (key, title) in zip(axes.flat, panels):
        if key == "grad_norms":
            layers = sorted({name for r in records for name in r.get(key, {})})
            for name in layers:
                pts = [(r["step"], r[key][name]) for r in records if name in r.get(key, {})]
                ax.plot(*zip(*pts), label=name, linewidth=1)
            ax.set_yscale("log")
            ax.legend(fontsize=5, ncol=2)
        else:
            for split, style in (("train", "-"), ("test", "o-")):
                pts = [(r["step"], r[key]) for r in records if r.get("split", "train") == split and key in r]
                if pts:
                    ax.plot(*zip(*pts), style, label=split, markersize=3)
            ax.legend(fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    atomic_write(out, lambda f: fig.savefig(f, dpi=110, format="png"))   # never through a link, never half
    plt.close(fig)
