"""A PyTorch gated PixelCNN of exactly minivq's layout: the peer for the prior's speed and quality comparisons.

Only the benchmarks and the tests that skip without torch import this (PyTorch is
never a minivq dependency). The layers, their order, the masks, the gate, the
head and the loss are those of minivq.models.GatedPixelCNN (read its docstring
for the layout), and the parameter and buffer names are the same, so
``load_minivq_state`` gives this model minivq's weights and one step of each
engine from the same weights is comparable step by step:

* an embedding (K, C) of the codes, then ``num_layers`` gated layers, the first
  with mask A (the current position hidden), the rest with mask B;
* per layer, a vertical stack (a (k//2 + 1) x k kernel over the rows above,
  padded top and sides) and a horizontal stack (a 1 x (k//2 + 1) kernel padded on
  the left), the vertical pre-activation fed to the horizontal one through a
  1x1 conv, tanh * sigmoid gates, a 1x1 conv on the horizontal output and a
  residual horizontal stack after the first layer;
* optional class conditioning: a learned per-class bias of both pre-activations;
* a head ReLU -> 1x1 conv (C -> head) -> ReLU -> 1x1 conv (head -> K);
* the loss: cross-entropy averaged over every latent of the batch, in nats.

Built without ``load_minivq_state``, every layer keeps PyTorch's own default
initialisation (nn.Conv2d: U(+-1/sqrt(fan_in)) for weight and bias, nn.Embedding:
N(0, 1)), the initialisation a PyTorch user gets.
"""
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class MaskedConv2d(nn.Conv2d):
    """``conv2d(pad(x), weight * mask) + bias``; ``pad`` is (left, right, top, bottom) as F.pad takes it."""

    def __init__(self, in_channels, out_channels, mask, pad):
        mask = torch.as_tensor(np.asarray(mask, np.float32))
        super().__init__(in_channels, out_channels, tuple(mask.shape))
        self.register_buffer("mask", mask)
        self.pad = tuple(pad)

    def forward(self, x):
        return F.conv2d(F.pad(x, self.pad), self.weight * self.mask, self.bias)


def gate(a):
    c = a.shape[1] // 2
    return torch.tanh(a[:, :c]) * torch.sigmoid(a[:, c:])


class GatedLayer(nn.Module):
    def __init__(self, channels, kernel_size, mask_type, num_classes=None):
        super().__init__()
        k, c = kernel_size, kernel_size // 2
        v_mask = np.ones((c + 1, k), np.float32)      # rows i-c .. i, columns j-c .. j+c
        h_mask = np.ones((1, c + 1), np.float32)      # row i, columns j-c .. j
        if mask_type == "A":
            v_mask[-1, :] = 0
            h_mask[0, -1] = 0
        self.residual = mask_type == "B"
        self.vertical = MaskedConv2d(channels, 2 * channels, v_mask, pad=(c, c, c, 0))
        self.horizontal = MaskedConv2d(channels, 2 * channels, h_mask, pad=(c, 0, 0, 0))
        self.vert_to_horiz = nn.Conv2d(2 * channels, 2 * channels, 1)
        self.horiz_out = nn.Conv2d(channels, channels, 1)
        self.class_bias = nn.Embedding(num_classes, 2 * channels) if num_classes else None

    def forward(self, v, h, labels=None):
        v_pre = self.vertical(v)
        h_pre = self.horizontal(h) + self.vert_to_horiz(v_pre)
        if self.class_bias is not None:
            bias = self.class_bias(labels)[:, :, None, None]
            v_pre, h_pre = v_pre + bias, h_pre + bias
        h_out = self.horiz_out(gate(h_pre))
        return gate(v_pre), (h_out + h if self.residual else h_out)


class GatedPixelCNN(nn.Module):
    """minivq.models.GatedPixelCNN in PyTorch, with the same constructor and the same state-dict names."""

    def __init__(self, num_embeddings, channels=32, num_layers=6, kernel_size=5, head_channels=128,
                 num_classes=None):
        super().__init__()
        self.num_embeddings, self.num_classes = num_embeddings, num_classes
        self.embedding = nn.Embedding(num_embeddings, channels)
        self.layers = nn.ModuleList([GatedLayer(channels, kernel_size, "A" if i == 0 else "B", num_classes)
                                     for i in range(num_layers)])
        self.head_1 = nn.Conv2d(channels, head_channels, 1)
        self.head_2 = nn.Conv2d(head_channels, num_embeddings, 1)

    def forward(self, indices, labels=None):
        x = self.embedding(indices).permute(0, 3, 1, 2)
        v, h = x, x
        for layer in self.layers:
            v, h = layer(v, h, labels)
        return self.head_2(F.relu(self.head_1(F.relu(h))))

    def loss(self, indices, labels=None):
        """Mean negative log-likelihood per latent, in nats."""
        return F.cross_entropy(self(indices, labels), indices)


def build_like(minivq_prior):
    """A twin with the size of a minivq GatedPixelCNN, holding its weights."""
    model = GatedPixelCNN(**minivq_prior.config)
    load_minivq_state(model, minivq_prior.state_dict())
    return model


def load_minivq_state(model, state):
    """Copy a minivq GatedPixelCNN's state dict (name -> array) into the twin, checking names and shapes.

    The names are the same on both sides (``embedding.weight``,
    ``layers.<i>.vertical.weight`` / ``.bias`` / ``.mask``, ``layers.<i>.horizontal.*``,
    ``layers.<i>.vert_to_horiz.*``, ``layers.<i>.horiz_out.*``, ``layers.<i>.class_bias.weight``,
    ``head_1.*``, ``head_2.*``); the layouts too (conv weights (out, in, kH, kW)). Values take the twin's dtype.
    """
    ours = model.state_dict()
    theirs = {k: np.asarray(v) for k, v in state.items()}
    if set(ours) != set(theirs):
        raise ValueError(f"state dicts differ: only in the twin {sorted(set(ours) - set(theirs))}, "
                         f"only in minivq's {sorted(set(theirs) - set(ours))}")
    for name, tensor in ours.items():
        if tuple(tensor.shape) != theirs[name].shape:
            raise ValueError(f"{name}: the twin has shape {tuple(tensor.shape)}, minivq's {theirs[name].shape}")
    model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(theirs[k])).to(ours[k].dtype) for k in ours})
    return model


def minivq_state(model):
    """The twin's state as a minivq GatedPixelCNN state dict (name -> float32 array)."""
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}
