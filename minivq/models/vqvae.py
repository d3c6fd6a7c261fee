"""The VQ-VAE of van den Oord et al. (2017), as in its common PyTorch reproduction.

    x (N, C, 32, 32)
      -> Encoder: 4x4/2 conv to h/2, ReLU, 4x4/2 conv to h, ReLU, 3x3 conv, residual stack,
                  1x1 conv to D                                    -> z_e (N, D, 8, 8)
      -> VectorQuantizer (its EMA variant when decay > 0, FSQ with levels)  -> z_q, indices (N, 8, 8)
      -> Decoder: 3x3 conv D to h, residual stack, 4x4/2 transposed conv to h/2, ReLU,
                  4x4/2 transposed conv to C                        -> x_recon (N, C, 32, 32)
"""
from dataclasses import asdict, dataclass, fields
from typing import Optional, Tuple

import numpy as np

from .. import backend
from .. import functional as F
from ..autograd import Tensor, no_grad
from ..nn import FSQ, Conv2d, ConvTranspose2d, Module, ReLU, Sequential, VectorQuantizer, VectorQuantizerEMA


class Residual(Module):
    """x + conv1x1(relu(conv3x3(relu(x)))), both convolutions without bias."""

    def __init__(self, channels, hidden):
        super().__init__()
        self.block = Sequential(ReLU(), Conv2d(channels, hidden, 3, padding=1, bias=False),
                                ReLU(), Conv2d(hidden, channels, 1, bias=False))

    def forward(self, x):
        return x + self.block(x)


class ResidualStack(Module):
    """``num_layers`` residual blocks (no weight sharing), then a ReLU."""

    def __init__(self, channels, hidden, num_layers):
        super().__init__()
        self.layers = Sequential(*[Residual(channels, hidden) for _ in range(num_layers)])

    def forward(self, x):
        return F.relu(self.layers(x))


class Encoder(Module):
    def __init__(self, in_channels, num_hiddens, num_residual_layers, num_residual_hiddens, embedding_dim):
        super().__init__()
        self.conv_1 = Conv2d(in_channels, num_hiddens // 2, 4, stride=2, padding=1)
        self.conv_2 = Conv2d(num_hiddens // 2, num_hiddens, 4, stride=2, padding=1)
        self.conv_3 = Conv2d(num_hiddens, num_hiddens, 3, padding=1)
        self.residual_stack = ResidualStack(num_hiddens, num_residual_hiddens, num_residual_layers)
        self.pre_vq_conv = Conv2d(num_hiddens, embedding_dim, 1)

    def forward(self, x):
        x = F.relu(self.conv_1(x))
        x = F.relu(self.conv_2(x))
        x = self.residual_stack(self.conv_3(x))
        return self.pre_vq_conv(x)


class Decoder(Module):
    def __init__(self, out_channels, num_hiddens, num_residual_layers, num_residual_hiddens, embedding_dim):
        super().__init__()
        self.conv_1 = Conv2d(embedding_dim, num_hiddens, 3, padding=1)
        self.residual_stack = ResidualStack(num_hiddens, num_residual_hiddens, num_residual_layers)
        self.conv_trans_1 = ConvTranspose2d(num_hiddens, num_hiddens // 2, 4, stride=2, padding=1)
        self.conv_trans_2 = ConvTranspose2d(num_hiddens // 2, out_channels, 4, stride=2, padding=1)

    def forward(self, z_q):
        x = self.residual_stack(self.conv_1(z_q))
        x = F.relu(self.conv_trans_1(x))
        return self.conv_trans_2(x)


@dataclass(frozen=True)
class QuantizerOptions:
    """How a VQVAE's quantiser picks, keeps and revives its codes (see ``nn.VectorQuantizer``).

    The field defaults are the paper's quantiser: every option off. ``levels``
    (e.g. (8, 8, 8)) selects finite scalar quantisation instead (``nn.FSQ``), which
    has no codebook and takes none of the other options.
    """
    kmeans_init: bool = False               # k-means++ on the first training batch
    decay_warmup: int = 0                   # EMA codebook: its averaging window grows to full over this many steps
    estimator: str = "straight_through"     # or "rotation" (Fifty et al., 2024)
    dead_code_threshold: float = 0.0        # > 0: re-seed codes whose usage EMA falls below this
    max_replacements: int = 64              # dead codes re-seeded per step, at most
    lookup: str = "l2"                      # or "cosine": l2-normalised codes and latents (ViT-VQGAN)
    lookup_dim: Optional[int] = None        # search in this many dimensions through learned 1x1 projections
    simvq: bool = False                     # codes = frozen random codes x a learned map (SimVQ)
    levels: Optional[Tuple[int, ...]] = None

    def changed(self):
        """{option: value} of the options that differ from the paper's (all off)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) != f.default}


# minivq's default quantiser, chosen by benchmarks/codebook_study.py (docs/codebook.md): with the EMA codebook
# (decay 0.99), codes searched by cosine similarity in 8 dimensions and dead codes re-seeded from the batch,
# the whole codebook is in use from the first hundred steps and reconstructions are better at every step.
DEFAULT_QUANTIZER = QuantizerOptions(lookup="cosine", lookup_dim=8, dead_code_threshold=1.0)
# The paper's: ``VQVAE(decay=0.0, quantizer=PAPER_QUANTIZER)`` (``minivq train --paper-quantizer``).
PAPER_QUANTIZER = QuantizerOptions()


class VQVAE(Module):
    """Encoder -> quantiser -> decoder. ``model(x)`` returns ``(x_recon, VQOutput)``.

    The quantiser: ``decay > 0`` selects the EMA codebook (``nn.VectorQuantizerEMA``),
    ``quantizer.levels`` finite scalar quantisation (``nn.FSQ``; then ``num_embeddings``
    must equal prod(levels)), otherwise the paper's learned codebook
    (``nn.VectorQuantizer``). ``quantizer`` (a ``QuantizerOptions``) holds the
    quantiser's other options; the default is ``DEFAULT_QUANTIZER`` with ``decay=0.99``
    (a codebook that stays in use: docs/codebook.md). The paper's quantiser is
    ``VQVAE(decay=0.0, quantizer=PAPER_QUANTIZER)``. ``kernel`` picks the
    nearest-code backend (``minivq.kernels``).
    """

    def __init__(self, in_channels=1, num_hiddens=128, num_residual_hiddens=32, num_residual_layers=2,
                 embedding_dim=64, num_embeddings=512, commitment_cost=0.25, decay=0.99, quantizer=DEFAULT_QUANTIZER,
                 kernel="auto"):
        super().__init__()
        if not isinstance(quantizer, QuantizerOptions):
            raise TypeError(f"quantizer must be a QuantizerOptions, got {type(quantizer).__name__}")
        for name, value in [("in_channels", in_channels), ("num_hiddens", num_hiddens),
                            ("num_residual_hiddens", num_residual_hiddens), ("embedding_dim", embedding_dim),
                            ("num_embeddings", num_embeddings)]:
            if int(value) < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if num_hiddens < 2:
            raise ValueError(f"num_hiddens must be >= 2 (the first layer has num_hiddens // 2), got {num_hiddens}")
        if num_residual_layers < 0 or decay < 0 or decay >= 1:
            raise ValueError(f"need num_residual_layers >= 0 and 0 <= decay < 1, "
                             f"got {num_residual_layers} and {decay}")
        q = quantizer
        if q.levels is not None:
            given = [name for name in q.changed() if name not in ("levels", "max_replacements")]
            given += ["decay"] if decay > 0 else []
            if given:
                raise ValueError(f"levels={q.levels} selects FSQ, which has no codebook: drop {', '.join(given)} "
                                 f"(and pass decay=0)")
            if int(np.prod(q.levels)) != num_embeddings:
                raise ValueError(f"levels={q.levels} give {int(np.prod(q.levels))} codes but num_embeddings="
                                 f"{num_embeddings}: pass num_embeddings={int(np.prod(q.levels))}")
        if q.decay_warmup and not decay > 0:
            raise ValueError(f"decay_warmup={q.decay_warmup} warms up the EMA codebook's decay: it needs decay > 0, "
                             f"got decay={decay}")
        if q.simvq and decay > 0:
            raise ValueError("simvq learns its codebook by gradient: it needs decay=0 (not the EMA codebook), "
                             f"got decay={decay}")
        self.config = dict(in_channels=in_channels, num_hiddens=num_hiddens,
                           num_residual_hiddens=num_residual_hiddens, num_residual_layers=num_residual_layers,
                           embedding_dim=embedding_dim, num_embeddings=num_embeddings,
                           commitment_cost=commitment_cost, decay=decay, **asdict(q))
        self.in_channels = in_channels
        self.encoder = Encoder(in_channels, num_hiddens, num_residual_layers, num_residual_hiddens, embedding_dim)
        options = dict(kmeans_init=q.kmeans_init, kernel=kernel, estimator=q.estimator,
                       dead_code_threshold=q.dead_code_threshold, max_replacements=q.max_replacements,
                       lookup=q.lookup, lookup_dim=q.lookup_dim)
        if q.levels is not None:
            self.vq = FSQ(q.levels, embedding_dim)
        elif decay > 0:
            self.vq = VectorQuantizerEMA(num_embeddings, embedding_dim, commitment_cost, decay=decay,
                                         decay_warmup=q.decay_warmup, **options)
        else:
            self.vq = VectorQuantizer(num_embeddings, embedding_dim, commitment_cost, simvq=q.simvq, **options)
        self.decoder = Decoder(in_channels, num_hiddens, num_residual_layers, num_residual_hiddens, embedding_dim)

    def check_input(self, x):
        shape = x.shape
        if len(shape) != 4 or shape[1] != self.in_channels or shape[2] % 4 or shape[3] % 4 or 0 in shape:
            raise ValueError(f"VQVAE expects images of shape (N, {self.in_channels}, H, W) with H and W "
                             f"multiples of 4, got {tuple(shape)}")

    def forward(self, x):
        if not isinstance(x, Tensor):
            x = Tensor(x)
        self.check_input(x)
        z_e = self.encoder(x)
        z_e.name = "z_e"            # names shown by minivq.graph's printed and drawn graphs
        vq = self.vq(z_e)
        x_recon = self.decoder(vq.quantized)
        x_recon.name = "x_recon"
        return x_recon, vq

    def center_output(self, x):
        """Shift the decoder's last bias so that this model's mean reconstruction of the batch ``x`` equals the
        mean of ``x``, per channel; returns the shift (a host array, one value per channel).

        A data-dependent initialisation for the start of training. The decoder's last layer sums
        ReLU outputs, all >= 0, through random weights, so a freshly initialised model adds an offset
        to every pixel whose size and sign depend on the seed (on Fashion-MNIST, -0.16 to +0.22 where
        the images' mean is -0.29): up to three times the data's variance in squared error, which the
        first tens of training steps spend removing (docs/codebook.md). Runs in eval mode: the
        codebook is neither updated nor re-seeded.
        """
        with self.evaluating(), no_grad():
            x = x if isinstance(x, Tensor) else Tensor(x)
            self.check_input(x)
            x_recon = self.decoder(self.vq(self.encoder(x)).quantized)
        axes = (0, 2, 3)
        shift = backend.to_numpy(x.data.mean(axis=axes) - x_recon.data.mean(axis=axes))
        bias = self.decoder.conv_trans_2.bias
        bias.data += backend.to_device(shift.astype(bias.data.dtype), backend.array_device(bias.data))
        return shift

    def encode(self, x):
        """Index grids (N, H/4, W/4) of images ``x`` (no graph, no codebook updates)."""
        with self.evaluating(), no_grad():
            if not isinstance(x, Tensor):
                x = Tensor(x)
            self.check_input(x)
            return self.vq(self.encoder(x)).indices

    def decode_indices(self, indices):
        """Images decoded from index grids (N, h, w), whichever the quantiser."""
        return self.decoder(self.vq.dequantize(indices))
