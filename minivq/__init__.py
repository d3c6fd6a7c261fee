"""minivq: a VQ-VAE engine written from scratch on NumPy (CPU) and CuPy (GPU)."""
from . import backend
from .autograd import Tensor, Function, no_grad, enable_grad, is_grad_enabled
from .backend import manual_seed
from .gradcheck import gradcheck, GradcheckError
from .io import save, load
from . import functional, graph, nn, optim


def _attach_source_kernels():
    """Make ``minivq.kernels`` importable from a source checkout (PYTHONPATH=.) as well.

    An install maps the top-level ``kernels/`` folder to ``minivq.kernels``
    (setup.cfg, package_dir); a bare checkout has no such mapping, so the
    folder beside this package is registered under that name here.
    """
    import importlib.util
    import os
    import sys
    if "minivq.kernels" in sys.modules or importlib.util.find_spec("minivq.kernels") is not None:
        return
    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels")
    init = os.path.join(folder, "__init__.py")
    if os.path.isfile(init):
        spec = importlib.util.spec_from_file_location("minivq.kernels", init, submodule_search_locations=[folder])
        module = importlib.util.module_from_spec(spec)
        sys.modules["minivq.kernels"] = module
        spec.loader.exec_module(module)


_attach_source_kernels()
from . import kernels, models  # noqa: E402  (after the kernels folder is registered)

__version__ = "0.1.0"


def tensor(data, requires_grad=False, device=None, dtype=None):
    """A new leaf Tensor holding ``data`` (its dtype kept unless ``dtype`` is given)."""
    return Tensor(data, requires_grad=requires_grad, dtype=dtype, device=device)


__all__ = ["Tensor", "Function", "tensor", "no_grad", "enable_grad", "is_grad_enabled", "manual_seed",
           "gradcheck", "GradcheckError", "save", "load", "backend", "functional", "graph", "nn", "optim",
           "models", "kernels"]
