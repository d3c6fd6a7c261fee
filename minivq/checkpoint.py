"""Checkpoints: model and optimiser state, the random state and a JSON meta record, in one atomic .npz.

A checkpoint of ``kind`` "minivq-vqvae" or "minivq-prior" holds the arrays
``model.*`` and ``optim.*`` (and, for a prior, ``vqvae.*``: the VQ-VAE it was
trained on) beside ``meta``, a JSON record of the run's settings
(``minivq.config``), its step and the random generator's state. Loading one
never runs code (``minivq.io.load``: allow_pickle=False).
"""
import json

import numpy as np

from . import backend
from .config import ModelConfig
from .io import load, save
from .models import GatedPixelCNN

VQVAE_KIND = "minivq-vqvae"
PRIOR_KIND = "minivq-prior"


def save_checkpoint(path, kind, step, model, optimizer, meta, extra_arrays=None):
    """Model and optimiser state, a JSON ``meta`` record and any ``extra_arrays``, in one atomic .npz."""
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    state.update({f"optim.{k}": v for k, v in optimizer.state_dict().items()})
    state.update(extra_arrays or {})
    record = dict(meta, format=kind, version=1, step=int(step), rng_state=backend.get_rng_state())
    state["meta"] = np.array(json.dumps(record))
    save(state, path)


def read_checkpoint(path, kind):
    """(meta, sections) of a checkpoint of ``kind``; ValueError for anything else.

    ``sections`` maps each key prefix ("model", "optim", ...) to its arrays, prefix removed.
    """
    state = load(path)
    if "meta" not in state:
        raise ValueError(f"{path} is not a minivq checkpoint (it has no 'meta' entry); "
                         f"was it written by another program?")
    try:
        meta = json.loads(str(state.pop("meta")))
        assert isinstance(meta, dict)
    except (ValueError, AssertionError):
        raise ValueError(f"{path} has an unreadable 'meta' entry; the checkpoint is damaged") from None
    if meta.get("format") != kind:
        raise ValueError(f"{path} is a '{meta.get('format')}' checkpoint, expected '{kind}'")
    sections = {"model": {}, "optim": {}}
    for key, value in state.items():
        prefix, _, name = key.partition(".")
        sections.setdefault(prefix, {})[name] = value
    return meta, sections


def restore(model, optimizer, meta, sections, device):
    """Move ``model`` to ``device`` in train mode, after loading a checkpoint's state if ``meta`` is given.

    Returns the step to continue from (0 for a fresh run). The optimiser state is
    loaded after the move, so it lands where its parameters are.
    """
    if meta:
        model.load_state_dict(sections["model"])
    model.to(device).train()
    if not meta:
        return 0
    optimizer.load_state_dict(sections["optim"])
    backend.set_rng_state(meta["rng_state"])
    return int(meta["step"])


def build_vqvae(meta, kernel="auto"):
    """The (untrained) VQ-VAE a checkpoint's meta record describes; ValueError if this version cannot build it."""
    try:
        return ModelConfig.from_checkpoint(meta).build(meta["model"].get("in_channels", 1), kernel=kernel)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ValueError(f"the checkpoint describes no VQ-VAE this version can build ({exc})") from None


def load_vqvae(path, device="cpu"):
    """A trained VQ-VAE (in eval mode) and its checkpoint's meta record."""
    meta, sections = read_checkpoint(path, VQVAE_KIND)
    try:
        model = build_vqvae(meta)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    model.load_state_dict(sections["model"])
    return model.to(device).eval(), meta


def load_prior(path, device="cpu"):
    """(prior, vqvae, meta) from a prior checkpoint, which embeds the VQ-VAE it was trained on."""
    meta, sections = read_checkpoint(path, PRIOR_KIND)
    try:
        prior = GatedPixelCNN(**meta["prior"])
        vqvae = build_vqvae({"model": meta["vqvae"]})
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path} describes no prior this version can build ({exc})") from None
    prior.load_state_dict(sections["model"])
    vqvae.load_state_dict(sections.get("vqvae", {}))
    return prior.to(device).eval(), vqvae.to(device).eval(), meta
