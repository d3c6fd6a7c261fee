"""Draw docs/graph-step.png: the backward graph of the training step in the README's engine snippet.

    python docs/make_graph.py        # needs matplotlib (the viz extra)

The same model, seed and batch as the snippet (the paper's VQ-VAE in float64,
four images of uniform noise), traced so the drawing groups the ops by module
and collapses each residual block into one box. docs/gradients.md shows the
picture; tests/test_graph_render.py checks what it draws.
"""
import os
import sys

import numpy as np

import minivq as mv
from minivq import functional as F

FIGURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "graph-step.png")


def step():
    """(model, loss) of the README's step, traced, its gradient norms recorded."""
    mv.manual_seed(0)
    x = mv.tensor(np.random.default_rng(0).uniform(-0.5, 0.5, (4, 1, 32, 32)))
    model = mv.models.VQVAE(decay=0.0, quantizer=mv.models.PAPER_QUANTIZER).double()     # the paper's, as the README
    with mv.graph.trace(model):
        x_recon, vq = model(x)
    loss = F.mse_loss(x_recon, x) * 12 + vq.loss
    loss.name = "loss"
    with mv.graph.record_grad_norms():
        loss.backward()
    return model, loss


def main(path=FIGURE):
    model, loss = step()
    mv.graph.render(loss, path, names=dict(model.named_parameters()),
                    title="the README's training step (the paper's VQ-VAE, 4 images): what each op received, "
                          "and what it passed to each input")
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
