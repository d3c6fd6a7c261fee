"""Training and evaluation loops for the VQ-VAE, with checkpoints and a JSONL metrics log.

A run lives in one folder (``--out``):
    checkpoint.npz     the latest checkpoint (model, optimiser, step, random state), written atomically
    metrics.jsonl      one JSON object per logged training step and per evaluation
    reconstructions.png  test images (top of each pair) above their reconstructions, at the end

Resuming is exact on the CPU: the batch of step s is a pure function of (seed, s)
(``minivq.data.BatchSampler``), and the checkpoint holds everything else that
changes during training, so a resumed run computes the same losses as an
uninterrupted one.

Data-parallel training (``mpiexec -n P minivq train``, see ``minivq.distributed``
and docs/distributed.md): every rank holds the whole model and takes rows
[r B/P, (r + 1) B/P) of each global batch of B; the EMA statistics, the
restart and k-means choices, the gradients (one allreduce of one flat buffer)
and the logged metrics are combined over the ranks, so every rank makes the
same update a single process would make with the whole batch. Only rank 0
writes the run folder, and a checkpoint does not depend on the number of ranks.
"""
import json
import math
import os
import sys
import time

import numpy as np

from . import backend
from . import functional as F
from .autograd import Tensor, no_grad
from .io import load, remove_stale_temporaries, save
from .optim import Adam

CHECKPOINT = "checkpoint.npz"
METRICS = "metrics.jsonl"
RECONSTRUCTIONS = "reconstructions.png"

MODEL_DEFAULTS = dict(num_hiddens=128, num_residual_hiddens=32, num_residual_layers=2, embedding_dim=64,
                      num_embeddings=512, commitment_cost=0.25, decay=0.0)


class NonFiniteError(RuntimeError):
    """Training produced a NaN or an infinity."""


# ---------------------------------------------------------------- checkpoints
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


def load_vqvae(path, device="cpu"):
    """A trained VQ-VAE (in eval mode) and its checkpoint's meta record."""
    from .models import VQVAE
    meta, sections = read_checkpoint(path, "minivq-vqvae")
    try:
        model = VQVAE(**meta["model"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path} describes no VQ-VAE this version can build ({exc})") from None
    model.load_state_dict(sections["model"])
    return model.to(device).eval(), meta


# ---------------------------------------------------------------- logging
class MetricsLog:
    """Append-only JSONL; on resume, records after the checkpoint's step are dropped first."""

    def __init__(self, path, resume_step=None, append=False, enabled=True):
        self.path = path if enabled else None
        if append or not enabled:
            return
        if resume_step is None:
            open(path, "w").close()
        elif os.path.exists(path):
            kept = []
            with open(path) as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                    except ValueError:
                        continue            # a line cut short by a crash
                    if rec.get("step", 0) <= resume_step:
                        kept.append(line if line.endswith("\n") else line + "\n")
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(kept)
            os.replace(tmp, path)

    def write(self, record):
        if self.path is None:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


class Progress:
    """A one-line progress bar on stderr (a plain line now and then when stderr is not a terminal)."""

    def __init__(self, total, start=0, stream=None, enabled=True):
        self.total, self.start = total, start
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.perf_counter()
        self.last = 0.0
        self.every = max(1, (total - start) // 20)

    def update(self, step, text):
        if not self.enabled:
            return
        now = time.perf_counter()
        done = step - self.start
        rate = done / max(now - self.t0, 1e-9)
        left = (self.total - step) / rate if rate > 0 else float("inf")
        eta = time.strftime("%M:%S", time.gmtime(left)) if left < 3600 else f"{left / 3600:.1f}h"
        width = 24
        fill = int(width * step / max(self.total, 1))
        line = f"step {step}/{self.total} [{'#' * fill}{'.' * (width - fill)}] {text} | {rate:.2f} it/s, {eta} left"
        if self.tty:
            if now - self.last > 0.2 or step == self.total:
                self.stream.write("\r" + line + "\033[K")
                self.stream.flush()
                self.last = now
        elif done % self.every == 0 or step == self.total:
            self.stream.write(line + "\n")
            self.stream.flush()

    def close(self):
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()


# ---------------------------------------------------------------- evaluation
def _model_dtype(model):
    return next(iter(model.parameters())).dtype


def _perplexity(counts):
    """exp(entropy) of the code distribution given by per-code ``counts``."""
    p = counts / max(counts.sum(), 1)
    return float(np.exp(-(p[p > 0] * np.log(p[p > 0])).sum()))


def evaluate(model, dataset, variance, device="cpu", batch_size=256, limit=None, comm=None):
    """Test-split metrics: MSE, MSE / variance, the quantiser's loss, perplexity and codes used.

    With a communicator of several ranks (a collective call), each rank
    evaluates a consecutive share of the images and the sums are combined.
    """
    was_training = model.training
    model.eval()
    n = len(dataset) if limit is None else min(limit, len(dataset))
    rank, size = (0, 1) if comm is None else (comm.rank, comm.size)
    k = model.vq.num_embeddings
    counts = np.zeros(k, np.int64)
    sq_err = vq_loss = 0.0
    with no_grad():
        for lo in range(n * rank // size, n * (rank + 1) // size, batch_size):
            x, _ = dataset.batch(np.arange(lo, min(lo + batch_size, n * (rank + 1) // size)), device=device,
                                 dtype=_model_dtype(model))
            x_recon, vq = model(Tensor(x))
            m = x.shape[0]
            sq_err += float(F.mse_loss(x_recon, Tensor(x)).item()) * m
            vq_loss += float(vq.loss.item()) * m
            counts += backend.to_numpy(vq.counts)
    model.train(was_training)
    if size > 1:
        sums = comm.allreduce_sum(np.concatenate([[sq_err, vq_loss], counts]).astype(np.float64))
        sq_err, vq_loss, counts = float(sums[0]), float(sums[1]), np.rint(sums[2:]).astype(np.int64)
    perplexity = _perplexity(counts)
    mse = sq_err / n
    return {"mse": mse, "nmse": mse / variance, "vq_loss": vq_loss / n,
            "perplexity": perplexity, "codes_used": int((counts > 0).sum()), "images": n}


def save_reconstructions(model, dataset, path, device="cpu", count=32):
    """A PNG of ``count`` test images, each row of originals followed by a row of reconstructions."""
    from .images import save_grid
    x, _ = dataset.batch(np.arange(min(count, len(dataset))), device=device, dtype=_model_dtype(model))
    was_training = model.training
    model.eval()
    with no_grad():
        x_recon, _ = model(Tensor(x))
    model.train(was_training)
    columns = 8
    pairs = []
    for lo in range(0, x.shape[0], columns):
        pairs.append(backend.to_numpy(x[lo:lo + columns]))
        pairs.append(np.clip(backend.to_numpy(x_recon.data[lo:lo + columns]), -0.5, 0.5))
    save_grid(np.concatenate(pairs), path, columns=columns)


def run_steps(compute, optimizer, start, steps, out, resume, checkpoint, evaluate_now, eval_every,
              checkpoint_every, log_every, skip_nonfinite, progress, grad_report=None, comm=None):
    """The loop both trainers share: step, check for NaN/inf, log, evaluate, checkpoint.

    ``compute(step)`` builds the graph of one step and returns ``(loss, checked,
    extra, bar_text)``: ``checked`` holds the float loss terms that must be
    finite, ``extra`` more fields for the log. A non-finite term stops training
    (``NonFiniteError``, the last checkpoint kept) or, with ``skip_nonfinite``,
    skips the step and counts it. ``grad_report()``, if given, is called after
    backward on logged steps and returns more fields for the log.

    With a communicator of several ranks, ``compute`` returns metrics already
    combined over the ranks (so all of them take the same decisions), gradients
    are averaged over the ranks after backward, and only rank 0 writes the log
    and shows progress; ``evaluate_now`` and ``checkpoint`` are called on every rank.
    """
    from .distributed import GradientAverager
    parallel = comm is not None and comm.size > 1
    root = not parallel or comm.rank == 0
    average_gradients = GradientAverager(comm, optimizer.params) if parallel else None
    comm_mark = comm.seconds if parallel else 0.0
    log = MetricsLog(os.path.join(out, METRICS), resume_step=start if resume else None, enabled=root)
    bar = Progress(steps, start, enabled=progress and root)
    skipped, last_good, step = 0, start, start
    t_start = time.perf_counter()
    try:
        for step in range(start + 1, steps + 1):
            loss, checked, extra, text = compute(step)
            bad = [k for k, v in checked.items() if not math.isfinite(v)]
            optimizer.zero_grad()
            if bad and not skip_nonfinite:
                raise NonFiniteError(
                    f"step {step}: {', '.join(bad)} became non-finite ({checked}); the checkpoint of step "
                    f"{last_good} is kept in {out}; lower --lr, or pass --skip-nonfinite to skip such steps")
            logged = step % log_every == 0 or step == steps
            if bad:
                skipped += 1
            else:
                loss.backward()
                if average_gradients is not None:
                    average_gradients()
                if logged and grad_report is not None:
                    extra = dict(extra, **grad_report())
                optimizer.step()
            if logged:
                record = dict({"step": step, "split": "train"}, **checked, **extra,
                              seconds=round(time.perf_counter() - t_start, 3))
                if skip_nonfinite:
                    record["skipped_nonfinite"] = skipped
                if parallel and comm.timed:     # rank 0's time in collectives since the last record
                    record["comm_seconds"] = round(comm.seconds - comm_mark, 6)
                    comm_mark = comm.seconds
                log.write(record)
            bar.update(step, text)
            if step % eval_every == 0 and step != steps:
                log.write(dict(evaluate_now(), step=step, split="test"))
            if step % checkpoint_every == 0 or step == steps:
                checkpoint(step)
                last_good = step
    except KeyboardInterrupt:
        # The interrupted step may have half-updated the parameters: keep the last checkpoint instead.
        bar.close()
        raise KeyboardInterrupt(f"interrupted at step {step}; the checkpoint of step {last_good} is in {out}, "
                                f"continue with --resume") from None
    bar.close()
    return skipped


# ---------------------------------------------------------------- training
def check_output_folder(out):
    """Create ``out``, prove it is writable before any work is done, and clear a killed run's temporaries."""
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, ".minivq-write-test")
        with open(probe, "w") as f:
            f.write("ok")
        os.unlink(probe)
        remove_stale_temporaries(out)
    except OSError as exc:
        raise ValueError(f"output folder {out} is not writable ({exc.strerror or exc}); "
                         f"choose another with --out") from None


def check_device(device):
    """The canonical name of ``device``, after checking it exists; a GPU becomes CuPy's current one."""
    kind, index = backend.parse_device(device)
    if kind == "cuda":
        backend.require_cuda(index)
        backend.use_device(device)      # kernels and new arrays go to cuda:N, not to GPU 0
    return backend.device_name(device)


def gradient_report(model, vq):
    """Per-layer gradient norms, and how the encoder's gradient at z_e splits between the loss terms.

    The commitment term's share is known in closed form, 2 beta (z_e - z_q) / numel (checked in
    tests/test_quantizer.py); the rest of z_e's gradient came through the estimator
    (straight-through or rotation) from the reconstruction.
    """
    from .graph import grad_norm
    layers = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            layer = name.rsplit(".", 1)[0]
            layers[layer] = layers.get(layer, 0.0) + grad_norm(p.grad) ** 2
    z_e, z_q = vq.z_e, vq.quantized.data
    beta = model.vq.commitment_cost
    commit = (2 * beta / z_e.data.size) * (z_e.data - z_q)
    recon = z_e.grad - commit
    r, c = grad_norm(recon), grad_norm(commit)
    return {"grad_norms": {k: math.sqrt(v) for k, v in layers.items()},
            "z_e_grad_recon": r, "z_e_grad_commit": c, "z_e_recon_share": r / (r + c) if r + c > 0 else 0.0}


def check_kernel(name):
    from .kernels import BACKENDS
    if name not in BACKENDS:
        raise ValueError(f"unknown nearest-code kernel {name!r}: use one of {', '.join(BACKENDS)}")


def resolve_model_config(given, checkpoint_config=None):
    """Model hyperparameters: the checkpoint's on resume (explicit flags must agree), else flags or defaults."""
    if checkpoint_config is None:
        return {k: (given.get(k) if given.get(k) is not None else v) for k, v in MODEL_DEFAULTS.items()}
    for k, v in given.items():
        if v is not None and k in checkpoint_config and checkpoint_config[k] != v:
            raise ValueError(f"--resume: the checkpoint was trained with {k}={checkpoint_config[k]}, "
                             f"but {k}={v} was given; drop the flag or start a new --out folder")
    return {k: checkpoint_config[k] for k in MODEL_DEFAULTS}


DTYPES = ("float32", "float64")


def check_dtype(dtype):
    try:
        name = None if dtype is None else np.dtype(dtype).name
    except TypeError:
        name = None
    if name not in DTYPES:
        raise ValueError(f"unknown training dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    return name


def _dataset_digest(*datasets):
    """SHA-256 of the datasets' pixels: the ranks of a data-parallel run must read the same images."""
    import hashlib
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
    extra = dict(extra, recon_error=means["recon_error"], perplexity=_perplexity(counts),
                 codes_used=int((counts > 0).sum()))
    return checked, extra


def train_vqvae(out, data=None, steps=2000, batch_size=128, lr=1e-3, seed=0, device="cpu", resume=False,
                eval_every=500, eval_size=None, checkpoint_every=500, log_every=10, skip_nonfinite=False,
                restart_after=0, kmeans_init=False, kernel="auto", estimator="straight_through", log_grads=False,
                progress=True, model_config=None, dtype="float32", comm=None, comm_backend="auto"):
    """Train a VQ-VAE; returns the final test metrics (a dict). See ``minivq train --help``.

    ``log_grads``: on logged steps, add per-layer gradient norms and the split of the
    encoder's gradient (at z_e) between the reconstruction and commitment terms.
    ``dtype``: "float32" or "float64", for the model and the batches.
    ``comm``: a ``minivq.distributed`` communicator for data-parallel training
    (default: this process alone); ``batch_size`` is then the global batch, split
    evenly over the ranks. ``comm_backend``: "auto" (NCCL for GPUs where usable),
    "mpi" or "nccl".
    """
    from . import distributed
    from .data import BatchSampler, load_dataset
    from .models import VQVAE

    comm = comm if comm is not None else distributed.SingleProcess()
    ckpt_path = os.path.join(out, CHECKPOINT)
    meta = sections = None
    with distributed.agreement(comm):
        for name, value in [("steps", steps), ("batch_size", batch_size), ("eval_every", eval_every),
                            ("checkpoint_every", checkpoint_every), ("log_every", log_every)]:
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not (lr > 0 and math.isfinite(lr)):
            raise ValueError(f"learning rate must be a positive number, got {lr}")
        dtype = check_dtype(dtype)
        if comm_backend not in distributed.BACKENDS:
            raise ValueError(f"unknown communication backend {comm_backend!r}: "
                             f"use one of {', '.join(distributed.BACKENDS)}")
        device = check_device(distributed.rank_device(device, comm))
        check_kernel(kernel)
        if comm.rank == 0:      # only rank 0 touches the run folder
            check_output_folder(out)
            if resume:
                if not os.path.exists(ckpt_path):
                    raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}; start without --resume")
                meta, sections = read_checkpoint(ckpt_path, "minivq-vqvae")
    if resume:
        meta, sections = comm.bcast_object((meta, sections))

    with distributed.agreement(comm) as agreed:
        if meta:
            # the run's settings come from the checkpoint, so the continuation is the same run
            t = meta["train"]
            seed, batch_size, lr = t["seed"], t["batch_size"], t["lr"]
            restart_after, kmeans_init = t["restart_after"], t["kmeans_init"]
            estimator = t.get("estimator", "straight_through")
            dtype = t.get("dtype", "float32")
            data = data if data is not None else t.get("data")
        config = resolve_model_config(model_config or {}, meta["model"] if meta else None)

        train_set = load_dataset(data, split="train")
        test_set = load_dataset(data, split="test")
        if batch_size > len(train_set):
            raise ValueError(f"batch size {batch_size} is larger than the training set ({len(train_set)} images)")
        if batch_size % comm.size:
            raise ValueError(f"--batch {batch_size} (the global batch) does not split evenly over {comm.size} "
                             f"processes; choose a multiple of {comm.size}")
        variance = meta["data_variance"] if meta else float(train_set.pixel_variance())

        backend.manual_seed(seed)
        model = VQVAE(in_channels=train_set.num_channels, restart_after=restart_after, kmeans_init=kmeans_init,
                      kernel=kernel, estimator=estimator, **config)
        if meta and meta["model"].get("in_channels", train_set.num_channels) != train_set.num_channels:
            raise ValueError(f"the checkpoint's model takes {meta['model']['in_channels']}-channel images, "
                             f"the dataset has {train_set.num_channels}")
        model.astype(dtype)
        optimizer = Adam(model.parameters(), lr=lr)
        start = restore(model, optimizer, meta, sections, device)

        record_meta = {"model": dict(config, in_channels=train_set.num_channels),
                       "train": {"seed": seed, "batch_size": batch_size, "lr": lr, "data": data,
                                 "dataset": train_set.name, "restart_after": restart_after,
                                 "kmeans_init": kmeans_init, "estimator": estimator, "dtype": dtype},
                       "data_variance": variance}
        if comm.size > 1:       # what every rank must share (paths may differ between machines, data may not)
            agreed.config = dict(record_meta["model"], **{k: v for k, v in record_meta["train"].items()
                                                          if k != "data"},
                                 steps=steps, start=start, device=backend.parse_device(device)[0], kernel=kernel,
                                 eval_every=eval_every, eval_size=eval_size, checkpoint_every=checkpoint_every,
                                 log_every=log_every, skip_nonfinite=skip_nonfinite, log_grads=log_grads,
                                 comm=comm_backend, data_sha256=_dataset_digest(train_set, test_set))

    comm = distributed.for_device(comm, device, comm_backend)
    if comm.size > 1:
        model.vq.reducer = distributed.BatchReducer(comm)
    sampler = BatchSampler(len(train_set), batch_size, seed)
    local = batch_size // comm.size

    def compute(step):
        rows = sampler.indices(step - 1)[comm.rank * local:(comm.rank + 1) * local]
        x, _ = train_set.batch(rows, device=device, dtype=dtype)
        x = Tensor(x)
        x_recon, vq = model(x)
        mse = F.mse_loss(x_recon, x)
        recon = mse / variance
        loss = recon + vq.loss
        checked = {"loss": float(loss.item()), "nmse": float(recon.item()), "vq_loss": float(vq.loss.item())}
        extra = {"recon_error": float(mse.item()), "perplexity": float(vq.perplexity), "codes_used": vq.codes_used}
        if comm.size > 1:
            checked, extra = _combine_step_metrics(comm, checked, extra, vq.counts)
        if restart_after:
            extra["codes_restarted"] = vq.restarted
        if log_grads:
            vq.z_e.retain_grad()
            last["vq"] = vq
        return loss, checked, extra, f"loss {checked['loss']:.4f} ppl {extra['perplexity']:.1f}"

    last = {}

    def grad_report():
        vq = last.pop("vq")
        return gradient_report(model, vq)

    def checkpoint(step):
        if comm.rank == 0:
            save_checkpoint(ckpt_path, "minivq-vqvae", step, model, optimizer, record_meta)

    run_steps(compute, optimizer, start, steps, out, resume, checkpoint,
              lambda: evaluate(model, test_set, variance, device, limit=eval_size, comm=comm),
              eval_every, checkpoint_every, log_every, skip_nonfinite, progress,
              grad_report=grad_report if log_grads else None, comm=comm)
    final = dict(evaluate(model, test_set, variance, device, limit=eval_size, comm=comm), step=steps, split="test")
    if comm.rank == 0:
        MetricsLog(os.path.join(out, METRICS), append=True).write(final)
        save_reconstructions(model, test_set, os.path.join(out, RECONSTRUCTIONS), device)
    return final


# ---------------------------------------------------------------- the prior
PRIOR_DEFAULTS = dict(channels=32, num_layers=6, kernel_size=5, head_channels=128)


def encode_dataset(model, dataset, device="cpu", batch_size=256):
    """Index grids (N, h, w) of every image, as int16 when K allows (compact), else int32."""
    grids = []
    for lo in range(0, len(dataset), batch_size):
        x, _ = dataset.batch(np.arange(lo, min(lo + batch_size, len(dataset))), device=device)
        grids.append(backend.to_numpy(model.encode(x)))
    dtype = np.int16 if model.vq.num_embeddings <= np.iinfo(np.int16).max else np.int32
    return np.concatenate(grids).astype(dtype)


def _file_digest(path):
    import hashlib
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
    from .data import load_dataset
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
    was_training = prior.training
    prior.eval()
    n = len(codes) if limit is None else min(limit, len(codes))
    total = 0.0
    with no_grad():
        for lo in range(0, n, batch_size):
            idx = backend.to_device(codes[lo:lo + batch_size].astype(np.int64), device)
            lab = None if labels is None else backend.to_device(labels[lo:lo + batch_size], device)
            total += float(prior.loss(idx, lab).item()) * idx.shape[0]
    prior.train(was_training)
    return total / n / math.log(2)


def load_prior(path, device="cpu"):
    """(prior, vqvae, meta) from a prior checkpoint, which embeds the VQ-VAE it was trained on."""
    from .models import VQVAE, GatedPixelCNN
    meta, sections = read_checkpoint(path, "minivq-prior")
    try:
        prior = GatedPixelCNN(**meta["prior"])
        vqvae = VQVAE(**meta["vqvae"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path} describes no prior this version can build ({exc})") from None
    prior.load_state_dict(sections["model"])
    vqvae.load_state_dict(sections.get("vqvae", {}))
    return prior.to(device).eval(), vqvae.to(device).eval(), meta


def train_prior(vqvae_path, out=None, data=None, steps=2000, batch_size=64, lr=1e-3, seed=0, device="cpu",
                resume=False, eval_every=500, eval_size=None, checkpoint_every=500, log_every=10,
                skip_nonfinite=False, conditional=False, progress=True, prior_config=None):
    """Fit a gated PixelCNN to the codes of a trained VQ-VAE; returns the final test metrics."""
    from .data import BatchSampler
    from .models import GatedPixelCNN

    for name, value in [("steps", steps), ("batch_size", batch_size), ("eval_every", eval_every),
                        ("checkpoint_every", checkpoint_every), ("log_every", log_every)]:
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    device = check_device(device)
    out = out or os.path.join(os.path.dirname(os.path.abspath(vqvae_path)), "prior")
    check_output_folder(out)
    ckpt_path = os.path.join(out, CHECKPOINT)
    vqvae, vq_meta = load_vqvae(vqvae_path, device)
    data = data if data is not None else vq_meta["train"].get("data")

    meta = sections = None
    if resume:
        if not os.path.exists(ckpt_path):
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}; start without --resume")
        meta, sections = read_checkpoint(ckpt_path, "minivq-prior")
        t = meta["train"]
        seed, batch_size, lr, conditional = t["seed"], t["batch_size"], t["lr"], t["conditional"]

    codes, cache = cached_codes(vqvae_path, vqvae, data, device, progress)
    train_codes, test_codes = codes["train_codes"], codes["test_codes"]
    train_labels = codes.get("train_labels") if conditional else None
    test_labels = codes.get("test_labels") if conditional else None
    if conditional and (train_labels is None or test_labels is None):
        raise ValueError("--conditional needs a dataset with labels")
    if batch_size > len(train_codes):
        raise ValueError(f"batch size {batch_size} is larger than the training set ({len(train_codes)} grids)")

    k = vqvae.vq.num_embeddings
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1 if conditional else None
    if meta:
        config = meta["prior"]
    else:
        config = {key: (prior_config or {}).get(key) or value for key, value in PRIOR_DEFAULTS.items()}
        config.update(num_embeddings=k, num_classes=num_classes)
    backend.manual_seed(seed)
    prior = GatedPixelCNN(**config)
    optimizer = Adam(prior.parameters(), lr=lr)
    start = restore(prior, optimizer, meta, sections, device)

    record_meta = {"prior": config, "vqvae": vq_meta["model"], "vqvae_checkpoint": os.path.abspath(vqvae_path),
                   "latent_shape": list(train_codes.shape[1:]), "codes_cache": cache,
                   "train": {"seed": seed, "batch_size": batch_size, "lr": lr, "data": data,
                             "conditional": conditional},
                   "uniform_bits": math.log2(k)}
    vqvae_state = {f"vqvae.{key}": v for key, v in vqvae.state_dict().items()}
    sampler = BatchSampler(len(train_codes), batch_size, seed)

    def checkpoint(step):
        save_checkpoint(ckpt_path, "minivq-prior", step, prior, optimizer, record_meta, vqvae_state)

    def compute(step):
        rows = sampler.indices(step - 1)
        idx = backend.to_device(train_codes[rows].astype(np.int64), device)
        lab = None if train_labels is None else backend.to_device(train_labels[rows], device)
        loss = prior.loss(idx, lab)
        nats = float(loss.item())
        return loss, {"loss": nats}, {"bits_per_latent": nats / math.log(2)}, \
            f"nll {nats / math.log(2):.3f} bits/latent"

    def evaluate_now():
        return {"nll_bits": prior_nll_bits(prior, test_codes, test_labels, device, limit=eval_size),
                "uniform_bits": math.log2(k)}

    run_steps(compute, optimizer, start, steps, out, resume, checkpoint, evaluate_now, eval_every,
              checkpoint_every, log_every, skip_nonfinite, progress)
    final = dict(evaluate_now(), step=steps, split="test")
    MetricsLog(os.path.join(out, METRICS), append=True).write(final)
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
