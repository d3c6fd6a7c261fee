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
