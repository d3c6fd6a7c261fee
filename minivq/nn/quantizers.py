"""The vector quantisers of the VQ-VAE: a learned codebook, and its EMA variant.

Both take encoder outputs ``z_e`` (N, D, H, W), replace each D-vector by its
nearest codebook row and return ``VQOutput(quantized, loss, indices,
perplexity)``; the output also carries ``codes_used``, ``codebook_loss`` and
``commitment_loss`` as attributes, for logging.
"""
from collections import namedtuple

import numpy as np

from .. import backend
from ..autograd import Tensor
from ..functional.quantize import ESTIMATORS, flatten_latents, vector_quantize
from ..kernels import nearest_code
from .module import Module, Parameter


class VQOutput(namedtuple("VQOutput", "quantized loss indices perplexity")):
    """quantized: Tensor (N, D, H, W); loss: scalar Tensor; indices: int64 (N, H, W); perplexity: 0-d array.

    Attributes beside the four fields: ``codes_used`` (how many distinct codes
    the batch picked), ``counts`` (per code), ``codebook_loss`` and
    ``commitment_loss`` (Tensors), ``z_e`` (the input), ``restarted`` (codes
    re-seeded this step).
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


def kmeans_plus_plus(vectors, k, iterations=10):
    """k-means++ seeding followed by ``iterations`` Lloyd steps; returns (k, D) centres.

    Used to initialise a codebook from the first batch. With fewer distinct
    vectors than k, the remaining centres repeat sampled vectors.
    """
    xp = backend.get_array_module(vectors)
    host = backend.to_numpy(vectors).astype(np.float64)
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
        assign = nearest_code(host, centres, backend="numpy")
        counts = np.bincount(assign, minlength=k)
        sums = backend.index_add(assign, host, k)
        used = counts > 0
        centres[used] = sums[used] / counts[used, None]
    return xp.asarray(centres.astype(vectors.dtype))


class _QuantizerBase(Module):
    """What both quantisers share: dead-code restarts, k-means++ initialisation, usage statistics."""

    def __init__(self, num_embeddings, embedding_dim, commitment_cost, restart_after, kmeans_init, kernel,
                 estimator):
        super().__init__()
        if estimator not in ESTIMATORS:
            raise ValueError(f"unknown gradient estimator {estimator!r}: use one of {', '.join(ESTIMATORS)}")
        if int(num_embeddings) < 1 or int(embedding_dim) < 1:
            raise ValueError(f"num_embeddings and embedding_dim must be >= 1, got {num_embeddings}, {embedding_dim}")
        if commitment_cost < 0:
            raise ValueError(f"commitment_cost must be >= 0, got {commitment_cost}")
        if restart_after < 0:
            raise ValueError(f"restart_after must be >= 0 (0 turns dead-code restarts off), got {restart_after}")
        self.num_embeddings, self.embedding_dim = int(num_embeddings), int(embedding_dim)
        self.commitment_cost = float(commitment_cost)
        self.restart_after = int(restart_after)
        self.kmeans_init = bool(kmeans_init)
        self.kernel = kernel
        self.estimator = estimator
        # steps since each code was last picked (for restarts); whether k-means init has run
        self.register_buffer("unused_steps", np.zeros(self.num_embeddings, np.int64))
        self.register_buffer("initialized", np.array(0 if kmeans_init else 1, np.int64))
        # data-parallel training injects a reducer over the ranks: usage and EMA statistics are then
        # summed over the global batch, and the random choices of restarts and k-means are made on rank 0
        self.reducer = LocalBatch()

    def extra_repr(self):
        return (f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}, "
                f"commitment_cost={self.commitment_cost}")

    def _codebook_array(self):
        raise NotImplementedError

    def _set_codes(self, which, vectors):
        raise NotImplementedError

    def _distributed(self):
        return self.reducer.size > 1

    def _maybe_kmeans_init(self, flat):
        # kmeans_init is checked first: reading the flag from the GPU would wait for the device every step
        if self.training and self.kmeans_init and int(self.initialized) == 0:
            if self._distributed():     # rank 0 clusters the whole global batch, the others take its centres
                everything = self.reducer.gather(flat)
                xp = backend.get_array_module(flat)
                centres = (kmeans_plus_plus(everything, self.num_embeddings) if self.reducer.rank == 0 else
                           xp.empty((self.num_embeddings, flat.shape[1]), flat.dtype))
                centres = self.reducer.broadcast(centres)
            else:
                centres = kmeans_plus_plus(flat, self.num_embeddings)
            self._set_codes(np.arange(self.num_embeddings), centres)
            self.initialized = backend.to_device(np.array(1, np.int64), backend.array_device(self.initialized))

    def _restart_dead_codes(self, flat, counts):
        """Re-seed codes unused for ``restart_after`` steps from random vectors of this batch."""
        if not (self.training and self.restart_after):
            return 0
        counts = backend.to_numpy(counts)
        if self._distributed():     # a code is used if any rank's slice of the batch picked it
            counts = self.reducer.sum(counts.astype(np.int64))
        # which codes restart is decided on the host (it sizes host-side random draws); the buffer
        # itself stays on the module's device
        unused = np.where(counts > 0, 0, backend.to_numpy(self.unused_steps) + 1)
        dead = np.flatnonzero(unused >= self.restart_after)
        unused[dead] = 0
        self.unused_steps = backend.to_device(unused, backend.array_device(self.unused_steps))
        if dead.size == 0:
            return 0
        if self._distributed():
            self._set_codes(dead, self._global_rows(flat, dead.size))
        else:
            rows = backend.rng().choice(flat.shape[0], size=dead.size, replace=dead.size > flat.shape[0])
            self._set_codes(dead, flat[backend.to_device(rows, backend.array_device(flat))])
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

    Options: ``restart_after=n`` re-seeds codes unused for n training steps from
    vectors of the current batch; ``kmeans_init=True`` sets the codebook by
    k-means++ on the first training batch; ``kernel`` picks the nearest-code
    backend (see ``minivq.kernels.nearest_code``); ``estimator`` the gradient
    estimator, "straight_through" (the paper's) or "rotation" (Fifty et al., 2024).
    """

    def __init__(self, num_embeddings, embedding_dim, commitment_cost=0.25, restart_after=0,
                 kmeans_init=False, kernel="auto", estimator="straight_through"):
        super().__init__(num_embeddings, embedding_dim, commitment_cost, restart_after, kmeans_init, kernel,
                         estimator)
        k = self.num_embeddings
        self.codebook = Parameter(backend.rng().uniform(-1.0 / k, 1.0 / k, (k, self.embedding_dim))
                                  .astype(np.float32))

    def _set_codes(self, which, vectors):
        self.codebook.data[backend.to_device(which, self.codebook.device)] = vectors.astype(self.codebook.dtype)

    def forward(self, z_e):
        _check_latents(z_e, self.embedding_dim, "VectorQuantizer")
        flat = flatten_latents(z_e.data)
        self._maybe_kmeans_init(flat)
        quantized, codebook_loss, commitment_loss, indices = vector_quantize(
            z_e, self.codebook, self.commitment_cost, backend=self.kernel, estimator=self.estimator)
        out = self._output(z_e, quantized, codebook_loss + commitment_loss, codebook_loss, commitment_loss, indices)
        out.restarted = self._restart_dead_codes(flat, out.counts)
        return out


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
    """

    def __init__(self, num_embeddings, embedding_dim, commitment_cost=0.25, decay=0.99, epsilon=1e-5,
                 restart_after=0, kmeans_init=False, kernel="auto", estimator="straight_through"):
        super().__init__(num_embeddings, embedding_dim, commitment_cost, restart_after, kmeans_init, kernel,
                         estimator)
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must lie in (0, 1), got {decay}")
        if epsilon <= 0:
            raise ValueError(f"epsilon must be > 0, got {epsilon}")
        self.decay, self.epsilon = float(decay), float(epsilon)
        k, d = self.num_embeddings, self.embedding_dim
        limit = np.sqrt(3.0 / d)      # Sonnet's variance-scaling uniform init: variance 1/D
        self.register_buffer("codebook", backend.rng().uniform(-limit, limit, (k, d)).astype(np.float32))
        self.register_buffer("cluster_size", np.zeros(k, np.float32))
        self.register_buffer("embed_sum", np.zeros((k, d), np.float32))
        self.register_buffer("ema_steps", np.array(0, np.int64))

    def _set_codes(self, which, vectors):
        which = backend.to_device(which, backend.array_device(self.codebook))
        self.codebook[which] = vectors.astype(self.codebook.dtype)
        # make the restarted codes' debiased averages say: one vector, equal to the new code
        t = int(self.ema_steps)
        debias = 1.0 - self.decay ** t if t > 0 else 1.0
        self.cluster_size[which] = debias
        self.embed_sum[which] = self.codebook[which] * debias

    def forward(self, z_e):
        _check_latents(z_e, self.embedding_dim, "VectorQuantizerEMA")
        flat = flatten_latents(z_e.data)
        self._maybe_kmeans_init(flat)
        codebook = self.codebook.astype(z_e.dtype, copy=False)
        quantized, codebook_loss, commitment_loss, indices = vector_quantize(
            z_e, codebook, self.commitment_cost, backend=self.kernel, estimator=self.estimator)
        out = self._output(z_e, quantized, commitment_loss, codebook_loss, commitment_loss, indices)
        if self.training:
            self._ema_update(flat, indices.reshape(-1))
        out.restarted = self._restart_dead_codes(flat, out.counts)
        return out

    def _ema_update(self, flat, indices):
        k = self.num_embeddings
        counts = backend.bincount(indices, k, self.cluster_size.dtype)
        sums = backend.index_add(indices, flat.astype(self.embed_sum.dtype, copy=False), k)
        if self._distributed():   # the statistics of the global batch: one sum of (counts | sums)
            xp = backend.get_array_module(sums)
            both = self.reducer.sum(xp.concatenate([counts[:, None], sums], axis=1))
            counts, sums = both[:, 0], both[:, 1:]
        self.ema_steps = self.ema_steps + 1
        w = 1.0 - self.decay
        self.cluster_size += w * (counts - self.cluster_size)       # hidden <- hidden - (hidden - value)(1 - decay)
        self.embed_sum += w * (sums - self.embed_sum)
        # 1 - decay^t, computed where the step count lives (reading it to the host would wait for the GPU)
        # and rounded to the accumulators' dtype, as a Python float is rounded in their arithmetic
        debias = (1.0 - self.decay ** self.ema_steps).astype(self.cluster_size.dtype)
        size = self.cluster_size / debias
        embed = self.embed_sum / debias
        total = size.sum()
        smoothed = (size + self.epsilon) / (total + k * self.epsilon) * total
        self.codebook = (embed / smoothed[:, None]).astype(self.codebook.dtype)
