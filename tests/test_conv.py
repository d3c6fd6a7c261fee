"""conv2d / conv_transpose2d: the loop references (minivq/functional/conv_reference.py) against hand-computed
examples and PyTorch; the fast ops' forward against those references, everything against PyTorch where installed,
argument errors, batch chunking under a workspace limit, the nn layers, and CuPy against NumPy."""
import contextlib
import functools
import math

import numpy as np
import pytest

import minivq as mv
from minivq import backend, kernels
from minivq.functional import conv as conv_module
from minivq.functional.conv import conv2d, conv_transpose2d, workspace_limit, get_workspace_limit
from minivq.functional.conv_reference import conv2d_reference, conv_transpose2d_reference
from minivq.kernels import col2im as _col2im_kernel, im2col as _im2col_kernel
from minivq.nn.conv import Conv2d, ConvTranspose2d

_KERNELS = {"im2col": _im2col_kernel, "col2im": _col2im_kernel}      # unpatched, for the window-copy test


def random_config(gen, transposed):
    """A random small convolution: stride 1-3, padding 0-2, kernel 1x1-5x5, odd and even images."""
    kh, kw = (int(v) for v in gen.integers(1, 6, 2))
    sh, sw = (int(v) for v in gen.integers(1, 4, 2))
    ph, pw = (int(v) for v in gen.integers(0, 3, 2))
    if gen.random() < 0.5:
        kw, sw, pw = kh, sh, ph                      # half of them square
    h = int(gen.integers(max(kh - 2 * ph, 1), 10))
    w = int(gen.integers(max(kw - 2 * pw, 1), 10))
    oph, opw = (int(gen.integers(0, sh)), int(gen.integers(0, sw))) if transposed else (0, 0)
    if transposed:   # the output must not be empty
        ph = min(ph, ((h - 1) * sh + kh + oph - 1) // 2)
        pw = min(pw, ((w - 1) * sw + kw + opw - 1) // 2)
    return dict(n=int(gen.integers(1, 4)), c_in=int(gen.integers(1, 4)), c_out=int(gen.integers(1, 4)),
                h=h, w=w, kernel=(kh, kw), stride=(sh, sw), padding=(ph, pw), output_padding=(oph, opw),
                bias=bool(gen.random() < 0.6))


def make_arrays(cfg, gen, transposed, dtype=np.float64):
    x = gen.standard_normal((cfg["n"], cfg["c_in"], cfg["h"], cfg["w"])).astype(dtype)
    wshape = ((cfg["c_in"], cfg["c_out"]) if transposed else (cfg["c_out"], cfg["c_in"])) + cfg["kernel"]
    w = gen.standard_normal(wshape).astype(dtype)
    b = gen.standard_normal(cfg["c_out"]).astype(dtype) if cfg["bias"] else None
    return x, w, b


def run(transposed, x, w, b, cfg, **kw):
    if transposed:
        return conv_transpose2d(x, w, b, cfg["stride"], cfg["padding"], cfg["output_padding"], **kw)
    return conv2d(x, w, b, cfg["stride"], cfg["padding"], **kw)


def reference(transposed, x, w, b, cfg):
    if transposed:
        return conv_transpose2d_reference(x, w, b, cfg["stride"], cfg["padding"], cfg["output_padding"])
    return conv2d_reference(x, w, b, cfg["stride"], cfg["padding"])


def forward_and_grads(transposed, x, w, b, cfg, gy=None, gen=None):
    """Output and gradients (x, w, b) of sum(y * gy) as NumPy arrays."""
    X, W = mv.tensor(x, requires_grad=True), mv.tensor(w, requires_grad=True)
    B = mv.tensor(b, requires_grad=True) if b is not None else None
    y = run(transposed, X, W, B, cfg)
    if gy is None:
        gy = gen.standard_normal(y.shape).astype(x.dtype)
    y.backward(gy)
    grads = [X.grad, W.grad] + ([B.grad] if B is not None else [])
    return y.data, grads, gy


# ---------------------------------------------------------------- the loop references themselves
def test_conv2d_reference_hand_computed():
    x = np.arange(9.0).reshape(1, 1, 3, 3)                       # [[0 1 2] [3 4 5] [6 7 8]]
    w = np.array([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 1, 2, 2)
    # y[i, j] = x[i, j] + 2 x[i, j+1] + 3 x[i+1, j] + 4 x[i+1, j+1]
    np.testing.assert_array_equal(conv2d_reference(x, w), [[[[27, 37], [57, 67]]]])
    np.testing.assert_array_equal(conv2d_reference(x, w, np.array([0.5])), [[[[27.5, 37.5], [57.5, 67.5]]]])
    # padded with zeros to 5x5, windows at rows/columns 0 and 2
    np.testing.assert_array_equal(conv2d_reference(x, w, stride=2, padding=1), [[[[0, 11], [30, 67]]]])
    # stride and padding per axis: 1 row of padding, none across; stride 1 down, 2 across
    np.testing.assert_array_equal(conv2d_reference(x, w, stride=(1, 2), padding=(1, 0)),
                                  [[[[4], [27], [57], [20]]]])
    # two input channels summed, two output channels, a batch of two
    image = np.concatenate([x[0], np.ones((1, 3, 3))])               # channel 0: x; channel 1: ones
    x2 = np.stack([image, -image])
    w2 = np.zeros((2, 2, 2, 2))
    w2[0, 0], w2[0, 1] = w[0, 0], 1.0        # out 0: the kernel above on channel 0, plus 4 ones of channel 1
    w2[1, 1, 0, 0] = 1.0                     # out 1: channel 1's top-left pixel
    y = conv2d_reference(x2, w2)
    assert y.shape == (2, 2, 2, 2)
    np.testing.assert_array_equal(y[0], [[[31, 41], [61, 71]], [[1, 1], [1, 1]]])
    np.testing.assert_array_equal(y[1], -y[0])


def test_conv_transpose2d_reference_hand_computed():
    x = np.array([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 1, 2, 2)
    w = np.array([[1.0, 10.0], [100.0, 1000.0]]).reshape(1, 1, 2, 2)
    # stride 1: the four stamps x[i, j] * w, shifted by (i, j), overlap and add
    np.testing.assert_array_equal(conv_transpose2d_reference(x, w),
                                  [[[[1, 12, 20], [103, 1234, 2040], [300, 3400, 4000]]]])
    # padding 1 crops one row and column off each side
    np.testing.assert_array_equal(conv_transpose2d_reference(x, w, padding=1), [[[[1234]]]])
    # stride 2: the stamps tile the output without overlapping
    stamps = [[1, 10, 2, 20], [100, 1000, 200, 2000], [3, 30, 4, 40], [300, 3000, 400, 4000]]
    np.testing.assert_array_equal(conv_transpose2d_reference(x, w, stride=2), [[stamps]])
    # output_padding adds a last row and column that only the bias reaches
    y = conv_transpose2d_reference(x, w, np.array([0.5]), stride=2, output_padding=1)
    expected = np.zeros((5, 5))
    expected[:4, :4] = stamps
    np.testing.assert_array_equal(y, [[expected + 0.5]])
    np.testing.assert_array_equal(conv_transpose2d_reference(x, w, stride=2, padding=1, output_padding=1),
                                  [[[[1000, 200, 2000], [30, 4, 40], [3000, 400, 4000]]]])
    # channels: out[d] = sum over c of x[c] stamped with w[c, d]
    x2 = np.concatenate([x, 2 * x], axis=1)                                  # (1, 2, 2, 2)
    w2 = np.stack([np.concatenate([w[0], -w[0]]), np.concatenate([w[0], w[0]])])   # (2 in, 2 out, 2, 2)
    y2 = conv_transpose2d_reference(x2, w2, stride=2)
    np.testing.assert_array_equal(y2[0, 0], 3 * np.array(stamps))               # x w + 2x w
    np.testing.assert_array_equal(y2[0, 1], -np.array(stamps) + 2 * np.array(stamps))


def test_references_are_adjoint_to_each_other():
    """<conv2d_reference(x, W), y> == <x, conv_transpose2d_reference(y, W)>: the two loops agree with each
    other without any of the fast code involved."""
    gen = np.random.default_rng(11)
    for _ in range(20):
        cfg = random_config(gen, False)
        x, w, _ = make_arrays(cfg, gen, False)
        y_shape = conv2d_reference(x, w, None, cfg["stride"], cfg["padding"]).shape
        (sh, sw), (ph, pw) = cfg["stride"], cfg["padding"]
        oph = cfg["h"] + 2 * ph - cfg["kernel"][0] - (y_shape[2] - 1) * sh
        opw = cfg["w"] + 2 * pw - cfg["kernel"][1] - (y_shape[3] - 1) * sw
        y = gen.standard_normal(y_shape)
        back = conv_transpose2d_reference(y, w, None, cfg["stride"], cfg["padding"], (oph, opw))
        assert back.shape == x.shape, cfg
        lhs = float((conv2d_reference(x, w, None, cfg["stride"], cfg["padding"]) * y).sum())
        assert lhs == pytest.approx(float((x * back).sum()), rel=1e-10, abs=1e-10), cfg


@pytest.mark.parametrize("transposed", [False, True], ids=["conv2d", "conv_transpose2d"])
def test_references_match_torch(transposed):
    torch = pytest.importorskip("torch")
    tf = torch.nn.functional
    gen = np.random.default_rng(60 + transposed)
    for _ in range(30):
        cfg = random_config(gen, transposed)
        x, w, b = make_arrays(cfg, gen, transposed)
        tb = torch.tensor(b) if b is not None else None
        if transposed:
            expected = tf.conv_transpose2d(torch.tensor(x), torch.tensor(w), tb, cfg["stride"], cfg["padding"],
                                           cfg["output_padding"])
        else:
            expected = tf.conv2d(torch.tensor(x), torch.tensor(w), tb, cfg["stride"], cfg["padding"])
        np.testing.assert_allclose(reference(transposed, x, w, b, cfg), expected.numpy(), rtol=1e-12, atol=1e-12,
                                   err_msg=str(cfg))


# ---------------------------------------------------------------- the fast forward against the loops
@pytest.mark.parametrize("transposed", [False, True], ids=["conv2d", "conv_transpose2d"])
def test_forward_matches_the_loop_reference(transposed):
    gen = np.random.default_rng(10 + transposed)
    for _ in range(40):
        cfg = random_config(gen, transposed)
        x, w, b = make_arrays(cfg, gen, transposed)
        y = run(transposed, x, w, b, cfg)
        expected = reference(transposed, x, w, b, cfg)
        assert y.shape == expected.shape, cfg
        np.testing.assert_allclose(y.data, expected, rtol=1e-12, atol=1e-12, err_msg=str(cfg))


@pytest.mark.parametrize("transposed", [False, True], ids=["conv2d", "conv_transpose2d"])
def test_forward_float32_matches_the_loop_reference(transposed):
    gen = np.random.default_rng(20 + transposed)
    for _ in range(10):
        cfg = random_config(gen, transposed)
        x, w, b = make_arrays(cfg, gen, transposed, dtype=np.float32)
        y = run(transposed, x, w, b, cfg)
        assert y.dtype == np.float32
        expected = reference(transposed, x.astype(np.float64), w.astype(np.float64),
                             None if b is None else b.astype(np.float64), cfg)
        np.testing.assert_allclose(y.data, expected, rtol=1e-5, atol=1e-5)


def test_transposed_is_the_adjoint_of_conv():
    """<conv2d(x, W), y> == <x, conv_transpose2d(y, W)> for the same weight array."""
    gen = np.random.default_rng(3)
    for _ in range(20):
        cfg = random_config(gen, False)
        x, w, _ = make_arrays(cfg, gen, False)
        y_shape = conv2d(x, w, None, cfg["stride"], cfg["padding"]).shape
        (sh, sw), (ph, pw) = cfg["stride"], cfg["padding"]
        # the output_padding that makes conv_transpose2d give back x's size
        oph = cfg["h"] + 2 * ph - cfg["kernel"][0] - (y_shape[2] - 1) * sh
        opw = cfg["w"] + 2 * pw - cfg["kernel"][1] - (y_shape[3] - 1) * sw
        y = gen.standard_normal(y_shape)
        lhs = float((conv2d(x, w, None, cfg["stride"], cfg["padding"]).data * y).sum())
        back = conv_transpose2d(y, w, None, cfg["stride"], cfg["padding"], (oph, opw))
        assert back.shape == x.shape
        assert lhs == pytest.approx(float((x * back.data).sum()), rel=1e-10, abs=1e-10)


def test_output_sizes_follow_pytorch_formulas():
    x = np.zeros((2, 3, 11, 8))
    assert conv2d(x, np.zeros((5, 3, 3, 2)), stride=(2, 3), padding=(1, 0)).shape == (2, 5, 6, 3)
    assert conv2d(x, np.zeros((5, 3, 11, 8))).shape == (2, 5, 1, 1)
    y = conv_transpose2d(x, np.zeros((3, 4, 4, 3)), stride=(2, 3), padding=(1, 2), output_padding=(1, 2))
    assert y.shape == (2, 4, (11 - 1) * 2 - 2 + 4 + 1, (8 - 1) * 3 - 4 + 3 + 2)


def test_empty_batch():
    y = conv2d(np.zeros((0, 2, 5, 5)), np.ones((3, 2, 3, 3)), np.ones(3), padding=1)
    assert y.shape == (0, 3, 5, 5)
    X = mv.tensor(np.zeros((0, 2, 5, 5)), requires_grad=True)
    W = mv.tensor(np.ones((2, 3, 3, 3)), requires_grad=True)
    out = conv_transpose2d(X, W, stride=2)
    assert out.shape == (0, 3, 11, 11)
    out.sum().backward()
    assert X.grad.shape == X.shape and W.grad.shape == W.shape and not W.grad.any()


@pytest.mark.parametrize("c_in, c_out, k, stride, padding", [
    (2, 3, 1, 1, 0),      # pointwise: the windows are a view
    (4, 1, 3, 1, 1),      # conv2d as the transposed conv of its mirror
    (1, 4, 3, 1, 1),      # the input gradient through col2im
    (3, 3, 3, 1, 1),      # the input gradient through the windows of gy
    (2, 3, 4, 2, 1),      # strided
])
@pytest.mark.parametrize("transposed", [False, True], ids=["conv2d", "conv_transpose2d"])
def test_empty_batch_on_every_route(c_in, c_out, k, stride, padding, transposed):
    X = mv.tensor(np.zeros((0, c_in, 5, 5)), requires_grad=True)
    shape = (c_in, c_out, k, k) if transposed else (c_out, c_in, k, k)
    W = mv.tensor(np.ones(shape), requires_grad=True)
    B = mv.tensor(np.ones(c_out), requires_grad=True)
    op = conv_transpose2d if transposed else conv2d
    out = op(X, W, B, stride, padding)
    assert out.shape[:2] == (0, c_out)
    out.sum().backward()
    assert X.grad.shape == X.shape and not W.grad.any() and not B.grad.any()


# ---------------------------------------------------------------- against PyTorch
@pytest.mark.parametrize("transposed", [False, True], ids=["conv2d", "conv_transpose2d"])
def test_forward_and_grads_match_torch(transposed):
    torch = pytest.importorskip("torch")
    tf = torch.nn.functional
    gen = np.random.default_rng(30 + transposed)
    for _ in range(30):
        cfg = random_config(gen, transposed)
        x, w, b = make_arrays(cfg, gen, transposed)
        y, grads, gy = forward_and_grads(transposed, x, w, b, cfg, gen=gen)
        tx, tw = torch.tensor(x, requires_grad=True), torch.tensor(w, requires_grad=True)
        tb = torch.tensor(b, requires_grad=True) if b is not None else None
        if transposed:
            ty = tf.conv_transpose2d(tx, tw, tb, cfg["stride"], cfg["padding"], cfg["output_padding"])
        else:
            ty = tf.conv2d(tx, tw, tb, cfg["stride"], cfg["padding"])
        ty.backward(torch.tensor(gy))
        np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-10, atol=1e-10, err_msg=str(cfg))
        for mine, theirs in zip(grads, [tx.grad, tw.grad] + ([tb.grad] if tb is not None else [])):
            np.testing.assert_allclose(mine, theirs.numpy(), rtol=1e-10, atol=1e-10, err_msg=str(cfg))


VQVAE_LAYERS = [  # (transposed, c_in, c_out, kernel, stride, padding, image size)
    (False, 1, 64, 4, 2, 1, 32), (False, 64, 128, 4, 2, 1, 16), (False, 128, 128, 3, 1, 1, 8),
    (False, 128, 32, 3, 1, 1, 8), (False, 32, 128, 1, 1, 0, 8), (False, 128, 64, 1, 1, 0, 8),
    (True, 128, 64, 4, 2, 1, 8), (True, 64, 1, 4, 2, 1, 16),
]


@pytest.mark.parametrize("layer", VQVAE_LAYERS, ids=lambda l: f"{'T' if l[0] else 'C'}{l[1]}-{l[2]}k{l[3]}")
def test_vqvae_layers_float32_match_torch(layer):
    torch = pytest.importorskip("torch")
    transposed, c_in, c_out, k, s, p, size = layer
    gen = np.random.default_rng(5)
    cfg = dict(n=4, c_in=c_in, c_out=c_out, h=size, w=size, kernel=(k, k), stride=(s, s), padding=(p, p),
               output_padding=(0, 0), bias=True)
    x, w, b = make_arrays(cfg, gen, transposed, dtype=np.float32)
    w *= 1 / math.sqrt(c_in * k * k)
    y, grads, gy = forward_and_grads(transposed, x, w, b, cfg, gen=gen)
    tx, tw, tb = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
    mod = torch.nn.functional.conv_transpose2d if transposed else torch.nn.functional.conv2d
    ty = mod(tx, tw, tb, s, p)
    ty.backward(torch.tensor(gy))
    for mine, theirs in zip([y] + grads, [ty.detach(), tx.grad, tw.grad, tb.grad]):
        theirs = theirs.numpy()
        np.testing.assert_allclose(mine, theirs, rtol=1e-4, atol=1e-4 * np.abs(theirs).max())


# ---------------------------------------------------------------- gradients wanted only where asked
def test_input_without_grad_gets_none_and_skips_col2im(monkeypatch):
    gen = np.random.default_rng(4)
    x = mv.tensor(gen.standard_normal((2, 1, 9, 9)))                 # the data batch: no gradient
    w = mv.tensor(gen.standard_normal((4, 1, 4, 4)), requires_grad=True)
    b = mv.tensor(gen.standard_normal(4), requires_grad=True)
    calls = []
    original = conv_module._col2im_pass
    monkeypatch.setattr(conv_module, "_col2im_pass", lambda *a, **k: calls.append(1) or original(*a, **k))
    conv2d(x, w, b, stride=2, padding=1).sum().backward()
    assert calls == [] and x.grad is None
    assert w.grad.shape == w.shape and b.grad.shape == (4,)


def test_weight_without_grad_gets_none():
    gen = np.random.default_rng(5)
    x = mv.tensor(gen.standard_normal((2, 3, 6, 6)), requires_grad=True)
    w = mv.tensor(gen.standard_normal((3, 2, 3, 3)))
    y = conv_transpose2d(x, w, stride=2)
    y.sum().backward()
    assert w.grad is None and x.grad.shape == x.shape


def test_no_grad_keeps_no_windows():
    gen = np.random.default_rng(6)
    w = mv.tensor(gen.standard_normal((3, 2, 3, 3)), requires_grad=True)
    with mv.no_grad():
        y = conv2d(gen.standard_normal((2, 2, 7, 7)), w)
    assert not y.requires_grad and y.creator is None
    fn = conv_module.Conv2d(conv_module._Geometry(2, 2, 7, 7, 3, (3, 3), (1, 1), (0, 0)))
    with mv.no_grad():
        fn(gen.standard_normal((2, 2, 7, 7)), w)
    assert fn.cols is None and fn.x is None


def test_backward_twice_accumulates():
    gen = np.random.default_rng(7)
    x = mv.tensor(gen.standard_normal((2, 2, 7, 7)), requires_grad=True)
    w = mv.tensor(gen.standard_normal((3, 2, 3, 3)), requires_grad=True)
    y = conv2d(x, w, padding=1)
    y.sum().backward()
    first = w.grad.copy()
    y.sum().backward()
    np.testing.assert_allclose(w.grad, 2 * first)


# ---------------------------------------------------------------- argument errors
def test_errors_name_the_offending_shapes():
    x, w = np.zeros((2, 3, 8, 8)), np.zeros((4, 3, 3, 3))
    with pytest.raises(ValueError, match=r"input of shape \(N, C_in, H, W\), got shape \(3, 8, 8\)"):
        conv2d(np.zeros((3, 8, 8)), w)
    with pytest.raises(ValueError, match=r"weight of shape .*got shape \(4, 3, 3\)"):
        conv2d(x, np.zeros((4, 3, 3)))
    with pytest.raises(ValueError, match=r"\(2, 3, 8, 8\) has 3 channels but weight shape \(4, 5, 3, 3\)"):
        conv2d(x, np.zeros((4, 5, 3, 3)))
    with pytest.raises(ValueError, match=r"\(2, 3, 8, 8\) has 3 channels but weight shape \(4, 5, 3, 3\)"):
        conv_transpose2d(x, np.zeros((4, 5, 3, 3)))
    with pytest.raises(ValueError, match=r"kernel 9x3 .* larger than the padded input 8x8"):
        conv2d(x, np.zeros((4, 3, 9, 3)))
    conv2d(x, np.zeros((4, 3, 9, 3)), padding=1)      # fits once padded
    with pytest.raises(TypeError, match="float64 and weight dtype float32"):
        conv2d(x, np.zeros((4, 3, 3, 3), np.float32))
    with pytest.raises(TypeError, match="bias dtype float32"):
        conv2d(x, w, np.zeros(4, np.float32))
    with pytest.raises(ValueError, match=r"bias must have shape \(4,\).*got shape \(3,\)"):
        conv2d(x, w, np.zeros(3))
    with pytest.raises(TypeError, match="floating-point input"):
        conv2d(np.zeros((2, 3, 8, 8), np.int64), w)
    with pytest.raises(ValueError, match="stride must be positive, got 0"):
        conv2d(x, w, stride=0)
    with pytest.raises(ValueError, match=r"stride must be positive, got \(1, -2\)"):
        conv_transpose2d(x, np.zeros((3, 4, 3, 3)), stride=(1, -2))
    with pytest.raises(ValueError, match="padding must be non-negative, got -1"):
        conv2d(x, w, padding=-1)
    with pytest.raises(TypeError, match="stride must be an int or a pair of ints"):
        conv2d(x, w, stride=(1, 2, 3))
    with pytest.raises(TypeError, match="padding must be an int or a pair of ints"):
        conv2d(x, w, padding=1.0)
    with pytest.raises(ValueError, match=r"output_padding \(2, 2\) must be smaller than stride \(2, 2\)"):
        conv_transpose2d(x, np.zeros((3, 4, 3, 3)), stride=2, output_padding=2)
    with pytest.raises(ValueError, match=r"output_padding \(0, 1\) must be smaller than stride \(1, 1\)"):
        conv_transpose2d(x, np.zeros((3, 4, 3, 3)), output_padding=(0, 1))
    with pytest.raises(ValueError, match="padding is too large"):
        conv_transpose2d(np.zeros((1, 3, 1, 1)), np.zeros((3, 4, 2, 2)), padding=1)


def test_errors_match_torch_on_the_same_bad_arguments():
    """Wherever PyTorch refuses a configuration, so do we (both raise, whatever the wording)."""
    torch = pytest.importorskip("torch")
    bad = [  # (transposed, x shape, w shape, stride, padding, output_padding)
        (False, (1, 3, 4, 4), (2, 3, 5, 5), 1, 0, 0),
        (False, (1, 3, 4, 4), (2, 4, 3, 3), 1, 0, 0),
        (True, (1, 3, 4, 4), (3, 2, 3, 3), 2, 0, 2),
        (True, (1, 3, 4, 4), (3, 2, 3, 3), 1, 0, 1),
    ]
    for transposed, xs, ws, s, p, op in bad:
        with pytest.raises((ValueError, TypeError)):
            if transposed:
                conv_transpose2d(np.zeros(xs), np.zeros(ws), None, s, p, op)
            else:
                conv2d(np.zeros(xs), np.zeros(ws), None, s, p)
        with pytest.raises(RuntimeError):
            if transposed:
                torch.nn.functional.conv_transpose2d(torch.zeros(xs), torch.zeros(ws), None, s, p, op)
            else:
                torch.nn.functional.conv2d(torch.zeros(xs), torch.zeros(ws), None, s, p)


# ---------------------------------------------------------------- chunking under a workspace limit
def test_workspace_limit_context_restores_and_validates():
    before = get_workspace_limit()
    assert before is None                            # the device's default
    g = conv_module._Geometry(1, 1, 4, 4, 1, (1, 1), (1, 1), (0, 0))
    assert g.images_per_chunk(np.zeros(1, np.float32)) == backend.CPU_WORKSPACE_BYTES // (16 * 4)
    with workspace_limit(1000):
        assert get_workspace_limit() == 1000
        with workspace_limit(10):
            assert get_workspace_limit() == 10
        assert get_workspace_limit() == 1000
    assert get_workspace_limit() == before
    with pytest.raises(ValueError):
        with workspace_limit(0):
            pass
    with pytest.raises(TypeError):
        with workspace_limit(1.5):
            pass
    assert get_workspace_limit() == before


@pytest.mark.parametrize("transposed", [False, True], ids=["conv2d", "conv_transpose2d"])
def test_chunked_batches_give_identical_results(transposed):
    gen = np.random.default_rng(40 + transposed)
    configs = [dict(n=5, c_in=3, c_out=4, h=9, w=7, kernel=(3, 3), stride=(1, 1), padding=(1, 1),
                    output_padding=(0, 0), bias=True),
               dict(n=7, c_in=4, c_out=3, h=8, w=8, kernel=(4, 4), stride=(2, 2), padding=(1, 1),
                    output_padding=(1, 1) if transposed else (0, 0), bias=True),
               dict(n=4, c_in=2, c_out=5, h=5, w=6, kernel=(1, 1), stride=(1, 1), padding=(0, 0),
                    output_padding=(0, 0), bias=False),
               dict(n=3, c_in=2, c_out=3, h=7, w=5, kernel=(2, 3), stride=(3, 2), padding=(2, 0),
                    output_padding=(2, 1) if transposed else (0, 0), bias=True)]
    for cfg in configs:
        x, w, b = make_arrays(cfg, gen, transposed)
        y, grads, gy = forward_and_grads(transposed, x, w, b, cfg, gen=gen)
        for limit in (1, 2 * 1024):        # one image per chunk; a few images per chunk
            with workspace_limit(limit):
                y_c, grads_c, _ = forward_and_grads(transposed, x, w, b, cfg, gy=gy)
            # The same numbers up to rounding: one GEMM over a wider matrix may round a few elements
            # differently in the last place (OpenBLAS splits the columns between threads, so a column
            # can fall in an edge tile in one split and not in another); the weight and bias gradients
            # also sum over the batch in a different order. A chunking bug would be off by O(1).
            for mine, ref in zip([y_c] + grads_c, [y] + grads):
                np.testing.assert_allclose(mine, ref, rtol=1e-13, atol=1e-13 * np.abs(ref).max())


@pytest.mark.parametrize("transposed", [False, True], ids=["conv2d", "conv_transpose2d"])
def test_both_window_copies_give_the_reference(monkeypatch, transposed):
    """The convolutions and their gradients through the NumPy window copies (in blocks of one image)
    and through Numba's: the same numbers, and the loop reference's output."""
    pytest.importorskip("numba")
    from minivq.kernels import windows_numpy
    monkeypatch.setattr(windows_numpy, "COL2IM_BLOCK_BYTES", 1)
    gen = np.random.default_rng(9)
    cfg = dict(n=5, c_in=3, c_out=4, h=7, w=6, kernel=(4, 3), stride=(2, 2), padding=(1, 1),
               output_padding=(1, 0) if transposed else (0, 0), bias=True)
    x, w, b = make_arrays(cfg, gen, transposed)
    results, gy = {}, None
    for windows in ("numpy", "numba"):
        for name in ("im2col", "col2im"):
            monkeypatch.setattr(kernels, name, functools.partial(_KERNELS[name], backend=windows))
        y, grads, gy = forward_and_grads(transposed, x, w, b, cfg, gy=gy, gen=gen)
        results[windows] = [y] + grads
        np.testing.assert_allclose(y, reference(transposed, x, w, b, cfg), rtol=1e-12, atol=1e-12)
    for mine, ref in zip(results["numba"], results["numpy"]):
        np.testing.assert_allclose(mine, ref, rtol=1e-13, atol=1e-13 * np.abs(ref).max())


def test_im2col_buffers_respect_the_limit(monkeypatch):
    """The im2col path (CuPy arrays, or no Numba; with Numba the forward product copies no windows at all)."""
    monkeypatch.setattr(kernels, "direct_correlation", lambda a, window_row=None, pointwise=False: False)
    sizes = []
    original = conv_module._im2col

    def spy(image, g):
        cols = original(image, g)
        sizes.append(cols.nbytes)
        return cols
    monkeypatch.setattr(conv_module, "_im2col", spy)
    gen = np.random.default_rng(8)
    x = mv.tensor(gen.standard_normal((16, 4, 9, 9)), requires_grad=True)
    w = mv.tensor(gen.standard_normal((6, 4, 3, 3)), requires_grad=True)
    one_image = 9 * 9 * 4 * 9 * 8                    # rows * (kH kW C) * itemsize
    with workspace_limit(3 * one_image + 5):
        conv2d(x, w, padding=1).sum().backward()
    assert sizes and max(sizes) <= 3 * one_image
    assert len(sizes) >= 2 * math.ceil(16 / 3)       # forward and backward both went chunk by chunk
    sizes.clear()
    conv2d(x, w, padding=1).sum().backward()         # under the default limit: one chunk, kept for backward
    # only the forward's windows of x, kept for the weight gradient: the input gradient goes through
    # col2im, since windows of gy (6 channels) would be a bigger copy than col2im's columns (4 of x)
    assert sizes == [16 * one_image]
    sizes.clear()
    w_narrow = mv.tensor(gen.standard_normal((3, 4, 3, 3)), requires_grad=True)
    conv2d(x, w_narrow, padding=1).sum().backward()  # 3 channels out: the conv runs as its mirror's
    assert sizes == [16 * one_image * 3 // 4]        # no windows of x; those of gy, once, for both gradients


def test_a_chunked_square_conv_copies_the_windows_of_gy_once_for_both_gradients(monkeypatch):
    """4 -> 4 channels at stride 1: the input gradient reads the windows of gy (as large as x's), and
    so does the weight gradient, from the same copy, instead of copying the windows of x again."""
    monkeypatch.setattr(kernels, "direct_correlation", lambda a, window_row=None, pointwise=False: False)    # the im2col path, as above
    calls = []
    original = conv_module._im2col
    monkeypatch.setattr(conv_module, "_im2col", lambda image, g: calls.append(image.shape) or original(image, g))
    gen = np.random.default_rng(9)
    x = mv.tensor(gen.standard_normal((16, 4, 9, 9)), requires_grad=True)
    w = mv.tensor(gen.standard_normal((4, 4, 3, 3)), requires_grad=True)
    with workspace_limit(3 * 9 * 9 * 4 * 9 * 8):     # three images' windows per chunk: 6 chunks
        y = conv2d(x, w, padding=1)
        assert len(calls) == 6
        gy = gen.standard_normal(y.shape)
        y.backward(gy)
    assert len(calls) == 12                          # 6 in forward, 6 in backward (not 12: x's again)
    grads = x.grad.copy(), w.grad.copy()
    x.grad = w.grad = None
    conv2d(x, w, padding=1).backward(gy)             # one chunk: x's windows kept from forward, gy's for dx
    np.testing.assert_allclose(grads[0], x.grad, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(grads[1], w.grad, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- the layers
def test_conv2d_layer_init_and_forward():
    mv.manual_seed(123)
    layer = Conv2d(3, 8, (3, 5), stride=2, padding=(1, 2))
    assert layer.weight.shape == (8, 3, 3, 5) and layer.bias.shape == (8,)
    assert layer.weight.dtype == np.float32 and layer.bias.dtype == np.float32
    assert [n for n, _ in layer.named_parameters()] == ["weight", "bias"]
    # kaiming_uniform(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)); drawn from minivq's generator, in order
    bound = 1 / math.sqrt(3 * 3 * 5)
    gen = np.random.default_rng(123)
    np.testing.assert_array_equal(layer.weight.data, gen.uniform(-bound, bound, (8, 3, 3, 5)).astype(np.float32))
    np.testing.assert_array_equal(layer.bias.data, gen.uniform(-bound, bound, 8).astype(np.float32))
    x = mv.tensor(np.random.default_rng(0).standard_normal((2, 3, 9, 10)).astype(np.float32))
    y = layer(x)
    np.testing.assert_allclose(y.data, conv2d_reference(x.data, layer.weight.data, layer.bias.data, (2, 2), (1, 2)),
                               rtol=1e-5, atol=1e-5)
    y.sum().backward()
    assert layer.weight.grad.shape == layer.weight.shape and layer.bias.grad.shape == (8,)


def test_conv_transpose2d_layer_init_uses_dim1_fan_in():
    mv.manual_seed(7)
    layer = ConvTranspose2d(16, 4, 3, stride=2, padding=1, output_padding=1, bias=False)
    assert layer.weight.shape == (16, 4, 3, 3) and layer.bias is None
    assert [n for n, _ in layer.named_parameters()] == ["weight"]
    bound = 1 / math.sqrt(4 * 3 * 3)                  # PyTorch: weight.size(1) * kH * kW
    gen = np.random.default_rng(7)
    np.testing.assert_array_equal(layer.weight.data, gen.uniform(-bound, bound, (16, 4, 3, 3)).astype(np.float32))
    x = np.random.default_rng(1).standard_normal((2, 16, 5, 5)).astype(np.float32)
    y = layer(x)
    assert y.shape == (2, 4, 10, 10)
    np.testing.assert_allclose(y.data, conv_transpose2d_reference(x, layer.weight.data, None, (2, 2), (1, 1), (1, 1)),
                               rtol=1e-5, atol=1e-5)


def test_layer_init_bounds_over_many_draws():
    mv.manual_seed(0)
    big = ConvTranspose2d(64, 32, 4)
    bound = 1 / math.sqrt(32 * 16)
    assert np.abs(big.weight.data).max() <= bound and np.abs(big.weight.data).max() > 0.99 * bound
    assert abs(float(big.weight.data.mean())) < 0.05 * bound
    mv.manual_seed(0)
    again = ConvTranspose2d(64, 32, 4)
    np.testing.assert_array_equal(big.weight.data, again.weight.data)


def test_layer_argument_errors():
    with pytest.raises(ValueError, match="in_channels must be positive"):
        Conv2d(0, 3, 3)
    with pytest.raises(TypeError, match="out_channels must be an integer"):
        Conv2d(3, 2.0, 3)
    with pytest.raises(ValueError, match="kernel_size must be positive"):
        Conv2d(3, 3, (3, 0))
    with pytest.raises(ValueError, match="stride must be positive"):
        ConvTranspose2d(3, 3, 3, stride=0)
    with pytest.raises(ValueError, match="output_padding"):
        ConvTranspose2d(3, 3, 3, stride=2, output_padding=2)


def test_layer_repr_matches_torch():
    torch = pytest.importorskip("torch")
    cases = [((1, 64, 4), dict(stride=2, padding=1)), ((3, 5, (1, 3)), {}), ((8, 8, 3), dict(bias=False)),
             ((4, 6, (3, 2)), dict(stride=(2, 1), padding=(0, 1)))]
    for args, kwargs in cases:
        assert repr(Conv2d(*args, **kwargs)) == repr(torch.nn.Conv2d(*args, **kwargs))
    tcases = [((128, 64, 4), dict(stride=2, padding=1)), ((3, 5, 3), dict(stride=2, output_padding=1, bias=False))]
    for args, kwargs in tcases:
        assert repr(ConvTranspose2d(*args, **kwargs)) == repr(torch.nn.ConvTranspose2d(*args, **kwargs))


# ---------------------------------------------------------------- CuPy against NumPy
def _cupy_or_skip():
    if not backend.cuda_available():
        pytest.skip("needs CuPy and a CUDA GPU")
    return backend.require_cuda()


@pytest.mark.gpu
@pytest.mark.parametrize("transposed", [False, True], ids=["conv2d", "conv_transpose2d"])
@pytest.mark.parametrize("limit", [None, 1], ids=["one-chunk", "chunked"])
def test_cupy_matches_numpy(transposed, limit):
    cp = _cupy_or_skip()
    gen = np.random.default_rng(50 + transposed)
    for _ in range(12):
        cfg = random_config(gen, transposed)
        x, w, b = make_arrays(cfg, gen, transposed)
        y, grads, gy = forward_and_grads(transposed, x, w, b, cfg, gen=gen)
        ctx = workspace_limit(limit) if limit else contextlib.nullcontext()
        with ctx:
            X = mv.tensor(cp.asarray(x), requires_grad=True)
            W = mv.tensor(cp.asarray(w), requires_grad=True)
            B = mv.tensor(cp.asarray(b), requires_grad=True) if b is not None else None
            y_gpu = run(transposed, X, W, B, cfg)
            assert backend.array_device(y_gpu.data).startswith("cuda")
            y_gpu.backward(cp.asarray(gy))
        np.testing.assert_allclose(cp.asnumpy(y_gpu.data), y, rtol=1e-10, atol=1e-10)
        for mine, ref in zip([X.grad, W.grad] + ([B.grad] if B is not None else []), grads):
            np.testing.assert_allclose(cp.asnumpy(mine), ref, rtol=1e-10, atol=1e-10)


@pytest.mark.gpu
def test_cupy_layers_float32():
    cp = _cupy_or_skip()
    mv.manual_seed(0)
    layer = Conv2d(3, 8, 3, padding=1)
    cpu_weight = layer.weight.data.copy()
    layer.to("cuda")
    x = np.random.default_rng(0).standard_normal((2, 3, 9, 9)).astype(np.float32)
    y = layer(mv.tensor(x, device="cuda"))
    y.sum().backward()
    np.testing.assert_allclose(cp.asnumpy(y.data), conv2d_reference(x, cpu_weight, cp.asnumpy(layer.bias.data),
                                                                 (1, 1), (1, 1)), rtol=1e-4, atol=1e-4)
    assert backend.array_device(layer.weight.grad).startswith("cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("transposed", [False, True], ids=["conv2d", "conv_transpose2d"])
def test_references_run_on_cupy(transposed):
    cp = _cupy_or_skip()
    gen = np.random.default_rng(70 + transposed)
    for _ in range(5):
        cfg = random_config(gen, transposed)
        x, w, b = make_arrays(cfg, gen, transposed)
        on_gpu = reference(transposed, cp.asarray(x), cp.asarray(w), None if b is None else cp.asarray(b), cfg)
        assert backend.array_device(on_gpu).startswith("cuda")
        np.testing.assert_allclose(cp.asnumpy(on_gpu), reference(transposed, x, w, b, cfg), rtol=1e-12, atol=1e-12)
