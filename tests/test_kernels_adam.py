"""Adam's update as one compiled pass on the CPU (minivq.kernels.adam_numba) against the array ops of
optim.Adam, its reference, to the bit: float32 and float64, with and without weight decay, over several
steps, on random shapes, gradients in other layouts; and what it leaves to the reference."""
import numpy as np
import pytest

import minivq as mv
from minivq import kernels, optim

pytest.importorskip("numba")
adam_numba = pytest.importorskip("minivq.kernels.adam_numba")


def same_bits(a, b):
    bits = f"u{a.itemsize}"
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a.view(bits), b.view(bits))




@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("settings", [{}, dict(lr=3e-2, betas=(0.5, 0.9), eps=1e-3, weight_decay=0.1)],
                         ids=["defaults", "other-settings"])
@pytest.mark.parametrize("seed", range(3))
def test_the_compiled_step_equals_the_array_ops_to_the_bit(monkeypatch, dtype, settings, seed):
    gen = np.random.default_rng(seed)
    shapes = [tuple(int(v) for v in gen.integers(1, 6, int(gen.integers(0, 4)))) for _ in range(4)]
    start = [gen.standard_normal(s).astype(dtype) for s in shapes]
    fused = [mv.tensor(a.copy(), requires_grad=True) for a in start]
    plain = [mv.tensor(a.copy(), requires_grad=True) for a in start]
    opt_fused, opt_plain = optim.Adam(fused, **settings), optim.Adam(plain, **settings)
    for step in range(4):
        grads = [gen.standard_normal(s).astype(dtype) * 10.0 ** int(gen.integers(-3, 3)) for s in shapes]
        for p, g in zip(fused, grads):      # some gradients arrive in another layout (a transposed view)
            p.grad = np.ascontiguousarray(g.T).T if g.ndim > 1 and step % 2 else g.copy()
        for p, g in zip(plain, grads):
            p.grad = g.copy()
        opt_fused.step()
        with monkeypatch.context() as m:    # the reference: no kernel
            m.setattr(kernels, "adam_step", lambda *args: False)
            opt_plain.step()
        for i, (a, b) in enumerate(zip(fused, plain)):
            assert same_bits(a.data, b.data), (step, i)
            assert same_bits(opt_fused.state[i]["exp_avg"], opt_plain.state[i]["exp_avg"])
            assert same_bits(opt_fused.state[i]["exp_avg_sq"], opt_plain.state[i]["exp_avg_sq"])


def test_the_kernel_is_what_runs_on_the_cpu():
    p = mv.tensor(np.ones((3, 2), np.float32), requires_grad=True)
    p.grad = np.full((3, 2), 0.5, np.float32)
    state = {"exp_avg": np.zeros((3, 2), np.float32), "exp_avg_sq": np.zeros((3, 2), np.float32)}
    assert kernels.adam_step(p.data, p.grad, state["exp_avg"], state["exp_avg_sq"], 1e-3, (0.9, 0.999), 1e-8,
                             0.0, 1)
    assert np.all(p.data < 1) and np.all(state["exp_avg"] > 0)      # updated in place


@pytest.mark.parametrize("case", ["float16", "fortran-param", "other-grad-dtype", "other-shape"])
def test_what_the_kernel_leaves_to_the_reference(case):
    p = np.ones((4, 3), np.float32)
    g, m, v = np.ones_like(p), np.zeros_like(p), np.zeros_like(p)
    if case == "float16":
        p, g, m, v = (a.astype(np.float16) for a in (p, g, m, v))
    elif case == "fortran-param":
        p, m, v = (np.asfortranarray(a) for a in (p, m, v))
    elif case == "other-grad-dtype":
        g = g.astype(np.float64)
    else:
        g = np.ones((3, 4), np.float32)
    before = p.copy()
    assert not adam_numba.adam_numba(p, g, m, v, 1e-3, (0.9, 0.999), 1e-8, 0.0, 1)
    assert np.array_equal(p, before) and not m.any()        # untouched: the reference does the step


def test_without_numba_the_array_ops_step(monkeypatch):
    monkeypatch.setitem(kernels._loaded, "numba-adam", "ImportError: no numba here")
    p = np.ones(3, np.float32)
    assert not kernels.adam_step(p, np.ones(3, np.float32), np.zeros(3, np.float32), np.zeros(3, np.float32),
                                 1e-3, (0.9, 0.999), 1e-8, 0.0, 1)
    assert np.array_equal(p, np.ones(3, np.float32))
