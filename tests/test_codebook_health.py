"""The vector quantisers' codebook-health options against formulas and finite differences.

Dead-code replacement (usage average by hand, the bound, the EMA accumulators), the cosine and
low-dimensional lookups, SimVQ, k-means++ with the new lookups, VQVAE's decode path for every
quantiser, two ranks (threads sharing a reducer) equal to one process in float64, the fake CuPy,
and the defaults: the paper's and Sonnet's quantisers, unchanged.
"""
import threading

import numpy as np
import pytest

import minivq as mv
from minivq import backend, nn
from minivq import functional as F
from minivq.functional.quantize import l2_normalize
from minivq.nn.quantizers import kmeans_plus_plus

QUANTIZERS = [nn.VectorQuantizer, nn.VectorQuantizerEMA]


def vqvae(decay=0.0, kernel="auto", **options):
    """A VQVAE with the quantiser options named as keywords (the paper's plain quantiser unless given)."""
    fields = set(mv.models.QuantizerOptions.__dataclass_fields__)
    quantizer = mv.models.QuantizerOptions(**{k: v for k, v in options.items() if k in fields})
    return mv.models.VQVAE(decay=decay, quantizer=quantizer, kernel=kernel,
                           **{k: v for k, v in options.items() if k not in fields})


def set_codebook(vq, codebook):
    if isinstance(vq, nn.VectorQuantizerEMA):
        vq.codebook = np.asarray(codebook, vq.codebook.dtype)
    else:
        vq.codebook.data = np.asarray(codebook, vq.codebook.dtype)


def codebook_of(vq):
    return vq.codebook if isinstance(vq, nn.VectorQuantizerEMA) else vq.codebook.data


def latents(rng, n, d, h, w, scale=1.0, dtype=np.float64):
    return mv.tensor((scale * rng.standard_normal((n, d, h, w))).astype(dtype), requires_grad=True)


def rows_of(z):
    return z.transpose(0, 2, 3, 1).reshape(-1, z.shape[1])


# ---------------------------------------------------------------- the defaults are the paper's and Sonnet's
def test_default_quantizers_draw_and_hold_what_they_did():
    mv.manual_seed(5)
    vq = nn.VectorQuantizer(16, 3)
    mv.manual_seed(5)
    expected = backend.rng().uniform(-1 / 16, 1 / 16, (16, 3)).astype(np.float32)
    np.testing.assert_array_equal(vq.codebook.data, expected)
    assert list(vq.state_dict()) == ["codebook", "initialized"]
    assert [name for name, _ in vq.named_parameters()] == ["codebook"]
    mv.manual_seed(5)
    ema = nn.VectorQuantizerEMA(16, 3)
    mv.manual_seed(5)
    limit = np.sqrt(3.0 / 3)
    np.testing.assert_array_equal(ema.codebook, backend.rng().uniform(-limit, limit, (16, 3)).astype(np.float32))
    assert set(ema.state_dict()) == {"codebook", "cluster_size", "embed_sum", "ema_steps", "initialized"}
    model = mv.models.VQVAE(decay=0.0, quantizer=mv.models.PAPER_QUANTIZER)       # the paper's, one option away
    assert type(model.vq) is nn.VectorQuantizer and model.vq.lookup == "l2" and model.vq.lookup_dim is None
    assert model.vq.dead_code_threshold == 0 and not model.vq.simvq and not model.vq.kmeans_init
    assert list(model.vq.state_dict()) == ["codebook", "initialized"]


@pytest.mark.parametrize("cls", QUANTIZERS)
def test_default_forward_never_replaces(cls):
    mv.manual_seed(0)
    vq = cls(8, 2).double()
    set_codebook(vq, np.array([[0, 0]] + [[100 + i, 100] for i in range(7)], np.float64))
    z = latents(np.random.default_rng(0), 1, 2, 3, 3)
    for _ in range(3):
        out = vq(z)
    assert out.replaced == 0
    assert out.codes_used == 1 or cls is nn.VectorQuantizerEMA    # the EMA moves unused codes to 0


# ---------------------------------------------------------------- dead-code replacement
@pytest.mark.parametrize("cls", QUANTIZERS)
def test_dead_codes_by_hand(cls):
    """usage = debiased EMA of the batch counts; the least used dead codes first, at most max_replacements."""
    mv.manual_seed(1)
    decay = cls.usage_decay
    vq = cls(6, 2, dead_code_threshold=1.5, max_replacements=2).double()
    far = np.array([[0, 0], [100, 100], [101, 100], [102, 100], [103, 100], [104, 100]], np.float64)
    set_codebook(vq, far)
    rng = np.random.default_rng(0)
    z = latents(rng, 1, 2, 3, 3)
    out = vq(z)
    # step 1: code 0 takes all nine latents; the debiased average is the batch's counts themselves
    np.testing.assert_array_equal(out.counts, [9, 0, 0, 0, 0, 0])
    assert out.replaced == 2
    flat = rows_of(z.data)
    codebook = codebook_of(vq)
    for k in (1, 2):        # codes 1..5 all have usage 0: ties go to the lower index
        assert np.any(np.all(flat == codebook[k], axis=1)), k
    if cls is nn.VectorQuantizer:         # (the EMA moves unused codes towards 0)
        np.testing.assert_array_equal(codebook[3:], far[3:])
    average = vq.usage / (1 - decay)
    np.testing.assert_allclose(average, [9, 1.5, 1.5, 0, 0, 0], rtol=1e-6)
    # step 2, with the batch the replaced codes came from
    before = vq.usage.astype(np.float64).copy()
    out2 = vq(z)
    counts = out2.counts.astype(np.float64)
    hidden = before + (1 - decay) * (counts - before)
    debias = 1 - decay ** 2
    average = hidden / debias
    dead = np.flatnonzero(average < 1.5)
    expected = dead[np.argsort(average[dead], kind="stable")[:2]]
    assert out2.replaced == len(expected) == 2
    changed = np.flatnonzero(np.any(codebook_of(vq) != codebook, axis=1))
    if cls is nn.VectorQuantizer:         # the plain codebook changes only where codes were re-seeded
        assert set(changed) <= set(expected)
    np.testing.assert_allclose(vq.usage[expected] / debias, 1.5, rtol=1e-6)
    keep = np.setdiff1d(np.arange(6), expected)
    np.testing.assert_allclose(vq.usage[keep], hidden[keep], rtol=1e-6)
    assert int(vq.usage_steps) == 2


def test_replaced_ema_codes_keep_their_accumulators_consistent():
    mv.manual_seed(2)
    vq = nn.VectorQuantizerEMA(6, 2, decay=0.9, dead_code_threshold=1.0, max_replacements=5).double()
    set_codebook(vq, [[0, 0], [100, 100], [101, 100], [102, 100], [103, 100], [104, 100]])
    z = latents(np.random.default_rng(1), 2, 2, 2, 2)
    out = vq(z)
    assert out.replaced == 5
    debias = 1 - 0.9 ** int(vq.ema_steps)
    # the debiased averages of a re-seeded code say: one vector, equal to the code
    np.testing.assert_allclose(vq.cluster_size[1:] / debias, 1.0)
    np.testing.assert_allclose(vq.embed_sum[1:] / debias, vq.codebook[1:])
    flat = rows_of(z.data)
    for code in vq.codebook[1:]:
        assert np.any(np.all(flat == code, axis=1))


def test_decay_warmup_by_hand():
    """With decay_warmup=S, update t averages with decay_t = 1 - 1/min(W, 1 + (t-1)(W-1)/S), W = 1/(1-decay),
    and the averages are the batch statistics weighted (1 - decay_i) prod_{j>i} decay_j: weights summing to one."""
    decay, warmup, eps, k = 0.8, 3, 1e-5, 3
    window = 1 / (1 - decay)
    vq = nn.VectorQuantizerEMA(k, 2, decay=decay, epsilon=eps, decay_warmup=warmup).double()
    rng = np.random.default_rng(20)
    stats, decays = [], []
    for t in range(1, 8):
        z = latents(rng, 2, 2, 3, 3)
        old = vq.codebook.copy()
        out = vq(z)
        idx = out.indices.reshape(-1)
        flat = rows_of(z.data)
        np.testing.assert_array_equal(idx, ((flat[:, None, :] - old[None]) ** 2).sum(-1).argmin(1))
        stats.append((np.bincount(idx, minlength=k).astype(float), np.stack([flat[idx == c].sum(0) for c in range(k)])))
        decays.append(1 - 1 / min(window, 1 + (t - 1) * (window - 1) / warmup))
        weights = np.array([(1 - decays[i]) * np.prod(decays[i + 1:]) for i in range(t)])
        assert weights.sum() == pytest.approx(1.0)          # decay_1 = 0: nothing to debias
        size = sum(w * n for w, (n, _) in zip(weights, stats))
        embed = sum(w * e for w, (_, e) in zip(weights, stats))
        smoothed = (size + eps) / (size.sum() + k * eps) * size.sum()
        np.testing.assert_allclose(vq.codebook, embed / smoothed[:, None], rtol=1e-10, err_msg=f"update {t}")
    assert decays[0] == 0.0 and decays[-1] == decay      # one step at first, the full window from update S + 1
    assert np.all(np.diff(decays) >= 0) and decays[warmup] == pytest.approx(decay)


def test_decay_warmup_keeps_replaced_codes_consistent_and_is_checked():
    mv.manual_seed(2)
    vq = nn.VectorQuantizerEMA(6, 2, decay=0.9, dead_code_threshold=1.0, max_replacements=5, decay_warmup=10).double()
    set_codebook(vq, [[0, 0], [100, 100], [101, 100], [102, 100], [103, 100], [104, 100]])
    vq(latents(np.random.default_rng(1), 2, 2, 2, 2))
    vq(latents(np.random.default_rng(2), 2, 2, 2, 2))
    assert "decay_warmup=10" in repr(vq)
    # the re-seeded codes' averages say: one vector, equal to the code (no debiasing under the warm-up)
    np.testing.assert_allclose(vq.embed_sum / vq.cluster_size[:, None], vq.codebook, rtol=1e-3)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="decay_warmup"):
            nn.VectorQuantizerEMA(6, 2, decay_warmup=bad)
    with pytest.raises(TypeError, match="simvq"):
        nn.VectorQuantizerEMA(6, 2, simvq=True)          # the forwarded options are the shared ones only
    with pytest.raises(ValueError, match="decay_warmup=5 .* needs decay > 0"):
        vqvae(**dict(TINY, decay=0.0, decay_warmup=5))


@pytest.mark.parametrize("cls", QUANTIZERS)
def test_eval_mode_neither_replaces_nor_counts(cls):
    mv.manual_seed(3)
    vq = cls(6, 2, dead_code_threshold=1.0).double().eval()
    before = {k: np.array(v, copy=True) for k, v in vq.state_dict().items()}
    out = vq(latents(np.random.default_rng(2), 1, 2, 3, 3))
    assert out.replaced == 0
    for key, value in vq.state_dict().items():
        np.testing.assert_array_equal(value, before[key], err_msg=key)


def test_a_used_code_below_the_threshold_is_replaced_and_a_busy_one_is_not():
    mv.manual_seed(4)
    vq = nn.VectorQuantizer(3, 1, dead_code_threshold=2.0, max_replacements=3).double()
    vq.codebook.data = np.array([[0.0], [10.0], [-10.0]])
    z = mv.tensor(np.array([0.1, 0.2, -0.1, 9.0]).reshape(1, 1, 1, 4))
    out = vq(z)
    np.testing.assert_array_equal(out.counts, [3, 1, 0])          # code 1 used once: below 2
    assert out.replaced == 2 and vq.codebook.data[0, 0] == 0.0


@pytest.mark.parametrize("kwargs,match", [
    (dict(dead_code_threshold=-1), "dead_code_threshold"), (dict(max_replacements=0), "max_replacements"),
    (dict(max_replacements=2.5), "max_replacements"), (dict(lookup="dot"), "unknown lookup"),
    (dict(lookup_dim=0), "lookup_dim"), (dict(lookup_dim=True), "lookup_dim")])
@pytest.mark.parametrize("cls", QUANTIZERS)
def test_bad_options_are_named(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(8, 4, **kwargs)


def test_restart_after_is_gone():
    for cls in QUANTIZERS:
        with pytest.raises(TypeError):
            cls(8, 4, restart_after=3)
    with pytest.raises(TypeError):
        mv.models.VQVAE(restart_after=3)


# ---------------------------------------------------------------- cosine and low-dimensional lookups
def test_l2_normalize_gradcheck_on_random_shapes():
    rng = np.random.default_rng(11)
    for _ in range(12):
        ndim = int(rng.integers(1, 5))
        shape = tuple(int(n) for n in rng.integers(1, 5, ndim))
        axis = int(rng.integers(0, ndim))
        x = mv.tensor(rng.standard_normal(shape), requires_grad=True)
        assert mv.gradcheck(lambda a: l2_normalize(a, axis=axis), [x]), (shape, axis)


def test_l2_normalize_gradcheck_and_values():
    rng = np.random.default_rng(5)
    for shape, axis in [((3, 4, 2, 2), 1), ((7, 5), 1), ((4, 3), 0)]:
        x = mv.tensor(rng.standard_normal(shape), requires_grad=True)
        y = l2_normalize(x, axis=axis)
        np.testing.assert_allclose(np.linalg.norm(y.data, axis=axis), 1.0)
        assert y.creator.name == "L2Normalize"
        assert mv.gradcheck(lambda a: l2_normalize(a, axis=axis), [x])
    zero = mv.tensor(np.zeros((2, 3)), requires_grad=True)
    y = l2_normalize(zero)
    assert np.all(np.isfinite(y.data)) and np.all(y.data == 0)
    y.backward(np.ones((2, 3)))
    assert np.all(np.isfinite(zero.grad))


@pytest.mark.parametrize("cls", QUANTIZERS)
def test_cosine_lookup_picks_the_largest_cosine_and_compares_unit_vectors(cls):
    mv.manual_seed(6)
    rng = np.random.default_rng(6)
    vq = cls(9, 3, commitment_cost=0.5, lookup="cosine").double()
    codebook = rng.standard_normal((9, 3)) * rng.uniform(0.1, 10, (9, 1))    # norms far apart
    set_codebook(vq, codebook)
    z = latents(rng, 2, 3, 2, 3, scale=4.0)
    out = vq(z)
    flat = rows_of(z.data)
    unit_codes = codebook / np.linalg.norm(codebook, axis=1, keepdims=True)
    unit_rows = flat / np.linalg.norm(flat, axis=1, keepdims=True)
    expected = (unit_rows @ unit_codes.T).argmax(1)
    np.testing.assert_array_equal(out.indices.reshape(-1), expected)
    np.testing.assert_allclose(rows_of(out.quantized.data), unit_codes[expected], rtol=1e-12)
    squared = ((unit_rows - unit_codes[expected]) ** 2).mean()
    total = (1 + 0.5) * squared if cls is nn.VectorQuantizer else 0.5 * squared
    np.testing.assert_allclose(out.loss.item(), total, rtol=1e-10)


def test_low_dimensional_lookup_shapes_and_search_space():
    mv.manual_seed(7)
    vq = nn.VectorQuantizer(10, 6, lookup_dim=2).double()
    assert vq.codebook.shape == (10, 2)
    assert vq.project_in.weight.shape == (2, 6, 1, 1) and vq.project_out.weight.shape == (6, 2, 1, 1)
    z = latents(np.random.default_rng(7), 2, 6, 3, 3)
    out = vq(z)
    assert out.quantized.shape == (2, 6, 3, 3)
    projected = vq.project_in(z).data
    flat = rows_of(projected)
    distances = ((flat[:, None, :] - vq.codebook.data[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(out.indices.reshape(-1), distances.argmin(1))
    z_q = vq.codebook.data[out.indices].transpose(0, 3, 1, 2)
    np.testing.assert_allclose(out.quantized.data, vq.project_out(mv.tensor(z_q)).data, rtol=1e-12)
    assert "lookup_dim=2" in repr(vq)


OPTION_SETS = [dict(lookup="cosine"), dict(lookup_dim=3), dict(lookup="cosine", lookup_dim=3),
               dict(simvq=True), dict(simvq=True, lookup="cosine", lookup_dim=3)]


def _quantizer(options, cls=nn.VectorQuantizer, seed=8):
    mv.manual_seed(seed)
    vq = cls(7, 5, commitment_cost=0.3, **options).double()
    if "simvq" not in options and cls is nn.VectorQuantizer:
        vq.codebook.data = np.random.default_rng(seed).standard_normal(vq.codebook.shape)
    return vq


@pytest.mark.parametrize("options", OPTION_SETS, ids=str)
def test_gradcheck_the_losses_and_the_decoder_path(options):
    """Each loss term against finite differences in what it is differentiated for (the assignment is
    fixed under small perturbations): the commitment term in z_e and project_in's parameters, the
    codebook term in the codebook (or SimVQ's map); the output in project_out's parameters."""
    vq = _quantizer(options)
    z = latents(np.random.default_rng(9), 2, 5, 2, 2)
    project_in = [p for name, p in vq.named_parameters() if name.startswith("project_in")]
    codebook = [vq.code_map if vq.simvq else vq.codebook]
    assert mv.gradcheck(lambda a, *rest: vq(a).commitment_loss, [z, *project_in])
    assert mv.gradcheck(lambda c: vq(z).codebook_loss, codebook)
    if "lookup_dim" in options:
        assert mv.gradcheck(lambda w, b: vq(z).quantized, [vq.project_out.weight, vq.project_out.bias])
    # sg[.] really stops: the codebook term gives z_e nothing, the commitment term the codebook nothing
    vq.zero_grad()
    z.grad = None
    vq(z).codebook_loss.backward()
    assert z.grad is None or not np.any(z.grad)
    vq.zero_grad()
    vq(z).commitment_loss.backward()
    assert codebook[0].grad is None or not np.any(codebook[0].grad)


@pytest.mark.parametrize("options", OPTION_SETS, ids=str)
def test_straight_through_reaches_the_encoder_through_the_lookup_space(options):
    """dL/dz_e through ``quantized`` is the gradient of the continuous path project_out(normalise(project_in(z_e))):
    the straight-through copy happens in the search space."""
    vq = _quantizer(options)
    rng = np.random.default_rng(10)
    z = latents(rng, 2, 5, 2, 2)
    upstream = rng.standard_normal((2, 5, 2, 2))
    (vq(z).quantized * upstream).sum().backward()

    def continuous(a):
        s = vq.project_in(a) if vq.lookup_dim else a
        s = l2_normalize(s) if vq.lookup == "cosine" else s
        return vq.project_out(s) if vq.lookup_dim else s

    z2 = mv.tensor(z.data.copy(), requires_grad=True)
    (continuous(z2) * upstream).sum().backward()
    np.testing.assert_allclose(z.grad, z2.grad, rtol=1e-10, atol=1e-12)
    assert mv.gradcheck(continuous, [z2])


# ---------------------------------------------------------------- SimVQ
def test_simvq_codes_are_frozen_codes_times_the_map_and_all_move():
    mv.manual_seed(11)
    vq = nn.VectorQuantizer(12, 4, simvq=True).double()
    assert [name for name, _ in vq.named_parameters()] == ["code_map"]
    assert set(vq.state_dict()) == {"frozen_codes", "code_map", "initialized"}
    codes = vq.frozen_codes @ vq.code_map.data
    z = latents(np.random.default_rng(11), 1, 4, 1, 2)
    out = vq(z)
    distances = ((rows_of(z.data)[:, None] - codes[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(out.indices.reshape(-1), distances.argmin(1))
    assert out.codes_used <= 2
    optimizer = mv.optim.Adam(vq.parameters(), lr=1e-2)
    frozen = vq.frozen_codes.copy()
    out.loss.backward()
    optimizer.step()
    moved = vq.frozen_codes @ vq.code_map.data
    assert np.all(np.any(moved != codes, axis=1))           # every code moved, though at most two were picked
    np.testing.assert_array_equal(vq.frozen_codes, frozen)   # the frozen codes did not


def test_simvq_reseeding_solves_for_the_frozen_rows():
    mv.manual_seed(12)
    vq = nn.VectorQuantizer(8, 3, simvq=True, dead_code_threshold=1.0, max_replacements=8).double()
    z = latents(np.random.default_rng(12), 1, 3, 2, 2, scale=5.0)
    out = vq(z)
    assert out.replaced >= 4
    codes = vq.frozen_codes @ vq.code_map.data
    flat = rows_of(z.data)
    reseeded = [k for k in range(8) if np.any(np.all(np.isclose(flat, codes[k], rtol=0, atol=1e-10), axis=1))]
    assert len(reseeded) >= out.replaced


def test_simvq_with_the_ema_codebook_is_refused():
    with pytest.raises(ValueError, match="simvq"):
        vqvae(decay=0.99, simvq=True)
    with pytest.raises(TypeError):
        nn.VectorQuantizerEMA(8, 4, simvq=True)


# ---------------------------------------------------------------- k-means++ with the new lookups
def test_spherical_kmeans_finds_directions():
    rng = np.random.default_rng(13)
    directions = np.array([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [-1.0, 0, 0]])
    pts = directions[rng.integers(0, 4, 400)] * rng.uniform(0.5, 20, (400, 1)) + 0.02 * rng.standard_normal((400, 3))
    mv.manual_seed(13)
    centres = kmeans_plus_plus(pts, 4, metric="ip")
    np.testing.assert_allclose(np.linalg.norm(centres, axis=1), 1.0, rtol=1e-9)
    for d in directions:
        assert np.max(centres @ d) > 0.999


@pytest.mark.parametrize("cls", QUANTIZERS)
@pytest.mark.parametrize("options", [dict(lookup="cosine"), dict(lookup_dim=2), dict(lookup="cosine", lookup_dim=2),
                                     dict(simvq=True)], ids=str)
def test_kmeans_init_in_the_search_space(cls, options):
    if cls is nn.VectorQuantizerEMA and "simvq" in options:
        pytest.skip("SimVQ is a plain-quantiser option")
    rng = np.random.default_rng(14)
    mv.manual_seed(14)
    vq = cls(4, 2, kmeans_init=True, **options).double()
    centres = np.array([[-5.0, 0.3], [5, 0.2], [0.1, 5], [0.2, -5]])
    pts = centres[np.arange(400) % 4] + 0.05 * rng.standard_normal((400, 2))
    z = mv.tensor(pts.T.reshape(1, 2, 20, 20))
    out = vq(z)
    assert int(vq.initialized) == 1
    assert out.codes_used == 4           # every centre found, in the (projected, normalised) space searched


# ---------------------------------------------------------------- the VQ-VAE
MODEL_OPTIONS = [dict(), dict(decay=0.9), dict(decay=0.9, decay_warmup=2),
                 dict(dead_code_threshold=1.0, max_replacements=4),
                 dict(decay=0.9, lookup="cosine", lookup_dim=2, dead_code_threshold=1.0),
                 dict(lookup="cosine", lookup_dim=2), dict(simvq=True, lookup="cosine"),
                 dict(levels=(2, 2, 3), num_embeddings=12), dict(decay=0.9, kmeans_init=True, lookup="cosine")]
TINY = dict(num_hiddens=8, num_residual_hiddens=4, num_residual_layers=1, embedding_dim=4, num_embeddings=16)


@pytest.mark.parametrize("options", MODEL_OPTIONS, ids=str)
def test_decode_indices_is_the_decoder_of_the_quantized_latents(options):
    mv.manual_seed(15)
    model = vqvae(**dict(TINY, **options)).double()
    x = np.random.default_rng(15).uniform(-0.5, 0.5, (3, 1, 8, 8))
    model(mv.tensor(x))                    # one training-mode step (k-means, replacement, EMA)
    model.eval()
    with mv.no_grad():
        x_recon, vq = model(mv.tensor(x))
        decoded = model.decode_indices(vq.indices)
    np.testing.assert_allclose(decoded.data, x_recon.data, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(model.encode(x), vq.indices)
    assert vq.indices.min() >= 0 and vq.indices.max() < model.vq.num_embeddings
    restored = vqvae(**dict(TINY, **options)).double()
    restored.load_state_dict(model.state_dict())          # every option's state round-trips
    with mv.no_grad():
        np.testing.assert_array_equal(restored.eval()(mv.tensor(x))[0].data, x_recon.data)


def test_model_config_records_the_quantizer_options():
    model = vqvae(**dict(TINY, lookup="cosine", lookup_dim=2, dead_code_threshold=1.0))
    config = model.config
    assert config["lookup"] == "cosine" and config["lookup_dim"] == 2 and config["dead_code_threshold"] == 1.0
    again = vqvae(**config)
    assert set(again.state_dict()) == set(model.state_dict())


# ---------------------------------------------------------------- two ranks equal one process
class _Board:
    def __init__(self, size):
        self.size, self.barrier, self.slots = size, threading.Barrier(size, timeout=60), [None] * size


class ThreadReducer:
    """A reducer over threads standing in for ranks (the five members distributed.BatchReducer has)."""

    def __init__(self, board, rank):
        self.board, self.rank = board, rank

    @property
    def size(self):
        return self.board.size

    def _exchange(self, array):
        self.board.slots[self.rank] = np.array(array, copy=True)
        self.board.barrier.wait()
        values = list(self.board.slots)
        self.board.barrier.wait()
        return values

    def sum(self, array):
        values = self._exchange(array)
        total = values[0].copy()
        for v in values[1:]:
            total = total + v
        return total

    def gather(self, array):
        return np.concatenate(self._exchange(array))

    def broadcast(self, array):
        return self._exchange(array)[0]


PARALLEL_CASES = {
    "plain-dead": (nn.VectorQuantizer, dict(dead_code_threshold=2.0, max_replacements=5)),
    "ema-dead-kmeans": (nn.VectorQuantizerEMA, dict(dead_code_threshold=2.0, max_replacements=5, kmeans_init=True)),
    "cosine-lowdim-dead": (nn.VectorQuantizerEMA, dict(lookup="cosine", lookup_dim=3, dead_code_threshold=2.0)),
    "ema-warmup-dead": (nn.VectorQuantizerEMA, dict(decay_warmup=2, dead_code_threshold=2.0, max_replacements=5)),
    "simvq-dead-kmeans": (nn.VectorQuantizer, dict(simvq=True, dead_code_threshold=2.0, kmeans_init=True)),
}


@pytest.mark.parametrize("case", list(PARALLEL_CASES))
def test_two_ranks_equal_one_process(case):
    cls, options = PARALLEL_CASES[case]
    rng = np.random.default_rng(16)
    batches = [rng.standard_normal((4, 5, 3, 3)) * 3 for _ in range(4)]

    def build():
        mv.manual_seed(16)
        return cls(12, 5, **options).double()

    one = build()
    replaced_one = [one(mv.tensor(b)).replaced for b in batches]
    state_one, rng_one = one.state_dict(), backend.rng().bit_generator.state

    ranks = [build(), build()]
    after_build = backend.get_rng_state()      # where the single process's generator was after build()
    board = _Board(2)
    for r, vq in enumerate(ranks):
        vq.reducer = ThreadReducer(board, r)
    replaced, errors, final_state = [[], []], [], [None, None]

    def run(r):
        backend.set_rng_state(after_build)     # each thread has its own generator, as each process would
        try:
            for b in batches:
                replaced[r].append(ranks[r](mv.tensor(b[2 * r:2 * r + 2])).replaced)
        except Exception as exc:      # noqa: BLE001 (reported below)
            errors.append(exc)
            board.barrier.abort()
        final_state[r] = backend.get_rng_state()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert replaced[0] == replaced[1] == replaced_one and sum(replaced_one) > 0
    assert final_state[0] == rng_one           # rank 0 drew exactly what the single process drew
    for vq in ranks:
        for key, value in state_one.items():
            np.testing.assert_allclose(vq.state_dict()[key], value, rtol=0, atol=1e-10, err_msg=f"{case} {key}")


# ---------------------------------------------------------------- on the fake CuPy
from test_fake_cupy import fake_cupy  # noqa: E402,F401  (the fixture)


@pytest.mark.parametrize("options", [dict(decay=0.9, lookup="cosine", lookup_dim=2, dead_code_threshold=1.0,
                                          kmeans_init=True, decay_warmup=2),
                                     dict(simvq=True, dead_code_threshold=1.0, max_replacements=3),
                                     dict(levels=(2, 2, 4), num_embeddings=16)], ids=str)
def test_options_on_the_device_match_the_host(fake_cupy, options):  # noqa: F811
    kwargs = dict(TINY, kernel="numpy", **options)
    mv.manual_seed(17)
    host = vqvae(**kwargs).double()
    mv.manual_seed(17)
    device = vqvae(**kwargs).double().to("cuda")
    rng = np.random.default_rng(17)
    for step in range(3):
        x = rng.uniform(-0.5, 0.5, (2, 1, 8, 8))
        mv.manual_seed(100 + step)
        r_host, q_host = host(mv.tensor(x))
        mv.manual_seed(100 + step)
        r_dev, q_dev = device(mv.tensor(x, device="cuda"))
        np.testing.assert_array_equal(backend.to_numpy(q_dev.indices), q_host.indices)
        assert q_dev.replaced == q_host.replaced
        np.testing.assert_allclose(backend.to_numpy(r_dev.data), r_host.data, rtol=1e-9, atol=1e-12)
        ((r_dev * r_dev).mean() + q_dev.loss).backward()
    for name, value in device.state_dict().items():
        assert backend.array_device(value) == "cuda:0", name
    decoded = device.decode_indices(q_dev.indices)
    assert backend.array_device(decoded.data) == "cuda:0"


def test_simvq_reseeding_stays_bounded_when_the_map_is_ill_conditioned():
    """Re-seeding ignores the map's directions weaker than SIMVQ_RCOND x its strongest: the new frozen rows
    stay small (the full inverse would scale them by 1e4 here), and the codes land on the projection of
    their targets onto the map's strong directions."""
    from minivq.nn.quantizers import SIMVQ_RCOND
    mv.manual_seed(13)
    vq = nn.VectorQuantizer(8, 3, simvq=True, dead_code_threshold=1.0, max_replacements=8).double()
    vq.code_map.data[...] = np.diag([1.0, 1e-4, 0.5])               # condition number 10,000
    targets = np.random.default_rng(13).standard_normal((8, 3))
    vq._set_codes(np.arange(8), targets)
    rows = vq.frozen_codes
    assert np.abs(rows).max() <= np.abs(targets).max() / (SIMVQ_RCOND * 1.0) + 1e-12
    np.testing.assert_allclose(rows[:, 1], 0.0, atol=1e-12)         # the weak direction is left out
    codes = rows @ vq.code_map.data
    np.testing.assert_allclose(codes[:, [0, 2]], targets[:, [0, 2]], rtol=1e-12)
