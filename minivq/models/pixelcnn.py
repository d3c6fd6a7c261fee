"""The learned prior: a gated PixelCNN (van den Oord et al., 2016) over grids of VQ-VAE codes.

p(c) = prod_i p(c_i | c_<i), positions i in raster order. Causality comes from
two stacks of masked convolutions:

* the vertical stack sees only rows strictly above the current one: its kernel
  covers the k//2 rows above and the current row (pad top k//2, left and right
  k//2), and in the first layer (mask A) the current row is masked out; later
  layers (mask B) may keep it, since their input already looks only upwards;
* the horizontal stack sees the current row to the left: a 1 x (k//2 + 1)
  kernel padded on the left; mask A removes the current position itself.

The vertical stack feeds the horizontal one at every layer (no blind spot);
each layer's output is tanh(a) * sigmoid(b) of its two halves; the horizontal
stack is residual after the first layer. Class conditioning adds a learned
per-class bias to both stacks' pre-activations. A 1x1 head gives K logits.

A masked convolution is an ordinary convolution whose weight is multiplied by a
constant 0/1 mask, so a masked tap contributes nothing and gets zero gradient.
"""
import numpy as np

from .. import backend
from .. import functional as F
from ..autograd import Tensor, no_grad
from ..nn import Conv2d, Embedding, Module, Sequential


class MaskedConv2d(Module):
    """``conv2d(pad(x), weight * mask) + bias``, with a constant 0/1 ``mask`` (kH, kW).

    ``pad`` is (left, right, top, bottom), so causal layers can pad on one side only.
    """

    def __init__(self, in_channels, out_channels, mask, pad, bias=True):
        super().__init__()
        mask = np.asarray(mask, np.float32)
        conv = Conv2d(in_channels, out_channels, mask.shape, bias=bias)   # PyTorch's initialisation
        self.weight, self.bias = conv.weight, conv.bias
        self.register_buffer("mask", mask)
        self.pad = tuple(pad)

    def extra_repr(self):
        return f"{self.weight.shape[1]}, {self.weight.shape[0]}, mask={self.mask.shape}, pad={self.pad}"

    def forward(self, x):
        mask = self.mask if self.mask.dtype == self.weight.dtype else self.mask.astype(self.weight.dtype)
        return F.conv2d(F.pad(x, self.pad), self.weight * mask, self.bias)


def gate(a):
    """tanh(first half of the channels) * sigmoid(second half)."""
    c = a.shape[1] // 2
    return F.tanh(a[:, :c]) * F.sigmoid(a[:, c:])


class GatedLayer(Module):
    """One layer of both stacks. ``mask_type`` "A" (first layer) hides the current position."""

    def __init__(self, channels, kernel_size, mask_type, num_classes=None):
        super().__init__()
        if mask_type not in ("A", "B"):
            raise ValueError(f"mask_type must be 'A' or 'B', got {mask_type!r}")
        k, c = kernel_size, kernel_size // 2
        v_mask = np.ones((c + 1, k), np.float32)      # rows i-c .. i, columns j-c .. j+c
        h_mask = np.ones((1, c + 1), np.float32)      # row i, columns j-c .. j
        if mask_type == "A":
            v_mask[-1, :] = 0                         # not the current row
            h_mask[0, -1] = 0                         # not the current position
        self.mask_type = mask_type
        self.residual = mask_type == "B"
        self.vertical = MaskedConv2d(channels, 2 * channels, v_mask, pad=(c, c, c, 0))
        self.horizontal = MaskedConv2d(channels, 2 * channels, h_mask, pad=(c, 0, 0, 0))
        self.vert_to_horiz = Conv2d(2 * channels, 2 * channels, 1)
        self.horiz_out = Conv2d(channels, channels, 1)
        self.class_bias = Embedding(num_classes, 2 * channels) if num_classes else None

    def forward(self, v, h, labels=None):
        v_pre = self.vertical(v)                                  # rows above only
        h_pre = self.horizontal(h) + self.vert_to_horiz(v_pre)    # left of here, plus everything above
        if self.class_bias is not None:
            bias = self.class_bias(labels)
            bias = F.reshape(bias, (bias.shape[0], bias.shape[1], 1, 1))
            v_pre, h_pre = v_pre + bias, h_pre + bias
        h_out = self.horiz_out(gate(h_pre))
        return gate(v_pre), (h_out + h if self.residual else h_out)


class GatedPixelCNN(Module):
    """An autoregressive prior over (N, H, W) grids of codes in [0, num_embeddings).

    Defaults (32 channels per stack, 6 layers, 5x5 kernels, a 1x1 head
    through 128 channels; 0.34 M parameters at K = 512) reach beyond an 8x8
    grid in every direction (6 layers x 2 rows/columns each) and train on
    Fashion-MNIST codes in minutes on two cores. ``num_classes`` enables
    class conditioning (``labels`` then required).
    """

    def __init__(self, num_embeddings, channels=32, num_layers=6, kernel_size=5, head_channels=128,
                 num_classes=None):
        super().__init__()
        if kernel_size < 3 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and >= 3, got {kernel_size}")
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.config = dict(num_embeddings=num_embeddings, channels=channels, num_layers=num_layers,
                           kernel_size=kernel_size, head_channels=head_channels, num_classes=num_classes)
        self.num_embeddings, self.num_classes = int(num_embeddings), num_classes
        self.embedding = Embedding(num_embeddings, channels)
        self.layers = Sequential(*[GatedLayer(channels, kernel_size, "A" if i == 0 else "B", num_classes)
                                   for i in range(num_layers)])
        self.head_1 = Conv2d(channels, head_channels, 1)
        self.head_2 = Conv2d(head_channels, num_embeddings, 1)

    def _check(self, indices, labels):
        shape = indices.shape
        if len(shape) != 3:
            raise ValueError(f"GatedPixelCNN expects index grids of shape (N, H, W), got {tuple(shape)}")
        if self.num_classes and labels is None:
            raise ValueError("this prior is class-conditional: give labels (N,) in [0, num_classes)")
        if labels is not None:
            if not self.num_classes:
                raise ValueError("labels given to a prior built without num_classes")
            lab = labels.data if isinstance(labels, Tensor) else labels
            lo, hi = backend.min_max(lab) if lab.size else (0, 0)
            if lab.shape != shape[:1] or lo < 0 or hi >= self.num_classes:
                raise ValueError(f"labels must have shape ({shape[0]},) and values in [0, {self.num_classes})")

    def forward(self, indices, labels=None):
        """Logits (N, K, H, W): position (i, j) depends only on codes before it in raster order."""
        self._check(indices, labels)
        x = F.transpose(self.embedding(indices), (0, 3, 1, 2))
        v, h = x, x
        for layer in self.layers:
            v, h = layer(v, h, labels)
        return self.head_2(F.relu(self.head_1(F.relu(h))))

    def loss(self, indices, labels=None):
        """Mean negative log-likelihood per latent, in nats."""
        return F.cross_entropy(self(indices, labels), indices)

    def sample(self, n, shape, labels=None, temperature=1.0, device="cpu"):
        """Draw ``n`` grids of ``shape`` (H, W) in raster order; random numbers from minivq's generator."""
        if int(n) < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        h, w = (int(s) for s in shape)
        if h < 1 or w < 1:
            raise ValueError(f"shape must be two positive sizes, got {shape}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if labels is not None:
            labels = backend.to_device(np.broadcast_to(np.asarray(labels, np.int64), (int(n),)).copy(), device)
        xp = backend.get_array_module(backend.to_device(np.zeros(1), device))
        grid = xp.zeros((int(n), h, w), np.int64)
        with self.evaluating(), no_grad():
            for i in range(h):
                for j in range(w):
                    # rows below i cannot influence row i, so the grid is cut after it
                    logits = self(grid[:, :i + 1], labels).data[:, :, i, j].astype(np.float64)
                    grid[:, i, j] = xp.asarray(_draw(backend.to_numpy(logits) / temperature))
        return grid


def _draw(logits):
    """One category per row of ``logits`` by inverse-CDF sampling with minivq's generator."""
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    cdf = np.cumsum(p, axis=1)
    u = backend.rng().random(logits.shape[0]) * cdf[:, -1]
    return np.minimum((cdf < u[:, None]).sum(axis=1), logits.shape[1] - 1).astype(np.int64)
