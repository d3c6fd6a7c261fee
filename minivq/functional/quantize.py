"""The two graph nodes that make vector quantisation trainable, named so a printed graph shows them.

``stop_gradient`` is the paper's sg[.]: identity forward, zero gradient.
``straight_through`` is the paper's copy of gradients from the decoder input
z_q back to the encoder output z_e: forward z_q, backward the incoming
gradient handed to z_e unchanged (and nothing to z_q).

Beside them, the nodes of the codebook-health options: ``l2_normalize`` (the
cosine-similarity lookup of ViT-VQGAN) and ``round_straight_through`` (the
rounding of finite scalar quantisation, FSQ), and ``vector_quantize``, the
nearest-code step itself.
"""
from ..autograd import Function
from ..backend import get_array_module
from ..kernels import nearest_code
from .basic import Embedding, transpose
from .losses import mse_loss


class StopGradient(Function):
    def forward(self, x):
        return x

    def backward(self, g):
        return None            # sg[x]: no gradient reaches x


class StraightThrough(Function):
    def forward(self, z_e, z_q):
        if z_e.shape != z_q.shape:
            raise ValueError(f"straight_through needs z_e and z_q of one shape, got {z_e.shape} and {z_q.shape}")
        return z_q

    def backward(self, g):
        return g, None         # dL/dz_e := dL/dz_q; z_q gets nothing through this node


class RotationTrick(Function):
    """Forward z_q; backward through the rotation that takes z_e to z_q (Fifty et al., 2024).

    Per latent vector (channel axis 1): z_q = lambda R z_e with lambda = |q| / |e| and
    R = I - 2 r r^T + 2 q^ e^T, where e^ = e/|e|, q^ = q/|q|, r = (e^ + q^)/|e^ + q^|: the
    rotation in the plane of e and q that turns e^ into q^. R and lambda are held constant
    (stop-gradient), so the gradient reaching z_e is the incoming one rotated back and scaled:
        dL/de = lambda R^T g = lambda (g - 2 r (r.g) + 2 e^ (q^.g)).
    The angle between the gradient and the code vector is thus carried over to the encoder,
    where the straight-through estimator copies g unchanged.
    """

    eps = 1e-12

    def forward(self, z_e, z_q):
        if z_e.shape != z_q.shape:
            raise ValueError(f"rotation_trick needs z_e and z_q of one shape, got {z_e.shape} and {z_q.shape}")
        xp = get_array_module(z_e)
        e_norm = xp.sqrt((z_e * z_e).sum(axis=1, keepdims=True))
        q_norm = xp.sqrt((z_q * z_q).sum(axis=1, keepdims=True))
        self.e_hat = z_e / xp.maximum(e_norm, self.eps)
        self.q_hat = z_q / xp.maximum(q_norm, self.eps)
        r = self.e_hat + self.q_hat
        self.r = r / xp.maximum(xp.sqrt((r * r).sum(axis=1, keepdims=True)), self.eps)
        self.scale = q_norm / xp.maximum(e_norm, self.eps)
        return z_q

    def backward(self, g):
        r, e_hat, q_hat = self.r, self.e_hat, self.q_hat
        r_dot_g = (r * g).sum(axis=1, keepdims=True)
        q_dot_g = (q_hat * g).sum(axis=1, keepdims=True)
        return self.scale * (g - 2 * r * r_dot_g + 2 * e_hat * q_dot_g), None


def rotation_trick(z_e, z_q):
    """Forward ``z_q``; backward rotates and scales the gradient onto ``z_e`` (see ``RotationTrick``)."""
    return RotationTrick()(z_e, z_q)


def stop_gradient(x):
    """sg[x]: forward ``x``, backward zero."""
    return StopGradient()(x)


def straight_through(z_e, z_q):
    """Forward ``z_q``; backward passes the gradient to ``z_e`` unchanged."""
    return StraightThrough()(z_e, z_q)


ESTIMATORS = {"straight_through": straight_through, "rotation": rotation_trick}


class RoundStraightThrough(Function):
    """Forward: round to the nearest integer (halves to even); backward: the gradient unchanged.

    The rounding of finite scalar quantisation (FSQ, Mentzer et al. 2023): round(z) has zero
    gradient almost everywhere, so the gradient is copied across it, as the straight-through
    estimator copies it across the codebook lookup: dL/dz := dL/dround(z).
    """

    def forward(self, z):
        return get_array_module(z).round(z)

    def backward(self, g):
        return g


def round_straight_through(z):
    """``round(z)`` forward, identity backward (see ``RoundStraightThrough``)."""
    return RoundStraightThrough()(z)


class L2Normalize(Function):
    """y = x / max(||x||, eps) along ``axis``: unit vectors for a cosine-similarity lookup.

    backward, where ||x|| > eps: dL/dx = (g - y (y.g)) / ||x|| (the part of g along y is removed);
    below eps, where y = x / eps, dL/dx = g / eps.
    """

    def __init__(self, axis=1, eps=1e-12):
        self.axis, self.eps = axis, eps

    def forward(self, x):
        xp = get_array_module(x)
        norm = xp.sqrt((x * x).sum(axis=self.axis, keepdims=True))
        self.scale = xp.maximum(norm, self.eps)
        self.small = norm <= self.eps
        self.y = x / self.scale
        return self.y

    def backward(self, g):
        xp = get_array_module(g)
        along = (self.y * g).sum(axis=self.axis, keepdims=True)
        return xp.where(self.small, g, g - self.y * along) / self.scale


def l2_normalize(x, axis=1, eps=1e-12):
    """``x`` divided by its l2 norm along ``axis`` (at least ``eps``); one named node."""
    return L2Normalize(axis, eps)(x)


def flatten_latents(z):
    """(N, D, H, W) raw array -> (N*H*W, D) rows, one per latent position, in raster order."""
    n, d, h, w = z.shape
    return z.transpose(0, 2, 3, 1).reshape(n * h * w, d)


def vector_quantize(z_e, codebook, commitment_cost=0.25, backend="auto", estimator="straight_through",
                    metric="l2"):
    """Quantise ``z_e`` (N, D, H, W) to its nearest rows of ``codebook`` (K, D), as in the paper.

    ``metric="l2"`` picks the code nearest in squared distance, ``"ip"`` the code of largest
    inner product (the cosine lookup, when ``z_e`` and the codes are l2-normalised).

    Returns ``(quantized, codebook_loss, commitment_loss, indices)``:
    - ``quantized = straight_through(z_e, z_q)``: forward z_q, gradient copied to z_e (or, with
      ``estimator="rotation"``, ``rotation_trick(z_e, z_q)``);
    - ``codebook_loss = mean ||sg[z_e] - z_q||^2`` (moves the chosen codes towards the encoder);
    - ``commitment_loss = commitment_cost * mean ||z_e - sg[z_q]||^2`` (keeps the encoder near its codes);
    - ``indices``: raw int64 array (N, H, W).
    ``codebook`` may be a Tensor that requires grad (the plain VQ) or a constant (the EMA VQ,
    whose codebook loss is then zero-gradient and may be ignored).
    """
    n, d, h, w = z_e.shape
    flat = flatten_latents(z_e.data)
    cb = codebook.data if hasattr(codebook, "requires_grad") else codebook
    indices = nearest_code(flat, cb, backend=backend, metric=metric).reshape(n, h, w)
    # e_k picked per position, NCHW; nearest_code's indices are in range, so no range check (a GPU wait)
    z_q = transpose(Embedding(check_range=False)(indices, codebook), (0, 3, 1, 2))
    codebook_loss = mse_loss(stop_gradient(z_e), z_q)
    commitment_loss = mse_loss(z_e, stop_gradient(z_q)) * commitment_cost
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown gradient estimator {estimator!r}: use one of {', '.join(ESTIMATORS)}")
    quantized = ESTIMATORS[estimator](z_e, z_q)
    # names, as the paper writes them, for printed and drawn graphs (minivq.graph)
    z_q.name, quantized.name = "z_q", "quantized"
    codebook_loss.name, commitment_loss.name = "codebook_loss", "commitment_loss"
    return quantized, codebook_loss, commitment_loss, indices
