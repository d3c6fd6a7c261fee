"""Models built from minivq.nn: the VQ-VAE and its learned prior."""
from .vqvae import (DEFAULT_QUANTIZER, PAPER_QUANTIZER, VQVAE, Decoder, Encoder, QuantizerOptions, Residual,
                    ResidualStack)
from .pixelcnn import GatedPixelCNN, GatedLayer, MaskedConv2d

__all__ = ["VQVAE", "QuantizerOptions", "DEFAULT_QUANTIZER", "PAPER_QUANTIZER", "Encoder", "Decoder", "Residual", "ResidualStack", "GatedPixelCNN", "GatedLayer", "MaskedConv2d"]
