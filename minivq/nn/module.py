"""``Module`` and ``Parameter``: containers that find their parameters in registration order."""
import contextlib
from collections import OrderedDict

import numpy as np

from .. import backend
from ..autograd import Tensor
from ..functional import relu


class Parameter(Tensor):
    """A Tensor that a Module registers as trainable (``requires_grad=True``)."""

    def __init__(self, data, requires_grad=True):
        super().__init__(data, requires_grad=requires_grad)

    def __repr__(self):
        return "Parameter(" + super().__repr__() + ")"


class Module:
    """Base class of layers and models.

    Assigning a Parameter or a Module to an attribute registers it; buffers
    (raw arrays saved with the state but not trained, such as the EMA
    codebook) are registered with ``register_buffer``. Everything is kept in
    plain dicts, so the order of ``parameters()`` is the order of assignment,
    the same on every run.
    """

    def __init__(self):
        object.__setattr__(self, "_parameters", OrderedDict())
        object.__setattr__(self, "_modules", OrderedDict())
        object.__setattr__(self, "_buffers", OrderedDict())
        object.__setattr__(self, "training", True)

    # -- registration
    def __setattr__(self, name, value):
        if "_parameters" not in self.__dict__:
            raise RuntimeError(f"{type(self).__name__}.__init__ must call super().__init__() "
                               f"before assigning attributes")
        if isinstance(value, (Parameter, Module)):
            for table in (self._parameters, self._modules, self._buffers, self.__dict__):
                table.pop(name, None)
            (self._parameters if isinstance(value, Parameter) else self._modules)[name] = value
        elif name in self._buffers:
            self._buffers[name] = value.data if isinstance(value, Tensor) else value   # a buffer stays a buffer
        elif name in self._parameters or name in self._modules:
            raise TypeError(f"cannot assign a {type(value).__name__} to '{name}', "
                            f"which holds a {'Parameter' if name in self._parameters else 'Module'}")
        else:
            object.__setattr__(self, name, value)

    def __getattr__(self, name):
        d = self.__dict__
        for table in ("_parameters", "_modules", "_buffers"):
            if table in d and name in d[table]:
                return d[table][name]
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")

    def register_buffer(self, name, array):
        """Keep a raw array in the state dict without training it."""
        if isinstance(array, Tensor):
            array = array.data
        self.__dict__.pop(name, None)
        self._buffers[name] = array

    # -- traversal
    def named_children(self):
        return iter(self._modules.items())

    def children(self):
        return iter(self._modules.values())

    def named_modules(self, prefix=""):
        yield prefix, self
        for name, child in self._modules.items():
            yield from child.named_modules(f"{prefix}.{name}" if prefix else name)

    def modules(self):
        for _, m in self.named_modules():
            yield m

    def named_parameters(self, prefix=""):
        """(dotted name, Parameter) pairs in registration order, each parameter once."""
        seen = set()
        for mod_name, mod in self.named_modules(prefix):
            for name, p in mod._parameters.items():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield (f"{mod_name}.{name}" if mod_name else name), p

    def parameters(self):
        return [p for _, p in self.named_parameters()]

    def named_buffers(self, prefix=""):
        for mod_name, mod in self.named_modules(prefix):
            for name, b in mod._buffers.items():
                yield (f"{mod_name}.{name}" if mod_name else name), b

    # -- state
    def state_dict(self):
        """Parameters and buffers as raw arrays under dotted names (references, not copies)."""
        state = OrderedDict((name, p.data) for name, p in self.named_parameters())
        state.update(self.named_buffers())
        return state

    def load_state_dict(self, state_dict, strict=True):
        """Copy arrays into the parameters and buffers, keeping each one's dtype and device."""
        own = self.state_dict()
        missing = [k for k in own if k not in state_dict]
        unexpected = [k for k in state_dict if k not in own]
        if strict and (missing or unexpected):
            parts = []
            if missing:
                parts.append(f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}")
            if unexpected:
                parts.append(f"unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
            raise ValueError(f"state dict does not fit {type(self).__name__}: " + "; ".join(parts))
        for key, target in own.items():
            if key not in state_dict:
                continue
            value = state_dict[key]
            value = backend.to_numpy(value.data if isinstance(value, Tensor) else value)
            if tuple(value.shape) != tuple(target.shape):
                raise ValueError(f"state dict entry '{key}' has shape {tuple(value.shape)}, "
                                 f"the model expects {tuple(target.shape)}")
            self._assign(key, value)
        return self

    def _assign(self, dotted, value):
        *path, name = dotted.split(".")
        mod = self
        for part in path:
            mod = mod._modules[part]
        if name in mod._parameters:
            p = mod._parameters[name]
            p.data = backend.to_device(np.asarray(value, dtype=p.dtype), p.device).copy()
        else:
            old = mod._buffers[name]
            mod._buffers[name] = backend.to_device(np.asarray(value, dtype=old.dtype),
                                                   backend.array_device(old)).copy()

    # -- modes and devices
    def train(self, mode=True):
        for m in self.modules():
            object.__setattr__(m, "training", bool(mode))
        return self

    def eval(self):
        return self.train(False)

    @contextlib.contextmanager
    def evaluating(self):
        """Within this block the module is in eval mode; its previous mode comes back after, even on error."""
        was_training = self.training
        self.eval()
        try:
            yield self
        finally:
            self.train(was_training)

    def to(self, device):
        """Move every parameter, gradient and buffer to ``device`` (in place); returns self."""
        backend.parse_device(device)
        for m in self.modules():
            for p in m._parameters.values():
                p.data = backend.to_device(p.data, device)
                if p.grad is not None:
                    p.grad = backend.to_device(p.grad, device)
            for name, b in m._buffers.items():
                m._buffers[name] = backend.to_device(b, device)
        return self

    def astype(self, dtype):
        """Cast every floating-point parameter and buffer to ``dtype`` (in place); returns self."""
        dtype = np.dtype(dtype)
        for m in self.modules():
            for p in m._parameters.values():
                p.data = p.data.astype(dtype)
                p.grad = None
            for name, b in m._buffers.items():
                if b.dtype.kind == "f":
                    m._buffers[name] = b.astype(dtype)
        return self

    def double(self):
        """float64 everywhere (what gradient checks need)."""
        return self.astype(np.float64)

    def float(self):
        return self.astype(np.float32)

    def zero_grad(self):
        for p in self.parameters():
            p.grad = None

    def num_parameters(self):
        return int(sum(p.data.size for p in self.parameters()))

    # -- calling
    def forward(self, *args, **kwargs):
        raise NotImplementedError

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def extra_repr(self):
        return ""

    def __repr__(self):
        lines = [f"{type(self).__name__}({self.extra_repr()}"]
        for name, child in self._modules.items():
            body = repr(child).replace("\n", "\n  ")
            lines.append(f"  ({name}): {body}")
        if len(lines) == 1:
            return lines[0] + ")"
        return "\n".join(lines) + "\n)"


class Sequential(Module):
    """Modules applied one after another; registered as ``0``, ``1``, ..."""

    def __init__(self, *modules):
        super().__init__()
        for i, m in enumerate(modules):
            if not isinstance(m, Module):
                raise TypeError(f"Sequential takes Modules, argument {i} is {type(m).__name__}")
            setattr(self, str(i), m)

    def __len__(self):
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules.values())

    def __getitem__(self, i):
        return list(self._modules.values())[i]

    def forward(self, x):
        for m in self._modules.values():
            x = m(x)
        return x


class ReLU(Module):
    def forward(self, x):
        return relu(x)
