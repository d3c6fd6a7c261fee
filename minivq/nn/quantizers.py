"""The vector quantisers of the VQ-VAE: a learned codebook, and its EMA variant.

Both take encoder outputs ``z_e`` (N, D, H, W), replace each D-vector by its
nearest codebook row and return ``VQOutput(quantized, loss, indices,
perplexity)``; the output also carries ``codes_used``, ``codebook_loss`` and
``commitment_loss`` as attributes, for logging. ``dequantize(indices)`` gives
the decoder's input for index grids (what the VQ-VAE decodes samples with).

Called with the API contract's arguments they are the paper's and Sonnet's
quantisers exactly. The codebook-health options (dead-code replacement, the
cosine and low-dimensional lookups, SimVQ, k-means++ initialisation) are
opt-in constructor arguments; FSQ, a quantiser without a codebook, is in fsq.py.
"""
from collections import namedtuple

import numpy as np

from .. import backend
from ..autograd import Tensor
from ..functional.basic import embedding, matmul, transpose
from ..functional.quantize import ESTIMATORS, flatten_latents, l2_normalize, vector_quantize
from ..kernels import index_add, nearest_code
from .conv import Conv2d
from .module import Module, Parameter

SIMVQ_RCOND = 0.1    # SimVQ re-seeding ignores the map's directions below this share of its strongest


class VQOutput(namedtuple("VQOutput", "quantized loss indices perplexity")):
    """quantized: Tensor (N, D, H, W); loss: scalar Tensor; indices: int64 (N, H, W); perplexity: 0-d array.

    Attributes beside the four fields: ``codes_used`` (how many distinct codes
    the batch picked), ``counts`` (per code), ``codebook_loss`` and
    ``commitment_loss`` (Tensors), ``z_e`` (the input), ``z_q`` (the chosen codes, the
    estimator's second input: in the search space, before ``project_out``), ``replaced``
    (dead codes re-seeded this step).
    """

    @property
    def codes_used(self):
        # computed when asked for: on the GPU it is a copy to the host, which waits for the device
        return int((self.counts > 0).sum())


def perplexity(counts):
    """exp(H(p)), p the code distribution given by per-code ``counts``: a 0-d array beside the counts."""
    xp = backend.get_array_module(counts)
    p = counts / xp.maximum(counts.sum(), 1)
    entropy = -(p * xp.log(xp.where(p > 0, p, 1.0))).sum()
    return xp.exp(entropy)


def _usage(indices, num_embeddings):
    """Perplexity of the codes' empirical distribution, and the per-code counts."""
    xp = backend.get_array_module(indices)
    counts = xp.bincount(indices.reshape(-1), minlength=num_embeddings)
    return perplexity(counts), counts


class LocalBatch:
    """Where the quantisers' batch statistics come from: in a single process, the batch alone.

    Data-parallel training (``minivq.distributed``) sets ``quantizer.reducer`` to an
    object with these same five members that combines the shares of the global
    batch held by the ranks; nn itself never sees a process. Rank ``r`` of ``size``
    holds the consecutive rows [r m, (r + 1) m) of the global batch.
    """
    rank, size = 0, 1

    def sum(self, array):
        """The element-wise sum of ``array`` over the ranks (counts, EMA sums)."""
        return array

    def gather(self, array):
        """Every rank's rows of ``array``, concatenated in rank order (the global batch)."""
        return array

    def broadcast(self, array):
        """Rank 0's ``array`` (a choice made once for all ranks)."""
        return array


def _check_latents(z_e, dim, who):
    if not isinstance(z_e, Tensor):
        raise TypeError(f"{who} takes a Tensor, got {type(z_e).__name__}")
    if z_e.ndim != 4 or z_e.shape[1] != dim:
        raise ValueError(f"{who} expects z_e of shape (N, {dim}, H, W), got {z_e.shape}")
    if z_e.dtype.kind != "f":
        raise TypeError(f"{who} expects a floating-point z_e, got {z_e.dtype}")


def kmeans_plus_plus(vectors, k, iterations=10, metric="l2"):
    """k-means++ seeding followed by ``iterations`` Lloyd steps; returns (k, D) centres.

    Used to initialise a codebook from the first batch. With fewer distinct
    vectors than k, the remaining centres repeat sampled vectors. ``metric="ip"``
    is spherical k-means, for the cosine lookup: the vectors are l2-normalised,
    each is assigned to the centre of largest inner product and the centres are
    renormalised after every step.
    """
    xp = backend.get_array_module(vectors)
    host = backend.to_numpy(vectors).astype(np.float64)
    if metric == "ip":
        host = host / np.maximum(np.linalg.norm(host, axis=1, keepdims=True), 1e-12)
    gen = backend.rng()
    m = host.shape[0]
    centres = np.empty((k, host.shape[1]))
    centres[0] = host[gen.integers(m)]
    closest = ((host - centres[0]) ** 2).sum(1)
    for j in range(1, k):
        total = closest.sum()
        pick = gen.integers(m) if total <= 0 else gen.choice(m, p=closest / total)
        centres[j] = host[pick]
        closest = np.minimum(closest, ((host - centres[j]) ** 2).sum(1))
    for _ in range(iterations):
        assign = nearest_code(host, centres, backend="numpy", metric=metric)
        counts = np.bincount(assign, minlength=k)
        sums = index_add(assign, host, k)
        used = counts > 0
        centres[used] = sums[used] / counts[used, None]
        if metric == "ip":
            centres[used] /= np.maximum(np.linalg.norm(centres[used], axis=1, keepdims=True), 1e-12)
    return xp.asarray(centres.astype(vectors.dtype))


LOOKUPS = {"l2": "l2", "cosine": "ip"}      # lookup -> the nearest-code kernel's metric


class _QuantizerBase(Module):
    """What both quantisers share: the lookup space, k-means++ initialisation, dead-code replacement, usage.

    The search space: with ``lookup_dim=d`` a learned 1x1 convolution ``project_in``
    takes z_e from D to d channels, the codes live in d dimensions, and
    ``project_out`` (d -> D) takes the chosen codes back to the decoder (ViT-VQGAN's
    factorised codes). With ``lookup="cosine"`` the search-space vectors and the
    codes are l2-normalised, so the nearest code is the one of largest cosine
    similarity, and the losses compare unit vectors.

    Dead-code replacement (``dead_code_threshold > 0``): the buffer ``usage`` holds
    an exponential moving average (decay ``usage_decay``, debiased) of how many
    latents of a training batch picked each code. After each training step, codes
    whose average is below the threshold are re-seeded from random search-space
    vectors of the batch, the least used first and at most ``max_replacements`` per
    step; a re-seeded code starts at the threshold.
    """

    # of the per-code usage average that dead-code replacement reads: 0.9 re-seeds a code that fell idle within
    # some tens of steps, where 0.99 took hundreds (in an early screen, 342 codes in use at step 300 with 0.99
    # against all 512 with 0.9, at equal test error: benchmarks/NOTES.md, codebook health)
    usage_decay = 0.9

    def __init__(self, num_embeddings, embedding_dim, commitment_cost, kmeans_init=False, kernel="auto",
                 estimator="straight_through", dead_code_threshold=0.0, max_replacements=64, lookup="l2",
                 lookup_dim=None):
        super().__init__()
        if estimator not in ESTIMATORS:
            raise ValueError(f"unknown gradient estimator {estimator!r}: use one of {', '.join(ESTIMATORS)}")
        if int(num_embeddings) < 1 or int(embedding_dim) < 1:
            raise ValueError(f"num_embeddings and embedding_dim must be >= 1, got {num_embeddings}, {embedding_dim}")
        if commitment_cost < 0:
            raise ValueError(f"commitment_cost must be >= 0, got {commitment_cost}")
        if not dead_code_threshold >= 0:
            raise ValueError(f"dead_code_threshold must be >= 0 (0 turns dead-code replacement off), "
                             f"got {dead_code_threshold}")
        if isinstance(max_replacements, bool) or int(max_replacements) != max_replacements or max_replacements < 1:
            raise ValueError(f"max_replacements must be an integer >= 1, got {max_replacements!r}")
        if lookup not in LOOKUPS:
            raise ValueError(f"unknown lookup {lookup!r}: use one of {', '.join(LOOKUPS)}")
        if lookup_dim is not None and (isinstance(lookup_dim, bool) or int(lookup_dim) != lookup_dim
                                       or lookup_dim < 1):
            raise ValueError(f"lookup_dim must be None (search in D) or an integer >= 1, got {lookup_dim!r}")
        self.num_embeddings, self.embedding_dim = int(num_embeddings), int(embedding_dim)
        self.commitment_cost = float(commitment_cost)
        self.kmeans_init = bool(kmeans_init)
        self.kernel = kernel
        self.estimator = estimator
        self.dead_code_threshold = float(dead_code_threshold)
        self.max_replacements = int(max_replacements)
        self.lookup = lookup
        self.lookup_dim = None if lookup_dim is None else int(lookup_dim)
        self.code_dim = self.lookup_dim or self.embedding_dim      # where the codes and the search live
        # whether k-means init has run
        self.register_buffer("initialized", np.array(0 if kmeans_init else 1, np.int64))
        if self.dead_code_threshold > 0:
            self.register_buffer("usage", np.zeros(self.num_embeddings, np.float32))    # un-debiased EMA
            self.register_buffer("usage_steps", np.array(0, np.int64))
        # data-parallel training injects a reducer over the ranks: usage and EMA statistics are then
        # summed over the global batch, and the random choices of replacements and k-means are made on rank 0
        self.reducer = LocalBatch()

    def _add_projections(self):
        """The learned 1x1 maps D -> d and d -> D of a low-dimensional lookup (called after the codebook)."""
        if self.lookup_dim is not None:
            self.project_in = Conv2d(self.embedding_dim, self.lookup_dim, 1)
            self.project_out = Conv2d(self.lookup_dim, self.embedding_dim, 1)

    def extra_repr(self):
        text = (f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}, "
                f"commitment_cost={self.commitment_cost}")
        if self.lookup != "l2":
            text += f", lookup={self.lookup!r}"
        if self.lookup_dim is not None:
            text += f", lookup_dim={self.lookup_dim}"
        if self.dead_code_threshold > 0:
            text += f", dead_code_threshold={self.dead_code_threshold}, max_replacements={self.max_replacements}"
        return text

    # -- what each quantiser defines
    def _codes(self, dtype):
        """The codebook as the lookup sees it (normalised for the cosine lookup): a Tensor or an array."""
        raise NotImplementedError

    def _set_codes(self, which, vectors):
        """Make codes ``which`` equal to search-space ``vectors`` (k-means init, replacement)."""
        raise NotImplementedError

    def _loss(self, codebook_loss, commitment_loss):
        raise NotImplementedError

    def _update(self, flat, indices):
        """After the lookup of a training step (the EMA update)."""

    # -- the step
    def forward(self, z_e):
        _check_latents(z_e, self.embedding_dim, type(self).__name__)
        z = self._search_space(z_e)
        flat = flatten_latents(z.data)
        self._maybe_kmeans_init(flat)
        quantized, codebook_loss, commitment_loss, indices = vector_quantize(
            z, self._codes(z.dtype), self.commitment_cost, backend=self.kernel, estimator=self.estimator,
            metric=LOOKUPS[self.lookup])
        # z_q is the estimator's second input; under no_grad there is no node, and quantized holds its values
        z_q = quantized.creator.inputs[1] if quantized.creator is not None else quantized
        if self.lookup_dim is not None:
            quantized = self.project_out(quantized)
        out = self._output(z_e, quantized, self._loss(codebook_loss, commitment_loss), codebook_loss,
                           commitment_loss, indices)
        out.z_q = z_q
        if out.loss.name is None:
            out.loss.name = "vq_loss"
        if self.training:
            self._update(flat, indices.reshape(-1))
        out.replaced = self._replace_dead_codes(flat, out.counts)
        return out

    def _search_space(self, z_e):
        """z_e as the lookup sees it: projected to d channels, l2-normalised over channels for cosine."""
        z = self.project_in(z_e) if self.lookup_dim is not None else z_e
        return l2_normalize(z, axis=1) if self.lookup == "cosine" else z

    def dequantize(self, indices):
        """z_q for index grids ``indices`` (N, H, W): the codes (projected back to D), a Tensor (N, D, H, W)."""
        codes = self._codes(self.codebook_dtype)
        z_q = transpose(embedding(indices, codes), (0, 3, 1, 2))
        return self.project_out(z_q) if self.lookup_dim is not None else z_q

    def _distributed(self):
        return self.reducer.size > 1

    def _maybe_kmeans_init(self, flat):
        # kmeans_init is checked first: reading the flag from the GPU would wait for the device every step
        if self.training and self.kmeans_init and int(self.initialized) == 0:
            metric = LOOKUPS[self.lookup]
            if self._distributed():     # rank 0 clusters the whole global batch, the others take its centres
                everything = self.reducer.gather(flat)
                xp = backend.get_array_module(flat)
                centres = (kmeans_plus_plus(everything, self.num_embeddings, metric=metric)
                           if self.reducer.rank == 0 else xp.empty((self.num_embeddings, flat.shape[1]), flat.dtype))
                centres = self.reducer.broadcast(centres)
            else:
                centres = kmeans_plus_plus(flat, self.num_embeddings, metric=metric)
            self._set_codes(np.arange(self.num_embeddings), centres)
            self.initialized = backend.to_device(np.array(1, np.int64), backend.array_device(self.initialized))

    def _replace_dead_codes(self, flat, counts):
        """Re-seed codes whose usage average fell below ``dead_code_threshold``; returns how many."""
        if not (self.training and self.dead_code_threshold > 0):
            return 0
        # the global batch's counts (a code is used if any rank's slice picked it); the decisions are
        # made on the host, from the same sums on every rank, so all ranks replace the same codes
        counts = self.reducer.sum(backend.to_numpy(counts).astype(np.int64))
        decay = self.usage_decay
        steps = int(self.usage_steps) + 1
        usage = backend.to_numpy(self.usage).astype(np.float64)
        usage += (1.0 - decay) * (counts - usage)          # hidden <- hidden - (hidden - value)(1 - decay)
        debias = 1.0 - decay ** steps
        average = usage / debias
        dead = np.flatnonzero(average < self.dead_code_threshold)
        if dead.size > self.max_replacements:        # the least used first, ties to the lower index
            dead = dead[np.argsort(average[dead], kind="stable")[:self.max_replacements]]
        if dead.size:
            self._set_codes(dead, self._global_rows(flat, dead.size))
            usage[dead] = self.dead_code_threshold * debias
        device = backend.array_device(self.usage)
        self.usage = backend.to_device(usage.astype(self.usage.dtype), device)
        self.usage_steps = backend.to_device(np.array(steps, np.int64), device)
        return int(dead.size)

    def _global_rows(self, flat, count):
        """``count`` random rows of the global batch's latents, drawn on rank 0 as one process would draw them.

        Rank r holds the global rows [r m, (r + 1) m) (m rows each, ranks take equal
        consecutive slices of the batch); every rank fills in the chosen rows it holds,
        zeros elsewhere, and a sum over the ranks assembles them exactly.
        """
        m, reducer = flat.shape[0], self.reducer
        total = m * reducer.size
        rows = (backend.rng().choice(total, size=count, replace=count > total) if reducer.rank == 0 else
                np.empty(count, np.int64))
        rows = reducer.broadcast(np.asarray(rows, np.int64))
        mine = np.flatnonzero((rows >= reducer.rank * m) & (rows < (reducer.rank + 1) * m))
        xp = backend.get_array_module(flat)
        device = backend.array_device(flat)
        vectors = xp.zeros((count, flat.shape[1]), flat.dtype)
        vectors[backend.to_device(mine, device)] = flat[backend.to_device(rows[mine] - reducer.rank * m, device)]
        return reducer.sum(vectors)

    def _output(self, z_e, quantized, loss, codebook_loss, commitment_loss, indices):
        perplexity, counts = _usage(indices, self.num_embeddings)
        out = VQOutput(quantized, loss, indices, perplexity)
        out.z_e = z_e
        out.codebook_loss, out.commitment_loss = codebook_loss, commitment_loss
        out.counts = counts
        return out


class VectorQuantizer(_QuantizerBase):
    """The paper's quantiser: a learned codebook trained by its own loss term.

    loss = mean ||sg[z_e] - e||^2 + commitment_cost * mean ||z_e - sg[e]||^2, and the
    output ``straight_through(z_e, e)`` copies the decoder's gradient to the encoder.

    Options (each off by default, so the defaults are the paper's quantiser):
    ``kmeans_init=True`` sets the codebook by k-means++ on the first training batch;
    ``kernel`` picks the nearest-code backend (see ``minivq.kernels.nearest_code``);
    ``estimator`` the gradient estimator, "straight_through" (the paper's) or "rotation"
    (Fifty et al., 2024); ``dead_code_threshold`` and ``max_replacements`` turn on
    dead-code replacement, ``lookup="cosine"`` the cosine-similarity lookup and
    ``lookup_dim`` the low-dimensional one (see ``_QuantizerBase``);
    ``simvq=True`` reparameterises the codebook as SimVQ (Zhu et al., 2024) does:
    codes = ``frozen_codes`` (K, d), a fixed random buffer, times ``code_map`` (d, d),
    the learned parameter, so that every code moves at every step.
    """

    def __init__(self, num_embeddings, embedding_dim, commitment_cost=0.25, kmeans_init=False, kernel="auto",
                 estimator="straight_through", dead_code_threshold=0.0, max_replacements=64, lookup="l2",
                 lookup_dim=None, simvq=False):
        super().__init__(num_embeddings, embedding_dim, commitment_cost, kmeans_init, kernel, estimator,
                         dead_code_threshold, max_replacements, lookup, lookup_dim)
        k, d = self.num_embeddings, self.code_dim
        self.simvq = bool(simvq)
        if self.simvq:
            # SimVQ's initialisation: codes N(0, 1/d), the map as PyTorch initialises a d x d linear layer
            self.register_buffer("frozen_codes", backend.rng().normal(0.0, d ** -0.5, (k, d)).astype(np.float32))
            self.code_map = Parameter(backend.rng().uniform(-d ** -0.5, d ** -0.5, (d, d)).astype(np.float32))
        else:
            self.codebook = Parameter(backend.rng().uniform(-1.0 / k, 1.0 / k, (k, d)).astype(np.float32))
        self._add_projections()

    def extra_repr(self):
        return super().extra_repr() + (", simvq=True" if self.simvq else "")

    @property
    def codebook_dtype(self):
        return self.code_map.dtype if self.simvq else self.codebook.dtype

    def _codes(self, dtype):
        codes = matmul(self.frozen_codes, self.code_map) if self.simvq else self.codebook
        return l2_normalize(codes, axis=1) if self.lookup == "cosine" else codes

    def _set_codes(self, which, vectors):
        if self.simvq:      # frozen rows c with c code_map = vector: c = vector pinv(code_map)
            device = backend.array_device(self.frozen_codes)
            # the pseudo-inverse of the small (d, d) map is taken on the host, in float64, without the
            # map's directions weaker than SIMVQ_RCOND x its strongest: as the map grows ill-conditioned
            # in training (condition 3,000 after 500 steps) the full inverse wrote frozen rows of norm up to
            # 420 (the random ones have about 1), and every later update of the map threw those codes far
            inverse = backend.to_device(np.linalg.pinv(backend.to_numpy(self.code_map.data).astype(np.float64),
                                                       rcond=SIMVQ_RCOND), device)
            rows = vectors.astype(np.float64) @ inverse
            self.frozen_codes[backend.to_device(which, device)] = rows.astype(self.frozen_codes.dtype)
        else:
            self.codebook.data[backend.to_device(which, self.codebook.device)] = vectors.astype(self.codebook.dtype)

    def _loss(self, codebook_loss, commitment_loss):
        return codebook_loss + commitment_loss


class VectorQuantizerEMA(_QuantizerBase):
    """The codebook as exponential moving averages of the encoder outputs assigned to each code.

    As Sonnet v2 computes it: with one-hot assignments, per-code counts n_k and
    sums s_k of the batch,
        N_k <- EMA(n_k),  S_k <- EMA(s_k)      (zero-initialised, debiased by 1 - decay^t)
        N_k' = (N_k + eps) / (sum N + K eps) * sum N      (Laplace smoothing)
        e_k  = S_k / N_k'
    Codes are looked up with the codebook as it was before the step's update;
    updates happen only in train mode. The loss is the commitment term alone.

    Buffers: ``codebook`` (K, D); ``cluster_size`` (K,) and ``embed_sum`` (K, D),
    the *un-debiased* EMA accumulators; ``ema_steps``, the count t of updates.
    Options as ``VectorQuantizer``'s (but SimVQ, whose codebook is learned by
    gradient); with a cosine or low-dimensional lookup the averages are taken of
    the search-space vectors (projected, normalised).

    ``decay_warmup=S`` (0: off, Sonnet's fixed decay) lets the averaging window,
    1 / (1 - decay_t), grow linearly from one step at the first update to
    1 / (1 - decay) at update S + 1, and stay there: early codes follow the
    encoder's fast-moving outputs, later ones average over as many steps as the
    fixed decay would. A window of one step at the first update (decay_1 = 0)
    fills the accumulators with that batch's statistics, so their weights sum to
    1 - prod(decay_i) = 1 from then on: no debiasing is needed.

    ``options``: ``VectorQuantizer``'s keyword options (kmeans_init, kernel,
    estimator, dead_code_threshold, max_replacements, lookup, lookup_dim).
    """

    def __init__(self, num_embeddings, embedding_dim, commitment_cost=0.25, decay=0.99, epsilon=1e-5,
                 decay_warmup=0, **options):
        super().__init__(num_embeddings, embedding_dim, commitment_cost, **options)
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must lie in (0, 1), got {decay}")
        if epsilon <= 0:
            raise ValueError(f"epsilon must be > 0, got {epsilon}")
        if isinstance(decay_warmup, bool) or int(decay_warmup) != decay_warmup or decay_warmup < 0:
            raise ValueError(f"decay_warmup must be an integer >= 0 (0: a fixed decay), got {decay_warmup!r}")
        self.decay, self.epsilon = float(decay), float(epsilon)
        self.decay_warmup = int(decay_warmup)
        k, d = self.num_embeddings, self.code_dim
        limit = np.sqrt(3.0 / d)      # Sonnet's variance-scaling uniform init: variance 1/D
        self.register_buffer("codebook", backend.rng().uniform(-limit, limit, (k, d)).astype(np.float32))
        self.register_buffer("cluster_size", np.zeros(k, np.float32))
        self.register_buffer("embed_sum", np.zeros((k, d), np.float32))
        self.register_buffer("ema_steps", np.array(0, np.int64))
        self._add_projections()

    def extra_repr(self):
        text = super().extra_repr() + f", decay={self.decay}"
        return text + (f", decay_warmup={self.decay_warmup}" if self.decay_warmup else "")

    @property
    def codebook_dtype(self):
        return self.codebook.dtype

    def _codes(self, dtype):
        codes = self.codebook.astype(dtype, copy=False)
        if self.lookup == "cosine":
            xp = backend.get_array_module(codes)
            codes = codes / xp.maximum(xp.sqrt((codes * codes).sum(axis=1, keepdims=True)), 1e-12)
        return codes

    def _set_codes(self, which, vectors):
        which = backend.to_device(which, backend.array_device(self.codebook))
        self.codebook[which] = vectors.astype(self.codebook.dtype)
        # make the re-seeded codes' debiased averages say: one vector, equal to the new code
        t = int(self.ema_steps)
        debias = 1.0 if t == 0 or self.decay_warmup else 1.0 - self.decay ** t
        self.cluster_size[which] = debias
        self.embed_sum[which] = self.codebook[which] * debias

    def _loss(self, codebook_loss, commitment_loss):
        return commitment_loss

    def _update(self, flat, indices):
        k = self.num_embeddings
        counts = backend.bincount(indices, k, self.cluster_size.dtype)
        sums = index_add(indices, flat.astype(self.embed_sum.dtype, copy=False), k)
        if self._distributed():   # the statistics of the global batch: one sum of (counts | sums)
            xp = backend.get_array_module(sums)
            both = self.reducer.sum(xp.concatenate([counts[:, None], sums], axis=1))
            counts, sums = both[:, 0], both[:, 1:]
        self.ema_steps = self.ema_steps + 1
        w = self._warmup_weight().astype(self.cluster_size.dtype) if self.decay_warmup else 1.0 - self.decay
        self.cluster_size += w * (counts - self.cluster_size)       # hidden <- hidden - (hidden - value)(1 - decay)
        self.embed_sum += w * (sums - self.embed_sum)
        # 1 - decay^t, computed where the step count lives (reading it to the host would wait for the GPU)
        # and rounded to the accumulators' dtype, as a Python float is rounded in their arithmetic
        if self.decay_warmup:       # the weights sum to one from the first update (see the class)
            size, embed = self.cluster_size, self.embed_sum
        else:
            debias = (1.0 - self.decay ** self.ema_steps).astype(self.cluster_size.dtype)
            size, embed = self.cluster_size / debias, self.embed_sum / debias
        total = size.sum()
        smoothed = (size + self.epsilon) / (total + k * self.epsilon) * total
        self.codebook = (embed / smoothed[:, None]).astype(self.codebook.dtype)

    def _warmup_weight(self):
        """1 - decay_t of update t = ema_steps under ``decay_warmup``, a 0-d float64 array where the count lives."""
        xp = backend.get_array_module(self.ema_steps)
        window = 1.0 / (1.0 - self.decay)                  # steps the fixed decay averages over
        # the window grows linearly: one step at t = 1, the full window at t = decay_warmup + 1
        grown = 1.0 + (self.ema_steps - 1).astype(np.float64) * ((window - 1.0) / self.decay_warmup)
        return 1.0 / xp.minimum(grown, window)
