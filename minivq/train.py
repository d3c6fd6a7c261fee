"""The VQ-VAE trainer: ``minivq train``.

    from minivq.config import TrainConfig, ModelConfig
    final = train_vqvae(TrainConfig(out="runs/a", steps=500), ModelConfig(decay=0.99))

A run lives in one folder (``minivq.runlog``); the step loop is ``minivq.loop``,
checkpoints ``minivq.checkpoint``, test metrics ``minivq.evaluation``.

Resuming is exact on the CPU: the batch of step s is a pure function of (seed, s)
(``minivq.data.BatchSampler``), and the checkpoint holds everything else that
changes during training, so a resumed run computes the same losses as an
uninterrupted one.

Data-parallel training (``mpiexec -n P minivq train``, see ``minivq.distributed``
and docs/distributed.md): every rank holds the whole model and takes rows
[r B/P, (r + 1) B/P) of each global batch of B; the EMA statistics, the
restart and k-means choices (through the quantiser's injected reducer), the
gradients (one allreduce of one flat buffer) and the logged metrics are
combined over the ranks, so every rank makes the same update a single process
would make with the whole batch. Only rank 0 writes the run folder, and a
checkpoint does not depend on the number of ranks. ``--workers N`` runs the
same ranks as N threads of this process instead (``minivq.workers``).
"""
import hashlib
import math
import os

import numpy as np

from . import backend
from . import distributed
from . import functional as F
from . import workers
from .autograd import Tensor
from .checkpoint import VQVAE_KIND, open_run, restore, resume_settings, save_checkpoint
from .config import ModelConfig, TrainConfig
from .data import BatchSampler, load_dataset
from .evaluation import evaluate, save_reconstructions
from .graph import estimator_agreement, grad_norm
from .loop import run_steps
from .nn.quantizers import perplexity
from .optim import Adam, annealed_lr
from .runlog import CHECKPOINT, RECONSTRUCTIONS


def check_device(device):
    """The canonical name of ``device``, after checking it exists; a GPU becomes CuPy's current one."""
    kind, index = backend.parse_device(device)
    if kind == "cuda":
        backend.require_cuda(index)
        backend.use_device(device)      # kernels and new arrays go to cuda:N, not to GPU 0
    return backend.device_name(device)


def resolve_model(given, checkpoint_meta=None):
    """The model's settings: the checkpoint's on resume (settings given explicitly must agree), else ``given``.

    ``given``: a ModelConfig, a dict of the settings chosen explicitly (as the CLI
    passes its model flags), or None for the defaults.
    """
    if isinstance(given, ModelConfig):
        if checkpoint_meta is None:
            return given
        chosen = {}
    else:
        normal = ModelConfig.from_dict(given or {})     # checked, and as the config holds them (levels "8,8" -> (8, 8))
        if checkpoint_meta is None:
            return normal
        # a None chosen is a setting too (lookup_dim=None: search in D)
        chosen = {k: getattr(normal, k) for k in (given or {}) if hasattr(normal, k)}
    saved = ModelConfig.from_checkpoint(checkpoint_meta)
    for k, v in chosen.items():
        if getattr(saved, k, v) != v:
            raise ValueError(f"--resume: the checkpoint was trained with {k}={getattr(saved, k)}, "
                             f"but {k}={v} was given; drop the flag or start a new --out folder")
    return saved


def gradient_report(model, vq, counts=None, estimator_out=None):
    """Per-layer gradient norms, and how the encoder's gradient at z_e splits between the loss terms.

    The commitment term's share is known in closed form, 2 beta (z_e - z_q) / numel (checked in
    tests/test_quantizer.py); the rest of z_e's gradient came through the estimator
    (straight-through or rotation) from the reconstruction. The split is exact for the
    l2 lookup in D dimensions; with a cosine or low-dimensional lookup (the commitment
    then lives in the search space) or FSQ only the total, ``z_e_grad``, is logged.
    Also: ``codebook_grad`` (the norm of the codebook's gradient, or SimVQ's map's;
    absent for the EMA codebook and FSQ) and, given the step's per-code ``counts``,
    ``code_counts`` = {"index": [...], "count": [...]} of the codes used.
    ``estimator_out``: the estimator's output Tensor, its gradient retained; then
    ``estimator_cosine`` and ``estimator_norm_ratio`` compare the gradients the
    straight-through and rotation-trick estimators would hand to z_e for it
    (``minivq.graph.estimator_agreement``).
    """
    report = {}
    if vq.z_e.grad is not None:
        layers = {}
        for name, p in model.named_parameters():
            if p.grad is not None:
                layer = name.rsplit(".", 1)[0]
                layers[layer] = layers.get(layer, 0.0) + grad_norm(p.grad) ** 2
        report["grad_norms"] = {k: math.sqrt(v) for k, v in layers.items()}
        z_e, quantizer = vq.z_e, model.vq
        if getattr(quantizer, "lookup", None) == "l2" and getattr(quantizer, "lookup_dim", 0) is None:
            beta = quantizer.commitment_cost
            commit = (2 * beta / z_e.data.size) * (z_e.data - vq.quantized.data)
            recon = z_e.grad - commit
            r, c = grad_norm(recon), grad_norm(commit)
            report.update(z_e_grad_recon=r, z_e_grad_commit=c, z_e_recon_share=r / (r + c) if r + c > 0 else 0.0)
        else:
            report["z_e_grad"] = grad_norm(z_e.grad)
        own = dict(quantizer.named_parameters())
        codes = own.get("codebook", own.get("code_map"))
        if codes is not None and codes.grad is not None:
            report["codebook_grad"] = grad_norm(codes.grad)
    if counts is not None:
        counts = np.rint(backend.to_numpy(counts)).astype(np.int64)
        used = np.flatnonzero(counts)
        report["code_counts"] = {"index": used.tolist(), "count": counts[used].tolist()}
    if estimator_out is not None and estimator_out.grad is not None:
        e, q = estimator_out.creator.inputs
        report["estimator_cosine"], report["estimator_norm_ratio"] = estimator_agreement(
            estimator_out.grad, e.data, q.data)
    return report


def estimator_output(vq):
    """The Tensor the straight-through or rotation-trick node made (before a low-dimensional lookup's
    ``project_out``), or None (FSQ, or no graph)."""
    t = vq.quantized
    for _ in range(2):
        fn = t.creator
        if fn is None:
            return None
        if fn.name in ("StraightThrough", "RotationTrick"):
            return t
        t = fn.inputs[0]
    return None


def _dataset_digest(*datasets):
    """SHA-256 of the datasets' pixels: the ranks of a data-parallel run must read the same images."""
    h = hashlib.sha256()
    for dataset in datasets:
        h.update(str(dataset.images.shape).encode())
        h.update(np.ascontiguousarray(dataset.images).data)
    return h.hexdigest()


def _combine_step_metrics(comm, checked, extra, counts):
    """The step's metrics over the global batch: loss terms averaged over the ranks, code counts summed."""
    names = list(checked) + ["recon_error"]
    local = [checked[k] for k in list(checked)] + [extra["recon_error"]]
    sums = comm.allreduce_sum(np.concatenate([local, backend.to_numpy(counts)]).astype(np.float64))
    means = dict(zip(names, (sums[:len(names)] / comm.size).tolist()))
    counts = np.rint(sums[len(names):])
    checked = {k: means[k] for k in checked}
    extra = dict(extra, recon_error=means["recon_error"], perplexity=float(perplexity(counts)),
                 codes_used=int((counts > 0).sum()))
    return checked, extra


def _setup(config, comm, explicit):
    """Checks every rank makes alike, then rank 0's look at the run folder: (config, device, folder, meta, sections).

    ``folder``: the locked run folder (``runlog.RunFolder``, rank 0 only; the caller closes it).
    """
    meta = sections = folder = None
    with distributed.agreement(comm):
        config.validate()
        device = check_device(distributed.rank_device(config.device, comm))
        if comm.rank == 0:      # only rank 0 touches the run folder
            folder, meta, sections = open_run(config, VQVAE_KIND)
    try:
        if config.resume:
            meta, sections = comm.bcast_object((meta, sections))
        with distributed.agreement(comm):
            if meta:    # the run's settings come from the checkpoint, so the continuation is the same run
                config = resume_settings(config, meta, explicit, os.path.join(config.out, CHECKPOINT))
                config = config.replace(data=config.data if config.data is not None else meta["train"].get("data"))
            if config.data is not None:     # recorded resolved: the checkpoint works from any folder
                config = config.replace(data=os.path.abspath(config.data))
            config = _plan(config, meta, os.path.join(config.out, CHECKPOINT))
    except BaseException:
        if folder is not None:
            folder.close()
        raise
    return config, device, folder, meta, sections


def _plan(config, meta, where):
    """``config`` with the run length its learning-rate schedule is planned for: ``--plan-steps`` if given,
    else a resumed run's recorded plan, else ``--steps``. Refused where the run would go past the end
    of its plan, where an annealed rate has reached 0."""
    planned = config.planned_steps
    if planned is None:
        planned = (meta["train"].get("planned_steps") if meta else None) or config.steps
    if config.lr_anneal > 0 and config.steps > planned:
        if config.planned_steps is not None:
            raise ValueError(f"--plan-steps {planned} is shorter than --steps {config.steps}: the learning rate "
                             f"would reach 0 at step {planned}; give --plan-steps {config.steps} or more, or "
                             f"--lr-anneal 0 for a constant rate")
        raise ValueError(f"--resume: {where} was planned for {planned} steps, where its learning rate reaches 0 "
                         f"(--lr-anneal {config.lr_anneal:g}); to train to step {config.steps}, plan again with "
                         f"--plan-steps {config.steps} (the rate then goes back to where the new plan has it)")
    return config.replace(planned_steps=planned)


def train_vqvae(config=None, model=None, comm=None, explicit=None):
    """Train a VQ-VAE; returns the final test metrics (a dict). See ``minivq train --help``.

    ``config``: a ``TrainConfig`` (default: TrainConfig()); ``model``: a ``ModelConfig``,
    or a dict of the model settings chosen explicitly (checked against the
    checkpoint on resume), or None. ``comm``: a ``minivq.distributed``
    communicator for data-parallel training (default: this process alone);
    ``config.batch_size`` is then the global batch, split evenly over the ranks;
    ``config.workers`` > 1 makes the ranks threads of this process (``minivq.workers``).
    ``explicit``: the names of the settings the user chose (the CLI's flags given);
    on resume those of ``TrainConfig.FROM_CHECKPOINT`` must equal the checkpoint's
    (default: the ones that differ from their defaults).

    The run folder is locked for the whole run: a second run on it is refused.
    """
    config = config if config is not None else TrainConfig()
    comm = comm if comm is not None else distributed.SingleProcess()
    if config.workers > 1:
        if comm.size > 1:
            raise distributed.CollectiveError(f"--workers {config.workers} under mpiexec: start one worker per "
                                              f"process (drop --workers) and as many processes as workers")
        return workers.run(lambda rank_comm: _train_rank(config, model, rank_comm, explicit), config.workers)
    if comm.size > 1:
        return _train_rank(config, model, comm, explicit)
    with workers.one_process(config.device, config.dtype):
        return _train_rank(config, model, comm, explicit)


def _train_rank(config, model, comm, explicit):
    config, device, folder, meta, sections = _setup(config, comm, explicit)
    try:
        return _train(config, model, comm, device, folder, meta, sections)
    finally:
        if folder is not None:
            folder.close()


def _train(config, model, comm, device, folder, meta, sections):
    with distributed.agreement(comm) as agreed:
        model_config = resolve_model(model, meta)
        # one copy of the (read-only) images for all the workers of this process
        train_set = comm.shared(("dataset", config.data, "train"), lambda: load_dataset(config.data, split="train"))
        test_set = comm.shared(("dataset", config.data, "test"), lambda: load_dataset(config.data, split="test"))
        if config.batch_size > len(train_set):
            raise ValueError(f"batch size {config.batch_size} is larger than the training set "
                             f"({len(train_set)} images)")
        if config.batch_size % comm.size:
            raise ValueError(f"--batch {config.batch_size} (the global batch) does not split evenly over "
                             f"{comm.size} processes; choose a multiple of {comm.size}")
        variance = meta["data_variance"] if meta else float(train_set.pixel_variance())
        if not variance > 0:
            raise ValueError(f"the training images of {train_set.name} all have one and the same pixel value "
                             f"(pixel variance 0): there is nothing to learn; check the dataset")

        backend.manual_seed(config.seed)
        vqvae = model_config.build(train_set.num_channels, kernel=config.kernel)
        if meta and meta["model"].get("in_channels", train_set.num_channels) != train_set.num_channels:
            raise ValueError(f"the checkpoint's model takes {meta['model']['in_channels']}-channel images, "
                             f"the dataset has {train_set.num_channels}")
        vqvae.astype(config.dtype)
        if config.center_output and not meta:
            # every rank centres on the same images: a batch spread evenly over the training set (not the
            # first training batch, whose bias gradient would then be zero up to rounding, and Adam's first
            # step, g / |g|, would follow the rounding)
            x, _ = train_set.batch(np.linspace(0, len(train_set) - 1, config.batch_size).astype(np.int64),
                                   device=device, dtype=config.dtype)
            vqvae.to(device)
            vqvae.center_output(x)
        optimizer = Adam(vqvae.parameters(), lr=config.lr)
        start = restore(vqvae, optimizer, meta, sections, device)

        record_meta = {"model": dict(model_config.to_dict(), in_channels=train_set.num_channels),
                       "train": dict(config.record(), dataset=train_set.name), "data_variance": variance}
        if comm.size > 1:       # what every rank must share (paths may differ between machines, data may not)
            shared = {k: v for k, v in config.to_dict().items() if k not in ("data", "out", "device", "progress")}
            agreed.config = dict(record_meta["model"], **shared, start=start,
                                 device=backend.parse_device(device)[0], data_sha256=_dataset_digest(train_set,
                                                                                                      test_set))

    comm = distributed.for_device(comm, device, config.comm_backend)
    if comm.size > 1:
        vqvae.vq.reducer = distributed.BatchReducer(comm)
    sampler = BatchSampler(len(train_set), config.batch_size, config.seed)
    local = config.batch_size // comm.size
    ckpt_path = os.path.join(config.out, CHECKPOINT)
    last = {}

    def compute(step):
        optimizer.lr = annealed_lr(config.lr, step, config.planned_steps, config.lr_anneal)
        rows = sampler.indices(step - 1)[comm.rank * local:(comm.rank + 1) * local]
        x, _ = train_set.batch(rows, device=device, dtype=config.dtype)
        x = Tensor(x)
        x_recon, vq = vqvae(x)
        mse = F.mse_loss(x_recon, x)
        recon = mse / variance
        loss = recon + vq.loss
        checked = {"loss": float(loss.item()), "nmse": float(recon.item()), "vq_loss": float(vq.loss.item())}
        extra = {"recon_error": float(mse.item()), "perplexity": float(vq.perplexity), "codes_used": vq.codes_used,
                 "lr": optimizer.lr}
        if comm.size > 1:
            checked, extra = _combine_step_metrics(comm, checked, extra, vq.counts)
        if model_config.dead_code_threshold > 0:
            extra["codes_replaced"] = vq.replaced
        if config.log_grads:
            vq.z_e.retain_grad()
            last["vq"] = vq
        if config.compare_estimators:
            last["vq"], last["estimator_out"] = vq, estimator_output(vq)
            if last["estimator_out"] is not None:
                last["estimator_out"].retain_grad()
        return loss, checked, extra, f"loss {checked['loss']:.4f} ppl {extra['perplexity']:.1f}"

    def grad_report():
        vq = last.pop("vq")
        counts = None
        if config.log_grads:    # the global batch's per-code counts (a collective: every rank reports)
            counts = vq.counts if comm.size == 1 else \
                comm.allreduce_sum(backend.to_numpy(vq.counts).astype(np.float64))
        return gradient_report(vqvae, vq, counts=counts, estimator_out=last.pop("estimator_out", None))

    def checkpoint(step):
        if comm.rank == 0:
            save_checkpoint(ckpt_path, VQVAE_KIND, step, vqvae, optimizer, record_meta)

    def evaluate_now():
        return evaluate(vqvae, test_set, variance, device, limit=config.eval_size, comm=comm)

    if folder is not None and config.overwrite:
        folder.clear()
    final = run_steps(compute, optimizer, start, config, config.out, checkpoint, evaluate_now,
                      grad_report=grad_report if config.log_grads or config.compare_estimators else None, comm=comm,
                      model_state=vqvae.state_dict)
    if comm.rank == 0:
        save_reconstructions(vqvae, test_set, os.path.join(config.out, RECONSTRUCTIONS), device)
    return final
