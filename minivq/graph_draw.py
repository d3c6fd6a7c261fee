"""Drawing a backward graph with matplotlib alone (no Graphviz): ``mv.graph.render(loss, "step.png")``.

What the picture shows:
- a box per op: its name (and its output's name, ``-> z_e``), the module that made it
  (under ``mv.graph.trace(model)``), its output shape and the norm of the gradient it
  received; a layer's own parameters are listed in its box with their gradient norms;
- an arrow from each op to each of its inputs, the way the gradient flows, labelled
  with the norm of the gradient it carries there; the arrows that carry none (a
  stop-gradient's input, the straight-through's ``z_q``) are dashed, in red;
- StraightThrough, StopGradient and RotationTrick filled in colour;
- the ops grouped into columns by the module that made them (encoder, quantiser,
  decoder, then the loss), the forward pass running down each column; the ops of
  one call of a module named in ``collapse`` (a residual block) drawn as one box.

Without a trace the columns come from the tensors' names (``z_e``, ``z_q``,
``quantized``, ``x_recon`` and the loss terms, which the VQ-VAE sets). The layout
(``graph_view``, ``layout``) is plain Python; only ``render`` needs matplotlib.
"""
import importlib.util
import math
import os

from . import functional as F
from .graph import COLOURS, SPECIAL, input_state, nodes, outputs, record_grad_norms, tensor_names, trace
from .io import atomic_write
from .nn.module import Parameter

GROUP_TITLES = {"encoder": "encoder", "vq": "quantiser", "decoder": "decoder", None: "loss"}
GROUP_COLOURS = {"encoder": "#e7f5ff", "quantiser": "#fff9db", "decoder": "#ebfbee", "loss": "#f1f3f5"}
CUT = "#d62728"
INLINE_OPS = ("Conv2d", "ConvTranspose2d", "MatMul", "Linear")      # layers whose parameters sit in their box


class Box:
    """One drawn node: an op, a collapsed block of ops, or a leaf that wants a gradient."""

    def __init__(self, key, kind, title, group, order):
        self.key, self.kind, self.title, self.group, self.order = key, kind, title, group, order
        self.name = self.where = self.shape = self.grad = None
        self.params = []        # (label, state, norm) of the parameters drawn inside the box
        self.members = []       # the Functions it stands for
        self.layer = self.x = self.y = 0.0
        self.placed = False

    def lines(self):
        head = self.title + (f" -> {self.name}" if self.name else "")
        out = [head]
        if self.where:
            out.append(self.where)
        size = str(tuple(self.shape)) if self.shape is not None else ""
        if self.kind == "leaf":
            out.append(f"leaf {size}")
        else:
            out.append(f"{size}   |g| {_short(self.grad)}" if self.grad is not None else f"{size}   |g| -")
        if self.params:
            out.append("  ".join(f"{label} {_edge_label(state, norm)}" for label, state, norm in self.params))
        return out


class Edge:
    """The gradient flowing from a consumer box to one of its inputs' boxes."""

    def __init__(self, src, dst, state, norm, approx=False):
        self.src, self.dst, self.state, self.norm, self.approx = src, dst, state, norm, approx


def _short(v):
    return "-" if v is None else f"{v:.2e}"


def _edge_label(state, norm, approx=False):
    if state == "cut":
        return "cut"
    if state == "grad" and norm is not None:
        return ("<= " if approx else "") + f"{norm:.2e}"
    return "-"


def _scope_group(fn):
    scope = getattr(fn, "scope", None)
    return GROUP_TITLES.get(scope.split(".")[0], scope.split(".")[0]) if scope else "loss"


def _named_groups(order, root, ids):
    """Columns from the tensors' names, for graphs built without ``trace``: {id(fn): group}."""
    by_name = {}
    for t in [root] + [x for fn in order for x in fn.inputs]:
        if id(t) in ids and t.creator is not None:
            by_name.setdefault(ids[id(t)], t)

    def ancestors(names):
        found, stack = set(), [by_name[n].creator for n in names if n in by_name]
        while stack:
            fn = stack.pop()
            if id(fn) not in found:
                found.add(id(fn))
                stack.extend(x.creator for x in fn.inputs if x.creator is not None)
        return found

    if "z_e" not in by_name:
        return {id(fn): "graph" for fn in order}
    encoder = ancestors(["z_e"])
    quantiser = ancestors(["quantized", "z_q", "vq_loss", "codebook_loss", "commitment_loss"]) - encoder
    decoder = ancestors(["x_recon"]) - encoder - quantiser
    return {id(fn): "encoder" if id(fn) in encoder else "quantiser" if id(fn) in quantiser
            else "decoder" if id(fn) in decoder else "loss" for fn in order}


def _block_of(fn, collapse):
    """(path, class name) of the outermost module named in ``collapse`` that made ``fn``, or None."""
    kinds = getattr(fn, "scope_kinds", None)
    if not kinds or not collapse:
        return None
    parts = fn.scope.split(".")
    for i, kind in enumerate(kinds):
        if kind in collapse:
            return ".".join(parts[:i + 1]), kind
    return None


def graph_view(root, names=None, collapse=("Residual",)):
    """(boxes {key: Box}, edges [Edge]) of ``root``'s backward graph, as ``render`` draws it.

    ``names``: {name: Tensor}, as for ``format_graph``; ``collapse``: class names of
    modules whose calls become one box each (needs ``trace``).
    """
    order = nodes(root)
    ids = tensor_names(root, names)
    outs = outputs(root)
    traced = any(getattr(fn, "scope", None) for fn in order)
    groups = {id(fn): _scope_group(fn) for fn in order} if traced else _named_groups(order, root, ids)
    consumers = {}
    for fn in order:
        for x in fn.inputs:
            if x.creator is not None:
                consumers.setdefault(id(x.creator), []).append(fn)

    boxes, key_of = {}, {}
    for fn in order:
        block = _block_of(fn, collapse)
        if block is not None:
            key = "block:" + block[0]
            if key not in boxes:
                boxes[key] = Box(key, "block", block[1], groups[id(fn)], fn.generation)
                boxes[key].where = block[0]
        else:
            key = f"op:{id(fn)}"
            kind = "special" if fn.name in SPECIAL else "op"
            boxes[key] = Box(key, kind, fn.name, groups[id(fn)], fn.generation)
            scope = getattr(fn, "scope", None)
            boxes[key].where = scope if scope and "." in scope else None     # the column says the rest
            out = outs.get(id(fn))
            boxes[key].name = ids.get(id(out)) if out is not None else None
            boxes[key].shape = fn.output_meta[0][0]
            boxes[key].grad = fn.grad_norms[0] if fn.grad_norms is not None else None
        key_of[id(fn)] = key
        boxes[key].members.append(fn)
        boxes[key].order = min(boxes[key].order, fn.generation)

    for box in boxes.values():          # a block shows what leaves it: the output of its last op
        if box.kind == "block":
            inside = {id(fn) for fn in box.members}
            exits = [fn for fn in box.members
                     if not consumers.get(id(fn)) or any(id(c) not in inside for c in consumers[id(fn)])]
            last = max(exits or box.members, key=lambda f: f.generation)
            out = outs.get(id(last))
            box.name = ids.get(id(out)) if out is not None else None
            box.shape = last.output_meta[0][0]
            box.grad = last.grad_norms[0] if last.grad_norms is not None else None
            ops = [fn.name for fn in sorted(box.members, key=lambda f: f.generation)]
            box.title = f"{box.title} ({'-'.join(_abbreviate(o) for o in ops)})"
            box.where = box.where.split(".", 1)[-1]

    edges, merged, block_params = [], {}, {}
    for fn in order:
        src = key_of[id(fn)]
        for i, x in enumerate(fn.inputs):
            state, norm = input_state(fn, i)
            if state == "const":
                continue
            if x.creator is not None:
                dst = key_of[id(x.creator)]
                if dst == src:
                    continue
                merged.setdefault((src, dst, id(x)), []).append((state, norm, x))
                continue
            is_param = isinstance(x, Parameter) or (names is not None and id(x) in ids and x.requires_grad)
            if is_param and (fn.name in INLINE_OPS or boxes[src].kind == "block"):
                label = ids.get(id(x), "param")
                if boxes[src].kind == "block":
                    block_params.setdefault(src, []).append((state, norm))
                else:
                    boxes[src].params.append((label.rsplit(".", 1)[-1], state, norm))
                continue
            dst = f"leaf:{id(x)}"
            if dst not in boxes:
                boxes[dst] = Box(dst, "leaf", ids.get(id(x), "leaf"), boxes[src].group, fn.generation - 1)
                boxes[dst].shape = x.shape
            edges.append(Edge(src, dst, state, norm))
    for src, pairs in block_params.items():     # a block's parameters: one combined norm
        norms = [n for s, n in pairs if s == "grad" and n is not None]
        boxes[src].params.append(("weights", "grad" if norms else "cut",
                                  math.sqrt(sum(n * n for n in norms)) if norms else None))
    for (src, dst, _), uses in merged.items():
        if len(uses) == 1:
            edges.append(Edge(src, dst, uses[0][0], uses[0][1]))
            continue
        x = uses[0][2]      # one tensor used several times inside a block
        inside = {id(fn) for fn in boxes[src].members}
        if all(id(c) in inside for c in consumers.get(id(x.creator), [])) and x.creator.grad_norms is not None:
            edges.append(Edge(src, dst, "grad", x.creator.grad_norms[0]))     # all of its gradient
        else:
            norms = [n for s, n, _ in uses if s == "grad" and n is not None]
            edges.append(Edge(src, dst, "grad" if norms else uses[0][0], sum(norms) if norms else None,
                              approx=True))
    return boxes, edges


def _abbreviate(op):
    return {"Conv2d": "Conv", "ConvTranspose2d": "ConvT"}.get(op, op)


# ---------------------------------------------------------------- layout
BOX_W, BOX_H, ROW, LANE, GAP, TOP = 2.5, 0.78, 1.25, 2.85, 0.5, 1.55      # inches


def _layers(group, members, boxes, edges, preds):
    """Number the layers of one group: the longest path from its first op, leaves just above their op."""
    ops = sorted((b for b in members if b.kind != "leaf"), key=lambda b: b.order)
    for b in ops:       # ascending generation is a topological order
        inside = [boxes[p].layer + 1 for p in preds[b.key] if boxes[p].group == group and boxes[p].kind != "leaf"]
        b.layer = max(inside, default=0)
    for b in reversed(ops):     # an op that reads only from other groups sits just before its first reader
        if not any(boxes[p].group == group and boxes[p].kind != "leaf" for p in preds[b.key]):
            readers = [boxes[e.src].layer for e in edges if e.dst == b.key and boxes[e.src].group == group]
            if readers:
                b.layer = max(b.layer, min(readers) - 1)
    leaves = [b for b in members if b.kind == "leaf"]
    for leaf in leaves:
        users = [boxes[e.src].layer for e in edges if e.dst == leaf.key and boxes[e.src].group == group]
        leaf.layer = min(users, default=1) - 1
    if any(leaf.layer < 0 for leaf in leaves):
        for b in members:
            b.layer += 1
    rows = {}
    for b in sorted(members, key=lambda b: (b.layer, b.order)):
        rows.setdefault(b.layer, []).append(b)
    return rows


# Where the four groups of a VQ-VAE step go, as a ring: the encoder down the left, the quantiser up
# from the bottom of the middle, the decoder up the right, the loss down from the top of the middle.
# (column, anchored at the top or the bottom, the forward pass going down or up)
RING = {"encoder": (0, "top", "down"), "loss": (1, "top", "down"), "quantiser": (1, "bottom", "up"),
        "decoder": (2, "bottom", "up")}


def layout(boxes, edges):
    """Place the boxes; returns the groups' frames [(group, left, right, top row, rows)].

    Each box gets ``x``, ``y`` (inches, y growing downwards) and ``layer``. A VQ-VAE
    step (groups encoder, quantiser, decoder, loss) is laid out as a ring (``RING``),
    so the arrows between groups stay short; other graphs get a column per group, in
    forward order, each running down.
    """
    last = {}       # forward order of the groups: by the depth of each one's last op
    for b in boxes.values():
        if b.kind != "leaf":
            last[b.group] = max(last.get(b.group, 0), max(fn.generation for fn in b.members))
    groups = sorted({b.group for b in boxes.values()}, key=lambda g: last.get(g, 0))
    preds = {k: [] for k in boxes}          # forward: the boxes an op reads from
    for e in edges:
        preds[e.src].append(e.dst)
    rows = {g: _layers(g, [b for b in boxes.values() if b.group == g], boxes, edges, preds) for g in groups}
    height = {g: max(rows[g]) + 1 for g in groups}
    width = {g: max(len(r) for r in rows[g].values()) for g in groups}
    if set(groups) <= set(RING) and {"encoder", "quantiser", "decoder"} <= set(groups):
        plan = {g: RING[g] for g in groups}
        total = max(height["encoder"], height["decoder"],
                    height["quantiser"] + (height["loss"] + 1 if "loss" in groups else 0))
    else:
        plan = {g: (i, "top", "down") for i, g in enumerate(groups)}
        total = max(height.values())
    columns = sorted({c for c, _, _ in plan.values()})
    col_width = {c: max(width[g] for g in groups if plan[g][0] == c) for c in columns}
    col_left, left = {}, 0.0
    for c in columns:
        col_left[c], left = left, left + col_width[c] * LANE + GAP
    neighbours = {k: list(preds[k]) for k in boxes}
    for e in edges:
        neighbours[e.dst].append(e.src)
    frames = []
    for sweep in range(3):      # order each row by its neighbours' mean x; the first sweep sees inputs only
        for g in groups:
            c, anchor, direction = plan[g]
            first = 0 if anchor == "top" else total - height[g]
            centre = col_left[c] + col_width[c] * LANE / 2
            for layer in sorted(rows[g]):
                row = rows[g][layer]

                def bary(b):
                    xs = [boxes[p].x for p in neighbours[b.key] if boxes[p].placed]
                    return sum(xs) / len(xs) if xs else centre
                row.sort(key=bary)
                at = first + (layer if direction == "down" else height[g] - 1 - layer)
                for i, b in enumerate(row):
                    b.x = centre + (i - (len(row) - 1) / 2) * LANE
                    b.y = TOP + at * ROW
                    b.placed = True
            if sweep == 0:
                frames.append((g, col_left[c], col_left[c] + col_width[c] * LANE, first, height[g]))
    return frames


# ---------------------------------------------------------------- drawing
def _fill(box):
    if box.kind == "special":
        return COLOURS[box.title], "#862e9c" if box.title == "RotationTrick" else "#c92a2a" \
            if box.title == "StopGradient" else "#e8590c"
    if box.kind == "block":
        return "#d0ebff", "#1c7ed6"
    if box.kind == "leaf":
        return "#d3f9d8", "#2b8a3e"
    return "white", "#868e96"


def render(root, path, names=None, collapse=("Residual",), title=None):
    """Draw ``root``'s backward graph to ``path``; the format (png, svg) is the file's extension.

    Returns (boxes, edges) as ``graph_view`` made them. Record the gradient norms
    first (``with mv.graph.record_grad_norms(): loss.backward()``) for the numbers.
    """
    ext = os.path.splitext(str(path))[1].lower().lstrip(".")
    if ext not in ("png", "svg"):
        raise ValueError(f"render draws PNG or SVG files: {path} ends in neither .png nor .svg")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import FancyArrowPatch, FancyBboxPatch
    except ImportError:
        raise RuntimeError("drawing a graph needs matplotlib: pip install -e .[viz]") from None
    if root.creator is None:
        raise ValueError("render needs a tensor computed from others (it has no graph: a leaf, or made under no_grad)")
    boxes, edges = graph_view(root, names, collapse)
    frames = layout(boxes, edges)
    width = max(max(right for _, _, right, _, _ in frames) + 0.45, 9.0)       # room for arcs on the right
    height = max(TOP + (first + rows) * ROW for *_, first, rows in frames) - ROW / 2 + 0.25
    fig = plt.figure(figsize=(width, height))
    ax = fig.add_axes([0, 0, 1, 1])
    ax.set_xlim(-0.1, width - 0.1)
    ax.set_ylim(height, 0)
    ax.axis("off")
    for group, lo, hi, first, rows in frames:
        top = TOP + first * ROW - BOX_H / 2 - 0.42
        ax.add_patch(FancyBboxPatch((lo + 0.08, top), hi - lo - 0.16, (rows - 1) * ROW + BOX_H + 0.55,
                                    boxstyle="round,pad=0.02,rounding_size=0.12",
                                    facecolor=GROUP_COLOURS.get(group, "#f8f9fa"), edgecolor="#ced4da", zorder=0))
        ax.text(lo + 0.25, top + 0.2, group, ha="left", va="center", fontsize=11, fontweight="bold",
                color="#495057", zorder=1)
    heading = title or "one backward pass: what each op received, and what it passed to each input"
    ax.text(0.1, 0.2, heading, ha="left", va="center", fontsize=11, fontweight="bold")
    ax.text(0.1, 0.42, "box: op -> output name, module, output shape, |g| = norm of the gradient it received "
                       "(and of its parameters' gradients).  arrow: the gradient flowing back to an input, "
                       "labelled with its norm.", ha="left", va="center", fontsize=7.5, color="#495057")
    ax.text(0.1, 0.6, "red dashed arrow: the op passes no gradient to that input (cut).  Filled: "
                      "StraightThrough, StopGradient, RotationTrick.  Blue: a collapsed block.",
            ha="left", va="center", fontsize=7.5, color=CUT)
    labels = []         # where edge labels went, so that the next ones avoid them
    for e in sorted(edges, key=lambda e: e.state != "cut"):
        _draw_edge(ax, boxes[e.src], boxes[e.dst], e, FancyArrowPatch, list(boxes.values()), labels)
    for box in boxes.values():
        face, edge = _fill(box)
        special = box.kind == "special"
        ax.add_patch(FancyBboxPatch((box.x - BOX_W / 2, box.y - BOX_H / 2), BOX_W, BOX_H,
                                    boxstyle="round,pad=0.02,rounding_size=0.08", facecolor=face, edgecolor=edge,
                                    linewidth=2.2 if special else 1.0, zorder=3))
        lines = box.lines()
        step = BOX_H / (len(lines) + 0.4)
        for i, line in enumerate(lines):
            y = box.y - BOX_H / 2 + step * (i + 0.7)
            bold, grey = i == 0, (i == 1 and box.where is not None)
            ax.text(box.x, y, _fit(line, 44 if bold else 50), ha="center", va="center",
                    fontsize=7.6 if bold else 6.6, fontweight="bold" if bold else "normal",
                    color="#868e96" if grey else "black", zorder=4, family="DejaVu Sans")
    atomic_write(path, lambda f: fig.savefig(f, format=ext, dpi=100))
    plt.close(fig)
    return boxes, edges


def _fit(text, n):
    return text if len(text) <= n else text[:n - 1] + "…"


def _inside(x, y, boxes, margin=0.06):
    return any(abs(x - b.x) < BOX_W / 2 + margin and abs(y - b.y) < BOX_H / 2 + margin for b in boxes)


def _draw_edge(ax, src, dst, e, FancyArrowPatch, boxes, labels):
    """The arrow from an op to its input, the way the gradient flows, with the norm it carries."""
    dx, dy = dst.x - src.x, dst.y - src.y
    rad = 0.0
    if abs(dx) >= BOX_W:                # to another lane: out of the side facing it, into its top or bottom
        side = 1 if dx > 0 else -1
        start = (src.x + side * BOX_W / 2, src.y)
        end = (dst.x, dst.y - math.copysign(BOX_H / 2, dy)) if abs(dy) > BOX_H else (dst.x - side * BOX_W / 2, dst.y)
    elif abs(dy) > BOX_H:               # within a lane: from the facing edges, top or bottom
        sign = 1 if dy > 0 else -1
        start, end = (src.x, src.y + sign * BOX_H / 2), (dst.x, dst.y - sign * BOX_H / 2)
        between = [b for b in boxes if abs(b.x - src.x) < 1e-6 and min(src.y, dst.y) < b.y < max(src.y, dst.y)]
        if abs(dx) < 1e-6 and between:      # past boxes in between: round them on the right
            start, end = (src.x + BOX_W / 2, src.y), (dst.x + BOX_W / 2, dst.y)
            rad = -sign * 0.44 / abs(dy)       # bulging 0.22 in to the right
    else:                               # level: side to side
        sign = 1 if dx > 0 else -1
        start, end = (src.x + sign * BOX_W / 2, src.y), (dst.x - sign * BOX_W / 2, dst.y)
    cut = e.state == "cut"
    colour = CUT if cut else "#495057"
    arrow = FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=9, linewidth=1.4 if cut else 0.9,
                            linestyle=(0, (4, 3)) if cut else "-", color=colour,
                            connectionstyle=f"arc3,rad={rad}", zorder=2, shrinkA=1, shrinkB=1)
    ax.add_patch(arrow)
    (x1, y1), (x2, y2) = start, end
    # the label sits on matplotlib's arc3 curve (a quadratic Bezier B(t) with its control point rad x the
    # chord's length off the chord's middle): halfway along a short arrow, near the input on a long one
    cx, cy = (x1 + x2) / 2 - rad * (y2 - y1), (y1 + y2) / 2 + rad * (x2 - x1)
    tries = (0.5, 0.4, 0.6, 0.3, 0.7) if math.hypot(x2 - x1, y2 - y1) < 1.6 * ROW else \
        (0.75, 0.85, 0.65, 0.55, 0.9, 0.45, 0.35)
    for t in tries:         # the first spot along the arrow on no box and no other label
        mx = (1 - t) ** 2 * x1 + 2 * t * (1 - t) * cx + t * t * x2
        my = (1 - t) ** 2 * y1 + 2 * t * (1 - t) * cy + t * t * y2
        if not _inside(mx, my, boxes) and not any(abs(mx - lx) < 0.6 and abs(my - ly) < 0.18 for lx, ly in labels):
            break
    labels.append((mx, my))
    label = _edge_label(e.state, e.norm, e.approx)
    if label != "-":
        ax.text(mx, my, label, ha="center", va="center", fontsize=6.4, color=colour, zorder=5,
                bbox=dict(boxstyle="round,pad=0.15", facecolor="white", edgecolor="none", alpha=0.9))


# ---------------------------------------------------------------- one training step
def training_step(model, x, variance):
    """One VQ-VAE training step's graph, traced and with its gradient norms recorded (no update is made).

    Returns the loss, ``||x - x_recon||^2 / variance + vq.loss``, its parts named.
    """
    with trace(model):
        x_recon, vq = model(x)
    recon = F.mse_loss(x_recon, x) / variance
    recon.name = "recon_loss"
    loss = recon + vq.loss
    loss.name = "loss"
    model.zero_grad()
    with record_grad_norms():
        loss.backward()
    return loss


def draw_checkpoint(checkpoint, out, data=None, device="cpu", batch_size=8, collapse=("Residual",)):
    """``minivq graph``: draw one training step of a checkpoint's VQ-VAE on a batch of its dataset.

    The batch is the run's first (its seed's order, training split); the model is put
    in train mode, as in training, and nothing is written back. Returns (boxes, edges).
    """
    from .autograd import Tensor
    from .checkpoint import load_vqvae
    from .data import BatchSampler, load_dataset
    from .evaluation import model_dtype

    ext = os.path.splitext(str(out))[1].lower()
    if ext not in (".png", ".svg"):
        raise ValueError(f"minivq graph writes PNG or SVG: {out} ends in neither .png nor .svg")
    if importlib.util.find_spec("matplotlib") is None:      # before any work (render imports it)
        raise RuntimeError("drawing a graph needs matplotlib: pip install -e .[viz]")
    model, meta = load_vqvae(checkpoint, device)
    train = meta.get("train") or {}
    dataset = load_dataset(data if data is not None else train.get("data"), split="train")
    if dataset.num_channels != model.in_channels:
        raise ValueError(f"the checkpoint's model takes {model.in_channels}-channel images, "
                         f"the dataset {dataset.name} has {dataset.num_channels}")
    if batch_size > len(dataset):
        raise ValueError(f"--batch {batch_size} is larger than the training set ({len(dataset)} images)")
    rows = BatchSampler(len(dataset), batch_size, int(train.get("seed", 0))).indices(0)
    x, _ = dataset.batch(rows, device=device, dtype=model_dtype(model))
    model.train()
    loss = training_step(model, Tensor(x), meta["data_variance"])
    title = (f"one training step of {os.path.basename(str(checkpoint))} (step {meta.get('step')}) on "
             f"{batch_size} {dataset.name} images: what each op received, and what it passed to each input")
    return render(loss, out, names=dict(model.named_parameters()), collapse=collapse, title=title)
