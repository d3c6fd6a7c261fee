"""Looking at a backward graph: as text, one line per node; as Graphviz DOT; or drawn (PNG, SVG).

    with mv.graph.trace(model):                 # optional: notes which module made each node
        x_recon, vq = model(x)
    loss = F.mse_loss(x_recon, x) / variance + vq.loss
    with mv.graph.record_grad_norms():
        loss.backward()
    print(mv.graph.format_graph(loss, names=dict(model.named_parameters())))
    mv.graph.render(loss, "step.png", names=dict(model.named_parameters()))

Each node line gives its number, its name (the Function's class: ``Conv2d``,
``StraightThrough``, ``StopGradient`` ...) and the name of its output tensor
if it has one (``t.name = "z_e"``; the VQ-VAE names ``z_e``, ``z_q``,
``quantized``, ``x_recon`` and its loss terms), its output shape, the norm of the
gradient that reached its output in the last recorded backward, and where its
inputs come from (other node numbers, or named leaves) with the norm of the
gradient the node passed to each: ``cut`` where the input wants a gradient and
the node passes none (a stop-gradient's input, the straight-through's ``z_q``).

``to_dot`` writes the same graph as DOT text (render it with ``dot -Tpng`` if
Graphviz is installed; nothing here needs it). ``render`` draws it with
matplotlib alone (the ``viz`` extra): see ``minivq.graph_draw``.
"""
import contextlib

import numpy as np

from . import autograd, backend
from .functional.quantize import RotationTrick

# the nodes that decide where the gradient goes: drawn and coloured apart, with the inputs they cut
SPECIAL = {"StraightThrough": (1,), "StopGradient": (0,), "RotationTrick": (1,)}
COLOURS = {"StraightThrough": "#ffd8a8", "StopGradient": "#ffc9c9", "RotationTrick": "#e5dbff"}


@contextlib.contextmanager
def record_grad_norms(inputs=True):
    """Within this block, every backward notes gradient norms on each node it runs.

    ``fn.grad_norms``: the norm of the gradient that reached each of the node's
    outputs. With ``inputs=True``, also ``fn.input_grad_norms``: the norm of the
    gradient the node passed to each input (None where it passed none). To see
    those, the hook runs the node's backward a second time on the same output
    gradients (backward is a pure function of them and of what forward saved), so a
    recorded backward costs about twice a plain one.

    It installs autograd's backward hook for the block; a hook already installed keeps being called.
    """
    outer = autograd.get_backward_hook()

    def note_norms(fn, grads_out):
        fn.grad_norms = [None if g is None else grad_norm(g) for g in grads_out]
        if inputs:
            grads_in = fn.backward(*grads_out)
            grads_in = grads_in if isinstance(grads_in, tuple) else (grads_in,)
            fn.input_grad_norms = [None if g is None or not x.requires_grad else grad_norm(g)
                                   for x, g in zip(fn.inputs, grads_in)]
        if outer is not None:
            outer(fn, grads_out)

    with autograd.backward_hook(note_norms):
        yield


@contextlib.contextmanager
def trace(model):
    """Within this block, each node made in a call of one of ``model``'s submodules notes it.

    ``fn.scope`` is the dotted name of the innermost module whose call made the node
    (``"encoder.conv_1"``; nodes made by a module's own code between its children's
    calls get that module's name), ``fn.scope_kinds`` the class names along that
    path. ``render`` groups the drawing by the first part (encoder, quantiser,
    decoder) and collapses repeated blocks (a residual block) by the class names.
    Nodes made outside the model (the loss) have no scope.
    """
    kinds = {name: type(m).__name__ for name, m in model.named_modules()}
    wrapped = []

    def wrap(name, module, forward):
        def traced(*args, **kwargs):
            result = forward(*args, **kwargs)
            stops = {id(t) for t in _tensors_in(args) + _tensors_in(kwargs)}
            parts = name.split(".")
            path_kinds = tuple(kinds[".".join(parts[:i + 1])] for i in range(len(parts)))
            for t in _tensors_in(result):
                _tag(t, stops, name, path_kinds)
            return result
        return traced

    for name, module in model.named_modules():
        if name and "forward" not in module.__dict__:
            module.__dict__["forward"] = wrap(name, module, module.forward)
            wrapped.append(module)
    try:
        yield model
    finally:
        for module in wrapped:
            module.__dict__.pop("forward", None)


def _tensors_in(value, depth=0):
    """The Tensors in a module's arguments or result: itself, tuples, lists, dicts, and VQOutput's attributes."""
    if isinstance(value, autograd.Tensor):
        return [value]
    if depth > 3:
        return []
    found = []
    if isinstance(value, (tuple, list)):
        for v in value:
            found += _tensors_in(v, depth + 1)
    elif isinstance(value, dict):
        for v in value.values():
            found += _tensors_in(v, depth + 1)
    if hasattr(value, "__dict__") and isinstance(value, tuple):      # VQOutput: z_e, z_q, the loss terms
        for v in vars(value).values():
            found += _tensors_in(v, depth + 1)
    return found


def _tag(t, stops, name, path_kinds):
    """Give ``scope`` to the untagged nodes between ``t`` and the tensors in ``stops`` (the call's inputs).

    Nodes already tagged (by a submodule's call, which ended first) keep their
    scope, and the walk goes on through them to the nodes this module made itself.
    """
    stack, seen = [t], set()
    while stack:
        x = stack.pop()
        fn = x.creator
        if id(x) in stops or fn is None or id(fn) in seen:
            continue
        seen.add(id(fn))
        if getattr(fn, "scope", None) is None:
            fn.scope, fn.scope_kinds = name, path_kinds
        stack.extend(fn.inputs)


def nodes(root):
    """The Functions of ``root``'s graph, from the root down (reverse topological order), each once."""
    if root.creator is None:
        return []
    found, stack, seen = [], [root.creator], {id(root.creator)}
    while stack:
        fn = stack.pop()
        found.append(fn)
        for x in fn.inputs:
            if x.creator is not None and id(x.creator) not in seen:
                seen.add(id(x.creator))
                stack.append(x.creator)
    found.sort(key=lambda f: -f.generation)   # stable: ties keep discovery order
    return found


def tensor_names(root, names=None):
    """{id(tensor): name} for every named tensor of ``root``'s graph, leaves and intermediates.

    ``names``: a mapping {name: Tensor} (``dict(model.named_parameters())``) that wins
    over the tensors' own ``.name``.
    """
    found = {}
    tensors = [root] + [x for fn in nodes(root) for x in fn.inputs]
    for t in tensors:
        if t.name:
            found.setdefault(id(t), t.name)
    found.update({id(t): n for n, t in (names or {}).items()})
    return found


def outputs(root):
    """{id(fn): its first output Tensor} for the nodes of ``root``'s graph whose output is still reachable."""
    found = {}
    for t in [root] + [x for fn in nodes(root) for x in fn.inputs]:
        if t.creator is not None:
            found.setdefault(id(t.creator), t)
    return found


def input_state(fn, i):
    """What the ``i``-th input of ``fn`` received in the last recorded backward.

    ``("grad", norm)``; ``("cut", None)``: it wants a gradient and the node passed
    none; ``("const", None)``: it wants none; ``("unknown", None)``: not recorded.
    """
    x = fn.inputs[i]
    if not x.requires_grad:
        return "const", None
    norms = getattr(fn, "input_grad_norms", None)
    if norms is None:
        return ("cut", None) if i in SPECIAL.get(fn.name, ()) else ("unknown", None)
    return ("cut", None) if norms[i] is None else ("grad", norms[i])


def _leaf_label(x, names):
    name = names.get(id(x)) or x.name
    if name:
        return name
    kind = "param" if x.requires_grad else "const"
    return f"{kind}{tuple(x.shape)}"


def _norm_text(fn, i=0):
    if fn.grad_norms is None or fn.grad_norms[i] is None:
        return "-"
    return f"{fn.grad_norms[i]:.4e}"


def _edge_text(state, norm):
    return {"grad": f"{norm:.4e}" if norm is not None else "-", "cut": "cut", "const": "-",
            "unknown": "-"}[state]


def format_graph(root, names=None):
    """The backward graph of ``root`` as text, one line per node.

    ``names``: a mapping {name: Tensor} (e.g. ``dict(model.named_parameters())``)
    used to label tensors, beside their own ``.name``. The ``node`` column reads
    ``Conv2d -> z_e`` when the node's output is named; each input is shown as
    ``source: norm``, the norm of the gradient the node passed to it (``cut``: none
    passes, ``-``: it needs none or nothing was recorded).
    """
    ids = tensor_names(root, names)
    order = nodes(root)
    number = {id(fn): i for i, fn in enumerate(order)}
    outs = outputs(root)
    rows = [("#", "node", "output shape", "grad norm", "inputs: grad norm passed to each")]
    for i, fn in enumerate(order):
        shape, _ = fn.output_meta[0]
        out = outs.get(id(fn))
        label = fn.name + (f" -> {ids[id(out)]}" if out is not None and id(out) in ids else "")
        sources = []
        for k, x in enumerate(fn.inputs):
            source = f"#{number[id(x.creator)]}" if x.creator is not None else _leaf_label(x, ids)
            if x.creator is not None and id(x) in ids:
                source += f" {ids[id(x)]}"
            sources.append(f"{source}: {_edge_text(*input_state(fn, k))}")
        rows.append((str(i), label, str(tuple(shape)), _norm_text(fn), ", ".join(sources)))
    widths = [max(len(r[c]) for r in rows) for c in range(4)]
    return "\n".join("  ".join(r[c].ljust(widths[c]) for c in range(4)) + "  " + r[4] for r in rows)


def to_dot(root, names=None):
    """The backward graph of ``root`` as Graphviz DOT text.

    Edges point along the forward pass (input -> node); each is labelled with the
    gradient norm that flows back along it, and the ones that carry none (``cut``)
    are dashed red. StraightThrough, StopGradient and RotationTrick are filled.
    """
    ids = tensor_names(root, names)
    order = nodes(root)
    number = {id(fn): i for i, fn in enumerate(order)}
    outs = outputs(root)
    lines = ["digraph backward {", "  rankdir=BT;", '  node [fontname="Helvetica", fontsize=10];',
             '  edge [fontname="Helvetica", fontsize=8];']
    leaves = {}
    for i, fn in enumerate(order):
        shape, _ = fn.output_meta[0]
        out = outs.get(id(fn))
        label = fn.name + (f" -> {ids[id(out)]}" if out is not None and id(out) in ids else "")
        label += f"\\n{tuple(shape)}"
        if fn.grad_norms is not None:
            label += f"\\n|grad| {_norm_text(fn)}"
        style = f', style="filled,bold", fillcolor="{COLOURS[fn.name]}"' if fn.name in COLOURS else ""
        lines.append(f'  n{i} [shape=box, label="{label}"{style}];')
        for k, x in enumerate(fn.inputs):
            if x.creator is not None:
                source = f"n{number[id(x.creator)]}"
            else:
                if id(x) not in leaves:
                    leaves[id(x)] = f"leaf{len(leaves)}"
                    lines.append(f'  {leaves[id(x)]} [shape=ellipse, label="{_leaf_label(x, ids)}"];')
                source = leaves[id(x)]
            state, norm = input_state(fn, k)
            attrs = {"grad": f' [label="{norm:.2e}"]' if norm is not None else "",
                     "cut": ' [style=dashed, color="#d62728", fontcolor="#d62728", label="cut"]',
                     "const": ' [color="#adb5bd"]', "unknown": ""}[state]
            lines.append(f"  {source} -> n{i}{attrs};")
    lines.append("}")
    return "\n".join(lines)


def render(root, path, names=None, collapse=("Residual",), title=None):
    """Draw the backward graph of ``root`` to ``path`` (PNG or SVG, by its extension) with matplotlib.

    See ``minivq.graph_draw.render``; needs matplotlib (``pip install -e .[viz]``).
    """
    from .graph_draw import render as draw      # matplotlib is an optional extra: imported only here
    return draw(root, path, names=names, collapse=collapse, title=title)


def estimator_agreement(grad, z_e, z_q):
    """How the two estimators' gradients at z_e compare, for one gradient ``grad`` reaching z_q (raw arrays).

    The straight-through estimator hands ``grad`` to z_e unchanged; the rotation
    trick hands it rotated and scaled per latent (``F.rotation_trick``). Returns
    ``(cosine, norm_ratio)`` of the two (flattened over the batch): their cosine,
    and |rotation's| / |straight-through's|.
    """
    rotation = RotationTrick()
    rotation.forward(z_e, z_q)
    rotated = rotation.backward(grad)[0]
    st, rt = grad_norm(grad), grad_norm(rotated)
    dot = float(backend.to_numpy((grad.astype(np.float64) * rotated).sum()))
    if st == 0 or rt == 0:
        return (1.0 if st == rt else 0.0), (rt / st if st > 0 else 1.0)
    return dot / (st * rt), rt / st


def grad_norm(array):
    """The L2 norm of a raw gradient array, as a Python float."""
    xp = backend.get_array_module(array)
    return float(backend.to_numpy(xp.sqrt((array.astype(np.float64) * array).sum())))
