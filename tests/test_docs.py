"""Run the snippets of docs/gradients.md in order and hold their output to what the page shows."""
import contextlib
import io
import os
import re


DOC = os.path.join(os.path.dirname(__file__), os.pardir, "docs", "gradients.md")


def snippets(text):
    """(code, expected output or None) for each ```python block, the ```text block after it."""
    blocks = re.findall(r"```(python|text)\n(.*?)```", text, flags=re.S)
    pairs = []
    for i, (kind, body) in enumerate(blocks):
        if kind == "python":
            nxt = blocks[i + 1] if i + 1 < len(blocks) else None
            pairs.append((body, nxt[1] if nxt and nxt[0] == "text" else None))
    return pairs


def test_gradients_walkthrough_runs_and_prints_what_it_says():
    with open(DOC) as f:
        pairs = snippets(f.read())
    assert len(pairs) >= 6
    namespace = {}
    for number, (code, expected) in enumerate(pairs, 1):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(code, f"gradients.md snippet {number}", "exec"), namespace)
        if expected is not None:
            got = [line.rstrip() for line in out.getvalue().strip().splitlines()]
            want = [line.rstrip() for line in expected.strip().splitlines()]
            assert got == want, f"snippet {number} printed:\n" + "\n".join(got)
