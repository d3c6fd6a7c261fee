"""The ``minivq`` command (also ``python -m minivq``).

Every error a user can cause (bad flags, a missing or malformed dataset or
checkpoint, a GPU asked for where none exists, an unwritable folder) ends as
one line on stderr and exit code 2; a numerical failure during training exits
with 3. Set MINIVQ_DEBUG=1 to see the full traceback instead.

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


def _int_at_least(minimum, what):
    """An argparse type: an integer >= ``minimum``, with a one-line error otherwise."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what} integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {what} integer, got {value}")
        return value
    return parse


_positive_int = _int_at_least(1, "a positive")
_non_negative_int = _int_at_least(0, "a non-negative")


def _positive_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text}")
    return value


def _add_common(p):
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--data", default=None,
                   help="dataset folder or file (default: $MINIVQ_DATA, else Debian's dataset-fashion-mnist)")


def build_parser():
    parser = argparse.ArgumentParser(prog="minivq", description="VQ-VAE training, evaluation and sampling "
                                                                "on a from-scratch NumPy/CuPy engine.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    t = sub.add_parser("train", help="train a VQ-VAE", description="Train a VQ-VAE on an image dataset.")
    _add_common(t)
    t.add_argument("--out", default="runs/vqvae", help="run folder: checkpoint, metrics.jsonl, PNG (default: runs/vqvae)")
    t.add_argument("--steps", type=_positive_int, default=2000, help="total training steps (default: 2000)")
    t.add_argument("--batch", type=_positive_int, default=128, help="batch size (default: 128)")
    t.add_argument("--lr", type=_positive_float, default=1e-3, help="Adam learning rate (default: 1e-3)")
    t.add_argument("--seed", type=_non_negative_int, default=0, help="random seed (default: 0)")
    t.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.npz")
    t.add_argument("--dtype", default="float32", choices=["float32", "float64"],
                   help="floating-point type of the model and the batches (default: float32)")
    t.add_argument("--comm", default="auto", choices=["auto", "mpi", "nccl"],
                   help="under mpiexec with --device cuda: collectives through NCCL (auto: where usable) or "
                        "through MPI via host memory (default: auto)")
    g = t.add_argument_group("model (defaults: the paper's; on --resume, taken from the checkpoint)")
    g.add_argument("--num-hiddens", type=_positive_int, default=None, help="h, encoder/decoder width (128)")
    g.add_argument("--residual-hiddens", type=_positive_int, default=None, help="residual width (32)")
    g.add_argument("--residual-layers", type=_non_negative_int, default=None, help="residual blocks (2)")
    g.add_argument("--embedding-dim", type=_positive_int, default=None, help="D, code vector size (64)")
    g.add_argument("--num-embeddings", type=_positive_int, default=None, help="K, codebook size (512)")
    g.add_argument("--commitment-cost", type=float, default=None, help="beta (0.25)")
    g.add_argument("--ema", action="store_true", help="EMA codebook updates (decay 0.99) instead of a codebook loss")
    g.add_argument("--decay", type=float, default=None, help="EMA decay (implies --ema; 0.99)")
    g.add_argument("--restart-after", type=_non_negative_int, default=0,
                   help="re-seed codes unused for this many steps from the batch (0: never)")
    g.add_argument("--kmeans-init", action="store_true", help="initialise the codebook by k-means++ on the first batch")
    g.add_argument("--kernel", default="auto", help="nearest-code backend: auto, numpy, numba, cupy")
    g.add_argument("--estimator", default="straight_through", choices=["straight_through", "rotation"],
                   help="gradient estimator through the quantiser (straight_through)")
    r = t.add_argument_group("logging and checkpoints")
    r.add_argument("--eval-every", type=_positive_int, default=500, help="test-split evaluation period (500)")
    r.add_argument("--eval-size", type=_positive_int, default=None, help="test images per evaluation (all)")
    r.add_argument("--checkpoint-every", type=_positive_int, default=500, help="checkpoint period (500)")
    r.add_argument("--log-every", type=_positive_int, default=10, help="metrics log period in steps (10)")
    r.add_argument("--skip-nonfinite", action="store_true", help="skip steps whose loss is NaN/inf (counted in the log)")
    r.add_argument("--log-grads", action="store_true",
                   help="log per-layer gradient norms and the recon/commitment split of the encoder's gradient")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")

    e = sub.add_parser("eval", help="test-split metrics of a checkpoint, as JSON on stdout")
    e.add_argument("checkpoint")
    _add_common(e)
    e.add_argument("--eval-size", type=_positive_int, default=None, help="test images to use (all)")

    c = sub.add_parser("reconstruct", help="a PNG of test images above their reconstructions")
    c.add_argument("checkpoint")
    _add_common(c)
    c.add_argument("--out", required=True, help="PNG file to write")
    c.add_argument("--n", type=_positive_int, default=32, help="number of images (32)")

    pr = sub.add_parser("train-prior", help="fit a gated PixelCNN prior to a trained VQ-VAE's codes",
                        description="Encode the dataset with a trained VQ-VAE (cached beside the checkpoint) "
                                    "and fit a gated PixelCNN to the code grids.")
    pr.add_argument("checkpoint", help="the VQ-VAE checkpoint (from minivq train)")
    _add_common(pr)
    pr.add_argument("--out", default=None, help="run folder (default: prior/ beside the checkpoint)")
    pr.add_argument("--steps", type=_positive_int, default=2000, help="training steps (2000)")
    pr.add_argument("--batch", type=_positive_int, default=64, help="batch size (64)")
    pr.add_argument("--lr", type=_positive_float, default=1e-3, help="Adam learning rate (1e-3)")
    pr.add_argument("--seed", type=_non_negative_int, default=0, help="random seed (0)")
    pr.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.npz")
    pr.add_argument("--conditional", action="store_true", help="condition on the class labels")
    pr.add_argument("--channels", type=_positive_int, default=None, help="channels per stack (32)")
    pr.add_argument("--layers", type=_positive_int, default=None, help="gated layers (6)")
    pr.add_argument("--kernel-size", type=_positive_int, default=None, help="odd kernel size (5)")
    pr.add_argument("--eval-every", type=_positive_int, default=500, help="test NLL period (500)")
    pr.add_argument("--eval-size", type=_positive_int, default=None, help="test grids per evaluation (all)")
    pr.add_argument("--checkpoint-every", type=_positive_int, default=500, help="checkpoint period (500)")
    pr.add_argument("--log-every", type=_positive_int, default=10, help="metrics log period (10)")
    pr.add_argument("--skip-nonfinite", action="store_true", help="skip steps whose loss is NaN/inf")
    pr.add_argument("--no-progress", action="store_true", help="no progress bar")

    s = sub.add_parser("sample", help="images from a trained prior, decoded by its VQ-VAE")
    s.add_argument("checkpoint", help="the prior checkpoint (from minivq train-prior)")
    s.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    s.add_argument("--n", type=_positive_int, default=64, help="number of images (64)")
    s.add_argument("--class", dest="label", type=_non_negative_int, default=None,
                   help="class to sample (class-conditional priors)")
    s.add_argument("--temperature", type=_positive_float, default=1.0, help="softmax temperature (1.0)")
    s.add_argument("--seed", type=_non_negative_int, default=0, help="random seed (0): same seed, same images")
    s.add_argument("--out", required=True, help="PNG file to write")

    pl = sub.add_parser("plot", help="PNG curves from a metrics.jsonl (needs matplotlib: .[viz])")
    pl.add_argument("metrics", help="a metrics.jsonl written by train or train-prior")
    pl.add_argument("--out", required=True, help="PNG file to write")
    return parser


def _model_flags(args):
    decay = args.decay if args.decay is not None else (0.99 if args.ema else None)
    return {"num_hiddens": args.num_hiddens, "num_residual_hiddens": args.residual_hiddens,
            "num_residual_layers": args.residual_layers, "embedding_dim": args.embedding_dim,
            "num_embeddings": args.num_embeddings, "commitment_cost": args.commitment_cost, "decay": decay}


def cmd_train(args):
    from .train import train_vqvae
    final = train_vqvae(
        args.out, data=args.data, steps=args.steps, batch_size=args.batch, lr=args.lr, seed=args.seed,
        device=args.device, resume=args.resume, eval_every=args.eval_every, eval_size=args.eval_size,
        checkpoint_every=args.checkpoint_every, log_every=args.log_every, skip_nonfinite=args.skip_nonfinite,
        restart_after=args.restart_after, kmeans_init=args.kmeans_init, kernel=args.kernel,
        estimator=args.estimator, log_grads=args.log_grads, progress=not args.no_progress,
        model_config=_model_flags(args), dtype=args.dtype, comm=args.comm_world, comm_backend=args.comm)
    if args.comm_world.rank == 0:
        print(json.dumps(final))
        print(f"wrote {os.path.join(args.out, 'checkpoint.npz')}, metrics.jsonl and reconstructions.png "
              f"in {args.out}", file=sys.stderr)


def _load_for_eval(args):
    from .data import load_dataset
    from .train import check_device, load_vqvae
    device = check_device(args.device)
    model, meta = load_vqvae(args.checkpoint, device)
    data = args.data if args.data is not None else meta["train"].get("data")
    test_set = load_dataset(data, split="test")
    if test_set.num_channels != model.in_channels:
        raise ValueError(f"the checkpoint's model takes {model.in_channels}-channel images, "
                         f"the dataset {test_set.name} has {test_set.num_channels}")
    return model, meta, test_set, device


def cmd_eval(args):
    from .train import evaluate
    model, meta, test_set, device = _load_for_eval(args)
    metrics = evaluate(model, test_set, meta["data_variance"], device, limit=args.eval_size)
    print(json.dumps(dict(metrics, step=meta["step"], checkpoint=args.checkpoint)))


def cmd_reconstruct(args):
    from .train import save_reconstructions
    _check_png_target(args.out)
    model, meta, test_set, device = _load_for_eval(args)
    save_reconstructions(model, test_set, args.out, device, count=args.n)
    print(f"wrote {args.out}", file=sys.stderr)


def cmd_train_prior(args):
    from .train import train_prior
    final = train_prior(
        args.checkpoint, out=args.out, data=args.data, steps=args.steps, batch_size=args.batch, lr=args.lr,
        seed=args.seed, device=args.device, resume=args.resume, eval_every=args.eval_every,
        eval_size=args.eval_size, checkpoint_every=args.checkpoint_every, log_every=args.log_every,
        skip_nonfinite=args.skip_nonfinite, conditional=args.conditional, progress=not args.no_progress,
        prior_config={"channels": args.channels, "num_layers": args.layers, "kernel_size": args.kernel_size})
    print(json.dumps(final))


def cmd_sample(args):
    from .images import save_grid
    from .train import sample_images
    _check_png_target(args.out)
    images = sample_images(args.checkpoint, n=args.n, label=args.label, temperature=args.temperature,
                           seed=args.seed, device=args.device)
    save_grid(images, args.out)
    print(f"wrote {args.out}", file=sys.stderr)


def cmd_plot(args):
    from .plot import plot_metrics
    _check_png_target(args.out)
    if not os.path.isfile(args.metrics):
        raise FileNotFoundError(f"no such metrics log: {args.metrics}")
    plot_metrics(args.metrics, args.out)
    print(f"wrote {args.out}", file=sys.stderr)


def _check_png_target(path):
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"cannot write {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise ValueError(f"cannot write {path}: folder {folder} is not writable")


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "reconstruct": cmd_reconstruct,
            "train-prior": cmd_train_prior, "sample": cmd_sample, "plot": cmd_plot}


def _report(comm, head, message, code, collective):
    """Print ``head: message`` on stderr and return ``code``; under mpiexec, once for the whole job.

    ``collective``: every rank met this error at the same point, so rank 0 prints
    it and every rank returns. Otherwise, with several ranks, the job ends here
    through the communicator's ``fail``: the line, naming the failing rank, is
    printed by rank 0 when it can be reached, and every rank exits with ``code``.
    """
    from . import distributed
    if comm is not None and comm.size > 1 and not collective:
        comm.fail(f"{head}: {comm.where()}: {message}", code)
    if comm is not None and comm.size > 1:
        printer = comm.rank == 0
    else:   # one process; or none known yet (the launch failed alike everywhere): the launcher's rank 0 prints
        printer = comm is not None or (distributed.env_rank() or 0) == 0
    if printer:
        print(f"{head}: {message}", file=sys.stderr, flush=True)
    return code


def main(argv=None):
    from . import distributed
    parser = build_parser()
    quiet = (distributed.env_rank() or 0) != 0      # under mpiexec, usage errors are printed by rank 0 alone
    with contextlib.redirect_stderr(io.StringIO()) if quiet else contextlib.nullcontext():
        args = parser.parse_args(argv)
    from .train import NonFiniteError
    debug = bool(os.environ.get("MINIVQ_DEBUG"))
    comm = None
    try:
        comm = distributed.from_environment()
        if comm.size > 1 and args.command != "train":
            raise distributed.CollectiveError(f"only `minivq train` runs on several processes; start "
                                              f"`minivq {args.command}` without mpiexec")
        args.comm_world = comm
        COMMANDS[args.command](args)
    except NonFiniteError as exc:
        if debug and (comm is None or comm.size == 1):
            raise
        return _report(comm, f"minivq {args.command}: error", exc, 3, collective=True)
    except KeyboardInterrupt as exc:
        return _report(comm, f"minivq {args.command}", exc or "interrupted", 130, collective=False)
    except (ValueError, TypeError, OSError, RuntimeError) as exc:
        if debug:
            if comm is None or comm.size == 1:
                raise
            traceback.print_exc()
        message = " ".join(str(exc).split()) or type(exc).__name__
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
