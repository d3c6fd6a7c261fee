"""The prior's trainer (``minivq train-prior``), its code cache, and sampling (``minivq sample``).

A gated PixelCNN is fitted to the index grids a trained VQ-VAE gives the
dataset's images. The grids are encoded once and cached beside the VQ-VAE's
checkpoint, in a file named after the checkpoint's SHA-256; the prior's own
checkpoint embeds the VQ-VAE, so sampling needs that one file alone.
"""
import hashlib
import math
import os
import sys

import numpy as np

from . import backend
from .autograd import no_grad
from .checkpoint import PRIOR_KIND, load_prior, load_vqvae, read_checkpoint, restore, save_checkpoint
from .config import PriorConfig
from .data import BatchSampler, load_dataset
from .io import load, save
from .loop import run_steps
from .models import GatedPixelCNN
from .optim import Adam
from .runlog import CHECKPOINT, METRICS, MetricsLog, check_output_folder
from .train import check_device


def encode_dataset(model, dataset, device="cpu", batch_size=256):
    """Index grids (N, h, w) of every image, as int16 when K allows (compact), else int32."""
    grids = []
    for lo in range(0, len(dataset), batch_size):
        x, _ = dataset.batch(np.arange(lo, min(lo + batch_size, len(dataset))), device=device)
        grids.append(backend.to_numpy(model.encode(x)))
    dtype = np.int16 if model.vq.num_embeddings <= np.iinfo(np.int16).max else np.int32
    return np.concatenate(grids).astype(dtype)


def _file_digest(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cached_codes(vqvae_path, model, data, device, progress=True):
    """Train/test index grids and labels of the dataset, encoded once and cached beside the checkpoint.

    The cache file is named after the checkpoint's SHA-256, so a retrained
    checkpoint never reuses stale codes.
    """
    digest = _file_digest(vqvae_path)
    cache = os.path.join(os.path.dirname(os.path.abspath(vqvae_path)), f"codes-{digest[:16]}.npz")
    if os.path.exists(cache):
        try:
            codes = load(cache)
            if {"train_codes", "test_codes"} <= set(codes):
                return codes, cache
        except ValueError:
            pass            # a damaged cache is rebuilt
    codes = {}
    for split in ("train", "test"):
        dataset = load_dataset(data, split=split)
        if dataset.num_channels != model.in_channels:
            raise ValueError(f"the VQ-VAE takes {model.in_channels}-channel images, "
                             f"the dataset {dataset.name} has {dataset.num_channels}")
        if progress:
            print(f"encoding the {split} split ({len(dataset)} images) to codes ...", file=sys.stderr)
        codes[f"{split}_codes"] = encode_dataset(model, dataset, device)
        if dataset.labels is not None:
            codes[f"{split}_labels"] = dataset.labels
    save(codes, cache)
    return codes, cache


def prior_nll_bits(prior, codes, labels, device="cpu", batch_size=256, limit=None):
    """Mean negative log-likelihood of index grids under the prior, in bits per latent."""
    n = len(codes) if limit is None else min(limit, len(codes))
    total = 0.0
    with prior.evaluating(), no_grad():
        for lo in range(0, n, batch_size):
            idx = backend.to_device(codes[lo:lo + batch_size].astype(np.int64), device)
            lab = None if labels is None else backend.to_device(labels[lo:lo + batch_size], device)
            total += float(prior.loss(idx, lab).item()) * idx.shape[0]
    return total / n / math.log(2)


def _setup(vqvae_path, config):
    """(config, device, vqvae, its meta, the prior's meta and sections on resume)."""
    config.validate()
    device = check_device(config.device)
    out = config.out or os.path.join(os.path.dirname(os.path.abspath(vqvae_path)), "prior")
    config = config.replace(out=out)
    check_output_folder(out)
    vqvae, vq_meta = load_vqvae(vqvae_path, device)
    meta = sections = None
    if config.resume:
        path = os.path.join(out, CHECKPOINT)
        if not os.path.exists(path):
            raise FileNotFoundError(f"--resume: no checkpoint at {path}; start without --resume")
        meta, sections = read_checkpoint(path, PRIOR_KIND)
        config = config.replace(**{k: meta["train"][k] for k in PriorConfig.FROM_CHECKPOINT})
    data = config.data if config.data is not None else vq_meta["train"].get("data")
    return config.replace(data=data), device, vqvae, vq_meta, meta, sections


def train_prior(vqvae_path, config=None):
    """Fit a gated PixelCNN to the codes of a trained VQ-VAE; returns the final test metrics.

    ``config``: a ``PriorConfig`` (default: PriorConfig()); on resume the
    checkpoint's seed, batch, learning rate and conditioning are used.
    """
    config, device, vqvae, vq_meta, meta, sections = _setup(vqvae_path, config or PriorConfig())
    codes, cache = cached_codes(vqvae_path, vqvae, config.data, device, config.progress)
    train_codes, test_codes = codes["train_codes"], codes["test_codes"]
    train_labels = codes.get("train_labels") if config.conditional else None
    test_labels = codes.get("test_labels") if config.conditional else None
    if config.conditional and (train_labels is None or test_labels is None):
        raise ValueError("--conditional needs a dataset with labels")
    if config.batch_size > len(train_codes):
        raise ValueError(f"batch size {config.batch_size} is larger than the training set "
                         f"({len(train_codes)} grids)")

    k = vqvae.vq.num_embeddings
    if meta:
        prior_config = meta["prior"]
    else:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1 if config.conditional else None
        prior_config = dict(config.model(), num_embeddings=k, num_classes=num_classes)
    backend.manual_seed(config.seed)
    prior = GatedPixelCNN(**prior_config)
    optimizer = Adam(prior.parameters(), lr=config.lr)
    start = restore(prior, optimizer, meta, sections, device)

    record_meta = {"prior": prior_config, "vqvae": vq_meta["model"], "vqvae_checkpoint": os.path.abspath(vqvae_path),
                   "latent_shape": list(train_codes.shape[1:]), "codes_cache": cache,
                   "train": config.record(), "uniform_bits": math.log2(k)}
    vqvae_state = {f"vqvae.{key}": v for key, v in vqvae.state_dict().items()}
    sampler = BatchSampler(len(train_codes), config.batch_size, config.seed)
    ckpt_path = os.path.join(config.out, CHECKPOINT)

    def checkpoint(step):
        save_checkpoint(ckpt_path, PRIOR_KIND, step, prior, optimizer, record_meta, vqvae_state)

    def compute(step):
        rows = sampler.indices(step - 1)
        idx = backend.to_device(train_codes[rows].astype(np.int64), device)
        lab = None if train_labels is None else backend.to_device(train_labels[rows], device)
        loss = prior.loss(idx, lab)
        nats = float(loss.item())
        return loss, {"loss": nats}, {"bits_per_latent": nats / math.log(2)}, \
            f"nll {nats / math.log(2):.3f} bits/latent"

    def evaluate_now():
        return {"nll_bits": prior_nll_bits(prior, test_codes, test_labels, device, limit=config.eval_size),
                "uniform_bits": math.log2(k)}

    run_steps(compute, optimizer, start, config, config.out, checkpoint, evaluate_now)
    final = dict(evaluate_now(), step=config.steps, split="test")
    MetricsLog(os.path.join(config.out, METRICS), append=True).write(final)
    return final


def sample_images(prior_path, n=64, label=None, temperature=1.0, seed=0, device="cpu"):
    """Images (n, C, H, W) decoded from code grids drawn from a trained prior."""
    device = check_device(device)
    prior, vqvae, meta = load_prior(prior_path, device)
    if label is not None and not prior.num_classes:
        raise ValueError("--class given, but this prior was trained without --conditional")
    if prior.num_classes and label is None:
        raise ValueError(f"this prior is class-conditional: give --class in [0, {prior.num_classes})")
    if label is not None and not 0 <= label < prior.num_classes:
        raise ValueError(f"--class must lie in [0, {prior.num_classes}), got {label}")
    backend.manual_seed(seed)
    grids = prior.sample(n, meta["latent_shape"], labels=label, temperature=temperature, device=device)
    with no_grad():
        images = vqvae.decode_indices(grids)
    return backend.to_numpy(images.data)
