"""The settings of a run, in one place: what the CLI parses, the trainers take and a checkpoint records.

Three dataclasses:

    ModelConfig   the VQ-VAE's hyperparameters; its defaults are read from ``VQVAE``'s
                  signature, so the model's defaults are written once, in models/vqvae.py
    TrainConfig   how ``minivq train`` runs (steps, batch, optimiser, logging, device ...)
    PriorConfig   how ``minivq train-prior`` runs, and the gated PixelCNN's size (its
                  defaults read from ``GatedPixelCNN``'s signature)

Each field that is a command-line flag says so in its metadata (``flag``, ``help``);
``minivq.cli`` builds its parsers from these fields, so a default, a help text and
a set of allowed choices exist once. ``validate()`` checks every field and raises
ValueError naming the flag, the value and what is allowed: one family of checks
for the CLI, the Python API and the values read back from a checkpoint.
"""
import dataclasses
import inspect
import math
from dataclasses import dataclass, field

import numpy as np

from .distributed import BACKENDS as COMM_BACKENDS
from .functional.quantize import ESTIMATORS
from .kernels import BACKENDS as KERNELS
from .models import DEFAULT_QUANTIZER, PAPER_QUANTIZER, GatedPixelCNN, QuantizerOptions, VQVAE

DTYPES = ("float32", "float64")
MAX_INT = 2 ** 63 - 1            # every integer setting fits an int64
MAX_PARAMETERS = 250_000_000     # 1 GB of float32 weights: a model larger than this is refused before it is built
MAX_CLASSES = 1000               # classes of a class-conditional prior


def _defaults_of(cls):
    """{parameter: default} of ``cls.__init__``: the one source of a model's defaults."""
    return {name: p.default for name, p in inspect.signature(cls.__init__).parameters.items()
            if p.default is not inspect.Parameter.empty}


_VQVAE_DEFAULTS = dict(_defaults_of(VQVAE), **dataclasses.asdict(DEFAULT_QUANTIZER))
QUANTIZER_OPTIONS = tuple(f.name for f in dataclasses.fields(QuantizerOptions))
_PRIOR_DEFAULTS = _defaults_of(GatedPixelCNN)


def option(default, flag=None, help=None, check=None, choices=None, group=None):
    """A config field; ``flag``/``help`` make it a command-line option, ``check``/``choices`` validate it."""
    return field(default=default, metadata=dict(flag=flag, help=help, check=check, choices=choices, group=group))


# ---------------------------------------------------------------- validators
# Each takes (value, name) and returns the value, or raises ValueError naming the option.
def positive_int(value, name):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 1 <= value <= MAX_INT:
        raise ValueError(f"{name} must be a positive integer (at most 2**63 - 1), got {value!r}")
    return int(value)


def non_negative_int(value, name):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value <= MAX_INT:
        raise ValueError(f"{name} must be a non-negative integer (at most 2**63 - 1), got {value!r}")
    return int(value)


def optional_positive_int(value, name):
    return None if value is None else positive_int(value, name)


def optional_dimension(value, name):
    """None or 0 (no such projection) -> None; else a positive integer."""
    return None if value is None or (not isinstance(value, bool) and value == 0) else positive_int(value, name)


def positive_float(value, name):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) \
            or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def non_negative_float(value, name):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) \
            or not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def unit_interval(value, name):
    """A number in [0, 1)."""
    value = non_negative_float(value, name)
    if value >= 1:
        raise ValueError(f"{name} must lie in [0, 1), got {value!r}")
    return value


def fraction(value, name):
    """A number in [0, 1]."""
    value = non_negative_float(value, name)
    if value > 1:
        raise ValueError(f"{name} must lie in [0, 1], got {value!r}")
    return value


def boolean(value, name):
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return bool(value)


def levels_tuple(value, name):
    """FSQ levels: None, or a tuple of integers >= 2 (also read from "8,8,8" or a JSON list)."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = [int(v) for v in value.split(",")]
        except ValueError:
            raise ValueError(f"{name} takes integers separated by commas, e.g. 8,8,8; got {value!r}") from None
    if not isinstance(value, (list, tuple)) or not value or \
            any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 2 for v in value):
        raise ValueError(f"{name} takes integers >= 2, e.g. 8,8,8; got {value!r}")
    return tuple(int(v) for v in value)


def dtype_name(value, name):
    try:
        canonical = None if value is None else np.dtype(value).name
    except TypeError:
        canonical = None
    if canonical not in DTYPES:
        raise ValueError(f"unknown training dtype {value!r} for {name}: use one of {', '.join(DTYPES)}")
    return canonical


def vqvae_parameter_count(config, in_channels=3):
    """The number of weights of the VQ-VAE ``config`` (a ModelConfig) describes, from its sizes alone
    (codebook buffers included, a little over for the quantiser's options): a bound checked before building."""
    h, r, layers = config.num_hiddens, config.num_residual_hiddens, config.num_residual_layers
    d, k = config.embedding_dim, config.num_embeddings
    convs = (in_channels * (h // 2) * 16 + (h // 2) * h * 16 + h * h * 9 + h * d      # encoder
             + d * h * 9 + h * (h // 2) * 16 + (h // 2) * in_channels * 16)            # decoder
    residual = 2 * layers * (h * r * 9 + r * h)
    quantiser = 2 * k * d + k + 2 * d * (config.lookup_dim or d) + d * d
    return convs + residual + quantiser + 4 * h + 2 * d + in_channels


def prior_parameter_count(num_embeddings, channels, num_layers, kernel_size, head_channels, num_classes=None):
    """The number of weights of ``GatedPixelCNN(**those)``, from its sizes alone (masks included)."""
    c, k = channels, kernel_size
    per_layer = (2 * c * c * (k // 2 + 1) * (k + 1) + 4 * c * c + c * c + 8 * c
                 + (k // 2 + 1) * (k + 1) + 2 * c * (num_classes or 0))
    return num_embeddings * c + num_layers * per_layer + c * head_channels + head_channels * num_embeddings \
        + head_channels + num_embeddings


def check_parameter_count(count, what):
    if count > MAX_PARAMETERS:
        raise ValueError(f"{what} would have about {count:,} weights, more than the {MAX_PARAMETERS:,} minivq "
                         f"builds; choose smaller sizes")


def _flag_name(f):
    return f.metadata.get("flag") or f.name


class _Config:
    """What the three configs share: validation, conversion to and from plain dicts."""

    def __post_init__(self):
        self.validate()

    def validate(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            choices, check = f.metadata.get("choices"), f.metadata.get("check")
            if choices is not None and value not in choices:
                raise ValueError(f"unknown {_flag_name(f).lstrip('-')} {value!r}: use one of {', '.join(choices)}")
            if check is not None:
                setattr(self, f.name, check(value, _flag_name(f)))
        return self

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values, **overrides):
        """A config from a (checkpoint's) dict; keys this version does not know are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in dict(values, **overrides).items() if k in names})

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


# A checkpoint written before an option existed was trained without it: these values, not today's
# defaults, fill the options such a checkpoint does not name.
_BEFORE_OPTION = {"kmeans_init": False, "decay_warmup": 0, "estimator": "straight_through", "dead_code_threshold": 0.0,
                  "lookup": "l2", "lookup_dim": None, "simvq": False, "levels": None}


@dataclass
class ModelConfig(_Config):
    """The VQ-VAE's hyperparameters, flat; defaults are VQVAE's and its DEFAULT_QUANTIZER's (``build()``)."""
    num_hiddens: int = option(_VQVAE_DEFAULTS["num_hiddens"], "--num-hiddens",
                              "h, encoder/decoder width", positive_int, group="model")
    num_residual_hiddens: int = option(_VQVAE_DEFAULTS["num_residual_hiddens"], "--residual-hiddens",
                                       "residual width", positive_int, group="model")
    num_residual_layers: int = option(_VQVAE_DEFAULTS["num_residual_layers"], "--residual-layers",
                                      "residual blocks", non_negative_int, group="model")
    embedding_dim: int = option(_VQVAE_DEFAULTS["embedding_dim"], "--embedding-dim",
                                "D, code vector size", positive_int, group="model")
    num_embeddings: int = option(_VQVAE_DEFAULTS["num_embeddings"], "--num-embeddings",
                                 "K, codebook size", positive_int, group="model")
    commitment_cost: float = option(_VQVAE_DEFAULTS["commitment_cost"], "--commitment-cost",
                                    "beta, weight of the commitment loss", non_negative_float, group="model")
    decay: float = option(_VQVAE_DEFAULTS["decay"], "--decay",
                          "EMA decay of the codebook (0: a codebook loss instead; --ema sets 0.99)",
                          unit_interval, group="model")
    decay_warmup: int = option(_VQVAE_DEFAULTS["decay_warmup"], "--decay-warmup",
                               "EMA codebook: grow its averaging window from 1 step to 1/(1 - decay) steps over "
                               "this many steps (0: the fixed decay from the first step)", non_negative_int,
                               group="model")
    kmeans_init: bool = option(_VQVAE_DEFAULTS["kmeans_init"], "--kmeans-init",
                               "initialise the codebook by k-means++ on the first batch", boolean, group="model")
    estimator: str = option(_VQVAE_DEFAULTS["estimator"], "--estimator",
                            "gradient estimator through the quantiser", choices=tuple(ESTIMATORS), group="model")
    dead_code_threshold: float = option(_VQVAE_DEFAULTS["dead_code_threshold"], "--dead-code-threshold",
                                        "re-seed codes whose usage (an EMA of counts per batch) falls below this "
                                        "from the batch's encoder outputs (0: never)", non_negative_float,
                                        group="model")
    max_replacements: int = option(_VQVAE_DEFAULTS["max_replacements"], "--max-replacements",
                                   "at most this many dead codes re-seeded per step", positive_int, group="model")
    lookup: str = option(_VQVAE_DEFAULTS["lookup"], "--lookup", "nearest code by squared distance (l2) or by "
                                                                "cosine similarity of l2-normalised vectors",
                         choices=("l2", "cosine"), group="model")
    lookup_dim: int = option(_VQVAE_DEFAULTS["lookup_dim"], "--lookup-dim",
                             "search the codebook in this many dimensions through learned projections "
                             "(0: in D itself)", optional_dimension, group="model")
    simvq: bool = option(_VQVAE_DEFAULTS["simvq"], "--simvq", "codes = a frozen random codebook times a learned "
                                                             "linear map (SimVQ)", boolean, group="model")
    levels: object = option(_VQVAE_DEFAULTS["levels"], "--levels", "finite scalar quantisation with these levels "
                                                                  "per dimension, e.g. 8,8,8 (K = their product)",
                            levels_tuple, group="model")

    def validate(self):
        super().validate()
        check_parameter_count(vqvae_parameter_count(self), "this VQ-VAE")
        return self

    def build(self, in_channels, kernel="auto"):
        """The VQ-VAE these settings describe (float32, on the CPU)."""
        values = self.to_dict()
        quantizer = QuantizerOptions(**{k: values.pop(k) for k in QUANTIZER_OPTIONS})
        return VQVAE(in_channels=in_channels, kernel=kernel, quantizer=quantizer, **values)

    @classmethod
    def paper(cls, **changes):
        """The paper's model: the plain quantiser with a codebook loss, no option of minivq's on."""
        return cls(**{**dataclasses.asdict(PAPER_QUANTIZER), "decay": 0.0, **changes})

    @classmethod
    def from_checkpoint(cls, meta):
        """The model settings a checkpoint's meta record describes.

        Checkpoints of earlier versions kept the quantiser's options in their
        ``train`` record; they are read from there when ``model`` lacks them.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        legacy = {k: v for k, v in (meta.get("train") or {}).items() if k in names}
        return cls.from_dict(dict(_BEFORE_OPTION, **legacy, **meta["model"]))


@dataclass
class _RunConfig(_Config):
    """What both trainers' step loops take."""
    data: object = option(None, "--data", "dataset folder or file (default: $MINIVQ_DATA, else Debian's "
                                          "dataset-fashion-mnist)", group="common")
    device: str = option("cpu", "--device", "cpu, cuda or cuda:N", group="common")
    steps: int = option(2000, "--steps", "total training steps", positive_int)
    batch_size: int = option(128, "--batch", "batch size", positive_int)
    lr: float = option(1e-3, "--lr", "Adam learning rate", positive_float)
    seed: int = option(0, "--seed", "random seed", non_negative_int)
    resume: bool = option(False, "--resume", "continue from --out/checkpoint.npz", boolean)
    overwrite: bool = option(False, "--overwrite", "replace the run already in --out (its checkpoint, log and "
                                                   "images) instead of refusing to", boolean)
    eval_every: int = option(500, "--eval-every", "test-split evaluation period in steps", positive_int,
                             group="logging")
    eval_size: int = option(None, "--eval-size", "test images per evaluation (default: all)",
                               optional_positive_int, group="logging")
    checkpoint_every: int = option(500, "--checkpoint-every", "checkpoint period in steps", positive_int,
                                   group="logging")
    log_every: int = option(10, "--log-every", "metrics log period in steps", positive_int, group="logging")
    skip_nonfinite: bool = option(False, "--skip-nonfinite", "skip steps whose loss is NaN/inf (counted in the "
                                                             "log)", boolean, group="logging")
    progress: bool = option(True, None, "show a progress bar (the CLI's --no-progress turns it off)", boolean)
    workers: int = option(1, "--workers", "data-parallel workers in this process: N threads, each training on "
                                          "1/N of every batch with one BLAS thread, the step one process takes "
                                          "(CPU only; as many as cores is fastest: docs/distributed.md)",
                          positive_int)

    BEFORE_RECORDED = {}        # see TrainConfig

    def validate(self):
        super().validate()
        if self.workers > 1 and not str(self.device).startswith("cpu"):
            raise ValueError(f"--workers {self.workers} runs threads on the CPU, not on --device {self.device}: "
                             f"drop --workers (for several GPUs, start one process per GPU with mpiexec)")
        if self.workers > 1 and self.batch_size % self.workers:
            raise ValueError(f"--batch {self.batch_size} does not split evenly over --workers {self.workers}; "
                             f"choose a multiple of {self.workers}")
        return self


@dataclass
class TrainConfig(_RunConfig):
    """How ``minivq train`` runs; the model's own settings are a ``ModelConfig``."""
    out: str = option("runs/vqvae", "--out", "run folder: checkpoint, metrics.jsonl, PNG")
    dtype: str = option("float32", "--dtype", "floating-point type of the model and the batches",
                        dtype_name, choices=DTYPES)
    comm_backend: str = option("auto", "--comm", "under mpiexec with --device cuda: collectives through NCCL "
                                                 "(auto: where usable) or through MPI via host memory",
                               choices=COMM_BACKENDS)
    kernel: str = option("auto", "--kernel", "nearest-code backend", choices=KERNELS, group="model")
    lr_anneal: float = option(0.25, "--lr-anneal", "fraction of the planned run over which the learning rate "
                                                   "falls from --lr to 0 along a half cosine (0: --lr "
                                                   "throughout)", fraction)
    planned_steps: int = option(None, "--plan-steps", "the run length the learning-rate schedule is planned for "
                                                      "(default: --steps; a resumed run keeps its checkpoint's "
                                                      "plan unless this is given)", optional_positive_int)
    center_output: bool = option(True, None, "before the first step, shift the decoder's output bias so the "
                                             "untrained model's mean reconstruction of a batch of training images "
                                             "is their mean (the CLI's --no-center-output turns it off)", boolean)
    log_grads: bool = option(False, "--log-grads", "log per-layer gradient norms, the reconstruction and "
                                                   "commitment gradient norms at z_e, the codebook's gradient "
                                                   "norm and per-code usage", boolean, group="logging")
    compare_estimators: bool = option(False, "--compare-estimators", "on each logged batch, log the cosine and "
                                                                     "norm ratio (rotation / straight-through) of "
                                                                     "the two estimators' gradients at z_e",
                                      boolean, group="logging")

    # what a resumed run takes from its checkpoint, so the continuation is the same run
    FROM_CHECKPOINT = ("seed", "batch_size", "lr", "dtype", "lr_anneal")
    # what a checkpoint written before a setting was recorded ran with (not today's default)
    BEFORE_RECORDED = {"dtype": DTYPES[0], "lr_anneal": 0.0}

    def record(self):
        """The part of these settings a checkpoint keeps (its meta record's ``train``)."""
        return {"seed": self.seed, "batch_size": self.batch_size, "lr": self.lr, "data": self.data,
                "dtype": self.dtype, "center_output": self.center_output, "lr_anneal": self.lr_anneal,
                "planned_steps": self.planned_steps}


@dataclass
class PriorConfig(_RunConfig):
    """How ``minivq train-prior`` runs, with the gated PixelCNN's size; defaults are GatedPixelCNN's."""
    out: object = option(None, "--out", "run folder (default: prior/ beside the checkpoint)")
    batch_size: int = option(64, "--batch", "batch size", positive_int)
    conditional: bool = option(False, "--conditional", "condition on the class labels", boolean)
    channels: int = option(_PRIOR_DEFAULTS["channels"], "--channels", "channels per stack", positive_int,
                           group="model")
    num_layers: int = option(_PRIOR_DEFAULTS["num_layers"], "--layers", "gated layers", positive_int,
                             group="model")
    kernel_size: int = option(_PRIOR_DEFAULTS["kernel_size"], "--kernel-size", "odd kernel size", positive_int,
                              group="model")
    head_channels: int = option(_PRIOR_DEFAULTS["head_channels"], None, "width of the 1x1 output head",
                                positive_int, group="model")

    FROM_CHECKPOINT = ("seed", "batch_size", "lr", "conditional")

    def model(self):
        """The PixelCNN's size, as GatedPixelCNN takes it (num_embeddings and num_classes come from the data)."""
        return {"channels": self.channels, "num_layers": self.num_layers, "kernel_size": self.kernel_size,
                "head_channels": self.head_channels}

    def record(self):
        return {"seed": self.seed, "batch_size": self.batch_size, "lr": self.lr, "data": self.data,
                "conditional": self.conditional}


def cli_fields(cls):
    """The fields of ``cls`` that are command-line options, in declaration order."""
    return [f for f in dataclasses.fields(cls) if f.metadata.get("flag")]
