"""The README's engine snippet runs and prints what the README shows (numbers to 4 significant digits)."""
import contextlib
import io
import os
import re

README = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "README.md")
NUMBER = re.compile(r"-?\d+\.\d+e[+-]\d+")


def engine_section():
    with open(README) as f:
        text = f.read()
    start = text.index("## The engine")
    code, shown = re.findall(r"```(?:python|text)\n(.*?)```", text[start:], flags=re.S)[:2]
    return code, shown


def same_up_to_rounding(got, want):
    """Equal text; numbers in e-notation equal to the last digit shown (other BLAS libraries round differently)."""
    if NUMBER.sub("#", got) != NUMBER.sub("#", want):
        return False
    return all(abs(float(a) - float(b)) <= 2e-4 * abs(float(b)) + 1e-12
               for a, b in zip(NUMBER.findall(got), NUMBER.findall(want)))


def test_the_engine_snippet_prints_what_the_readme_shows():
    code, shown = engine_section()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README engine snippet", "exec"), {})
    got = [line.rstrip() for line in out.getvalue().strip().splitlines()]
    want = [line.rstrip() for line in shown.strip().splitlines()]
    assert len(got) == len(want), "\n".join(got)
    for g, w in zip(got, want):
        assert same_up_to_rounding(g, w), f"printed:\n{g}\nthe README shows:\n{w}"
    text = "\n".join(got)
    assert "param(" not in text                    # parameters by name
    rows = [re.split(r"\s{2,}", line) for line in got[1:]]
    assert all(NUMBER.fullmatch(row[3]) for row in rows)     # every node's gradient norm, none blank
    assert text.count(": cut") == 3                # the two stop-gradients and the straight-through's z_q


def test_the_comparison_tolerates_rounding_only():
    assert same_up_to_rounding("a 1.0000e+00 b", "a 1.0001e+00 b")
    assert not same_up_to_rounding("a 1.0000e+00 b", "a 1.0100e+00 b")
    assert not same_up_to_rounding("a 1.0000e+00 b", "a 1.0000e+00 c")
