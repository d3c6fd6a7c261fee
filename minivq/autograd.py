"""Reverse-mode automatic differentiation: ``Tensor``, ``Function`` and ``backward``.

The model is DeZero's. A ``Function`` maps raw arrays to raw arrays in
``forward`` and maps output gradients to input gradients in ``backward``,
side by side in one class; calling it on Tensors records the call in a graph.
A Tensor knows the Function that created it (``creator``); a Function holds
its inputs strongly and its outputs through weak references, so a graph is
freed as soon as the last Tensor of it is dropped, with no reference cycles.

``backward`` walks the graph without recursion: Functions are popped from a
heap ordered by *generation* (an input's generation plus one), so every
Function runs after all the Functions that consumed its outputs, and each
gradient it receives is already complete.
"""
import heapq
import itertools
import threading
import weakref

import numpy as np

from . import backend


# ---------------------------------------------------------------- grad mode and hook
class _ThreadState(threading.local):
    """The grad mode and the backward hook, one of each per thread (as in PyTorch): a thread that
    turns recording off, or inspects its backward, changes nothing for the data-parallel workers
    beside it (``minivq.workers``). A new thread starts with recording on and no hook."""
    grad_enabled = True
    backward_hook = None


_state = _ThreadState()


def set_grad_enabled(mode):
    """Turn graph recording on or off in this thread; returns the previous mode."""
    previous, _state.grad_enabled = _state.grad_enabled, bool(mode)
    return previous


def no_grad():
    """Within this block operations are not recorded: no graph, no saved arrays."""
    return backend.setting(set_grad_enabled, False)


def enable_grad():
    """Within this block operations are recorded again (inside a ``no_grad`` block, say)."""
    return backend.setting(set_grad_enabled, True)


def is_grad_enabled():
    return _state.grad_enabled


# An opt-in inspection hook: ``fn(function, grads_out)`` is called once per
# Function during backward, after its ``backward`` ran, with the gradients of
# its outputs. None by default, so backward pays one ``is None`` test per node.
# ``minivq.graph.record_grad_norms`` is built on it; autograd knows nothing of graph.
def get_backward_hook():
    """The hook backward calls for each Function in this thread, or None."""
    return _state.backward_hook


def set_backward_hook(fn):
    """Make ``fn(function, grads_out)`` (or None) this thread's backward hook; returns the previous one."""
    if fn is not None and not callable(fn):
        raise TypeError(f"a backward hook must be callable or None, got {fn!r}")
    previous, _state.backward_hook = _state.backward_hook, fn
    return previous


def backward_hook(fn):
    """Within this block, backward calls ``fn(function, grads_out)`` once per Function it runs."""
    return backend.setting(set_backward_hook, fn)


# ---------------------------------------------------------------- Tensor
def _as_array(data, dtype=None, device=None):
    """Turn ``data`` (array, Tensor, list, scalar) into a NumPy/CuPy array."""
    if isinstance(data, Tensor):
        data = data.data
    xp = backend.get_array_module(data)
    if xp is np and not isinstance(data, np.ndarray):
        data = np.asarray(data, dtype=dtype)
    elif dtype is not None and data.dtype != np.dtype(dtype):
        data = data.astype(dtype)
    if device is not None and backend.array_device(data) != backend.device_name(device):
        data = backend.to_device(data, device)
    if data.dtype == object:
        raise TypeError("tensor data must be numeric, got an object array")
    return data


class _HookHandle:
    def __init__(self, hooks, fn):
        self._hooks, self._fn = hooks, fn

    def remove(self):
        if self._fn in self._hooks:
            self._hooks.remove(self._fn)


class Tensor:
    """An array (NumPy or CuPy) with an optional gradient and a link to the Function that made it."""

    __array_priority__ = 200   # so ``ndarray + Tensor`` calls Tensor.__radd__

    def __init__(self, data, requires_grad=False, dtype=None, device=None, name=None):
        data = _as_array(data, dtype, device)
        if requires_grad and data.dtype.kind != "f":
            raise TypeError(f"only floating-point tensors can require gradients, got dtype {data.dtype}")
        self.data = data
        self.grad = None
        self.requires_grad = bool(requires_grad)
        self.creator = None       # the Function that produced this tensor (None for a leaf)
        self.generation = 0       # depth in the graph, orders backward
        self.name = name
        self._hooks = []
        self._retains_grad = False

    # -- what it is
    @property
    def shape(self):
        return self.data.shape

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def ndim(self):
        return self.data.ndim

    @property
    def device(self):
        return backend.array_device(self.data)

    @property
    def is_leaf(self):
        return self.creator is None

    def numel(self):
        return int(self.data.size)

    def __len__(self):
        return len(self.data)

    def __repr__(self):
        body = repr(backend.to_numpy(self.data)).replace("array(", "tensor(", 1)
        extra = []
        if self.device != "cpu":
            extra.append(f"device='{self.device}'")
        if self.creator is not None:
            extra.append(f"grad_fn={self.creator.name}")
        elif self.requires_grad:
            extra.append("requires_grad=True")
        if extra:
            body = body[:-1] + ", " + ", ".join(extra) + ")"
        return body

    def item(self):
        if self.data.size != 1:
            raise ValueError(f"item() needs a tensor with one element, got shape {self.shape}")
        return self.data.reshape(()).item()

    def numpy(self):
        """The values as a NumPy array (copied from the GPU when needed)."""
        return backend.to_numpy(self.data)

    def detach(self):
        """A new leaf sharing the same array, cut from the graph."""
        return Tensor(self.data, name=self.name)

    # ``to(device)`` and ``astype(dtype)``, the operators and the other array-like
    # methods are differentiable ops: minivq.functional installs them on Tensor.

    # -- gradients
    def register_hook(self, fn):
        """Call ``fn(grad)`` when this tensor's gradient is computed; a non-None result replaces it."""
        if not self.requires_grad:
            raise RuntimeError("cannot register a hook on a tensor that does not require grad")
        self._hooks.append(fn)
        return _HookHandle(self._hooks, fn)

    def retain_grad(self):
        """Keep ``.grad`` on this non-leaf tensor after backward (leaves always keep theirs)."""
        self._retains_grad = True
        return self

    def _run_hooks(self, grad):
        for fn in self._hooks:
            out = fn(grad)
            if out is not None:
                grad = out
        return grad

    def backward(self, grad=None):
        """Accumulate d(self)/d(leaf) into every leaf's ``.grad``.

        ``grad`` is the gradient of some scalar with respect to this tensor;
        it may be omitted when this tensor holds a single element.
        """
        if not self.requires_grad:
            raise RuntimeError("backward() on a tensor that does not require grad "
                               "(no input of the computation had requires_grad=True, or it ran under no_grad)")
        xp = backend.get_array_module(self.data)
        if grad is None:
            if self.data.size != 1:
                raise ValueError(f"backward() without a gradient needs a one-element output, got shape {self.shape}")
            grad = xp.ones_like(self.data)
        else:
            grad = _as_array(grad, dtype=self.dtype, device=self.device)    # a host gradient follows the tensor
            if grad.shape != self.shape:
                raise ValueError(f"backward() gradient has shape {grad.shape}, the tensor has {self.shape}")
        run_backward(self, grad)

    def zero_grad(self):
        self.grad = None


def run_backward(root, grad):
    """Propagate ``grad`` from ``root`` through the graph (no recursion)."""
    pending = {id(root): grad}      # gradients computed in this pass, by tensor id
    alive = {id(root): root}        # keeps those tensors (and so their ids) alive
    heap, queued, tie = [], set(), itertools.count()
    leaves = []

    def reach(t):
        if t.creator is None:
            if id(t) not in queued:
                queued.add(id(t))
                leaves.append(t)
        elif id(t.creator) not in queued:
            queued.add(id(t.creator))
            heapq.heappush(heap, (-t.creator.generation, next(tie), t.creator))

    reach(root)
    hook = _state.backward_hook
    while heap:
        fn = heapq.heappop(heap)[2]
        grads_out = []
        for ref, (shape, dtype) in zip(fn.outputs, fn.output_meta):
            y = ref()
            g = pending.pop(id(y), None) if y is not None else None
            if g is not None:
                g = y._run_hooks(g)
                if y._retains_grad:
                    y.grad = g.copy() if y.grad is None else y.grad + g
            grads_out.append(g)
        if all(g is None for g in grads_out):
            continue
        if len(grads_out) > 1:   # multi-output functions see zeros for outputs nobody used
            xp = backend.get_array_module(*[g for g in grads_out if g is not None])
            grads_out = [xp.zeros(s, d) if g is None else g
                         for g, (s, d) in zip(grads_out, fn.output_meta)]
        grads_in = fn.backward(*grads_out)
        if not isinstance(grads_in, tuple):
            grads_in = (grads_in,)
        if hook is not None:
            hook(fn, grads_out)
        for x, gx in zip(fn.inputs, grads_in):
            if gx is None or not x.requires_grad:
                continue
            if gx.shape != x.shape:
                raise RuntimeError(f"{fn.name}.backward returned a gradient of shape {gx.shape} "
                                   f"for an input of shape {x.shape}")
            key = id(x)
            if key in pending:
                pending[key] = pending[key] + gx    # a shared subexpression: gradients add
            else:
                pending[key] = gx
                alive[key] = x
            reach(x)
    for leaf in leaves:
        g = pending.pop(id(leaf), None)
        if g is None:
            continue
        g = leaf._run_hooks(g)
        leaf.grad = g.copy() if leaf.grad is None else leaf.grad + g


# ---------------------------------------------------------------- Function
class Function:
    """One differentiable operation.

    Subclasses define ``forward(*arrays) -> array (or tuple)`` and
    ``backward(*grads_out) -> grad or tuple of grads`` (one per input, ``None``
    where the input needs none), and save in ``forward`` what ``backward``
    reads. ``self.needs_input_grad`` is set before ``forward`` runs, so both
    can skip work for inputs that want no gradient (Chainer's idea).
    """

    grad_norms = None      # set by minivq.graph.record_grad_norms() through the backward hook

    @property
    def name(self):
        return type(self).__name__

    def __call__(self, *inputs):
        inputs = [x if isinstance(x, Tensor) else Tensor(x) for x in inputs]
        record = _state.grad_enabled and any(x.requires_grad for x in inputs)
        self.needs_input_grad = tuple(record and x.requires_grad for x in inputs)
        ys = self.forward(*[x.data for x in inputs])
        single = not isinstance(ys, tuple)
        ys = (ys,) if single else ys
        outputs = [Tensor.__new__(Tensor) for _ in ys]
        for out, y in zip(outputs, ys):
            out.data, out.grad, out.name = y, None, None
            out.requires_grad, out.creator, out.generation = record, None, 0
            out._hooks, out._retains_grad = [], False
        if record:
            self.generation = max(x.generation for x in inputs)
            self.inputs = inputs
            self.outputs = [weakref.ref(o) for o in outputs]
            self.output_meta = [(y.shape, y.dtype) for y in ys]
            for out in outputs:
                out.creator = self
                out.generation = self.generation + 1
        return outputs[0] if single else tuple(outputs)

    def forward(self, *xs):
        raise NotImplementedError

    def backward(self, *gys):
        raise NotImplementedError
