"""Softmax-family ops and the training losses."""
from .. import kernels
from ..autograd import Function, Tensor
from ..backend import get_array_module, min_max


def _log_softmax(x, axis):
    """log softmax along ``axis`` in four passes over x: max, shift, exp-and-sum, subtract (in place)."""
    xp = get_array_module(x)
    shifted = x - x.max(axis=axis, keepdims=True)
    shifted -= xp.log(xp.exp(shifted).sum(axis=axis, keepdims=True))
    return shifted


class LogSoftmax(Function):
    def __init__(self, axis):
        self.axis = axis

    def forward(self, x):
        self.y = _log_softmax(x, self.axis)
        return self.y

    def backward(self, g):
        xp = get_array_module(g)
        # d log_softmax: g - softmax * sum(g)
        return g - xp.exp(self.y) * g.sum(axis=self.axis, keepdims=True)


def log_softmax(x, axis=1):
    return LogSoftmax(axis)(x)


def _target_index(target):
    """The index tuple that picks ``a[n, target[n, ...], ...]`` at every position (one per position)."""
    xp = get_array_module(target)
    ndim = target.ndim
    axes = [xp.arange(size).reshape((-1,) + (1,) * (ndim - 1 - i)) for i, size in enumerate(target.shape)]
    return (axes[0], target) + tuple(axes[1:])


class CrossEntropy(Function):
    """Mean over all positions of -log softmax(logits)[target]; classes on axis 1."""

    def forward(self, logits, target):
        self.index = _target_index(target)
        self.log_p = _log_softmax(logits, 1)
        self.count = target.size
        nll = -self.log_p[self.index]
        return nll.sum(dtype=logits.dtype) / logits.dtype.type(self.count)

    def backward(self, g):
        xp = get_array_module(g)
        # d/dlogits = (softmax - onehot(target)) / count: softmax scaled, then 1/count off at each target
        scale = g / self.count
        grad = xp.exp(self.log_p)
        grad *= scale
        grad[self.index] -= scale
        return grad, None


def cross_entropy(logits, target):
    """PyTorch's ``F.cross_entropy`` with mean reduction: logits (N, C, ...), target (N, ...) class indices."""
    t = target.data if isinstance(target, Tensor) else target
    xp = get_array_module(logits.data if isinstance(logits, Tensor) else logits)
    t = xp.asarray(t)
    shape = logits.shape
    if len(shape) < 2:
        raise ValueError(f"cross_entropy logits need shape (N, C, ...), got {shape}")
    if t.dtype.kind not in "iu":
        raise TypeError(f"cross_entropy target must hold integer class indices, got dtype {t.dtype}")
    if t.shape != shape[:1] + shape[2:]:
        raise ValueError(f"cross_entropy target shape {t.shape} does not match logits {shape} "
                         f"(expected {shape[:1] + shape[2:]})")
    if t.size:
        lo, hi = min_max(t)
        if lo < 0 or hi >= shape[1]:
            raise ValueError(f"cross_entropy target values must lie in [0, {shape[1]}), got {lo}..{hi}")
    return CrossEntropy()(logits, t.astype(xp.int64, copy=False))


class MSELoss(Function):
    def forward(self, a, b):
        self.diff, mean = kernels.squared_error(a, b)      # a - b, and the mean of its squares
        return mean

    def backward(self, g):
        # d mean((a-b)^2)/da = 2 (a-b) / n
        ga = self.diff * (2 * g / self.diff.size)
        return (ga if self.needs_input_grad[0] else None,
                -ga if self.needs_input_grad[1] else None)


def mse_loss(a, b):
    """Mean squared error over all elements; shapes must match."""
    if a.shape != b.shape:
        raise ValueError(f"mse_loss needs equal shapes, got {a.shape} and {b.shape}")
    return MSELoss()(a, b)
