"""Stateless differentiable operations (``minivq.functional``, imported as ``F``)."""
from .basic import (add, sub, mul, div, neg, pow, matmul, exp, log, relu, sigmoid, tanh,
                    sum, mean, reshape, transpose, getitem, concatenate, cat, pad, cast, to_device,
                    embedding, sum_to)
from .conv import conv2d, conv_transpose2d
from .losses import log_softmax, cross_entropy, mse_loss
from .quantize import (stop_gradient, straight_through, rotation_trick, vector_quantize, round_straight_through,
                       l2_normalize)

__all__ = ["add", "sub", "mul", "div", "neg", "pow", "matmul", "exp", "log", "relu", "sigmoid", "tanh",
           "sum", "mean", "reshape", "transpose", "getitem", "concatenate", "cat", "pad", "cast",
           "to_device", "embedding", "sum_to", "conv2d", "conv_transpose2d", "log_softmax", "cross_entropy", "mse_loss",
           "stop_gradient", "straight_through", "rotation_trick", "vector_quantize", "round_straight_through",
           "l2_normalize"]
