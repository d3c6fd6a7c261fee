"""The prior's trainer (``minivq train-prior``), its code cache, and sampling (``minivq sample``).

A gated PixelCNN is fitted to the index grids a trained VQ-VAE gives the
dataset's images. The grids are encoded once and cached beside the VQ-VAE's
checkpoint, in a file named after the checkpoint's SHA-256; the prior's own
checkpoint embeds the VQ-VAE, so sampling needs that one file alone. Each test
record holds the NLL in bits per latent beside two context-free references on
the same codes (the unigram and the per-position unigram cross-entropy) and the
ratio NLL / per-position unigram: how much the prior learns from context.
"""
import contextlib
import hashlib
import math
import os
import sys

import numpy as np

from . import backend, workers
from .autograd import no_grad
from .checkpoint import (MAX_LATENT_POSITIONS, PRIOR_KIND, load_prior, load_vqvae, open_run, restore,
                         resume_settings, save_checkpoint)
from .config import MAX_CLASSES, PriorConfig, check_parameter_count, prior_parameter_count
from .data import BatchSampler, load_dataset
from .images import MAX_GRID_IMAGES
from .io import load, save
from .loop import run_steps
from .models import GatedPixelCNN
from .optim import Adam
from .runlog import CHECKPOINT
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
    checkpoint never reuses stale codes. An unreadable cache is rebuilt; a readable
    one that does not fit the checkpoint (``check_codes``) is refused, naming it.
    """
    digest = _file_digest(vqvae_path)
    cache = os.path.join(os.path.dirname(os.path.abspath(vqvae_path)), f"codes-{digest[:16]}.npz")
    if os.path.lexists(cache):
        try:
            codes = load(cache)
        except ValueError:
            codes = None            # a damaged cache is rebuilt
        if codes is not None:
            return check_codes(codes, model.vq.num_embeddings, cache), cache
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
    save(check_codes(codes, model.vq.num_embeddings, f"the codes of {data}"), cache)
    return codes, cache


def check_codes(codes, k, where):
    """``codes`` if they are index grids a prior can be fitted to; ValueError naming ``where`` otherwise.

    Both splits: integer grids (N >= 1, h, w) of the same h x w (at most
    ``MAX_LATENT_POSITIONS`` positions) with values in [0, k); labels, where
    present, integers, one per grid.
    """
    fix = f"; delete {where} to have it rebuilt" if where.endswith(".npz") else ""
    shapes = set()
    for split in ("train", "test"):
        grids, labels = codes.get(f"{split}_codes"), codes.get(f"{split}_labels")
        if grids is None or grids.dtype.kind not in "iu" or grids.ndim != 3 or 0 in grids.shape:
            found = "none" if grids is None else f"{grids.dtype} {grids.shape}"
            raise ValueError(f"{where}: the {split} codes should be integer grids (N >= 1, h, w), found {found}{fix}")
        lo, hi = int(grids.min()), int(grids.max())
        if lo < 0 or hi >= k:
            raise ValueError(f"{where}: the {split} codes lie in [{lo}, {hi}], the VQ-VAE has codes [0, {k}){fix}")
        shapes.add(grids.shape[1:])
        if labels is not None:
            if labels.dtype.kind not in "iu" or labels.shape != grids.shape[:1]:
                raise ValueError(f"{where}: the {split} labels should be {grids.shape[0]} integers, found "
                                 f"{labels.dtype} {labels.shape}{fix}")
    if len(shapes) != 1:
        raise ValueError(f"{where}: the train and test grids differ in size ({sorted(shapes)}){fix}")
    h, w = shapes.pop()
    if h * w > MAX_LATENT_POSITIONS:
        raise ValueError(f"{where}: code grids of {h} x {w} are more than the {MAX_LATENT_POSITIONS} positions "
                         f"minivq's prior handles (sampling visits each); train the VQ-VAE on smaller images")
    return codes


def prior_nll_bits(prior, codes, labels, device="cpu", batch_size=256, limit=None, comm=None):
    """Mean negative log-likelihood of index grids under the prior, in bits per latent.

    ``limit``: the first ``limit`` grids only (``--eval-size``), each counted once.
    With a communicator of several ranks (a collective call), each rank scores its
    share of the grids and the sums are added up: every rank returns the same value.
    """
    n = len(codes) if limit is None else min(limit, len(codes))
    rank, size = (0, 1) if comm is None else (comm.rank, comm.size)
    first, last = n * rank // size, n * (rank + 1) // size       # this rank's grids
    total = 0.0
    with prior.evaluating(), no_grad():
        for lo in range(first, last, batch_size):
            hi = min(lo + batch_size, last)     # the last batch stops at the share's end
            idx = backend.to_device(codes[lo:hi].astype(np.int64), device)
            lab = None if labels is None else backend.to_device(labels[lo:hi], device)
            total += float(prior.loss(idx, lab).item()) * idx.shape[0]
    if size > 1:
        total = float(comm.allreduce_sum(np.array([total]))[0])
    return total / n / math.log(2)


def unigram_bits(train_codes, test_codes, k, smoothing=0.5):
    """Cross-entropy (bits per latent) of the test codes under one histogram of the training codes.

    The histogram counts every training latent, ``smoothing`` is added to each of
    the ``k`` bins (add-0.5 by default, so a code unseen in training costs bits,
    not infinity), and the cross-entropy is the mean of -log2 p(code) over every
    test latent: a context-free reference for the prior's NLL.
    """
    counts = np.bincount(np.asarray(train_codes, np.int64).ravel(), minlength=k) + float(smoothing)
    log_p = np.log2(counts) - np.log2(counts.sum())
    return float(-log_p[np.asarray(test_codes, np.int64).ravel()].mean())


def position_unigram_bits(train_codes, test_codes, k, smoothing=0.5):
    """Cross-entropy (bits per latent) of the test codes under one histogram per latent position.

    ``h * w`` histograms (64 for 8 x 8 grids), each of the training codes at its
    position, add-``smoothing`` over the ``k`` bins; the mean of -log2 p_ij(code)
    over every test grid and position. What a prior knows without context, but
    with the position: NLL / this says how much the prior learns from context.
    """
    train = np.asarray(train_codes, np.int64).reshape(len(train_codes), -1)
    test = np.asarray(test_codes, np.int64).reshape(len(test_codes), -1)
    total = 0.0
    for pos in range(train.shape[1]):
        counts = np.bincount(train[:, pos], minlength=k) + float(smoothing)
        log_p = np.log2(counts) - np.log2(counts.sum())
        total += float(log_p[test[:, pos]].sum())
    return -total / test.size


def context_free_references(train_codes, test_codes, k):
    """The unigram and per-position unigram cross-entropies (bits per latent) the prior's NLL is held to."""
    return {"unigram_bits": unigram_bits(train_codes, test_codes, k),
            "position_unigram_bits": position_unigram_bits(train_codes, test_codes, k)}


def _setup(vqvae_path, config, explicit):
    """(config, device, run folder (locked), vqvae, its meta, the prior's meta and sections on resume)."""
    config.validate()
    device = check_device(config.device)
    out = config.out or os.path.join(os.path.dirname(os.path.abspath(vqvae_path)), "prior")
    config = config.replace(out=out)
    vqvae, vq_meta = load_vqvae(vqvae_path, device)
    folder, meta, sections = open_run(config, PRIOR_KIND)
    try:
        if meta:
            config = resume_settings(config, meta, explicit, os.path.join(out, CHECKPOINT))
        data = config.data if config.data is not None else vq_meta["train"].get("data")
        config = config.replace(data=None if data is None else os.path.abspath(data))
    except BaseException:
        folder.close()
        raise
    return config, device, folder, vqvae, vq_meta, meta, sections


def train_prior(vqvae_path, config=None, explicit=None):
    """Fit a gated PixelCNN to the codes of a trained VQ-VAE; returns the final test metrics.

    ``config``: a ``PriorConfig`` (default: PriorConfig()); on resume the
    checkpoint's seed, batch, learning rate and conditioning are used, and those
    of them named in ``explicit`` (the settings the user chose; default: those
    that differ from their defaults) must equal the checkpoint's. The run folder
    is locked for the whole run. ``config.workers`` > 1 trains on that many
    data-parallel worker threads (``minivq.workers``), each with 1/N of every batch.
    """
    config, device, folder, vqvae, vq_meta, meta, sections = _setup(vqvae_path, config or PriorConfig(), explicit)
    # one process: its convolutions (the codes' encoding too) spread over the cores; the prior's layers are float32
    cores = workers.one_process(config.device, np.float32) if config.workers == 1 else contextlib.nullcontext()
    with folder, cores:
        return _train_prior(vqvae_path, config, device, folder, vqvae, vq_meta, meta, sections)


def _train_prior(vqvae_path, config, device, folder, vqvae, vq_meta, meta, sections):
    codes, cache = cached_codes(vqvae_path, vqvae, config.data, device, config.progress)
    train_codes, test_codes = codes["train_codes"], codes["test_codes"]
    train_labels = codes.get("train_labels") if config.conditional else None
    test_labels = codes.get("test_labels") if config.conditional else None
    if config.conditional and (train_labels is None or test_labels is None):
        raise ValueError("--conditional needs a dataset with labels")
    if config.conditional:
        lo, hi = min(train_labels.min(), test_labels.min()), max(train_labels.max(), test_labels.max())
        if lo < 0 or hi >= MAX_CLASSES:
            raise ValueError(f"--conditional: the labels of {config.data} lie in [{lo}, {hi}]; class labels must "
                             f"lie in 0..{MAX_CLASSES - 1}")
    if config.batch_size > len(train_codes):
        raise ValueError(f"batch size {config.batch_size} is larger than the training set "
                         f"({len(train_codes)} grids)")

    k = vqvae.vq.num_embeddings
    if meta:
        prior_config = meta["prior"]
    else:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1 if config.conditional else None
        prior_config = dict(config.model(), num_embeddings=k, num_classes=num_classes)
        check_parameter_count(prior_parameter_count(**prior_config), "this prior")
    record_meta = {"prior": prior_config, "vqvae": vq_meta["model"], "vqvae_checkpoint": os.path.abspath(vqvae_path),
                   "latent_shape": list(train_codes.shape[1:]), "codes_cache": cache,
                   "train": config.record(), "uniform_bits": math.log2(k)}
    vqvae_state = {f"vqvae.{key}": v for key, v in vqvae.state_dict().items()}
    ckpt_path = os.path.join(config.out, CHECKPOINT)
    # the context-free references, on the test grids the NLL is measured on (the first --eval-size)
    references = context_free_references(train_codes, test_codes[:config.eval_size], k)

    def fit(comm):
        """The training itself, on one rank: the whole of it in one process, or one of --workers N
        threads (``minivq.workers``), each with its replica of the prior and 1/N of every batch."""
        backend.manual_seed(config.seed)
        prior = GatedPixelCNN(**prior_config)
        optimizer = Adam(prior.parameters(), lr=config.lr)
        start = restore(prior, optimizer, meta, sections, device)
        sampler = BatchSampler(len(train_codes), config.batch_size, config.seed)
        local = config.batch_size // comm.size

        def checkpoint(step):
            if comm.rank == 0:
                save_checkpoint(ckpt_path, PRIOR_KIND, step, prior, optimizer, record_meta, vqvae_state)

        def compute(step):
            rows = sampler.indices(step - 1)[comm.rank * local:(comm.rank + 1) * local]
            idx = backend.to_device(train_codes[rows].astype(np.int64), device)
            lab = None if train_labels is None else backend.to_device(train_labels[rows], device)
            loss = prior.loss(idx, lab)
            nats = float(loss.item())
            if comm.size > 1:       # the global batch's mean: every rank logs and checks the same value
                nats = float(comm.allreduce_sum(np.array([nats]))[0]) / comm.size
            return loss, {"loss": nats}, {"bits_per_latent": nats / math.log(2)}, \
                f"nll {nats / math.log(2):.3f} bits/latent"

        def evaluate_now():
            nll = prior_nll_bits(prior, test_codes, test_labels, device, limit=config.eval_size, comm=comm)
            return dict({"nll_bits": nll, "uniform_bits": math.log2(k)}, **references,
                        nll_over_position_unigram=nll / references["position_unigram_bits"])

        return run_steps(compute, optimizer, start, config, config.out, checkpoint, evaluate_now, comm=comm,
                         model_state=prior.state_dict)

    if config.overwrite:
        folder.clear()
    return workers.run(fit, config.workers)


SAMPLE_CHUNK = 256      # grids drawn at a time, so memory does not grow with n


def sample_images(prior_path, n=64, label=None, temperature=1.0, seed=0, device="cpu"):
    """Images (n, C, H, W) decoded from code grids drawn from a trained prior.

    At most ``MAX_GRID_IMAGES``, drawn ``SAMPLE_CHUNK`` grids at a time. A temperature so
    small that the scaled logits overflow is refused (ValueError), not sampled from.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= MAX_GRID_IMAGES:
        raise ValueError(f"--n must lie in 1..{MAX_GRID_IMAGES} (one PNG grid), got {n}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"--temperature must be a positive finite number, got {temperature}")
    device = check_device(device)
    prior, vqvae, meta = load_prior(prior_path, device)
    if label is not None and not prior.num_classes:
        raise ValueError("--class given, but this prior was trained without --conditional")
    if prior.num_classes and label is None:
        raise ValueError(f"this prior is class-conditional: give --class in [0, {prior.num_classes})")
    if label is not None and not 0 <= label < prior.num_classes:
        raise ValueError(f"--class must lie in [0, {prior.num_classes}), got {label}")
    backend.manual_seed(seed)
    images = []
    try:        # the convolutions split each batch over the cores (workers.one_process): the same bits
        with np.errstate(over="raise", invalid="raise", divide="raise", under="ignore"), \
                workers.one_process(device, np.float32):
            for lo in range(0, n, SAMPLE_CHUNK):
                grids = prior.sample(min(SAMPLE_CHUNK, n - lo), meta["latent_shape"], labels=label,
                                     temperature=temperature, device=device)
                with no_grad():
                    images.append(backend.to_numpy(vqvae.decode_indices(grids).data))
    except FloatingPointError as exc:
        if temperature < 1:
            raise ValueError(f"sampling at --temperature {temperature} overflows the prior's scaled logits "
                             f"({exc}); use a larger --temperature") from None
        raise ValueError(f"{prior_path}: the prior gives non-finite values while sampling ({exc}); "
                         f"the checkpoint is damaged") from None
    return np.concatenate(images)
