"""Layers and containers (``minivq.nn``)."""
from .module import Module, Parameter, Sequential, ReLU

__all__ = ["Module", "Parameter", "Sequential", "ReLU"]
