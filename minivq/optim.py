"""SGD and Adam with PyTorch's exact update rules, and the learning-rate schedule of ``minivq train``.

Optimiser state is kept per parameter *position* (the order of the list
given), never by ``id()`` of a tensor, so a state dict saved from one process
loads into a freshly built model in another.
"""
import math


from . import backend, kernels
from .autograd import Tensor


def annealed_lr(peak, step, planned_steps, fraction):
    """The learning rate of step ``step`` (1-based) of a run planned for ``planned_steps`` steps:
    ``peak`` until the plan's last ``fraction``, then a half cosine from ``peak`` down to 0 at its end.

    ``fraction`` 0 (or one that rounds to no step) keeps ``peak`` throughout; past the
    plan's end an annealed rate stays 0.
    """
    decay = int(round(fraction * planned_steps))        # steps on the cosine
    start = planned_steps - decay                       # the last step at the peak
    if step <= start or decay == 0:
        return peak
    # peak (1 + cos(pi s / decay)) / 2, s = steps since the peak: 0 at the plan's last step
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(step - start, decay) / decay))


class Optimizer:
    def __init__(self, params, lr):
        self.params = list(params)
        if not self.params:
            raise ValueError("optimizer got an empty parameter list")
        for i, p in enumerate(self.params):
            if not isinstance(p, Tensor) or not p.requires_grad:
                raise TypeError(f"optimizer parameter {i} is not a Tensor that requires grad")
        if not (isinstance(lr, (int, float)) and lr >= 0 and math.isfinite(lr)):
            raise ValueError(f"learning rate must be a non-negative finite number, got {lr!r}")
        self.lr = float(lr)
        self.state = [dict() for _ in self.params]   # state[i] belongs to params[i]

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    def step(self):
        for i, p in enumerate(self.params):
            if p.grad is not None:
                self._update(p.data, p.grad, self.state[i])

    def _update(self, param, grad, state):
        raise NotImplementedError

    # -- checkpoints: a flat dict of arrays, "<position>.<name>"
    def state_dict(self):
        out = {}
        for i, st in enumerate(self.state):
            for name, value in st.items():
                out[f"{i}.{name}"] = value
        return out

    def load_state_dict(self, state):
        fresh = [dict() for _ in self.params]
        for key, value in state.items():
            pos, _, name = key.partition(".")
            if not pos.isdigit() or int(pos) >= len(self.params) or not name:
                raise ValueError(f"optimizer state key '{key}' does not fit {len(self.params)} parameters")
            p = self.params[int(pos)]
            value = backend.to_numpy(value)
            if value.ndim == 0:
                fresh[int(pos)][name] = value.item()
            else:
                if value.shape != p.shape:
                    raise ValueError(f"optimizer state '{key}' has shape {value.shape}, parameter {pos} has {p.shape}")
                fresh[int(pos)][name] = backend.to_device(value.astype(p.dtype), p.device).copy()
        self.state = fresh


class SGD(Optimizer):
    """p -= lr * d, where d = grad (+ weight decay), or the momentum buffer b = momentum b + (1 - dampening) d."""

    def __init__(self, params, lr, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False):
        super().__init__(params, lr)
        if momentum < 0 or weight_decay < 0:
            raise ValueError(f"momentum and weight_decay must be >= 0, got {momentum}, {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("nesterov momentum needs momentum > 0 and dampening = 0")
        self.momentum, self.dampening = momentum, dampening
        self.weight_decay, self.nesterov = weight_decay, nesterov

    def _update(self, param, grad, state):
        d = grad + self.weight_decay * param if self.weight_decay else grad
        if self.momentum:
            buf = state.get("momentum_buffer")
            if buf is None:
                # an array, also for a 0-d parameter (NumPy turns 0-d arithmetic into scalars, which
                # the in-place updates below would rebind instead of update)
                buf = state["momentum_buffer"] = backend.get_array_module(param).array(d, dtype=param.dtype)
            else:
                buf *= self.momentum
                buf += (1 - self.dampening) * d
            d = d + self.momentum * buf if self.nesterov else buf
        param -= self.lr * d


class Adam(Optimizer):
    """Adam as PyTorch computes it (bias-corrected, eps added outside the square root)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(params, lr)
        b1, b2 = betas
        if not (0 <= b1 < 1 and 0 <= b2 < 1):
            raise ValueError(f"Adam betas must lie in [0, 1), got {betas}")
        if eps < 0 or weight_decay < 0:
            raise ValueError(f"Adam eps and weight_decay must be >= 0, got {eps}, {weight_decay}")
        self.betas, self.eps, self.weight_decay = (float(b1), float(b2)), float(eps), float(weight_decay)

    def _update(self, param, grad, state):
        xp = backend.get_array_module(param)
        b1, b2 = self.betas
        if "step" not in state:
            state["step"] = 0
            state["exp_avg"] = xp.zeros_like(param)
            state["exp_avg_sq"] = xp.zeros_like(param)
        state["step"] += 1
        t, m, v = state["step"], state["exp_avg"], state["exp_avg_sq"]
        if kernels.adam_step(param, grad, m, v, self.lr, self.betas, self.eps, self.weight_decay, t):
            return          # the lines below as one pass (Numba on the CPU, CUDA on a GPU), to the bit
        if self.weight_decay:
            grad = grad + self.weight_decay * param
        m += (1 - b1) * (grad - m)                # m <- lerp(m, g, 1 - b1)
        v *= b2
        v += (1 - b2) * grad * grad               # v <- b2 v + (1 - b2) g^2
        step_size = self.lr / (1 - b1 ** t)
        denom = xp.sqrt(v) / math.sqrt(1 - b2 ** t) + self.eps
        param -= step_size * (m / denom)
