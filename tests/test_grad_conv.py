"""Gradients of conv2d and conv_transpose2d against central differences (mv.gradcheck, float64)."""
import numpy as np
import pytest

import minivq as mv
from minivq.functional.conv import conv2d, conv_transpose2d, workspace_limit
from minivq.functional.conv_reference import conv2d_reference

CONFIGS_PER_OP = 60


def make_configs(seed, transposed, count=CONFIGS_PER_OP):
    """Random small convolutions: stride 1-3, padding 0-2, kernel 1x1-5x5 (non-square too),
    mostly odd image sizes, batch 1-3, with and without bias, some non-square strides/paddings."""
    gen = np.random.default_rng(seed)
    configs = []
    while len(configs) < count:
        kh, kw = (int(v) for v in gen.integers(1, 6, 2))
        if gen.random() < 0.4:
            kw = kh
        sh, sw = (int(v) for v in gen.integers(1, 4, 2))
        ph, pw = (int(v) for v in gen.integers(0, 3, 2))
        if gen.random() < 0.6:
            sw, pw = sh, ph
        odd = [3, 5, 7, 9] if not transposed else [1, 3, 5]
        h, w = int(gen.choice(odd)), int(gen.choice(odd))
        if gen.random() < 0.15:
            h += 1                                   # an even size now and then
        oph, opw = (int(gen.integers(0, sh)), int(gen.integers(0, sw))) if transposed else (0, 0)
        if transposed:
            out_h, out_w = (h - 1) * sh - 2 * ph + kh + oph, (w - 1) * sw - 2 * pw + kw + opw
            if out_h <= 0 or out_w <= 0:
                continue
        elif h + 2 * ph < kh or w + 2 * pw < kw:
            continue
        configs.append(dict(n=int(gen.integers(1, 4)), c_in=int(gen.integers(1, 3)), c_out=int(gen.integers(1, 4)),
                            h=h, w=w, kernel=(kh, kw), stride=(sh, sw), padding=(ph, pw),
                            output_padding=(oph, opw), bias=bool(gen.random() < 0.6),
                            x_grad=bool(gen.random() < 0.85)))
    return configs


def inputs_for(cfg, transposed, gen):
    x = mv.tensor(gen.standard_normal((cfg["n"], cfg["c_in"], cfg["h"], cfg["w"])), requires_grad=cfg["x_grad"])
    wshape = ((cfg["c_in"], cfg["c_out"]) if transposed else (cfg["c_out"], cfg["c_in"])) + cfg["kernel"]
    w = mv.tensor(gen.standard_normal(wshape), requires_grad=True)
    b = mv.tensor(gen.standard_normal(cfg["c_out"]), requires_grad=True) if cfg["bias"] else None
    return x, w, b


def op_for(cfg, transposed):
    s, p, op = cfg["stride"], cfg["padding"], cfg["output_padding"]
    if transposed:
        return lambda x, w, b=None: conv_transpose2d(x, w, b, s, p, op)
    return lambda x, w, b=None: conv2d(x, w, b, s, p)


@pytest.mark.parametrize("transposed", [False, True], ids=["conv2d", "conv_transpose2d"])
def test_configs_cover_the_space(transposed):
    configs = make_configs(100 + transposed, transposed)
    assert len(configs) >= 50
    assert {c["stride"][0] for c in configs} == {1, 2, 3}
    assert {c["padding"][0] for c in configs} == {0, 1, 2}
    kernels = {c["kernel"] for c in configs}
    assert (1, 1) in kernels and any(k == (5, 5) or 5 in k for k in kernels)
    assert any(kh != kw for kh, kw in kernels)
    assert any(c["stride"][0] != c["stride"][1] for c in configs)
    assert any(c["padding"][0] != c["padding"][1] for c in configs)
    assert {c["n"] for c in configs} == {1, 2, 3}
    assert any(c["bias"] for c in configs) and not all(c["bias"] for c in configs)
    assert any(c["h"] % 2 for c in configs) and any(not c["x_grad"] for c in configs)
    if transposed:
        assert any(c["output_padding"] != (0, 0) for c in configs)


ROUTES = [  # (c_in, c_out, h, w, kernel, padding, the way functional/conv.py computes it)
    (3, 1, 5, 6, (3, 3), (1, 1), "mirror"),        # narrow output: runs as the transposed conv of its mirror
    (4, 2, 6, 5, (2, 3), (1, 1), "mirror"),
    (2, 2, 5, 5, (3, 3), (1, 1), "flipped dx"),    # the input gradient reads the windows of gy
    (1, 3, 5, 4, (3, 2), (1, 0), "col2im dx"),     # wide output: the input gradient adds back over windows
]


@pytest.mark.parametrize("c_in, c_out, h, w, kernel, padding, route", ROUTES)
@pytest.mark.parametrize("chunked", [False, True], ids=["whole batch", "one image at a time"])
def test_gradcheck_each_route_of_a_stride_1_conv(c_in, c_out, h, w, kernel, padding, route, chunked):
    from minivq.functional import conv as conv_module
    g = conv_module._Geometry(3, c_in, h, w, c_out, kernel, (1, 1), padding)
    taken = ("mirror" if conv_module._narrow_grid_geometry(g) is not None
             else "flipped dx" if conv_module._flipped_geometry(g) is not None else "col2im dx")
    assert taken == route
    gen = np.random.default_rng(c_in * 10 + c_out)
    x = mv.tensor(gen.standard_normal((3, c_in, h, w)), requires_grad=True)
    wt = mv.tensor(gen.standard_normal((c_out, c_in) + kernel), requires_grad=True)
    b = mv.tensor(gen.standard_normal(c_out), requires_grad=True)
    with workspace_limit(1 if chunked else 2 ** 28):
        y = conv2d(x, wt, b, 1, padding)
        np.testing.assert_allclose(y.data, conv2d_reference(x.data, wt.data, b.data, (1, 1), padding),
                                   rtol=1e-12, atol=1e-12)
        assert mv.gradcheck(lambda x, w, b: conv2d(x, w, b, 1, padding), [x, wt, b])


@pytest.mark.parametrize("transposed", [False, True], ids=["conv2d", "conv_transpose2d"])
def test_gradcheck_random_configs(transposed):
    gen = np.random.default_rng(200 + transposed)
    for cfg in make_configs(100 + transposed, transposed):
        x, w, b = inputs_for(cfg, transposed, gen)
        args = [x, w] + ([b] if b is not None else [])
        try:
            mv.gradcheck(op_for(cfg, transposed), args)
        except mv.GradcheckError as exc:
            raise AssertionError(f"{cfg}: {exc}") from None
        if not cfg["x_grad"]:
            assert x.grad is None


@pytest.mark.parametrize("transposed", [False, True], ids=["conv2d", "conv_transpose2d"])
def test_gradcheck_chunked(transposed):
    """The chunk-by-chunk paths (one image per chunk) have the right gradients too."""
    gen = np.random.default_rng(300 + transposed)
    with workspace_limit(1):
        for cfg in make_configs(400 + transposed, transposed, count=8):
            cfg["n"] = 3
            x, w, b = inputs_for(cfg, transposed, gen)
            mv.gradcheck(op_for(cfg, transposed), [x, w] + ([b] if b is not None else []))


LARGER = [  # (c_in, c_out, size, kernel, stride, padding, output_padding)
    (6, 8, 13, (3, 3), (1, 1), (1, 1), (0, 0)),
    (8, 5, 16, (4, 4), (2, 2), (1, 1), (1, 1)),
    (5, 7, 11, (5, 3), (2, 3), (2, 1), (1, 2)),
    (16, 4, 9, (1, 1), (1, 1), (0, 0), (0, 0)),
]


@pytest.mark.parametrize("transposed", [False, True], ids=["conv2d", "conv_transpose2d"])
@pytest.mark.parametrize("case", LARGER, ids=lambda c: f"{c[0]}-{c[1]}x{c[2]}k{c[3][0]}{c[3][1]}s{c[4][0]}{c[4][1]}")
def test_gradcheck_larger_along_directions(transposed, case):
    c_in, c_out, size, kernel, stride, padding, output_padding = case
    cfg = dict(n=3, c_in=c_in, c_out=c_out, h=size, w=size + 2, kernel=kernel, stride=stride, padding=padding,
               output_padding=output_padding if transposed else (0, 0), bias=True, x_grad=True)
    x, w, b = inputs_for(cfg, transposed, np.random.default_rng(500))
    mv.gradcheck(op_for(cfg, transposed), [x, w, b], directions=12)


@pytest.mark.slow
@pytest.mark.parametrize("transposed", [False, True], ids=["conv2d", "conv_transpose2d"])
def test_gradcheck_many_more_configs(transposed):
    gen = np.random.default_rng(600 + transposed)
    for cfg in make_configs(700 + transposed, transposed, count=300):
        x, w, b = inputs_for(cfg, transposed, gen)
        mv.gradcheck(op_for(cfg, transposed), [x, w] + ([b] if b is not None else []))
