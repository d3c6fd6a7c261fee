"""The ``minivq`` command (also ``python -m minivq``).

Every error a user can cause (bad flags, a missing or malformed dataset or
checkpoint, a GPU asked for where none exists, an unwritable folder) ends as
one line on stderr and exit code 2; a numerical failure during training exits
with 3. Set MINIVQ_DEBUG=1 (or true, yes) to see the full traceback instead.
A usage error prints a short usage line and the error (exit 2); Ctrl-C prints
``minivq <command>: interrupted`` (exit 130).

Started by ``mpiexec -n P`` (``minivq train`` only), the processes train one
model data-parallel (``minivq.distributed``). An error that every rank meets
alike is printed once, by rank 0, and every rank exits with its code; an
error on some ranks only is printed once (by rank 0 when it can) and ends the
whole job through ``MPI_Abort`` with that code.
"""
import argparse
import contextlib
import io
import json
import os
import sys
import traceback
import warnings

import numpy as np

from . import backend, distributed, workers
from .checkpoint import load_vqvae
from .config import (QUANTIZER_OPTIONS, ModelConfig, PriorConfig, TrainConfig, cli_fields, non_negative_int,
                     positive_float,
                     positive_int)
from .data import load_dataset
from .evaluation import evaluate, save_reconstructions
from .images import MAX_GRID_IMAGES, save_grid
from .io import check_output_path
from .loop import NonFiniteError
from .prior import sample_images, train_prior
from .runlog import CHECKPOINT, METRICS, RECONSTRUCTIONS
from .train import check_device, train_vqvae


def _number(kind, check=None):
    """An argparse type: an int or a float, then ``check`` (one of minivq.config's validators) if given."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if check is not None:
            try:
                checked = check(value, "value")
            except ValueError as exc:
                raise argparse.ArgumentTypeError(str(exc)) from None
            # a value the check maps to None (--lookup-dim 0: none) stays as typed, since None means
            # "not given" here; _given maps it
            value = value if checked is None else checked
        return value
    return parse


def _add_options(parser, cls, groups, only=None):
    """One option per command-line field of the config class ``cls`` (``minivq.config``).

    Every option defaults to None, meaning "not given": the config's own default
    applies, and a resumed run can tell a flag the user gave from one they did not.
    The help shows the config's default, and its choices where it has them.
    """
    for f in cli_fields(cls):
        meta = f.metadata
        if only is not None and meta.get("group") not in only:
            continue
        target = groups.get(meta.get("group"), parser)
        shown = f.type is not bool and f.default is not None
        text = meta["help"] + (f" (default: {f.default})" if shown else "")
        if f.type is bool:
            target.add_argument(meta["flag"], dest=f.name, action="store_true", default=None, help=meta["help"])
            continue
        kind = _number(f.type, meta.get("check")) if f.type in (int, float) else str
        metavar = "{" + ",".join(meta["choices"]) + "}" if meta.get("choices") else \
            {int: "N", float: "X"}.get(f.type)
        target.add_argument(meta["flag"], dest=f.name, type=kind, default=None, metavar=metavar, help=text)


def _given(args, cls):
    """{field: value} of the options of ``cls`` given on the command line, as the config holds them (a value
    given may stand for None: ``--lookup-dim 0`` is ``lookup_dim=None``)."""
    given = {}
    for f in cli_fields(cls):
        value = getattr(args, f.name, None)
        if value is not None:
            check = f.metadata.get("check") if f.type in (int, float) else None
            given[f.name] = check(value, f.metadata["flag"]) if check is not None else value
    return given


def _add_common(p):
    _add_options(p, TrainConfig, {}, only=("common",))


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is two lines: a short usage line and the error (not the whole usage block)."""

    def error(self, message):
        self.exit(2, f"usage: {self.prog} ... (see {self.prog} --help)\n{self.prog}: error: "
                     f"{' '.join(message.split())}\n")


def build_parser():
    parser = _Parser(prog="minivq", description="VQ-VAE training, evaluation and sampling "
                                                                "on a from-scratch NumPy/CuPy engine.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    t = sub.add_parser("train", help="train a VQ-VAE", description="Train a VQ-VAE on an image dataset.")
    groups = {"model": t.add_argument_group("model (on --resume, taken from the checkpoint)"),
              "logging": t.add_argument_group("logging and checkpoints")}
    _add_options(t, TrainConfig, groups)
    _add_options(t, ModelConfig, groups)
    groups["model"].add_argument("--paper-quantizer", action="store_true",
                                 help="the paper's quantiser: a codebook loss instead of EMA updates (--decay 0), "
                                      "squared-distance lookup in D, no dead-code replacement, no k-means "
                                      "(flags given beside it still apply)")
    groups["model"].add_argument("--ema", action="store_true", help="EMA codebook updates (--decay 0.99; the "
                                                                   "default, kept for older command lines)")
    groups["model"].add_argument("--restart-after", default=None, help=argparse.SUPPRESS)  # replaced: see _model_choices
    t.add_argument("--no-center-output", action="store_true",
                   help="keep the decoder's random output bias at the start (by default it is shifted so the "
                        "untrained model's mean reconstruction of a batch of training images is their mean)")
    groups["logging"].add_argument("--no-progress", action="store_true", help="no progress bar")

    e = sub.add_parser("eval", help="test-split metrics of a checkpoint, as JSON on stdout")
    e.add_argument("checkpoint")
    _add_common(e)
    e.add_argument("--eval-size", type=_number(int, positive_int), default=None,
                   help="test images to use (default: all)")

    c = sub.add_parser("reconstruct", help="a PNG of test images above their reconstructions")
    c.add_argument("checkpoint")
    _add_common(c)
    c.add_argument("--out", required=True, help="PNG file to write")
    c.add_argument("--n", type=_number(int, positive_int), default=32,
                   help=f"number of images, at most {MAX_GRID_IMAGES} (default: 32)")

    pr = sub.add_parser("train-prior", help="fit a gated PixelCNN prior to a trained VQ-VAE's codes",
                        description="Encode the dataset with a trained VQ-VAE (cached beside the checkpoint) "
                                    "and fit a gated PixelCNN to the code grids.")
    pr.add_argument("checkpoint", help="the VQ-VAE checkpoint (from minivq train)")
    groups = {"model": pr.add_argument_group("the PixelCNN (on --resume, taken from the checkpoint)"),
              "logging": pr.add_argument_group("logging and checkpoints")}
    _add_options(pr, PriorConfig, groups)
    groups["logging"].add_argument("--no-progress", action="store_true", help="no progress bar")

    s = sub.add_parser("sample", help="images from a trained prior, decoded by its VQ-VAE")
    s.add_argument("checkpoint", help="the prior checkpoint (from minivq train-prior)")
    s.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    s.add_argument("--n", type=_number(int, positive_int), default=64,
                   help=f"number of images, at most {MAX_GRID_IMAGES} (default: 64)")
    s.add_argument("--class", dest="label", type=_number(int, non_negative_int), default=None,
                   help="class to sample (class-conditional priors)")
    s.add_argument("--temperature", type=_number(float, positive_float), default=1.0, help="softmax temperature (default: 1.0)")
    s.add_argument("--seed", type=_number(int, non_negative_int), default=0, help="random seed (0): same seed, same images")
    s.add_argument("--out", required=True, help="PNG file to write")

    g = sub.add_parser("graph", help="draw one training step's backward graph (needs matplotlib: .[viz])",
                       description="Draw the backward graph of one training step of a checkpoint's VQ-VAE on a "
                                   "batch of its dataset: each op with the gradient norm it received, each "
                                   "edge with the norm it passes, the cut ones dashed red.")
    g.add_argument("checkpoint", help="a VQ-VAE checkpoint (from minivq train)")
    _add_common(g)
    g.add_argument("--out", required=True, help="PNG or SVG file to write (by its extension)")
    g.add_argument("--batch", type=_number(int, positive_int), default=8, help="batch size (default: 8)")
    g.add_argument("--expand", action="store_true", help="draw every op (default: a residual block is one box)")

    pl = sub.add_parser("plot", help="PNG curves from metrics.jsonl logs, overlaid (needs matplotlib: .[viz])")
    pl.add_argument("metrics", nargs="+", help="one or more metrics.jsonl written by train or train-prior "
                                               "(several are overlaid, one colour per run folder)")
    pl.add_argument("--out", required=True, help="PNG file to write")
    return parser


def _train_config(args):
    given = _given(args, TrainConfig)
    if args.no_progress:
        given["progress"] = False
    if args.no_center_output:
        given["center_output"] = False
    return TrainConfig.from_dict(given)


def _model_choices(args):
    """The model settings given on the command line: explicit flags over --paper-quantizer's (or --ema's) values."""
    if args.restart_after is not None:
        raise ValueError("--restart-after (re-seed every code unused for N steps at once) was replaced by "
                         "--dead-code-threshold X (re-seed codes whose usage EMA falls below X, at most "
                         "--max-replacements a step); see docs/codebook.md")
    given = _given(args, ModelConfig)
    base = {}
    if args.paper_quantizer or "levels" in given or "simvq" in given:
        # the paper's quantiser, and FSQ and SimVQ (which take no EMA codebook), start from every option off
        paper = ModelConfig.paper().to_dict()
        base = {k: paper[k] for k in ("decay", *QUANTIZER_OPTIONS)}
    if args.ema:
        base["decay"] = 0.99
    return dict(base, **given)


def cmd_train(args):
    final = train_vqvae(_train_config(args), _model_choices(args), comm=args.comm_world,
                        explicit=set(_given(args, TrainConfig)))
    if args.comm_world.rank == 0:
        out = args.out if args.out is not None else TrainConfig.out
        print(json.dumps(final))
        print(f"wrote {os.path.join(out, CHECKPOINT)}, {METRICS} and {RECONSTRUCTIONS} in {out}", file=sys.stderr)


def _load_for_eval(args):
    device = check_device(args.device if args.device is not None else TrainConfig.device)
    model, meta = load_vqvae(args.checkpoint, device)
    data = args.data if args.data is not None else meta["train"].get("data")
    test_set = load_dataset(data, split="test")
    if test_set.num_channels != model.in_channels:
        raise ValueError(f"the checkpoint's model takes {model.in_channels}-channel images, "
                         f"the dataset {test_set.name} has {test_set.num_channels}")
    return model, meta, test_set, device


def cmd_eval(args):
    model, meta, test_set, device = _load_for_eval(args)
    with workers.one_process(device, next(iter(model.parameters())).dtype):    # as training evaluates
        metrics = evaluate(model, test_set, meta["data_variance"], device, limit=args.eval_size)
    print(json.dumps(dict(metrics, step=meta["step"], checkpoint=args.checkpoint)))


def cmd_reconstruct(args):
    _check_png_target(args.out)
    model, meta, test_set, device = _load_for_eval(args)
    save_reconstructions(model, test_set, args.out, device, count=args.n)
    print(f"wrote {args.out}", file=sys.stderr)


def cmd_train_prior(args):
    given = _given(args, PriorConfig)
    if args.no_progress:
        given["progress"] = False
    print(json.dumps(train_prior(args.checkpoint, PriorConfig.from_dict(given), explicit=set(given))))


def cmd_sample(args):
    _check_png_target(args.out)
    images = sample_images(args.checkpoint, n=args.n, label=args.label, temperature=args.temperature,
                           seed=args.seed, device=args.device)
    save_grid(images, args.out)
    print(f"wrote {args.out}", file=sys.stderr)


def cmd_plot(args):
    from .plot import plot_metrics     # matplotlib, an optional extra: imported only for this command
    _check_png_target(args.out)
    for path in args.metrics:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no such metrics log: {path}")
    plot_metrics(args.metrics, args.out)
    print(f"wrote {args.out}", file=sys.stderr)


def cmd_graph(args):
    from .graph_draw import draw_checkpoint     # matplotlib, an optional extra: imported only for this command
    _check_png_target(args.out)
    device = check_device(args.device if args.device is not None else TrainConfig.device)
    draw_checkpoint(args.checkpoint, args.out, data=args.data, device=device, batch_size=args.batch,
                    collapse=() if args.expand else ("Residual",))
    print(f"wrote {args.out}", file=sys.stderr)


def _check_png_target(path):
    """Before any work: the PNG's folder exists and is writable, and ``path`` is not a link, FIFO, device ..."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"cannot write {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise ValueError(f"cannot write {path}: folder {folder} is not writable")
    check_output_path(path)


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "reconstruct": cmd_reconstruct,
            "train-prior": cmd_train_prior, "sample": cmd_sample, "plot": cmd_plot, "graph": cmd_graph}


def _report(comm, head, message, code, collective):
    """Print ``head: message`` on stderr and return ``code``; under mpiexec, once for the whole job.

    ``collective``: every rank met this error at the same point, so rank 0 prints
    it and every rank returns. Otherwise, with several ranks, the job ends here
    through the communicator's ``fail``: the line, naming the failing rank, is
    printed by rank 0 when it can be reached, and every rank exits with ``code``.
    """
    if comm is not None and comm.size > 1 and not collective:
        comm.fail(f"{head}: {comm.where()}: {message}", code)
    if comm is not None and comm.size > 1:
        printer = comm.rank == 0
    else:   # one process; or none known yet (the launch failed alike everywhere): the launcher's rank 0 prints
        printer = comm is not None or (distributed.env_rank() or 0) == 0
    if printer:
        print(f"{head}: {message}", file=sys.stderr, flush=True)
    return code


def _debug():
    """MINIVQ_DEBUG=1 (or true, yes) shows tracebacks; unset, 0, false, no or anything else does not."""
    return os.environ.get("MINIVQ_DEBUG", "").strip().lower() in ("1", "true", "yes")


def main(argv=None):
    parser = build_parser()
    quiet = (distributed.env_rank() or 0) != 0      # under mpiexec, usage errors are printed by rank 0 alone
    try:
        with contextlib.redirect_stderr(io.StringIO()) if quiet else contextlib.nullcontext():
            args = parser.parse_args(argv)
    except KeyboardInterrupt:
        return _report(None, "minivq", "interrupted", 130, collective=True)
    debug = _debug()
    comm = None
    try:
        comm = distributed.from_environment()
        if comm.size > 1 and args.command != "train":
            raise distributed.CollectiveError(f"only `minivq train` runs on several processes; start "
                                              f"`minivq {args.command}` without mpiexec")
        args.comm_world = comm
        backend.keep_freed_host_memory()    # a step reuses the last step's freed memory: no fresh pages
        # NumPy's floating-point warnings never reach the terminal: a NaN or inf that matters is
        # reported by the checks (exit 3 in training, a ValueError elsewhere)
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            COMMANDS[args.command](args)
    except NonFiniteError as exc:
        if debug and (comm is None or comm.size == 1):
            raise
        return _report(comm, f"minivq {args.command}: error", exc, 3, collective=exc.collective)
    except KeyboardInterrupt as exc:
        message = str(exc) if str(exc).startswith("interrupted") else "interrupted"
        return _report(comm, f"minivq {args.command}", message, 130, collective=False)
    except (ValueError, TypeError, OSError, RuntimeError, MemoryError) as exc:
        if debug:
            if comm is None or comm.size == 1:
                raise
            traceback.print_exc()
        message = " ".join(str(exc).split()) or type(exc).__name__
        if isinstance(exc, MemoryError):
            message = f"out of memory ({message}); choose smaller sizes, a smaller --batch or --n"
        return _report(comm, f"minivq {args.command}: error", message, 2,
                       collective=isinstance(exc, distributed.CollectiveError))
    except Exception:
        if comm is None or comm.size == 1:
            raise
        traceback.print_exc()       # a bug: the traceback, then the whole job ends
        return _report(comm, f"minivq {args.command}: error",
                       f"unexpected {sys.exc_info()[0].__name__} (traceback above)", 1, collective=False)
    finally:
        if comm is not None:
            comm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
