"""The VQ-VAE's architecture and the PixelCNN prior's causality, gradients and sampling."""
import numpy as np
import pytest

import minivq as mv
from minivq import functional as F
from minivq.models import (DEFAULT_QUANTIZER, PAPER_QUANTIZER, VQVAE, GatedLayer, GatedPixelCNN, MaskedConv2d,
                           QuantizerOptions)


def test_vqvae_layout_and_shapes():
    """The paper's model (its learned codebook a parameter): names, shapes, initialisation."""
    mv.manual_seed(0)
    model = VQVAE(decay=0.0, quantizer=PAPER_QUANTIZER)
    names = [n for n, _ in model.named_parameters()]
    assert names[:4] == ["encoder.conv_1.weight", "encoder.conv_1.bias", "encoder.conv_2.weight", "encoder.conv_2.bias"]
    assert "vq.codebook" in names and names[-1] == "decoder.conv_trans_2.bias"
    shapes = dict((n, p.shape) for n, p in model.named_parameters())
    assert shapes["encoder.conv_1.weight"] == (64, 1, 4, 4)
    assert shapes["encoder.residual_stack.layers.0.block.1.weight"] == (32, 128, 3, 3)
    assert shapes["encoder.residual_stack.layers.1.block.3.weight"] == (128, 32, 1, 1)
    assert "encoder.residual_stack.layers.0.block.1.bias" not in shapes       # residual convs have no bias
    assert shapes["encoder.pre_vq_conv.weight"] == (64, 128, 1, 1)
    assert shapes["decoder.conv_trans_1.weight"] == (128, 64, 4, 4)
    assert shapes["decoder.conv_trans_2.weight"] == (64, 1, 4, 4)
    assert shapes["vq.codebook"] == (512, 64)
    assert np.abs(model.vq.codebook.data).max() <= 1 / 512
    x = mv.tensor(np.zeros((2, 1, 32, 32), np.float32))
    x_recon, vq = model(x)
    assert x_recon.shape == (2, 1, 32, 32) and vq.indices.shape == (2, 8, 8)
    assert isinstance(VQVAE(decay=0.99, quantizer=PAPER_QUANTIZER).vq, mv.nn.VectorQuantizerEMA)


def test_vqvae_default_quantizer():
    """VQVAE()'s quantiser is minivq's default, not the paper's: the EMA codebook (decay 0.99, a buffer, not a
    parameter), searched by cosine similarity in 8 dimensions through learned projections, dead codes re-seeded."""
    assert DEFAULT_QUANTIZER == QuantizerOptions(lookup="cosine", lookup_dim=8, dead_code_threshold=1.0)
    assert PAPER_QUANTIZER == QuantizerOptions() and not PAPER_QUANTIZER.changed()
    mv.manual_seed(0)
    model = VQVAE()
    vq = model.vq
    assert type(vq) is mv.nn.VectorQuantizerEMA and vq.decay == 0.99
    assert vq.lookup == "cosine" and vq.lookup_dim == 8 and vq.dead_code_threshold == 1.0
    assert not vq.kmeans_init and vq.estimator == "straight_through"
    assert vq.codebook.shape == (512, 8)
    shapes = dict((n, p.shape) for n, p in model.named_parameters())
    assert "vq.codebook" not in shapes
    assert shapes["vq.project_in.weight"] == (8, 64, 1, 1) and shapes["vq.project_out.weight"] == (64, 8, 1, 1)
    assert {"codebook", "usage", "usage_steps"} <= set(vq.state_dict())
    assert model.config["decay"] == 0.99 and model.config["lookup"] == "cosine"
    assert model.config["lookup_dim"] == 8 and model.config["dead_code_threshold"] == 1.0
    x = mv.tensor(np.zeros((2, 1, 32, 32), np.float32))
    x_recon, out = model(x)
    assert x_recon.shape == (2, 1, 32, 32) and out.indices.shape == (2, 8, 8)
    with pytest.raises(TypeError, match="QuantizerOptions"):
        VQVAE(quantizer=dict(lookup="cosine"))


def test_vqvae_parameter_count_matches_torch_reference():
    pytest.importorskip("torch")
    import sys, os
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks"))
    from torch_vqvae import VQVAE as TorchVQVAE
    ours = VQVAE(in_channels=3, decay=0.0, quantizer=PAPER_QUANTIZER).num_parameters()     # the paper's, as torch's
    theirs = sum(p.numel() for p in TorchVQVAE(in_channels=3).parameters())
    assert ours == theirs


def test_vqvae_rejects_wrong_images():
    model = VQVAE(num_hiddens=8, num_residual_hiddens=4, embedding_dim=4, num_embeddings=8)
    with pytest.raises(ValueError, match=r"\(N, 1, H, W\).*got \(2, 3, 32, 32\)"):
        model(np.zeros((2, 3, 32, 32), np.float32))
    with pytest.raises(ValueError, match="multiples of 4"):
        model(np.zeros((2, 1, 30, 30), np.float32))


def test_small_vqvae_gradients_in_float64():
    """Encoder and decoder gradients through the whole model, by random directions."""
    mv.manual_seed(1)
    model = VQVAE(num_hiddens=4, num_residual_hiddens=2, num_residual_layers=1, embedding_dim=3,
                  num_embeddings=5).double()
    x = mv.tensor(np.random.default_rng(1).uniform(-0.5, 0.5, (2, 1, 8, 8)))
    # the codes must not flip under the finite-difference steps: check the decoder path with fixed indices
    idx = model.encode(x.data)
    dec = model.decoder

    def decode(codebook):
        return dec(F.transpose(F.embedding(idx, codebook), (0, 3, 1, 2)))

    cb = mv.tensor(np.random.default_rng(2).standard_normal((5, 3)), requires_grad=True)
    assert mv.gradcheck(decode, [cb], directions=4)
    enc_in = mv.tensor(x.data, requires_grad=True)
    assert mv.gradcheck(lambda t: model.encoder(t), [enc_in], directions=4)


def test_decode_indices_equals_the_forward_pass():
    mv.manual_seed(2)
    model = VQVAE(num_hiddens=8, num_residual_hiddens=4, embedding_dim=4, num_embeddings=8).eval()
    x = np.random.default_rng(3).uniform(-0.5, 0.5, (3, 1, 16, 16)).astype(np.float32)
    with mv.no_grad():
        recon, vq = model(x)
        again = model.decode_indices(model.encode(x))
    np.testing.assert_allclose(again.data, recon.data, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- PixelCNN
def _dependencies(model, h, w, labels=None):
    """For each output position, which input positions it depends on (through gradients)."""
    deps = {}
    rng = np.random.default_rng(0)
    for i in range(h):
        for j in range(w):
            x = mv.tensor(rng.standard_normal((1, model.embedding.embedding_dim, h, w)), requires_grad=True)
            v = hh = x
            for layer in model.layers:
                v, hh = layer(v, hh, labels)
            # the head is 1x1 (pointwise) and cannot change which positions are seen; its ReLUs
            # could hide a dependency by chance, so the stacks' output is probed directly
            hh[:, :, i, j].sum().backward()
            deps[(i, j)] = set(np.flatnonzero(np.abs(x.grad).sum(axis=(0, 1)).reshape(-1) > 0).tolist())
    return deps


@pytest.mark.parametrize("kernel_size,layers,h,w", [(3, 6, 4, 5), (5, 3, 5, 4), (3, 2, 3, 3),
                                                    (5, 6, 8, 8)])     # the default prior on 8x8 grids
def test_pixelcnn_is_autoregressive_with_no_blind_spot(kernel_size, layers, h, w):
    mv.manual_seed(3)
    model = GatedPixelCNN(6, channels=3, num_layers=layers, kernel_size=kernel_size, head_channels=5).double()
    deps = _dependencies(model, h, w)
    for (i, j), seen in deps.items():
        pos = i * w + j
        assert all(p < pos for p in seen), f"position {(i, j)} sees the future: {sorted(seen)}"
    if layers * (kernel_size // 2) >= max(h, w):
        # deep enough to reach everything: every earlier position must be seen (no blind spot)
        for (i, j), seen in deps.items():
            assert seen == set(range(i * w + j)), f"blind spot at {(i, j)}"


def test_pixelcnn_head_is_pointwise():
    model = GatedPixelCNN(4, channels=2, num_layers=1, kernel_size=3, head_channels=3)
    assert model.head_1.kernel_size == (1, 1) and model.head_2.kernel_size == (1, 1)


def test_pixelcnn_logits_do_not_depend_on_later_codes():
    mv.manual_seed(4)
    model = GatedPixelCNN(5, channels=4, num_layers=3, kernel_size=3, head_channels=6)
    rng = np.random.default_rng(4)
    grid = rng.integers(0, 5, (2, 4, 4))
    base = model(grid).data
    for pos in range(16):
        i, j = divmod(pos, 4)
        changed = grid.copy()
        flat = changed.reshape(2, -1)
        flat[:, pos:] = rng.integers(0, 5, flat[:, pos:].shape)
        out = model(changed).data
        before = [(a, b) for a in range(4) for b in range(4) if a * 4 + b <= pos]
        for a, b in before:
            np.testing.assert_array_equal(out[:, :, a, b], base[:, :, a, b])


def test_masked_and_gated_layers_gradcheck():
    mv.manual_seed(5)
    rng = np.random.default_rng(5)
    mask = np.array([[1, 1, 1], [1, 0, 0]], np.float32)
    conv = MaskedConv2d(2, 3, mask, pad=(1, 1, 1, 0)).double()
    x = mv.tensor(rng.standard_normal((2, 2, 4, 5)), requires_grad=True)
    assert mv.gradcheck(lambda t, w: F.conv2d(F.pad(t, conv.pad), w * conv.mask, conv.bias), [x, conv.weight])
    # masked taps get exactly zero gradient
    conv(x).sum().backward()
    assert np.all(conv.weight.grad[:, :, 1, 1:] == 0) and np.any(conv.weight.grad[:, :, 0] != 0)
    for mask_type in ("A", "B"):
        layer = GatedLayer(2, 3, mask_type, num_classes=3).double()
        v = mv.tensor(rng.standard_normal((2, 2, 3, 4)), requires_grad=True)
        h = mv.tensor(rng.standard_normal((2, 2, 3, 4)), requires_grad=True)
        labels = np.array([0, 2])
        assert mv.gradcheck(lambda a, b: F.concatenate(layer(a, b, labels), axis=1), [v, h])
        params = [layer.vertical.weight, layer.horizontal.weight, layer.vert_to_horiz.weight,
                  layer.class_bias.weight]
        assert mv.gradcheck(lambda *ps: F.concatenate(layer(v, h, labels), axis=1), params, directions=3)


def test_sampling_is_reproducible_and_in_range():
    mv.manual_seed(6)
    model = GatedPixelCNN(7, channels=4, num_layers=2, kernel_size=3, head_channels=8, num_classes=2)
    mv.manual_seed(11)
    a = model.sample(3, (3, 4), labels=1)
    mv.manual_seed(11)
    b = model.sample(3, (3, 4), labels=1)
    mv.manual_seed(12)
    c = model.sample(3, (3, 4), labels=1)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (3, 3, 4) and a.dtype == np.int64 and a.min() >= 0 and a.max() < 7
    assert not np.array_equal(a, c)


def test_sampling_follows_the_model_distribution():
    """A 1x1 grid: the first position has no context, so samples follow softmax(bias-only logits)."""
    mv.manual_seed(7)
    model = GatedPixelCNN(4, channels=2, num_layers=1, kernel_size=3, head_channels=3)
    with mv.no_grad():
        logits = model(np.zeros((1, 1, 1), np.int64)).data[0, :, 0, 0].astype(np.float64)
    p = np.exp(logits - logits.max())
    p /= p.sum()
    mv.manual_seed(8)
    draws = model.sample(4000, (1, 1)).reshape(-1)
    freq = np.bincount(draws, minlength=4) / 4000
    np.testing.assert_allclose(freq, p, atol=0.03)


def test_prior_input_checks():
    model = GatedPixelCNN(4, channels=2, num_layers=1, kernel_size=3, num_classes=3)
    with pytest.raises(ValueError, match="class-conditional"):
        model(np.zeros((1, 2, 2), np.int64))
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        model(np.zeros((2, 2), np.int64), np.zeros(1, np.int64))
    with pytest.raises(ValueError, match="kernel_size"):
        GatedPixelCNN(4, kernel_size=4)


@pytest.mark.parametrize("channels", [1, 3])
def test_center_output_makes_the_mean_reconstruction_the_batch_mean(channels):
    mv.manual_seed(3)
    model = VQVAE(in_channels=channels, num_hiddens=8, num_residual_hiddens=4, num_residual_layers=1,
                  embedding_dim=4, num_embeddings=16).double()
    x = np.random.default_rng(3).uniform(-0.5, 0.5, (6, channels, 8, 8)) - 0.2 * np.arange(channels)[:, None, None]
    before = {k: v.copy() for k, v in model.state_dict().items()}
    shift = model.center_output(x)
    assert model.training and shift.shape == (channels,)
    with mv.no_grad():
        x_recon, _ = model.eval()(mv.tensor(x))
    np.testing.assert_allclose(x_recon.data.mean(axis=(0, 2, 3)), x.mean(axis=(0, 2, 3)), atol=1e-12)
    after = model.state_dict()
    for key, value in before.items():          # only the last bias moved; the codebook was not updated
        if key != "decoder.conv_trans_2.bias":
            np.testing.assert_array_equal(after[key], value, err_msg=key)
    np.testing.assert_allclose(after["decoder.conv_trans_2.bias"] - before["decoder.conv_trans_2.bias"], shift)


@pytest.mark.parametrize("which", ["prior", "vqvae", "paper vqvae"])
def test_a_training_step_hands_every_convolution_channels_last_arrays(monkeypatch, which):
    """Activations and their gradients stay channels-last through the whole step (functional/conv.py),
    so no convolution pays a transposing copy of its input or of the gradient it receives."""
    from minivq.functional import conv as conv_module
    strays = []
    for name in ("_rows", "_im2col"):
        original = getattr(conv_module, name)

        def spy(a, *rest, original=original, name=name):
            if not a.transpose(0, 2, 3, 1).flags.c_contiguous:
                strays.append((name, a.shape, a.strides))
            return original(a, *rest)
        monkeypatch.setattr(conv_module, name, spy)
    gen = np.random.default_rng(0)
    if which == "prior":
        loss = GatedPixelCNN(16, num_layers=2).loss(gen.integers(0, 16, (3, 6, 6)))
    else:
        model = VQVAE(num_hiddens=8, num_residual_hiddens=4, embedding_dim=4, num_embeddings=16,
                      **({"decay": 0.0, "quantizer": PAPER_QUANTIZER} if which == "paper vqvae" else {}))
        x = mv.tensor(gen.random((2, 1, 16, 16)).astype(np.float32))
        x_recon, vq = model(x)
        loss = F.mse_loss(x_recon, x) + vq.loss
    loss.backward()
    assert strays == []
