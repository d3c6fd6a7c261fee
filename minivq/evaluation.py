"""Test-split metrics of a VQ-VAE, and the PNG of its reconstructions."""
import numpy as np

from . import backend
from . import functional as F
from .autograd import Tensor, no_grad
from .images import MAX_GRID_IMAGES, save_grid
from .nn.quantizers import perplexity


def model_dtype(model):
    return next(iter(model.parameters())).dtype


def evaluate(model, dataset, variance, device="cpu", batch_size=256, limit=None, comm=None):
    """Test-split metrics: MSE, MSE / variance, the quantiser's loss, perplexity and codes used.

    With a communicator of several ranks (a collective call), each rank
    evaluates a consecutive share of the images and the sums are combined.
    """
    n = len(dataset) if limit is None else min(limit, len(dataset))
    rank, size = (0, 1) if comm is None else (comm.rank, comm.size)
    counts = np.zeros(model.vq.num_embeddings, np.int64)
    sq_err = vq_loss = 0.0
    with model.evaluating(), no_grad():
        for lo in range(n * rank // size, n * (rank + 1) // size, batch_size):
            x, _ = dataset.batch(np.arange(lo, min(lo + batch_size, n * (rank + 1) // size)), device=device,
                                 dtype=model_dtype(model))
            x_recon, vq = model(Tensor(x))
            m = x.shape[0]
            sq_err += float(F.mse_loss(x_recon, Tensor(x)).item()) * m
            vq_loss += float(vq.loss.item()) * m
            counts += backend.to_numpy(vq.counts)
    if size > 1:
        sums = comm.allreduce_sum(np.concatenate([[sq_err, vq_loss], counts]).astype(np.float64))
        sq_err, vq_loss, counts = float(sums[0]), float(sums[1]), np.rint(sums[2:]).astype(np.int64)
    mse = sq_err / n
    return {"mse": mse, "nmse": mse / variance, "vq_loss": vq_loss / n,
            "perplexity": float(perplexity(counts)), "codes_used": int((counts > 0).sum()), "images": n}


def save_reconstructions(model, dataset, path, device="cpu", count=32, batch_size=256):
    """A PNG of ``count`` test images (at most ``MAX_GRID_IMAGES``), each row of originals followed by a row
    of reconstructions; the model sees ``batch_size`` images at a time."""
    if not 1 <= count <= MAX_GRID_IMAGES:
        raise ValueError(f"--n must lie in 1..{MAX_GRID_IMAGES} (one PNG grid), got {count}")
    columns = 8
    pairs = []
    n = min(count, len(dataset))
    with model.evaluating(), no_grad():
        for lo in range(0, n, batch_size):
            x, _ = dataset.batch(np.arange(lo, min(lo + batch_size, n)), device=device, dtype=model_dtype(model))
            x_recon, _ = model(Tensor(x))
            x, x_recon = backend.to_numpy(x), np.clip(backend.to_numpy(x_recon.data), -0.5, 0.5)
            for row in range(0, x.shape[0], columns):
                pairs += [x[row:row + columns], x_recon[row:row + columns]]
    save_grid(np.concatenate(pairs), path, columns=columns)
