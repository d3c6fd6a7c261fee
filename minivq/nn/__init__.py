"""Layers and containers (``minivq.nn``)."""
from .module import Module, Parameter, Sequential, ReLU
from .conv import Conv2d, ConvTranspose2d
from .embedding import Embedding
from .quantizers import VectorQuantizer, VectorQuantizerEMA, VQOutput
from .fsq import FSQ

__all__ = ["Module", "Parameter", "Sequential", "ReLU", "Conv2d", "ConvTranspose2d", "Embedding", "VectorQuantizer", "VectorQuantizerEMA", "VQOutput", "FSQ"]
