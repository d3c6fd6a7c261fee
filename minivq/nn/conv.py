"""Convolution layers: ``Conv2d`` and ``ConvTranspose2d``, initialised as PyTorch initialises them."""
import math

import numpy as np

from .. import backend
from ..functional.conv import conv2d, conv_transpose2d, _pair
from .module import Module, Parameter


def _uniform(bound, shape):
    """U(-bound, bound) from minivq's one generator, drawn on the CPU, then float32."""
    return Parameter(backend.rng().uniform(-bound, bound, size=shape).astype(np.float32))


def _check_channels(in_channels, out_channels):
    for name, value in (("in_channels", in_channels), ("out_channels", out_channels)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{name} must be an integer, got {value!r}")
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")
    return int(in_channels), int(out_channels)


class _ConvNd(Module):
    """What the two layers share: sizes, parameters, initialisation, repr."""

    def __init__(self, in_channels, out_channels, kernel_size, stride, padding, bias, weight_shape, fan_in):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        # PyTorch: kaiming_uniform_(a=sqrt(5)) for the weight, i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
        # and the same bound for the bias; fan_in is weight.size(1) * kH * kW
        bound = 1.0 / math.sqrt(fan_in)
        self.weight = _uniform(bound, weight_shape)
        if bias:
            self.bias = _uniform(bound, (out_channels,))
        else:
            self.bias = None

    def extra_repr(self):
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
             f"stride={self.stride}")
        if self.padding != (0, 0):
            s += f", padding={self.padding}"
        if getattr(self, "output_padding", (0, 0)) != (0, 0):
            s += f", output_padding={self.output_padding}"
        if self.bias is None:
            s += ", bias=False"
        return s


class Conv2d(_ConvNd):
    """2-D convolution over NCHW input; weight (out_channels, in_channels, kH, kW), bias (out_channels,)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, bias=True):
        in_channels, out_channels = _check_channels(in_channels, out_channels)
        kernel = _pair(kernel_size, "kernel_size", 1)
        stride, padding = _pair(stride, "stride", 1), _pair(padding, "padding", 0)
        kh, kw = kernel
        super().__init__(in_channels, out_channels, kernel, stride, padding, bias,
                         (out_channels, in_channels, kh, kw), fan_in=in_channels * kh * kw)

    def forward(self, x):
        return conv2d(x, self.weight, self.bias, self.stride, self.padding)


class ConvTranspose2d(_ConvNd):
    """Transposed 2-D convolution; weight (in_channels, out_channels, kH, kW), bias (out_channels,)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, output_padding=0, bias=True):
        in_channels, out_channels = _check_channels(in_channels, out_channels)
        kernel = _pair(kernel_size, "kernel_size", 1)
        stride, padding = _pair(stride, "stride", 1), _pair(padding, "padding", 0)
        output_padding = _pair(output_padding, "output_padding", 0)
        if output_padding[0] >= stride[0] or output_padding[1] >= stride[1]:
            raise ValueError(f"ConvTranspose2d output_padding {output_padding} must be smaller than "
                             f"stride {stride}")
        kh, kw = kernel
        # PyTorch computes fan_in from dim 1 of the (in, out, kH, kW) weight: out_channels * kH * kW
        super().__init__(in_channels, out_channels, kernel, stride, padding, bias,
                         (in_channels, out_channels, kh, kw), fan_in=out_channels * kh * kw)
        self.output_padding = output_padding

    def forward(self, x):
        return conv_transpose2d(x, self.weight, self.bias, self.stride, self.padding, self.output_padding)
