"""The two graph nodes that make vector quantisation trainable, named so a printed graph shows them.

``stop_gradient`` is the paper's sg[.]: identity forward, zero gradient.
``straight_through`` is the paper's copy of gradients from the decoder input
z_q back to the encoder output z_e: forward z_q, backward the incoming
gradient handed to z_e unchanged (and nothing to z_q).
"""
from ..autograd import Function


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


def stop_gradient(x):
    """sg[x]: forward ``x``, backward zero."""
    return StopGradient()(x)


def straight_through(z_e, z_q):
    """Forward ``z_q``; backward passes the gradient to ``z_e`` unchanged."""
    return StraightThrough()(z_e, z_q)


def flatten_latents(z):
    """(N, D, H, W) raw array -> (N*H*W, D) rows, one per latent position, in raster order."""
    n, d, h, w = z.shape
    return z.transpose(0, 2, 3, 1).reshape(n * h * w, d)


def vector_quantize(z_e, codebook, commitment_cost=0.25, backend="auto"):
    """Quantise ``z_e`` (N, D, H, W) to its nearest rows of ``codebook`` (K, D), as in the paper.

    Returns ``(quantized, codebook_loss, commitment_loss, indices)``:
    - ``quantized = straight_through(z_e, z_q)``: forward z_q, gradient copied to z_e;
    - ``codebook_loss = mean ||sg[z_e] - z_q||^2`` (moves the chosen codes towards the encoder);
    - ``commitment_loss = commitment_cost * mean ||z_e - sg[z_q]||^2`` (keeps the encoder near its codes);
    - ``indices``: raw int64 array (N, H, W).
    ``codebook`` may be a Tensor that requires grad (the plain VQ) or a constant (the EMA VQ,
    whose codebook loss is then zero-gradient and may be ignored).
    """
    from ..kernels import nearest_code
    from .basic import embedding, transpose
    from .losses import mse_loss

    n, d, h, w = z_e.shape
    flat = flatten_latents(z_e.data)
    cb = codebook.data if hasattr(codebook, "requires_grad") else codebook
    indices = nearest_code(flat, cb, backend=backend).reshape(n, h, w)
    z_q = transpose(embedding(indices, codebook), (0, 3, 1, 2))      # e_k picked per position, NCHW
    codebook_loss = mse_loss(stop_gradient(z_e), z_q)
    commitment_loss = mse_loss(z_e, stop_gradient(z_q)) * commitment_cost
    return straight_through(z_e, z_q), codebook_loss, commitment_loss, indices
