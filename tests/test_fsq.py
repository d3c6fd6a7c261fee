"""Finite scalar quantisation (nn.FSQ) against the paper's formulas: the bound, the levels, the
indices, the straight-through rounding node, gradients, and the VQ-VAE built on it."""
import numpy as np
import pytest

import minivq as mv
from minivq import nn
from minivq import functional as F
from minivq.functional.quantize import RoundStraightThrough, round_straight_through


def fsq_options(levels, **others):
    return mv.models.QuantizerOptions(levels=levels, **others)


def identity_fsq(levels):
    """An FSQ whose input projection is the identity (D = L), so tests can place z directly."""
    fsq = nn.FSQ(levels, len(levels)).double()
    fsq.project_in.weight.data = np.eye(len(levels)).reshape(len(levels), len(levels), 1, 1)
    fsq.project_in.bias.data = np.zeros(len(levels))
    return fsq


def test_round_straight_through_is_a_named_node_passing_the_gradient():
    x = mv.tensor(np.array([-1.5, -0.6, 0.4, 0.5, 1.5, 2.49]), requires_grad=True)
    y = round_straight_through(x)
    np.testing.assert_array_equal(y.data, [-2, -1, 0, 0, 2, 2])        # halves to even, as np.round
    assert y.creator.name == "RoundStraightThrough" and isinstance(y.creator, RoundStraightThrough)
    g = np.array([1.0, -2.0, 3.0, 0.5, 0.25, 7.0])
    y.backward(g)
    np.testing.assert_array_equal(x.grad, g)


@pytest.mark.parametrize("levels", [(8, 8, 8), (8, 5, 5, 5), (2, 3), (7,), (16, 4)])
def test_bound_then_round_reaches_exactly_each_channels_levels(levels):
    mv.manual_seed(0)
    fsq = identity_fsq(levels)
    z = np.linspace(-30, 30, 20001)
    grid = np.tile(z, (len(levels), 1)).reshape(1, len(levels), 1, -1)
    with mv.no_grad():
        bounded = fsq.bound(mv.tensor(grid)).data[0, :, 0, :]
    for i, l in enumerate(levels):
        half_l = (l - 1) * (1 + fsq.eps) / 2
        offset = 0.5 if l % 2 == 0 else 0.0
        expected = np.tanh(z + np.arctanh(offset / half_l)) * half_l - offset     # the paper's bound
        np.testing.assert_allclose(bounded[i], expected, rtol=1e-12, atol=1e-12)
        values = np.unique(np.round(bounded[i]))
        np.testing.assert_array_equal(values, np.arange(l) - l // 2)              # exactly l integers
        assert abs(np.interp(0.0, z, bounded[i])) < 1e-9                         # zero stays zero


@pytest.mark.parametrize("levels", [(8, 8, 8), (3, 5, 2), (4, 4)])
def test_indices_enumerate_the_grid_and_dequantize_inverts_them(levels):
    mv.manual_seed(1)
    fsq = identity_fsq(levels)
    # one latent at the centre of every grid point: z = atanh((v + offset) / half_l) - shift
    mesh = np.stack(np.meshgrid(*[np.arange(l) - l // 2 for l in levels], indexing="ij"), -1).reshape(-1, len(levels))
    lv = np.array(levels, float)
    half_l = (lv - 1) * (1 + fsq.eps) / 2
    offset = np.where(lv % 2 == 0, 0.5, 0.0)
    z = np.arctanh((mesh + offset) / half_l) - np.arctanh(offset / half_l)
    z_e = mv.tensor(z.T.reshape(1, len(levels), 1, -1), requires_grad=True)
    out = fsq(z_e)
    n = int(np.prod(levels))
    indices = out.indices.reshape(-1)
    assert out.indices.dtype == np.int64 and out.indices.shape == (1, 1, n)
    np.testing.assert_array_equal(np.sort(indices), np.arange(n))           # a bijection onto [0, prod)
    digits = mesh + np.array(levels) // 2
    radix = np.cumprod([1] + list(levels[:-1]))
    np.testing.assert_array_equal(indices, digits @ radix)                  # mixed radix, first digit lowest
    assert out.codes_used == n and out.counts.shape == (n,) and fsq.num_embeddings == n
    np.testing.assert_allclose(float(out.perplexity), n, rtol=1e-12)
    with mv.no_grad():
        again = fsq.dequantize(out.indices)
    np.testing.assert_array_equal(again.data, out.quantized.data)
    codes = mesh / (np.array(levels) // 2)                                   # the grid scaled into [-1, 1]
    expected = fsq.project_out(mv.tensor(codes.T.reshape(1, len(levels), 1, -1))).data
    np.testing.assert_allclose(out.quantized.data, expected, rtol=1e-12)


def test_outputs_have_the_vector_quantizers_fields():
    mv.manual_seed(2)
    fsq = nn.FSQ((8, 8, 8), 6)
    z_e = mv.tensor(np.random.default_rng(2).standard_normal((2, 6, 3, 3)).astype(np.float32), requires_grad=True)
    out = fsq(z_e)
    quantized, loss, indices, perplexity = out
    assert quantized.shape == (2, 6, 3, 3) and quantized.dtype == np.float32
    assert loss.shape == () and float(loss.item()) == 0.0
    assert indices.shape == (2, 3, 3) and indices.min() >= 0 and indices.max() < 512
    assert out.z_e is z_e and out.replaced == 0 and out.counts.sum() == 18
    assert float(out.codebook_loss.item()) == 0.0 and float(out.commitment_loss.item()) == 0.0
    assert {name for name, _ in fsq.named_parameters()} == {"project_in.weight", "project_in.bias",
                                                            "project_out.weight", "project_out.bias"}
    assert "levels=(8, 8, 8)" in repr(fsq)


def test_gradients_straight_through_the_rounding():
    """The gradient is that of the same pipeline with the rounding taken out (the straight-through
    estimator), and that pipeline gradchecks in every input and parameter."""
    mv.manual_seed(3)
    fsq = nn.FSQ((5, 4, 3), 4).double()
    rng = np.random.default_rng(3)
    z_e = mv.tensor(rng.standard_normal((2, 4, 2, 2)), requires_grad=True)
    upstream = rng.standard_normal((2, 4, 2, 2))
    (fsq(z_e).quantized * upstream).sum().backward()
    grads = {name: p.grad.copy() for name, p in fsq.named_parameters()}
    half_width = np.array([2.0, 2.0, 1.0]).reshape(1, 3, 1, 1)

    def smooth(a, *params):           # round(.) replaced by the identity
        return fsq.project_out(fsq.bound(fsq.project_in(a)) / half_width)

    z2 = mv.tensor(z_e.data.copy(), requires_grad=True)
    fsq.zero_grad()
    (smooth(z2) * upstream).sum().backward()
    np.testing.assert_allclose(z_e.grad, z2.grad, rtol=1e-12)
    for name, p in fsq.named_parameters():
        if name.startswith("project_in"):
            np.testing.assert_allclose(grads[name], p.grad, rtol=1e-12, err_msg=name)
    assert mv.gradcheck(smooth, [z2, *fsq.parameters()])
    # project_out sees the rounded values: the output is differentiable in its parameters as it stands
    assert mv.gradcheck(lambda w, b: fsq(z_e).quantized, [fsq.project_out.weight, fsq.project_out.bias])


def test_bad_levels_and_indices_are_named():
    with pytest.raises(ValueError, match="levels"):
        nn.FSQ((8, 1), 4)
    with pytest.raises(ValueError, match="levels"):
        nn.FSQ((), 4)
    with pytest.raises(TypeError, match="levels"):
        nn.FSQ("abc", 4)
    fsq = nn.FSQ((2, 2), 4)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        fsq.dequantize(np.array([[[4]]]))
    with pytest.raises(ValueError, match=r"\(N, 4, H, W\)"):
        fsq(mv.tensor(np.zeros((1, 3, 2, 2), np.float32)))


def test_vqvae_on_fsq_trains_and_decodes():
    mv.manual_seed(4)
    model = mv.models.VQVAE(num_hiddens=8, num_residual_hiddens=4, num_residual_layers=1, embedding_dim=4,
                            num_embeddings=64, decay=0.0, quantizer=fsq_options((4, 4, 4)))
    assert isinstance(model.vq, nn.FSQ) and model.config["levels"] == (4, 4, 4)
    x = mv.tensor(np.random.default_rng(4).uniform(-0.5, 0.5, (4, 1, 8, 8)).astype(np.float32))
    optimizer = mv.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        x_recon, vq = model(x)
        loss = F.mse_loss(x_recon, x) + vq.loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.item()))
    assert losses[-1] < losses[0]
    assert model.vq.project_in.weight.grad is not None and np.any(model.vq.project_in.weight.grad)
    grids = model.encode(x.data)
    assert grids.shape == (4, 2, 2) and grids.max() < 64
    assert model.decode_indices(grids).shape == (4, 1, 8, 8)


def test_vqvae_refuses_codebook_options_and_a_wrong_size_with_fsq():
    with pytest.raises(ValueError, match="num_embeddings=1000"):
        mv.models.VQVAE(decay=0.0, quantizer=fsq_options((8, 5, 5, 5)))
    with pytest.raises(ValueError, match="decay"):
        mv.models.VQVAE(decay=0.99, quantizer=fsq_options((8, 8, 8)))
    with pytest.raises(ValueError, match="dead_code_threshold"):
        mv.models.VQVAE(decay=0.0, quantizer=fsq_options((8, 8, 8), dead_code_threshold=1.0))
