"""The import rules of DESIGN.md hold in the code: every import of minivq/ and kernels/, lazy ones included.

Each ``.py`` file is parsed with ``ast`` (nothing is imported); every ``import``
and ``from ... import`` anywhere in it (module level, inside functions, under
``try``) and every ``importlib.import_module("...")`` / ``__import__("...")``
with a literal name is collected, relative imports resolved to absolute module
names. ``kernels/`` is installed as ``minivq.kernels`` and named so here. The
layers, bottom up: backend -> autograd -> functional -> nn -> models -> the
training modules and cli; ``kernels/`` beside backend.
"""
import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
TREES = {"minivq": os.path.join(ROOT, "minivq"), "minivq.kernels": os.path.join(ROOT, "kernels")}

# The layers at or below models, plus the low-level helpers they may use. Every other module of minivq
# (train, loop, checkpoint, runlog, config, evaluation, prior, cli, distributed, plot, images, ...) and the
# package root itself (it re-exports everything) count as "training": above models.
LOW = {"backend", "autograd", "gradcheck", "functional", "nn", "models", "kernels", "io", "graph", "optim", "data"}
GPU_LIBRARIES = ("cupy", "cupyx", "numba")
PACKAGES = {"minivq", "minivq.functional", "minivq.nn", "minivq.models", "minivq.kernels"}


# ---------------------------------------------------------------- collecting imports
def module_files():
    """``{module name: (path, is_package)}`` for every .py file of minivq/ and kernels/."""
    found = {}
    for prefix, top in TREES.items():
        for folder, dirs, files in os.walk(top):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            rel = os.path.relpath(folder, top)
            parts = [] if rel == "." else rel.split(os.sep)
            for name in sorted(files):
                if not name.endswith(".py"):
                    continue
                stem = name[:-3]
                is_package = stem == "__init__"
                module = ".".join([prefix] + parts + ([] if is_package else [stem]))
                found[module] = (os.path.join(folder, name), is_package)
    return found


def _resolve(module, is_package, level, target):
    """The absolute name of ``from <level dots><target> import ...`` written in ``module``."""
    if level == 0:
        return target
    package = module.split(".") if is_package else module.split(".")[:-1]
    base = package[:len(package) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def imports_of(source, module, is_package=False, known=()):
    """``[(line, imported module)]`` for every import in ``source`` (text or an ``ast`` node) of ``module``.

    ``from X import a``: ``X.a`` when that is a module in ``known`` (a submodule), else ``X``.
    """
    found = []
    for node in ast.walk(ast.parse(source) if isinstance(source, str) else source):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, is_package, node.level, node.module)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((node.lineno, sub if sub in known else base))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in ("import_module", "__import__"):
                found.append((node.lineno, node.args[0].value))
    return found


# ---------------------------------------------------------------- the rules
def _within(name, package):
    return name == package or name.startswith(package + ".")


def _is_minivq(name):
    return _within(name, "minivq")


def _is_training(name):
    """A module of minivq above models: the package root, and every top-level module not in LOW."""
    if not _is_minivq(name):
        return False
    parts = name.split(".")
    return len(parts) == 1 or parts[1] not in LOW


def violations(module, imports):
    """``[(line, imported, rule)]`` for the imports of ``module`` that DESIGN.md forbids."""
    bad = []
    for line, name in imports:
        rules = []
        if name.split(".")[0] in GPU_LIBRARIES and not (
                module == "minivq.backend" or _within(module, "minivq.kernels")):
            rules.append("only backend.py and kernels/ import cupy, cupyx or numba")
        if module == "minivq.backend" and _is_minivq(name):
            rules.append("backend imports nothing of minivq")
        if module == "minivq.autograd" and _is_minivq(name) and name != "minivq.backend":
            rules.append("autograd imports only backend")
        if _within(module, "minivq.functional") and (
                _within(name, "minivq.nn") or _within(name, "minivq.models") or _within(name, "minivq.graph")
                or _is_training(name)):
            rules.append("functional imports nothing of nn, models, graph or training")
        if _within(module, "minivq.nn") and (_within(name, "minivq.models") or _is_training(name)):
            rules.append("nn imports nothing of models, training or distributed")
        if _within(module, "minivq.models") and _is_training(name):
            rules.append("models import nothing of training or cli")
        if _within(module, "minivq.kernels") and _is_minivq(name) and name != "minivq.backend" \
                and not _within(name, "minivq.kernels"):
            rules.append("kernels/ imports nothing of minivq but backend")
        bad += [(line, name, rule) for rule in rules]
    return bad


def walk():
    """``{module: (path, [(line, imported)])}`` over the whole tree."""
    files = module_files()
    result = {}
    for module, (path, is_package) in files.items():
        with open(path, encoding="utf-8") as f:
            source = f.read()
        result[module] = (path, imports_of(source, module, is_package, files))
    return result


# ---------------------------------------------------------------- tests
def test_the_import_rules_hold():
    lines = []
    for module, (path, imports) in sorted(walk().items()):
        for line, name, rule in sorted(violations(module, imports)):
            lines.append(f"{os.path.relpath(path, ROOT)}:{line}: imports {name} ({rule})")
    assert not lines, "import rules of DESIGN.md broken:\n" + "\n".join(lines)


def test_the_walk_sees_the_whole_tree_lazy_imports_included():
    tree = walk()
    assert len(tree) >= 25, sorted(tree)
    assert sum(len(imports) for _, imports in tree.values()) >= 100
    for must in ("minivq.backend", "minivq.autograd", "minivq.functional.basic", "minivq.nn.quantizers",
                 "minivq.models.vqvae", "minivq.kernels", "minivq.kernels.nearest_numba"):
        assert must in tree, must
    imported = {m: {name for _, name in imports} for m, (_, imports) in tree.items()}
    assert "minivq.backend" in imported["minivq.kernels"]          # `from minivq import backend`, absolute
    assert "minivq.autograd" in imported["minivq.functional.basic"]  # `from ..autograd import`, relative
    assert "minivq.kernels" in imported["minivq.functional.quantize"]
    assert "numba" in imported["minivq.kernels.nearest_numba"]
    assert "cupy" in imported["minivq.backend"]                     # imported inside a function only


def test_kernels_are_imported_at_the_top_of_a_module_not_lazily():
    lazy = []
    for module, (path, is_package) in sorted(module_files().items()):
        if _within(module, "minivq.kernels"):
            continue
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lazy += [f"{os.path.relpath(path, ROOT)}:{line}: {fn.name}() imports {name}"
                         for line, name in imports_of(fn, module, is_package) if _within(name, "minivq.kernels")]
    assert not lazy, "import minivq.kernels at the top of the module:\n" + "\n".join(sorted(set(lazy)))


@pytest.mark.parametrize("module, source", [
    ("minivq.nn.quantizers", "import cupy"),
    ("minivq.distributed", "def f():\n    from cupy.cuda import nccl\n"),
    ("minivq.functional.conv", "import numba.core"),
    ("minivq.autograd", "def backward():\n    from .graph import grad_norm\n"),
    ("minivq.autograd", "from .functional.basic import cast"),
    ("minivq.functional.basic", "from ..nn import Module"),
    ("minivq.functional", "from .. import graph"),
    ("minivq.functional.losses", "import minivq as mv"),
    ("minivq.nn.quantizers", "from ..distributed import SingleProcess"),
    ("minivq.nn", "from ..models import VQVAE"),
    ("minivq.models.vqvae", "try:\n    from ..train import train_vqvae\nexcept ImportError:\n    pass\n"),
    ("minivq.models.pixelcnn", "from minivq.cli import main"),
    ("minivq.models.pixelcnn", "import importlib\nimportlib.import_module('minivq.loop')"),
    ("minivq.kernels.nearest_numpy", "from minivq.autograd import Tensor"),
    ("minivq.kernels", "from minivq import functional"),
    ("minivq.backend", "from .autograd import Tensor"),
])
def test_the_checker_flags_a_bad_import(module, source):
    known = {"minivq.graph", "minivq.functional", "minivq.distributed"}
    found = imports_of(source, module, module in PACKAGES, known)
    assert found, source
    assert violations(module, found), f"{module}: {source!r} was not flagged (imports seen: {found})"


@pytest.mark.parametrize("module, source", [
    ("minivq.autograd", "from . import backend\nimport numpy as np"),
    ("minivq.functional.quantize", "from ..kernels import nearest_code\nfrom .basic import Embedding"),
    ("minivq.nn.conv", "from ..functional.conv import conv2d\nfrom .. import backend"),
    ("minivq.models.vqvae", "from ..nn import Conv2d\nfrom .. import functional as F"),
    ("minivq.kernels", "from minivq import backend\nfrom . import nearest_numba"),
    ("minivq.kernels.nearest_numba", "from numba import njit"),
    ("minivq.backend", "import cupy\nimport cupyx"),
    ("minivq.train", "import cupy_like_but_not_cupy\nfrom .models import VQVAE\nfrom . import distributed"),
])
def test_the_checker_passes_a_good_import(module, source):
    known = {"minivq.backend", "minivq.functional", "minivq.distributed", "minivq.kernels.nearest_numba"}
    found = imports_of(source, module, module in PACKAGES, known)
    assert found and violations(module, found) == [], found
