"""Checkpoints: model and optimiser state, the random state and a JSON meta record, in one atomic .npz.

A checkpoint of ``kind`` "minivq-vqvae" or "minivq-prior" holds the arrays
``model.*`` and ``optim.*`` (and, for a prior, ``vqvae.*``: the VQ-VAE it was
trained on) beside ``meta``, a JSON record of the run's settings
(``minivq.config``), its step and the random generator's state. Loading one
never runs code (``minivq.io.load``: no pickle, every member's size and
compression ratio checked before it is inflated), and the meta record is
checked against one schema (``check_meta``) before anything is built from it.
"""
import dataclasses
import json
import os

import numpy as np

from . import backend
from .config import (DTYPES, MAX_CLASSES, ModelConfig, boolean, check_parameter_count, dtype_name, fraction,
                     non_negative_float, non_negative_int, optional_positive_int, positive_float, positive_int,
                     prior_parameter_count)
from .io import load, save
from .models import GatedPixelCNN
from .runlog import CHECKPOINT, RunFolder

VQVAE_KIND = "minivq-vqvae"
PRIOR_KIND = "minivq-prior"
VERSION = 1
MAX_LATENT_POSITIONS = 64 * 64      # h * w of a prior's code grids: sampling visits each position once


def save_checkpoint(path, kind, step, model, optimizer, meta, extra_arrays=None):
    """Model and optimiser state, a JSON ``meta`` record and any ``extra_arrays``, in one atomic .npz."""
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    state.update({f"optim.{k}": v for k, v in optimizer.state_dict().items()})
    state.update(extra_arrays or {})
    record = dict(meta, format=kind, version=VERSION, step=int(step), rng_state=backend.get_rng_state())
    state["meta"] = np.array(json.dumps(record))
    save(state, path)


def read_checkpoint(path, kind):
    """(meta, sections) of a checkpoint of ``kind``; ValueError for anything else.

    ``meta`` has been checked against the schema below (``check_meta``) before anything
    is built from it. ``sections`` maps each key prefix ("model", "optim", ...) to its
    arrays, prefix removed.
    """
    state = load(path)
    if "meta" not in state:
        raise ValueError(f"{path} is not a minivq checkpoint (it has no 'meta' entry); "
                         f"was it written by another program?")
    try:
        meta = json.loads(str(state.pop("meta")))
        assert isinstance(meta, dict)
    except (ValueError, AssertionError, RecursionError):
        raise ValueError(f"{path} has an unreadable 'meta' entry; the checkpoint is damaged") from None
    if meta.get("format") != kind:
        raise ValueError(f"{path} is a '{meta.get('format')}' checkpoint, expected '{kind}'")
    check_meta(meta, kind, path)
    sections = {"model": {}, "optim": {}}
    for key, value in state.items():
        prefix, _, name = key.partition(".")
        sections.setdefault(prefix, {})[name] = value
    return meta, sections


# ---------------------------------------------------------------- the schema of the meta record
# Every field minivq reads from a checkpoint, checked in one place before anything is allocated.
# Each check takes (value, name) and returns the value or raises ValueError/TypeError.
def _record(value, name):
    if not isinstance(value, dict):
        raise ValueError(f"must be a JSON object, got {type(value).__name__}")
    return value


def _text_or_none(value, name):
    if value is not None and not isinstance(value, str):
        raise ValueError(f"must be a string, got {type(value).__name__}")
    return value


def _version(value, name):
    if type(value) is not int or value != VERSION:
        raise ValueError(f"is {value!r}; this minivq reads version {VERSION}")
    return value


def _rng_state(value, name):
    """A state the generator behind ``mv.manual_seed`` accepts (tried on a fresh one)."""
    try:
        type(backend.rng().bit_generator)().state = value
    except (TypeError, ValueError, KeyError, OverflowError, AttributeError) as exc:
        raise ValueError(f"is not a random generator state ({type(exc).__name__})") from None
    return value


def _latent_shape(value, name):
    if not (isinstance(value, list) and len(value) == 2 and all(type(v) is int and v >= 1 for v in value)):
        raise ValueError(f"must be two positive integers [h, w], got {value!r}")
    if value[0] * value[1] > MAX_LATENT_POSITIONS:
        raise ValueError(f"{value[0]} x {value[1]} is more than the {MAX_LATENT_POSITIONS} code positions "
                         f"minivq's prior samples")
    return value


def _in_channels(value, name):
    if type(value) is not int or value not in (1, 3):
        raise ValueError(f"must be 1 or 3, got {value!r}")
    return value


def _num_classes(value, name):
    if value is not None and (type(value) is not int or not 1 <= value <= MAX_CLASSES):
        raise ValueError(f"must be null or an integer in 1..{MAX_CLASSES}, got {value!r}")
    return value


def _field(record, key, check, where, default=KeyError):
    """``check(record[key])``, or ``default`` when the key is missing and a default is given."""
    if key not in record:
        if default is KeyError:
            raise ValueError(f"{where}: the metadata has no '{key}'; the checkpoint is damaged or from "
                             f"another program")
        return default
    try:
        return check(record[key], key)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: metadata '{key}' {exc}".replace(f"'{key}' {key} ", f"'{key}' ")) from None


_COMMON = {"version": _version, "step": non_negative_int, "rng_state": _rng_state}
_TRAIN = {"seed": non_negative_int, "batch_size": positive_int, "lr": positive_float}
_OPTIONAL_TRAIN = {"data": (_text_or_none, None), "dtype": (dtype_name, DTYPES[0]), "dataset": (_text_or_none, None),
                   "conditional": (boolean, False), "lr_anneal": (fraction, 0.0),
                   "planned_steps": (optional_positive_int, None)}


def _model_config(record, where):
    """The ModelConfig a (VQ-VAE or embedded) meta record describes, its sizes bounded; ValueError otherwise."""
    try:
        return ModelConfig.from_checkpoint(record)
    except (TypeError, ValueError, AttributeError) as exc:
        raise ValueError(f"{where} describes no VQ-VAE this version can build ({exc})") from None


def check_meta(meta, kind, where):
    """Check every field minivq reads from the meta record of a ``kind`` checkpoint; ValueError naming it."""
    for key, check in _COMMON.items():
        _field(meta, key, check, where)
    train = _field(meta, "train", _record, where)
    for key, check in _TRAIN.items():
        _field(train, key, check, f"{where} (train)")
    for key, (check, default) in _OPTIONAL_TRAIN.items():
        _field(train, key, check, f"{where} (train)", default)
    if kind == VQVAE_KIND:
        _field(meta, "model", _record, where)
        _field(meta["model"], "in_channels", _in_channels, f"{where} (model)", 1)
        _model_config(meta, where)
        _field(meta, "data_variance", positive_float, where)
        return meta
    _field(train, "conditional", boolean, f"{where} (train)")
    prior = _field(meta, "prior", _record, where)
    sizes = {key: _field(prior, key, check, f"{where} (prior)") for key, check in
             (("num_embeddings", positive_int), ("channels", positive_int), ("num_layers", positive_int),
              ("kernel_size", positive_int), ("head_channels", positive_int), ("num_classes", _num_classes))}
    unknown = set(prior) - set(sizes)
    if unknown:
        raise ValueError(f"{where}: the prior's metadata holds unknown settings {sorted(unknown)}")
    check_parameter_count(prior_parameter_count(**sizes), f"{where}: the prior")
    vqvae = _model_config({"model": _field(meta, "vqvae", _record, where)}, where)
    if vqvae.num_embeddings != sizes["num_embeddings"]:
        raise ValueError(f"{where}: the prior draws {sizes['num_embeddings']} codes but its VQ-VAE has "
                         f"{vqvae.num_embeddings}; the checkpoint is damaged")
    _field(meta, "latent_shape", _latent_shape, where)
    _field(meta, "uniform_bits", non_negative_float, where)
    return meta


def resume_settings(config, meta, explicit, where):
    """``config`` with the settings a resumed run takes from its checkpoint (``config.FROM_CHECKPOINT``).

    A setting the user gave explicitly (``explicit``: field names; None: those that differ
    from the config's default) must equal the checkpoint's, or it is refused: a resumed
    run is the same run. ``config.steps`` must lie beyond the checkpoint's step.
    """
    fields = {f.name: f for f in dataclasses.fields(config)}
    if explicit is None:
        explicit = {name for name in config.FROM_CHECKPOINT if getattr(config, name) != fields[name].default}
    saved = dict(config.BEFORE_RECORDED, **meta["train"])
    for name in config.FROM_CHECKPOINT:
        if name in explicit and name in saved and getattr(config, name) != saved[name]:
            flag = fields[name].metadata.get("flag") or name
            raise ValueError(f"--resume: {where} was trained with {flag} {saved[name]}, but {flag} "
                             f"{getattr(config, name)} was given; a resumed run keeps its checkpoint's settings: "
                             f"drop {flag}, or start a new run in another --out")
    if config.steps <= meta["step"]:
        raise ValueError(f"--resume: {where} is at step {meta['step']}; --steps is the total number of steps "
                         f"and must be larger, got {config.steps}")
    return config.replace(**{name: saved[name] for name in config.FROM_CHECKPOINT if name in saved})


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


def open_run(config, kind):
    """Take the run folder ``config.out`` for this process (a locked ``runlog.RunFolder``): (folder, meta, sections).

    With ``config.resume`` its checkpoint is read (``meta`` and ``sections``, else None).
    Without, a folder that holds an earlier run is refused unless ``config.overwrite``
    (the trainer clears it with ``folder.clear()`` once training is about to start).
    """
    if config.resume and config.overwrite:
        raise ValueError("--resume continues the run in --out and --overwrite replaces it: give one of them")
    folder = RunFolder(config.out)
    try:
        meta = sections = None
        path = os.path.join(config.out, CHECKPOINT)
        if config.resume:
            if not os.path.exists(path):
                raise FileNotFoundError(f"--resume: no checkpoint at {path}; start without --resume")
            meta, sections = read_checkpoint(path, kind)
        elif folder.existing_run() and not config.overwrite:
            raise ValueError(f"{config.out} already holds a run ({', '.join(folder.existing_run())}); continue it "
                             f"with --resume, replace it with --overwrite, or choose another --out")
    except BaseException:
        folder.close()
        raise
    return folder, meta, sections


def build_vqvae(meta, kernel="auto", where="the checkpoint"):
    """The (untrained) VQ-VAE a (checked) meta record describes; ValueError if this version cannot build it."""
    config = _model_config(meta, where)
    try:
        return config.build(meta["model"].get("in_channels", 1), kernel=kernel)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where} describes no VQ-VAE this version can build ({exc})") from None


def _load_state(model, arrays, where, what):
    try:
        model.load_state_dict(arrays)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: the {what} weights do not fit the model it describes ({exc})") from None


def load_vqvae(path, device="cpu"):
    """A trained VQ-VAE (in eval mode) and its checkpoint's meta record."""
    meta, sections = read_checkpoint(path, VQVAE_KIND)
    model = build_vqvae(meta, where=path)
    _load_state(model, sections["model"], path, "VQ-VAE")
    return model.to(device).eval(), meta


def load_prior(path, device="cpu"):
    """(prior, vqvae, meta) from a prior checkpoint, which embeds the VQ-VAE it was trained on."""
    meta, sections = read_checkpoint(path, PRIOR_KIND)
    try:
        prior = GatedPixelCNN(**meta["prior"])
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path} describes no prior this version can build ({exc})") from None
    vqvae = build_vqvae({"model": meta["vqvae"]}, where=path)
    _load_state(prior, sections["model"], path, "prior's")
    _load_state(vqvae, sections.get("vqvae", {}), path, "embedded VQ-VAE's")
    return prior.to(device).eval(), vqvae.to(device).eval(), meta
