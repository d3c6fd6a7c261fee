"""docs/estimators.md: its snippets print what the page shows, the page is what its script makes, and the
figure's arrows obey the two identities the page states."""
import contextlib
import importlib.util
import io
import os

import numpy as np
import pytest

from test_docs import snippets

DOCS = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "docs")


def script():
    spec = importlib.util.spec_from_file_location("make_estimators", os.path.join(DOCS, "make_estimators.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def made():
    module = script()
    outputs, namespace = module.run()
    return module, outputs, namespace


def test_the_page_runs_and_prints_what_it_says():
    with open(os.path.join(DOCS, "estimators.md")) as f:
        pairs = snippets(f.read())
    assert len(pairs) == 5
    namespace = {}
    for number, (code, expected) in enumerate(pairs, 1):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(code, f"estimators.md snippet {number}", "exec"), namespace)
        got = [line.rstrip() for line in out.getvalue().strip().splitlines()]
        want = [line.rstrip() for line in expected.strip().splitlines()]
        assert got == want, f"snippet {number} printed:\n" + "\n".join(got)
    printed = "".join(p[1] for p in pairs)
    assert "gradcheck failed for input 0" in printed and "24 of 24 elements off" in printed   # on purpose
    with open(os.path.join(DOCS, "estimators.md")) as f:
        assert "All 24 elements are off" in f.read()       # the text says what the output shows


def test_the_page_is_what_the_script_makes(made):
    module, outputs, _ = made
    with open(module.PAGE) as f:
        assert f.read() == module.markdown(outputs), "docs/estimators.md is stale: run python docs/make_estimators.py"
    assert "![the two estimators in two dimensions](estimators.png)" in module.markdown(outputs)
    assert os.path.exists(module.FIGURE)


def test_the_figures_arrows_obey_the_identities(made):
    module, _, ns = made
    panels = module.arrows(ns)
    codes, z_e, k, target = ns["codes"], ns["z_e"], ns["k"], ns["target"]
    q = codes[k]
    g = q - target                                       # the gradient at z_q of sum |z_q - t|^2 / 2
    (st, _), = panels["straight-through"]
    np.testing.assert_array_equal(-st, g)                # straight-through: the gradient at z_q, unchanged
    (rt, _), = panels["rotation trick"]
    scale = np.linalg.norm(q, axis=1) / np.linalg.norm(z_e, axis=1)
    np.testing.assert_allclose(np.linalg.norm(rt, axis=1), scale * np.linalg.norm(g, axis=1), rtol=1e-12)
    cos = lambda a, b: (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)   # noqa: E731
    np.testing.assert_allclose(cos(-rt, z_e), cos(g, q), atol=1e-12)            # the angle to the vector, kept
    total, commit = panels["straight-through + commitment (beta = 0.25)"]
    np.testing.assert_allclose(-commit[0], 2 * 0.25 * (z_e - q), atol=1e-12)
    np.testing.assert_allclose(total[0], st + commit[0], atol=1e-12)
    assert len(set(k.tolist())) == len(codes)           # every cell has a point


def test_the_figure_is_drawn(made, tmp_path):
    pytest.importorskip("matplotlib")
    module, _, ns = made
    module.figure(ns, str(tmp_path / "estimators.png"))
    assert (tmp_path / "estimators.png").read_bytes().startswith(b"\x89PNG")
