"""Finite scalar quantisation (FSQ, Mentzer et al. 2023): a quantiser without a codebook.

A learned 1x1 convolution takes z_e (N, D, H, W) to L = len(levels) channels;
each channel i is bounded to an interval that holds levels[i] integers and
rounded to one of them, through a straight-through rounding node; the rounded
values, scaled into [-1, 1], go back to D channels through a second 1x1
convolution. The implicit codebook is the grid of prod(levels) points, so every
code exists from the first step and none can die.

    z        = project_in(z_e)                                  (N, L, H, W)
    bounded  = tanh(z + shift) * half_l - offset                (the paper's bound)
    rounded  = round_straight_through(bounded)                  integers in [-(l // 2), l - 1 - l // 2]
    z_q      = project_out(rounded / (l // 2))                  (N, D, H, W)

with, per channel of l levels, half_l = (l - 1)(1 + 1e-3) / 2, offset = 0.5 for
even l (0 for odd) and shift = atanh(offset / half_l), so that zero stays zero.
The index of a grid point is its digits ``rounded + l // 2`` read in mixed radix
(the first channel is the least significant digit): integers in [0, prod(levels)),
which the prior trains on as it does on codebook indices. There is no
quantiser loss (it is a zero scalar).
"""
import numpy as np

from .. import backend
from ..autograd import Tensor
from ..functional.basic import transpose
from ..functional.quantize import flatten_latents, round_straight_through
from .conv import Conv2d
from .module import Module
from .quantizers import LocalBatch, VQOutput, _check_latents, _usage


class FSQ(Module):
    """Finite scalar quantisation to the grid ``levels`` (e.g. (8, 8, 8): 512 implicit codes).

    ``FSQ(levels, embedding_dim)(z_e)`` returns ``VQOutput(quantized, loss, indices,
    perplexity)`` with the same attributes as the vector quantisers'
    (``counts``, ``codes_used``, ``codebook_loss``, ``commitment_loss``, ``z_e``,
    ``replaced``); ``loss`` and the two loss terms are zero. Parameters: the two
    projections ``project_in`` (D -> L) and ``project_out`` (L -> D).
    """

    eps = 1e-3      # widens each interval a little, so that tanh's open range still reaches the end levels

    def __init__(self, levels, embedding_dim):
        super().__init__()
        try:
            levels = tuple(int(l) for l in levels)
        except (TypeError, ValueError):
            raise TypeError(f"levels must be a sequence of integers, got {levels!r}") from None
        if not levels or min(levels) < 2:
            raise ValueError(f"levels must be one or more integers >= 2, got {levels}")
        if int(embedding_dim) < 1:
            raise ValueError(f"embedding_dim must be >= 1, got {embedding_dim}")
        self.levels, self.embedding_dim = levels, int(embedding_dim)
        self.num_embeddings = int(np.prod(levels))
        if self.num_embeddings >= 2 ** 62:
            raise ValueError(f"levels {levels} give {self.num_embeddings} codes, more than int64 indices hold")
        lv = np.array(levels, np.float64)
        self._half_width = np.floor(lv / 2)                     # l // 2: rounded values scale into [-1, 1]
        self._half_l = (lv - 1) * (1 + self.eps) / 2
        self._offset = np.where(lv % 2 == 0, 0.5, 0.0)
        self._shift = np.arctanh(self._offset / self._half_l)
        self._radix = np.cumprod([1] + list(levels[:-1])).astype(np.int64)    # place value of each digit
        self.project_in = Conv2d(self.embedding_dim, len(levels), 1)
        self.project_out = Conv2d(len(levels), self.embedding_dim, 1)
        self.reducer = LocalBatch()     # for symmetry with the vector quantisers: FSQ keeps no batch statistics

    def extra_repr(self):
        return f"levels={self.levels}, embedding_dim={self.embedding_dim}, num_embeddings={self.num_embeddings}"

    def _per_channel(self, values, like):
        """A per-level constant as an array of shape (1, L, 1, 1) of ``like``'s dtype and device."""
        return backend.to_device(values.reshape(1, -1, 1, 1).astype(like.dtype), backend.array_device(like))

    def bound(self, z):
        """tanh(z + shift) * half_l - offset: channel i lies in an interval holding levels[i] integers."""
        return (z + self._per_channel(self._shift, z.data)).tanh() * self._per_channel(self._half_l, z.data) \
            - self._per_channel(self._offset, z.data)

    def forward(self, z_e):
        _check_latents(z_e, self.embedding_dim, "FSQ")
        rounded = round_straight_through(self.bound(self.project_in(z_e)))
        codes = rounded / self._per_channel(self._half_width, rounded.data)
        indices = self._indices(rounded.data)
        xp = backend.get_array_module(z_e.data)
        zero = Tensor(xp.zeros((), z_e.dtype))
        perplexity, counts = _usage(indices, self.num_embeddings)
        out = VQOutput(self.project_out(codes), zero, indices, perplexity)
        out.z_e, out.counts, out.replaced = z_e, counts, 0
        out.z_q = codes     # the grid points in [-1, 1], before project_out
        out.codebook_loss = out.commitment_loss = zero
        return out

    def _indices(self, rounded):
        """Grid points (N, L, H, W) of rounded values -> int64 indices (N, H, W), mixed radix."""
        xp = backend.get_array_module(rounded)
        n, _, h, w = rounded.shape
        digits = flatten_latents(rounded) + xp.asarray(self._half_width.astype(rounded.dtype))
        radix = backend.to_device(self._radix, backend.array_device(rounded))
        return (xp.rint(digits).astype(np.int64) * radix).sum(axis=1).reshape(n, h, w)

    def dequantize(self, indices):
        """z_q for index grids ``indices`` (N, H, W): the grid points, projected to D, a Tensor (N, D, H, W)."""
        xp = backend.get_array_module(indices)
        if not hasattr(indices, "dtype") or indices.dtype.kind not in "iu":
            raise TypeError(f"FSQ indices must be an integer array, got {type(indices).__name__}")
        if indices.size and (int(indices.min()) < 0 or int(indices.max()) >= self.num_embeddings):
            raise ValueError(f"FSQ indices must lie in [0, {self.num_embeddings}), "
                             f"got values from {int(indices.min())} to {int(indices.max())}")
        device = backend.array_device(indices)
        radix = backend.to_device(self._radix, device)
        levels = backend.to_device(np.array(self.levels, np.int64), device)
        half_width = backend.to_device(self._half_width, device)
        digits = (indices.astype(np.int64)[..., None] // radix) % levels          # (N, H, W, L)
        dtype = self.project_out.weight.dtype
        codes = ((digits - half_width) / half_width).astype(dtype)
        return self.project_out(transpose(Tensor(xp.ascontiguousarray(codes)), (0, 3, 1, 2)))
