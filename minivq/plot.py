"""Curves from one or more metrics logs (``metrics.jsonl``) as a PNG; needs matplotlib (``pip install -e .[viz]``).

    minivq plot runs/a/metrics.jsonl runs/b/metrics.jsonl --out curves.png

Several logs are overlaid, one colour per run folder (training: lines, test
split: dots). The training loss is drawn on a log scale (an early spike would
flatten the rest). What ``--log-grads`` logs gets panels of its own: the
absolute gradient norms at z_e (reconstruction, commitment) and the codebook's;
per run, the per-layer gradient norms grouped into encoder (blues, solid),
quantiser (reds, thick) and decoder (greens, dashed) with the legend outside
the axes, and a heatmap of per-code usage over the logged steps.
``--compare-estimators`` adds the cosine and norm ratio of the two estimators'
gradients at z_e.
"""
import json
import math
import os

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


# (title, [(key, line style, label)], log scale): the panels of scalar quantities, drawn when a log has them
PANELS = [
    ("training loss (log scale)", [("loss", "-", None)], True),
    ("MSE / data variance", [("nmse", "-", None)], False),
    ("codebook perplexity", [("perplexity", "-", None)], False),
    ("codes used", [("codes_used", "-", None)], False),
    ("prior NLL (bits / latent)", [("bits_per_latent", "-", None), ("nll_bits", "-", None)], False),
    ("gradient norm at z_e and of the codebook",
     [("z_e_grad_recon", "-", "z_e, from the reconstruction"), ("z_e_grad_commit", "--", "z_e, from the commitment"),
      ("z_e_grad", "-.", "z_e, total"), ("codebook_grad", ":", "codebook")], True),
    ("cosine of the two estimators' gradients at z_e", [("estimator_cosine", "-", None)], False),
    ("|rotation| / |straight-through| at z_e", [("estimator_norm_ratio", "-", None)], True),
]
GROUPS = [("encoder", "Blues", "-", 1.0), ("vq", "Reds", "-", 2.2), ("decoder", "Greens", "--", 1.0)]


def run_labels(paths):
    """A short name per log: its folder's name, or more of its path where two folders share a name."""
    full = [os.path.dirname(os.path.abspath(p)) for p in paths]
    labels = [os.path.basename(f) or f for f in full]
    for i, label in enumerate(labels):
        if labels.count(label) > 1:
            labels[i] = os.path.relpath(full[i])
    return labels


def _layer_style(name, order):
    """(colour, line style, width) of a per-layer line: its group's colour map, darker deeper in the group."""
    import matplotlib
    group = name.split(".")[0]
    for prefix, cmap, style, width in GROUPS:
        if group == prefix:
            members = [n for n in order if n.split(".")[0] == prefix]
            shade = 0.4 + 0.55 * (members.index(name) / max(len(members) - 1, 1))
            return matplotlib.colormaps[cmap](shade), style, width
    return "#868e96", ":", 1.0


def _scalar_panel(ax, runs, colours, keys, log):
    drawn = False
    for (label, records), colour in zip(runs, colours):
        for key, style, name in keys:
            train = [(r["step"], r[key]) for r in records if r.get("split", "train") == "train" and key in r]
            test = [(r["step"], r[key]) for r in records if r.get("split") == "test" and key in r]
            if train:
                ax.plot(*zip(*train), style, color=colour, linewidth=1.2)
                drawn = True
            if test:
                ax.plot(*zip(*test), "o", color=colour, markersize=4, markeredgecolor="white", markeredgewidth=0.5)
                drawn = True
    if log and drawn:
        ax.set_yscale("log")
    names = [(style, name) for key, style, name in keys if name and any(key in r for _, rs in runs for r in rs)]
    if names:       # which line style is which quantity (the colours are the runs)
        from matplotlib.lines import Line2D
        ax.legend([Line2D([], [], color="#495057", linestyle=s) for s, _ in names], [n for _, n in names],
                  fontsize=7, loc="best")


def _layers_panel(ax, records, title):
    order = []
    for r in records:
        for name in r.get("grad_norms", {}):
            if name not in order:
                order.append(name)
    rank = {g: i for i, (g, *_) in enumerate(GROUPS)}
    first = {n: i for i, n in enumerate(order)}
    order.sort(key=lambda n: (rank.get(n.split(".")[0], len(GROUPS)), first[n]))
    for name in order:
        pts = [(r["step"], r["grad_norms"][name]) for r in records if name in r.get("grad_norms", {})]
        colour, style, width = _layer_style(name, order)
        ax.plot(*zip(*pts), style, color=colour, linewidth=width, label="vq (the codebook)" if name == "vq" else name)
    ax.set_yscale("log")
    ax.set_title(title, fontsize=10)
    legend = ax.legend(fontsize=6.5, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0,
                       ncol=1 if len(order) <= 18 else 2, title_fontsize=6.5,
                       title="encoder: blues; quantiser: red, thick; decoder: greens, dashed")
    legend.set_in_layout(False)     # it sits in the third column, beside the panel


def usage_matrix(records):
    """(steps, codes, counts[code, step]) of the logged per-code usage, codes sorted by total use."""
    logged = [r for r in records if "code_counts" in r]
    steps = [r["step"] for r in logged]
    totals = {}
    for r in logged:
        for i, c in zip(r["code_counts"]["index"], r["code_counts"]["count"]):
            totals[i] = totals.get(i, 0) + c
    codes = sorted(totals, key=lambda i: (-totals[i], i))
    row = {code: k for k, code in enumerate(codes)}
    counts = [[0] * len(steps) for _ in codes]
    for j, r in enumerate(logged):
        for i, c in zip(r["code_counts"]["index"], r["code_counts"]["count"]):
            counts[row[i]][j] = c
    return steps, codes, counts


def _usage_panel(ax, fig, records, title):
    import numpy as np
    from matplotlib.colors import LogNorm
    steps, codes, counts = usage_matrix(records)
    data = np.ma.masked_equal(np.array(counts, dtype=float), 0)
    extent = (steps[0] - 0.5, steps[-1] + 0.5, len(codes) - 0.5, -0.5) if len(steps) > 1 else None
    image = ax.imshow(data, aspect="auto", interpolation="nearest", cmap="viridis", extent=extent,
                      norm=LogNorm(vmin=1, vmax=max(1, data.max())))
    ax.set_facecolor("white")
    ax.set_title(f"{title}: {len(codes)} codes ever used, most used first", fontsize=10)
    ax.set_ylabel("code index")
    from matplotlib.ticker import FuncFormatter, MaxNLocator
    ax.yaxis.set_major_locator(MaxNLocator(nbins=min(len(codes), 12), integer=True))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: str(codes[int(round(y))])
                                               if 0 <= round(y) < len(codes) and abs(y - round(y)) < 1e-6 else ""))
    fig.colorbar(image, ax=ax, pad=0.01, fraction=0.03).set_label("latents per batch", fontsize=8)


def plot_metrics(paths, out):
    """Write the panels of the quantities found in the logs ``paths`` (one path or several), overlaid by run."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("plotting needs matplotlib: pip install -e .[viz]") from None
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    runs = list(zip(run_labels(paths), [read_metrics(p) for p in paths]))
    colours = [plt.get_cmap("tab10")(i % 10) for i in range(len(runs))]
    panels = [(t, k, log) for t, k, log in PANELS if any(key in r for _, rs in runs for r in rs for key, *_ in k)]
    layered = [(label, rs) for label, rs in runs if any("grad_norms" in r for r in rs)]
    usage = [(label, rs) for label, rs in runs if any("code_counts" in r for r in rs)]
    cols = 3
    scalar_rows = math.ceil(len(panels) / cols)
    rows = scalar_rows + len(layered) + len(usage)
    fig = plt.figure(figsize=(15, 3.3 * rows + 0.5))
    grid = fig.add_gridspec(rows, cols)
    for n, (title, keys, log) in enumerate(panels):
        ax = fig.add_subplot(grid[n // cols, n % cols])
        _scalar_panel(ax, runs, colours, keys, log)
        ax.set_title(title, fontsize=10)
    row = scalar_rows
    for label, records in layered:
        ax = fig.add_subplot(grid[row, :2])
        _layers_panel(ax, records, f"gradient norm per layer, {label}")
        row += 1
    for label, records in usage:
        ax = fig.add_subplot(grid[row, :])
        _usage_panel(ax, fig, records, f"per-code usage, {label}")
        row += 1
    for ax in fig.axes:
        if ax.get_label() != "<colorbar>":
            ax.set_xlabel("step", fontsize=8)
            if not ax.images:
                ax.grid(alpha=0.3)
            ax.tick_params(labelsize=8)
    from matplotlib.lines import Line2D
    handles = [Line2D([], [], color=c, linewidth=2) for c in colours]
    handles += [Line2D([], [], color="#495057"), Line2D([], [], color="#495057", marker="o", linestyle="none")]
    fig.legend(handles, [label for label, _ in runs] + ["training", "test split"], loc="upper center",
               ncol=min(len(handles), 6), fontsize=9, frameon=False, bbox_to_anchor=(0.5, 1.0))
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / (3.3 * rows + 0.5)))
    atomic_write(out, lambda f: fig.savefig(f, dpi=100, format="png"))   # never through a link, never half
    plt.close(fig)
