"""Optimisers against hand-computed references (and PyTorch where installed)."""
import math

import numpy as np
import pytest

import minivq as mv
from minivq import optim


def adam_reference(p, grads, lr, b1, b2, eps):
    """Adam written out from the paper with PyTorch's placement of eps."""
    p = p.copy()
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat = m / (1 - b1 ** t)
        denom = np.sqrt(v) / math.sqrt(1 - b2 ** t) + eps
        p = p - lr * m_hat / denom
    return p


def run(opt_cls, p0, grads, **kw):
    p = mv.tensor(p0.copy(), requires_grad=True)
    opt = opt_cls([p], **kw)
    for g in grads:
        p.grad = g.copy()
        opt.step()
    return p.data


def test_adam_matches_hand_computed_reference():
    rng = np.random.default_rng(0)
    p0 = rng.standard_normal(7)
    grads = [rng.standard_normal(7) * 10 ** rng.uniform(-4, 1) for _ in range(25)]
    ours = run(optim.Adam, p0, grads, lr=0.01, betas=(0.8, 0.99), eps=1e-6)
    np.testing.assert_allclose(ours, adam_reference(p0, grads, 0.01, 0.8, 0.99, 1e-6), rtol=1e-12, atol=1e-14)


def test_adam_first_step_moves_by_lr():
    # after one step m_hat = g and sqrt(v_hat) = |g|: every coordinate moves by lr (up to eps)
    ours = run(optim.Adam, np.zeros(3), [np.array([3.0, -0.5, 100.0])], lr=0.1)
    np.testing.assert_allclose(ours, [-0.1, 0.1, -0.1], rtol=1e-6)


def test_sgd_momentum_reference():
    p0 = np.array([1.0, -2.0])
    grads = [np.array([0.5, 1.0]), np.array([-1.0, 2.0]), np.array([0.25, 0.0])]
    lr, mu = 0.1, 0.9
    p, buf = p0.copy(), None
    for g in grads:
        buf = g.copy() if buf is None else mu * buf + g
        p = p - lr * buf
    np.testing.assert_allclose(run(optim.SGD, p0, grads, lr=lr, momentum=mu), p, rtol=1e-14)
    np.testing.assert_allclose(run(optim.SGD, p0, grads, lr=lr), p0 - lr * sum(grads), rtol=1e-14)


def test_against_torch_when_installed():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    p0 = rng.standard_normal((4, 3))
    grads = [rng.standard_normal((4, 3)) for _ in range(10)]
    for ours_cls, torch_cls, kw in [(optim.Adam, torch.optim.Adam, dict(lr=3e-3, weight_decay=0.01)),
                                    (optim.SGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True))]:
        tp = torch.tensor(p0.copy(), requires_grad=True)
        topt = torch_cls([tp], **kw)
        for g in grads:
            tp.grad = torch.tensor(g)
            topt.step()
        np.testing.assert_allclose(run(ours_cls, p0, grads, **kw), tp.detach().numpy(), rtol=1e-12, atol=1e-14)


def test_state_dict_round_trip_resumes_identically():
    rng = np.random.default_rng(2)
    p0 = rng.standard_normal(5)
    grads = [rng.standard_normal(5) for _ in range(6)]
    full = run(optim.Adam, p0, grads, lr=0.01)
    p = mv.tensor(p0.copy(), requires_grad=True)
    opt = optim.Adam([p], lr=0.01)
    for g in grads[:3]:
        p.grad = g.copy()
        opt.step()
    state = {k: np.asarray(v) for k, v in opt.state_dict().items()}
    p2 = mv.tensor(p.data.copy(), requires_grad=True)
    opt2 = optim.Adam([p2], lr=0.01)
    opt2.load_state_dict(state)
    for g in grads[3:]:
        p2.grad = g.copy()
        opt2.step()
    np.testing.assert_array_equal(p2.data, full)


def test_bad_arguments():
    p = mv.tensor(np.zeros(2), requires_grad=True)
    with pytest.raises(ValueError, match="empty"):
        optim.SGD([], lr=0.1)
    with pytest.raises(ValueError, match="learning rate"):
        optim.Adam([p], lr=-1)
    with pytest.raises(ValueError, match="betas"):
        optim.Adam([p], betas=(1.0, 0.9))
    with pytest.raises(TypeError, match="requires grad"):
        optim.SGD([mv.tensor(np.zeros(2))], lr=0.1)
    opt = optim.Adam([p])
    with pytest.raises(ValueError, match="does not fit"):
        opt.load_state_dict({"3.exp_avg": np.zeros(2)})


def test_annealed_lr_holds_the_peak_then_falls_along_a_half_cosine_to_zero():
    peak = 1e-3
    rates = [optim.annealed_lr(peak, t, 8, 0.25) for t in range(1, 11)]
    # a plan of 8 steps, its last quarter (2 steps) annealed: peak to step 6, then (1 + cos(pi s / 2)) / 2
    assert rates[:6] == [peak] * 6
    assert rates[6] == pytest.approx(peak / 2, rel=1e-12) and rates[7] == pytest.approx(0.0, abs=1e-18)
    assert rates[8:] == [rates[7]] * 2                          # past the plan's end it stays at 0
    assert [optim.annealed_lr(peak, t, 8, 0.0) for t in (1, 8, 20)] == [peak] * 3      # no anneal
    whole = [optim.annealed_lr(peak, t, 4, 1.0) for t in range(1, 5)]        # the whole plan on the cosine
    assert whole == pytest.approx([peak * (1 + math.cos(math.pi * t / 4)) / 2 for t in range(1, 5)], rel=1e-12)
    rng = np.random.default_rng(5)
    for _ in range(50):                        # never above the peak nor below 0, and never rising
        plan, frac = int(rng.integers(1, 300)), float(rng.uniform(0, 1))
        seq = [optim.annealed_lr(peak, t, plan, frac) for t in range(1, plan + 3)]
        assert all(0 <= r <= peak for r in seq) and all(a >= b for a, b in zip(seq, seq[1:]))
