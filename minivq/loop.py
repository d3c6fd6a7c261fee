"""The step loop both trainers share: step, check for NaN/inf, log, evaluate, checkpoint."""
import math
import os
import time

from .distributed import GradientAverager
from .runlog import METRICS, MetricsLog, Progress


class NonFiniteError(RuntimeError):
    """Training produced a NaN or an infinity."""


def run_steps(compute, optimizer, start, run, out, checkpoint, evaluate_now, grad_report=None, comm=None):
    """Train from step ``start`` to ``run.steps``; returns the number of steps skipped as non-finite.

    ``run`` is the trainer's config (``minivq.config``: steps, resume, eval_every,
    checkpoint_every, log_every, skip_nonfinite, progress); ``out`` the run folder.
    ``compute(step)`` builds the graph of one step and returns ``(loss, checked,
    extra, bar_text)``: ``checked`` holds the float loss terms that must be
    finite, ``extra`` more fields for the log. A non-finite term stops training
    (``NonFiniteError``, the last checkpoint kept) or, with ``skip_nonfinite``,
    skips the step and counts it. ``grad_report()``, if given, is called after
    backward on logged steps and returns more fields for the log.
    ``checkpoint(step)`` and ``evaluate_now()`` are the trainer's.

    With a communicator of several ranks, ``compute`` returns metrics already
    combined over the ranks (so all of them take the same decisions), gradients
    are averaged over the ranks after backward, and only rank 0 writes the log
    and shows progress; ``evaluate_now`` and ``checkpoint`` are called on every rank.
    """
    parallel = comm is not None and comm.size > 1
    root = not parallel or comm.rank == 0
    average_gradients = GradientAverager(comm, optimizer.params) if parallel else None
    comm_mark = comm.seconds if parallel else 0.0
    log = MetricsLog(os.path.join(out, METRICS), resume_step=start if run.resume else None, enabled=root)
    steps = run.steps
    bar = Progress(steps, start, enabled=run.progress and root)
    skipped, last_good, step = 0, start, start
    t_start = time.perf_counter()
    try:
        for step in range(start + 1, steps + 1):
            loss, checked, extra, text = compute(step)
            bad = [k for k, v in checked.items() if not math.isfinite(v)]
            optimizer.zero_grad()
            if bad and not run.skip_nonfinite:
                raise NonFiniteError(
                    f"step {step}: {', '.join(bad)} became non-finite ({checked}); the checkpoint of step "
                    f"{last_good} is kept in {out}; lower --lr, or pass --skip-nonfinite to skip such steps")
            logged = step % run.log_every == 0 or step == steps
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
                if run.skip_nonfinite:
                    record["skipped_nonfinite"] = skipped
                if parallel and comm.timed:     # rank 0's time in collectives since the last record
                    record["comm_seconds"] = round(comm.seconds - comm_mark, 6)
                    comm_mark = comm.seconds
                log.write(record)
            bar.update(step, text)
            if step % run.eval_every == 0 and step != steps:
                log.write(dict(evaluate_now(), step=step, split="test"))
            if step % run.checkpoint_every == 0 or step == steps:
                checkpoint(step)
                last_good = step
    except KeyboardInterrupt:
        # The interrupted step may have half-updated the parameters: keep the last checkpoint instead.
        bar.close()
        raise KeyboardInterrupt(f"interrupted at step {step}; the checkpoint of step {last_good} is in {out}, "
                                f"continue with --resume") from None
    bar.close()
    return skipped
