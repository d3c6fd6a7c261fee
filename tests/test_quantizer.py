"""The quantisers' outputs and gradients against the paper's formulas, the EMA update by hand."""
import numpy as np
import pytest

import minivq as mv
from minivq import nn
from minivq.nn.quantizers import kmeans_plus_plus


def nearest_by_hand(z_e, codebook):
    flat = z_e.transpose(0, 2, 3, 1).reshape(-1, z_e.shape[1])
    d = ((flat[:, None, :] - codebook[None, :, :]) ** 2).sum(-1)
    return d.argmin(1).reshape(z_e.shape[0], z_e.shape[2], z_e.shape[3])


@pytest.mark.parametrize("shape,k,beta", [((2, 3, 4, 5), 7, 0.25), ((1, 1, 3, 3), 2, 1.0), ((3, 5, 1, 2), 11, 0.0)])
def test_plain_vq_values_and_gradients_match_the_formulas(shape, k, beta):
    rng = np.random.default_rng(0)
    n, d, h, w = shape
    mv.manual_seed(0)
    vq = nn.VectorQuantizer(k, d, commitment_cost=beta).double()
    vq.codebook.data = rng.standard_normal((k, d))
    z_e = mv.tensor(rng.standard_normal(shape), requires_grad=True)
    out = vq(z_e)
    idx = nearest_by_hand(z_e.data, vq.codebook.data)
    np.testing.assert_array_equal(out.indices, idx)
    assert out.indices.dtype == np.int64
    e = vq.codebook.data[idx].transpose(0, 3, 1, 2)           # z_q
    np.testing.assert_array_equal(out.quantized.data, e)
    numel = z_e.data.size
    np.testing.assert_allclose(out.loss.item(), (1 + beta) * ((z_e.data - e) ** 2).sum() / numel, rtol=1e-12)

    upstream = rng.standard_normal(shape)
    total = (out.quantized * upstream).sum() + out.loss
    total.backward()
    # dL/dz_e = upstream (straight-through) + 2 beta (z_e - e) / numel
    np.testing.assert_allclose(z_e.grad, upstream + 2 * beta * (z_e.data - e) / numel, rtol=1e-10, atol=1e-14)
    # dL/de_k = sum over positions choosing k of 2 (e_k - z_e) / numel; the decoder path gives nothing
    expected = np.zeros((k, d))
    flat_diff = (e - z_e.data).transpose(0, 2, 3, 1).reshape(-1, d)
    np.add.at(expected, idx.reshape(-1), 2 * flat_diff / numel)
    np.testing.assert_allclose(vq.codebook.grad, expected, rtol=1e-10, atol=1e-14)


def test_outputs_carry_usage_and_perplexity():
    mv.manual_seed(1)
    vq = nn.VectorQuantizer(4, 2)
    vq.codebook.data = np.array([[0, 0], [10, 0], [0, 10], [10, 10]], np.float32)
    z = np.zeros((1, 2, 2, 2), np.float32)
    z[0, :, 0, 0] = [10, 0]
    z[0, :, 0, 1] = [10, 0.5]
    z[0, :, 1, 0] = [0, 9]
    z[0, :, 1, 1] = [0.2, 0.1]
    out = vq(mv.tensor(z, requires_grad=True))
    np.testing.assert_array_equal(out.indices, [[[1, 1], [2, 0]]])
    p = np.array([0.25, 0.5, 0.25])
    assert float(out.perplexity) == pytest.approx(np.exp(-(p * np.log(p)).sum()))
    assert out.codes_used == 3
    quantized, loss, indices, perplexity = out          # the contract's four fields unpack
    assert quantized is out.quantized


def test_graph_shows_the_named_nodes():
    mv.manual_seed(2)
    vq = nn.VectorQuantizer(5, 3)
    out = vq(mv.tensor(np.ones((1, 3, 2, 2), np.float32), requires_grad=True))
    assert out.quantized.creator.name == "StraightThrough"
    names = set()
    stack = [out.loss.creator]
    while stack:
        fn = stack.pop()
        names.add(fn.name)
        stack.extend(x.creator for x in fn.inputs if x.creator is not None)
    assert "StopGradient" in names and "Embedding" in names


def test_ema_update_by_hand():
    decay, eps = 0.5, 1e-5
    vq = nn.VectorQuantizerEMA(2, 1, commitment_cost=0.25, decay=decay, epsilon=eps).double()
    vq.codebook = np.array([[0.0], [10.0]])
    z = np.array([1.0, 2.0, 9.0]).reshape(1, 1, 1, 3)
    out = vq(mv.tensor(z, requires_grad=True))
    # codes chosen with the old codebook
    np.testing.assert_array_equal(out.indices, [[[0, 0, 1]]])
    np.testing.assert_allclose(out.quantized.data.ravel(), [0.0, 0.0, 10.0])
    # step 1: hidden = (1 - decay) * value; debiased by 1 - decay^1 -> the batch statistics themselves
    n = np.array([2.0, 1.0])
    s = np.array([3.0, 9.0])
    total = n.sum()
    smoothed = (n + eps) / (total + 2 * eps) * total
    np.testing.assert_allclose(vq.codebook.ravel(), s / smoothed, rtol=1e-12)
    np.testing.assert_allclose(vq.cluster_size, (1 - decay) * n)
    # step 2 with new data: hidden = decay * hidden + (1 - decay) * value, debiased by 1 - decay^2
    z2 = np.array([4.0, 5.0, 6.0]).reshape(1, 1, 1, 3)
    old = vq.codebook.copy()
    out2 = vq(mv.tensor(z2, requires_grad=True))
    idx2 = np.abs(z2.reshape(-1, 1) - old.reshape(1, -1)).argmin(1)
    np.testing.assert_array_equal(out2.indices.ravel(), idx2)
    n2 = np.bincount(idx2, minlength=2).astype(float)
    s2 = np.bincount(idx2, weights=z2.ravel(), minlength=2)
    hidden_n = decay * (1 - decay) * n + (1 - decay) * n2
    hidden_s = decay * (1 - decay) * s + (1 - decay) * s2
    debias = 1 - decay ** 2
    size, embed = hidden_n / debias, hidden_s / debias
    smoothed = (size + eps) / (size.sum() + 2 * eps) * size.sum()
    np.testing.assert_allclose(vq.codebook.ravel(), embed / smoothed, rtol=1e-12)
    # commitment loss only, and eval mode freezes the codebook
    np.testing.assert_allclose(out2.loss.item(), 0.25 * ((z2.ravel() - old.ravel()[idx2]) ** 2).mean())
    vq.eval()
    frozen = vq.codebook.copy()
    vq(mv.tensor(z2))
    np.testing.assert_array_equal(vq.codebook, frozen)


def test_ema_has_no_parameters_and_buffers_in_state():
    vq = nn.VectorQuantizerEMA(8, 4)
    assert vq.parameters() == []
    assert {"codebook", "cluster_size", "embed_sum"} <= set(vq.state_dict())


def test_kmeans_init_fits_clustered_data():
    rng = np.random.default_rng(4)
    centres = np.array([[-5.0, 0], [5, 0], [0, 5], [0, -5]])
    pts = centres[rng.integers(0, 4, 400)] + 0.1 * rng.standard_normal((400, 2))
    mv.manual_seed(4)
    found = kmeans_plus_plus(pts.astype(np.float32), 4)
    for c in centres:
        assert np.min(np.linalg.norm(found - c, axis=1)) < 0.1
    vq = nn.VectorQuantizer(4, 2, kmeans_init=True)
    z = pts.astype(np.float32).T.reshape(1, 2, 20, 20)
    out = vq(mv.tensor(z))
    assert out.codes_used == 4 and int(vq.initialized) == 1


def test_bad_latents_are_named():
    vq = nn.VectorQuantizer(4, 3)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\), got \(2, 4, 1, 1\)"):
        vq(mv.tensor(np.zeros((2, 4, 1, 1), np.float32)))
    with pytest.raises(TypeError, match="Tensor"):
        vq(np.zeros((2, 3, 1, 1), np.float32))
    with pytest.raises(ValueError, match="decay"):
        nn.VectorQuantizerEMA(4, 3, decay=1.0)
