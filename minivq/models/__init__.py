"""Models built from minivq.nn: the VQ-VAE and its learned prior."""
from .vqvae import VQVAE, Encoder, Decoder, Residual, ResidualStack
from .pixelcnn import GatedPixelCNN, GatedLayer, MaskedConv2d

__all__ = ["VQVAE", "Encoder", "Decoder", "Residual", "ResidualStack", "GatedPixelCNN", "GatedLayer", "MaskedConv2d"]
