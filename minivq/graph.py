"""Looking at a backward graph: as text, one line per node, or as Graphviz DOT.

    with mv.graph.record_grad_norms():
        loss.backward()
    print(mv.graph.format_graph(loss, names=dict(model.named_parameters())))

Each node line gives its number, its name (the Function's class: ``Conv2d``,
``StraightThrough``, ``StopGradient`` ...), its output shape, the norm of the
gradient that reached its output in the last recorded backward, and where
its inputs come from (other node numbers, or named leaves). ``to_dot`` writes
the same graph as DOT text (render it with ``dot -Tpng`` if Graphviz is
installed; nothing here needs it).
"""
import contextlib

import numpy as np

from . import autograd, backend


@contextlib.contextmanager
def record_grad_norms():
    """Within this block, every backward notes the norm of each node's output gradient (``fn.grad_norms``).

    It installs autograd's backward hook for the block; a hook already installed keeps being called.
    """
    outer = autograd.get_backward_hook()

    def note_norms(fn, grads_out):
        fn.grad_norms = [None if g is None else grad_norm(g) for g in grads_out]
        if outer is not None:
            outer(fn, grads_out)

    with autograd.backward_hook(note_norms):
        yield


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


def format_graph(root, names=None):
    """The backward graph of ``root`` as text, one line per node.

    ``names``: a mapping {name: Tensor} (e.g. ``dict(model.named_parameters())``)
    used to label leaves.
    """
    ids = {id(t): n for n, t in (names or {}).items()}
    order = nodes(root)
    number = {id(fn): i for i, fn in enumerate(order)}
    rows = [("#", "node", "output shape", "grad norm", "inputs")]
    for i, fn in enumerate(order):
        shape, _ = fn.output_meta[0]
        sources = []
        for x in fn.inputs:
            if x.creator is not None:
                sources.append(f"#{number[id(x.creator)]}")
            else:
                sources.append(_leaf_label(x, ids))
        rows.append((str(i), fn.name, str(tuple(shape)), _norm_text(fn), ", ".join(sources)))
    widths = [max(len(r[c]) for r in rows) for c in range(4)]
    return "\n".join("  ".join(r[c].ljust(widths[c]) for c in range(4)) + "  " + r[4] for r in rows)


def to_dot(root, names=None):
    """The backward graph of ``root`` as Graphviz DOT text."""
    ids = {id(t): n for n, t in (names or {}).items()}
    order = nodes(root)
    number = {id(fn): i for i, fn in enumerate(order)}
    lines = ["digraph backward {", "  rankdir=BT;", '  node [fontname="Helvetica", fontsize=10];']
    leaves = {}
    for i, fn in enumerate(order):
        shape, _ = fn.output_meta[0]
        label = f"{fn.name}\\n{tuple(shape)}"
        if fn.grad_norms is not None:
            label += f"\\n|grad| {_norm_text(fn)}"
        style = ', style=filled, fillcolor="#ffe0b0"' if fn.name in ("StraightThrough", "StopGradient") else ""
        lines.append(f'  n{i} [shape=box, label="{label}"{style}];')
        for x in fn.inputs:
            if x.creator is not None:
                lines.append(f"  n{number[id(x.creator)]} -> n{i};")
            else:
                if id(x) not in leaves:
                    leaves[id(x)] = f"leaf{len(leaves)}"
                    lines.append(f'  {leaves[id(x)]} [shape=ellipse, label="{_leaf_label(x, ids)}"];')
                lines.append(f"  {leaves[id(x)]} -> n{i};")
    lines.append("}")
    return "\n".join(lines)


def grad_norm(array):
    """The L2 norm of a raw gradient array, as a Python float."""
    xp = backend.get_array_module(array)
    return float(backend.to_numpy(xp.sqrt((array.astype(np.float64) * array).sum())))
