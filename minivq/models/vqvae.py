"""The VQ-VAE of van den Oord et al. (2017), as in its common PyTorch reproduction.

    x (N, C, 32, 32)
      -> Encoder: 4x4/2 conv to h/2, ReLU, 4x4/2 conv to h, ReLU, 3x3 conv, residual stack,
                  1x1 conv to D                                    -> z_e (N, D, 8, 8)
      -> VectorQuantizer (its EMA variant when decay > 0, FSQ with levels)  -> z_q, indices (N, 8, 8)
      -> Decoder: 3x3 conv D to h, residual stack, 4x4/2 transposed conv to h/2, ReLU,
                  4x4/2 transposed conv to C                        -> x_recon (N, C, 32, 32)
"""
import numpy as np

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


class VQVAE(Module):
    """Encoder -> quantiser -> decoder. ``model(x)`` returns ``(x_recon, VQOutput)``.

    The quantiser: ``decay > 0`` selects the EMA codebook (``nn.VectorQuantizerEMA``),
    ``levels`` (e.g. (8, 8, 8)) finite scalar quantisation (``nn.FSQ``; then
    ``num_embeddings`` must equal prod(levels)), otherwise the paper's learned codebook
    (``nn.VectorQuantizer``). The other options go to the vector quantisers (see
    ``nn.VectorQuantizer``): ``kmeans_init``, ``kernel`` (nearest-code backend),
    ``estimator`` ("straight_through" or "rotation"), dead-code replacement
    (``dead_code_threshold`` > 0, at most ``max_replacements`` codes a step),
    ``lookup`` ("l2" or "cosine"), ``lookup_dim`` (search in d < D dimensions through
    learned projections) and ``simvq`` (codes = frozen random codes x a learned map;
    the plain quantiser only). The defaults are the paper's plain quantiser.
    """

    def __init__(self, in_channels=1, num_hiddens=128, num_residual_hiddens=32, num_residual_layers=2,
                 embedding_dim=64, num_embeddings=512, commitment_cost=0.25, decay=0.0,
                 kmeans_init=False, kernel="auto", estimator="straight_through", dead_code_threshold=0.0,
                 max_replacements=64, lookup="l2", lookup_dim=None, simvq=False, levels=None, restart_after=0):
        super().__init__()
        if restart_after:   # transitional: accepted as 0 only until the training config drops the option
            raise ValueError(f"restart_after={restart_after}: the mass re-seed of dead codes was replaced by "
                             "gentle dead-code replacement: use dead_code_threshold (e.g. 1.0) and max_replacements")
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
        if levels is not None:
            levels = tuple(levels)
            given = [name for name, value, default in [
                ("decay", decay, 0.0), ("kmeans_init", kmeans_init, False), ("simvq", simvq, False),
                ("dead_code_threshold", dead_code_threshold, 0.0), ("lookup", lookup, "l2"),
                ("lookup_dim", lookup_dim, None)] if value != default]
            if given:
                raise ValueError(f"levels={levels} selects FSQ, which has no codebook: drop {', '.join(given)}")
            if int(np.prod(levels)) != num_embeddings:
                raise ValueError(f"levels={levels} give {int(np.prod(levels))} codes but num_embeddings="
                                 f"{num_embeddings}: pass num_embeddings={int(np.prod(levels))}")
        if simvq and decay > 0:
            raise ValueError("simvq learns its codebook by gradient: it needs decay=0 (not the EMA codebook), "
                             f"got decay={decay}")
        self.config = dict(in_channels=in_channels, num_hiddens=num_hiddens,
                           num_residual_hiddens=num_residual_hiddens, num_residual_layers=num_residual_layers,
                           embedding_dim=embedding_dim, num_embeddings=num_embeddings,
                           commitment_cost=commitment_cost, decay=decay, kmeans_init=kmeans_init,
                           estimator=estimator, dead_code_threshold=dead_code_threshold,
                           max_replacements=max_replacements, lookup=lookup, lookup_dim=lookup_dim, simvq=simvq,
                           levels=levels)
        self.in_channels = in_channels
        self.encoder = Encoder(in_channels, num_hiddens, num_residual_layers, num_residual_hiddens, embedding_dim)
        options = dict(kmeans_init=kmeans_init, kernel=kernel, estimator=estimator,
                       dead_code_threshold=dead_code_threshold, max_replacements=max_replacements, lookup=lookup,
                       lookup_dim=lookup_dim)
        if levels is not None:
            self.vq = FSQ(levels, embedding_dim)
        elif decay > 0:
            self.vq = VectorQuantizerEMA(num_embeddings, embedding_dim, commitment_cost, decay=decay, **options)
        else:
            self.vq = VectorQuantizer(num_embeddings, embedding_dim, commitment_cost, simvq=simvq, **options)
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
