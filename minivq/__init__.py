"""minivq: a VQ-VAE engine written from scratch on NumPy (CPU) and CuPy (GPU)."""
from . import backend
from .autograd import Tensor, Function, no_grad, enable_grad, is_grad_enabled
from .backend import manual_seed
from .gradcheck import gradcheck, GradcheckError
from .io import save, load
# kernels/ is installed as minivq.kernels (setup.cfg: package_dir); it needs only backend
from . import kernels, functional, graph, nn, optim, models

__version__ = "0.1.0"


def tensor(data, requires_grad=False, device=None, dtype=None):
    """A new leaf Tensor holding ``data`` (its dtype kept unless ``dtype`` is given)."""
    return Tensor(data, requires_grad=requires_grad, dtype=dtype, device=device)


__all__ = ["Tensor", "Function", "tensor", "no_grad", "enable_grad", "is_grad_enabled", "manual_seed",
           "gradcheck", "GradcheckError", "save", "load", "backend", "functional", "graph", "nn", "optim",
           "models", "kernels"]
