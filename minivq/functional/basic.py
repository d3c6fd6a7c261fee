"""Elementwise arithmetic, reductions, shape ops and indexing, each forward beside its backward.

Broadcasting is undone in backward by ``sum_to``: the gradient of an input
that was broadcast is summed over the axes it was stretched along.
"""
import numpy as np

from .. import backend, kernels
from ..autograd import Function, Tensor
from ..backend import get_array_module


def sum_to(g, shape):
    """Sum ``g`` down to ``shape`` (the adjoint of broadcasting ``shape`` up to ``g.shape``)."""
    if g.shape == shape:
        return g
    lead = g.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(lead + i for i, n in enumerate(shape) if n == 1 and g.shape[lead + i] != 1)
    return g.sum(axis=axes, keepdims=True).reshape(shape)


def _operands(a, b):
    """Both operands as Tensors; a Python number takes the dtype and device of the other side."""
    if not isinstance(a, Tensor):
        a = _constant(a, like=b)
    if not isinstance(b, Tensor):
        b = _constant(b, like=a)
    return a, b


def _constant(value, like):
    xp = get_array_module(like.data)
    if isinstance(value, (bool, int, float)) and like.dtype.kind == "f":
        return Tensor(xp.asarray(value, dtype=like.dtype))
    return Tensor(xp.asarray(value))


# ---------------------------------------------------------------- arithmetic
class Add(Function):
    def forward(self, a, b):
        self.shapes = a.shape, b.shape
        return kernels.add(a, b)        # a + b (split over the threads where the convolutions split too)

    def backward(self, g):
        sa, sb = self.shapes
        return (sum_to(g, sa) if self.needs_input_grad[0] else None,
                sum_to(g, sb) if self.needs_input_grad[1] else None)


class Sub(Function):
    def forward(self, a, b):
        self.shapes = a.shape, b.shape
        return a - b

    def backward(self, g):
        sa, sb = self.shapes
        return (sum_to(g, sa) if self.needs_input_grad[0] else None,
                sum_to(-g, sb) if self.needs_input_grad[1] else None)


class Mul(Function):
    def forward(self, a, b):
        self.a, self.b = a, b
        return a * b

    def backward(self, g):
        a, b = self.a, self.b
        return (sum_to(g * b, a.shape) if self.needs_input_grad[0] else None,
                sum_to(g * a, b.shape) if self.needs_input_grad[1] else None)


class Div(Function):
    def forward(self, a, b):
        self.a, self.b = a, b
        return a / b

    def backward(self, g):
        a, b = self.a, self.b
        ga = sum_to(g / b, a.shape) if self.needs_input_grad[0] else None
        # d(a/b)/db = -a / b^2
        gb = sum_to(-g * a / (b * b), b.shape) if self.needs_input_grad[1] else None
        return ga, gb


class Neg(Function):
    def forward(self, x):
        return -x

    def backward(self, g):
        return -g


class Pow(Function):
    def forward(self, a, b):
        self.a, self.b = a, b
        self.y = a ** b
        return self.y

    def backward(self, g):
        a, b, y = self.a, self.b, self.y
        ga = gb = None
        if self.needs_input_grad[0]:
            ga = sum_to(g * b * a ** (b - 1), a.shape)     # d(a^b)/da = b a^(b-1)
        if self.needs_input_grad[1]:
            xp = get_array_module(a)
            gb = sum_to(g * y * xp.log(a), b.shape)         # d(a^b)/db = a^b log a
        return ga, gb


class MatMul(Function):
    def forward(self, a, b):
        self.a, self.b = a, b
        return a @ b

    def backward(self, g):
        a, b = self.a, self.b
        xp = get_array_module(a)
        # Treat 1-D operands as a row (a) or a column (b), as matmul does, and give g those axes back.
        a2 = a[None, :] if a.ndim == 1 else a
        b2 = b[:, None] if b.ndim == 1 else b
        batch = np.broadcast_shapes(a2.shape[:-2], b2.shape[:-2])
        g = g.reshape(batch + (a2.shape[-2], b2.shape[-1]))
        ga = gb = None
        if self.needs_input_grad[0]:     # dL/da = g b^T
            ga = sum_to(g @ xp.swapaxes(b2, -1, -2), a2.shape).reshape(a.shape)
        if self.needs_input_grad[1]:     # dL/db = a^T g
            gb = sum_to(xp.swapaxes(a2, -1, -2) @ g, b2.shape).reshape(b.shape)
        return ga, gb


def add(a, b):
    return Add()(*_operands(a, b))


def sub(a, b):
    return Sub()(*_operands(a, b))


def mul(a, b):
    return Mul()(*_operands(a, b))


def div(a, b):
    return Div()(*_operands(a, b))


def neg(x):
    return Neg()(x)


def pow(a, b):
    return Pow()(*_operands(a, b))


def matmul(a, b):
    a, b = _operands(a, b)
    if a.ndim == 0 or b.ndim == 0:
        raise ValueError(f"matmul needs operands with at least one axis, got shapes {a.shape} and {b.shape}")
    return MatMul()(a, b)


# ---------------------------------------------------------------- elementwise
class Exp(Function):
    def forward(self, x):
        self.y = get_array_module(x).exp(x)
        return self.y

    def backward(self, g):
        return g * self.y


class Log(Function):
    def forward(self, x):
        self.x = x
        return get_array_module(x).log(x)

    def backward(self, g):
        return g / self.x


class ReLU(Function):
    def forward(self, x):
        self.y = kernels.relu(x)       # max(x, 0) in one pass (split over the threads as the convs); NaN stays NaN
        return self.y

    def backward(self, g):
        return kernels.relu_grad(g, self.y)            # g * (y > 0): dy/dx = 1 where x > 0, else 0


class Sigmoid(Function):
    def forward(self, x):
        xp = get_array_module(x)
        self.y = 0.5 * (xp.tanh(0.5 * x) + 1)     # overflow-free sigmoid
        return self.y.astype(x.dtype, copy=False)

    def backward(self, g):
        return g * self.y * (1 - self.y)


class Tanh(Function):
    def forward(self, x):
        self.y = get_array_module(x).tanh(x)
        return self.y

    def backward(self, g):
        return g * (1 - self.y * self.y)


def exp(x):
    return Exp()(x)


def log(x):
    return Log()(x)


def relu(x):
    return ReLU()(x)


def sigmoid(x):
    return Sigmoid()(x)


def tanh(x):
    return Tanh()(x)


# ---------------------------------------------------------------- reductions
def _normalise_axis(axis, ndim):
    if axis is None:
        return tuple(range(ndim))
    axes = (axis,) if isinstance(axis, (int, np.integer)) else tuple(axis)
    out = []
    for a in axes:
        if not -ndim <= a < ndim:
            raise ValueError(f"axis {a} is out of range for a tensor with {ndim} axes")
        out.append(int(a) % ndim)
    return tuple(sorted(set(out)))


def _expand_back(g, in_shape, axes, keepdims):
    """Broadcast a reduced gradient back over the reduced axes."""
    xp = get_array_module(g)
    if not keepdims:
        g = g.reshape([1 if i in axes else n for i, n in enumerate(in_shape)])
    return xp.broadcast_to(g, in_shape)


class Sum(Function):
    def __init__(self, axis=None, keepdims=False):
        self.axis, self.keepdims = axis, keepdims

    def forward(self, x):
        self.in_shape = x.shape
        self.axes = _normalise_axis(self.axis, x.ndim)
        return x.sum(axis=self.axes, keepdims=self.keepdims)

    def backward(self, g):
        return _expand_back(g, self.in_shape, self.axes, self.keepdims)


class Mean(Function):
    def __init__(self, axis=None, keepdims=False):
        self.axis, self.keepdims = axis, keepdims

    def forward(self, x):
        self.in_shape = x.shape
        self.axes = _normalise_axis(self.axis, x.ndim)
        self.count = int(np.prod([x.shape[a] for a in self.axes]))
        return x.mean(axis=self.axes, keepdims=self.keepdims)

    def backward(self, g):
        return _expand_back(g / self.count, self.in_shape, self.axes, self.keepdims)


def sum(x, axis=None, keepdims=False):
    return Sum(axis, keepdims)(x)


def mean(x, axis=None, keepdims=False):
    return Mean(axis, keepdims)(x)


# ---------------------------------------------------------------- shape
class Reshape(Function):
    def __init__(self, shape):
        self.shape = shape

    def forward(self, x):
        self.in_shape = x.shape
        return x.reshape(self.shape)

    def backward(self, g):
        return g.reshape(self.in_shape)


class Transpose(Function):
    def __init__(self, axes=None):
        self.axes = axes

    def forward(self, x):
        self.perm = tuple(range(x.ndim))[::-1] if self.axes is None else tuple(a % x.ndim for a in self.axes)
        return x.transpose(self.perm)

    def backward(self, g):
        return g.transpose(tuple(np.argsort(self.perm)))


class GetItem(Function):
    def __init__(self, key):
        self.key = key

    def forward(self, x):
        self.in_shape = x.shape
        self.in_order = backend.memory_order(x)     # the gradient is made in x's layout: channels-last
        return x[self.key]                          # stays so, and the convolutions it reaches need no copy

    def backward(self, g):
        xp = get_array_module(g)
        gx = _zeros_in_order(xp, self.in_shape, g.dtype, self.in_order)
        if _is_basic_index(self.key):
            gx[self.key] = g                     # basic indexing never repeats an element
        else:
            backend.add_at(gx, self.key, g)      # advanced indexing may: scatter-add
        return gx


def _zeros_in_order(xp, shape, dtype, order):
    """Zeros of ``shape`` whose memory holds the axes in ``order`` (``backend.memory_order``), viewed in
    shape's order."""
    stored = xp.zeros(tuple(shape[axis] for axis in order), dtype=dtype)
    return stored.transpose(tuple(order.index(axis) for axis in range(len(order))))


def _is_basic_index(key):
    parts = key if isinstance(key, tuple) else (key,)
    return all(p is None or p is Ellipsis or isinstance(p, (slice, int, np.integer)) for p in parts)


class Concatenate(Function):
    def __init__(self, axis):
        self.axis = axis

    def forward(self, *xs):
        xp = get_array_module(*xs)
        self.sizes = [x.shape[self.axis] for x in xs]
        return xp.concatenate(xs, axis=self.axis)

    def backward(self, g):
        xp = get_array_module(g)
        cuts = np.cumsum(self.sizes)[:-1].tolist()
        return tuple(xp.split(g, cuts, axis=self.axis))


class Pad(Function):
    """Constant padding; ``pad`` is PyTorch's (left, right) pairs starting from the last axis."""

    def __init__(self, pad, value=0.0):
        self.pad, self.value = pad, value

    def forward(self, x):
        xp = get_array_module(x)
        pairs = [(0, 0)] * x.ndim
        for i in range(len(self.pad) // 2):
            pairs[x.ndim - 1 - i] = (self.pad[2 * i], self.pad[2 * i + 1])
        self.crop = tuple(slice(lo, lo + n) for (lo, _), n in zip(pairs, x.shape))
        shape = tuple(n + lo + hi for n, (lo, hi) in zip(x.shape, pairs))
        out = xp.full_like(x, self.value, shape=shape)      # x's memory layout (channels-last stays so)
        out[self.crop] = x
        return out

    def backward(self, g):
        return g[self.crop]


class Cast(Function):
    def __init__(self, dtype):
        self.dtype = np.dtype(dtype)

    def forward(self, x):
        self.in_dtype = x.dtype
        return x.astype(self.dtype)

    def backward(self, g):
        return g.astype(self.in_dtype)


class ToDevice(Function):
    def __init__(self, device):
        self.device = device

    def forward(self, x):
        self.in_device = backend.array_device(x)
        return backend.to_device(x, self.device)

    def backward(self, g):
        return backend.to_device(g, self.in_device)


def reshape(x, *shape):
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = tuple(shape[0])
    return Reshape(shape)(x)


def transpose(x, *axes):
    if len(axes) == 1 and isinstance(axes[0], (tuple, list)):
        axes = tuple(axes[0])
    return Transpose(axes or None)(x)


def getitem(x, key):
    if isinstance(key, Tensor):
        key = key.data
    elif isinstance(key, tuple):
        key = tuple(k.data if isinstance(k, Tensor) else k for k in key)
    return GetItem(key)(x)


def concatenate(tensors, axis=0):
    tensors = list(tensors)
    if not tensors:
        raise ValueError("concatenate needs at least one tensor")
    return Concatenate(axis)(*tensors)


cat = concatenate


def pad(x, pad, value=0.0):
    if len(pad) % 2 or len(pad) // 2 > x.ndim or any(int(p) < 0 for p in pad):
        raise ValueError(f"pad must hold non-negative (left, right) pairs for at most {x.ndim} axes, got {pad}")
    return Pad(tuple(int(p) for p in pad), value)(x)


def cast(x, dtype):
    return Cast(dtype)(x)


def to_device(x, device):
    return ToDevice(device)(x)


def _tensor_to(x, device):
    """``Tensor.to``: ``x`` on ``device``; differentiable (the gradient moves back); ``x`` itself if already there."""
    if backend.array_device(x.data) == backend.device_name(device):
        return x
    return to_device(x, device)


# ---------------------------------------------------------------- embedding
class Embedding(Function):
    """Rows of ``weight`` picked by integer ``indices``; backward scatter-adds into the picked rows.

    ``check_range=False`` skips the range check of the indices (one wait for the GPU), for callers
    whose indices are in range by construction (the quantisers' nearest codes). On the GPU an
    unchecked index out of range wraps around instead of failing.
    """

    def __init__(self, check_range=True):
        self.check_range = check_range

    def forward(self, indices, weight):
        if indices.dtype.kind not in "iu":
            raise TypeError(f"embedding indices must be integers, got dtype {indices.dtype}")
        if self.check_range and indices.size:
            lo, hi = backend.min_max(indices)
            if lo < 0 or hi >= weight.shape[0]:
                raise ValueError(f"embedding indices must lie in [0, {weight.shape[0]}), "
                                 f"got values from {lo} to {hi}")
        self.indices, self.num_rows = indices, weight.shape[0]
        return weight[indices]

    def backward(self, g):
        if not self.needs_input_grad[1]:
            return None, None
        d = g.shape[-1]
        # dL/dW[k] = sum of g over the positions that picked row k
        return None, kernels.index_add(self.indices.reshape(-1), g.reshape(-1, d), self.num_rows)


def embedding(indices, weight):
    """``weight[indices]``: indices of any shape, weight (K, D) -> (*indices.shape, D)."""
    if weight.ndim != 2:
        raise ValueError(f"embedding weight must be 2-D (num_embeddings, dim), got shape {weight.shape}")
    return Embedding()(indices, weight)


# ---------------------------------------------------------------- Tensor methods
def _install_tensor_methods():
    """Give Tensor its operators and methods; they are the functions above."""
    T = Tensor
    T.__add__ = add
    T.__radd__ = lambda self, other: add(other, self)
    T.__sub__ = sub
    T.__rsub__ = lambda self, other: sub(other, self)
    T.__mul__ = mul
    T.__rmul__ = lambda self, other: mul(other, self)
    T.__truediv__ = div
    T.__rtruediv__ = lambda self, other: div(other, self)
    T.__neg__ = neg
    T.__pow__ = pow
    T.__rpow__ = lambda self, other: pow(other, self)
    T.__matmul__ = matmul
    T.__rmatmul__ = lambda self, other: matmul(other, self)
    T.__getitem__ = getitem
    T.sum = sum
    T.mean = mean
    T.reshape = reshape
    T.transpose = transpose
    T.T = property(lambda self: transpose(self))
    T.exp = exp
    T.log = log
    T.relu = relu
    T.sigmoid = sigmoid
    T.tanh = tanh
    T.to = _tensor_to
    T.astype = cast


_install_tensor_methods()
