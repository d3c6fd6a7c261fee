"""The step loop both trainers share: step, check for NaN/inf, log, evaluate, checkpoint."""
import math
import os
import time

import numpy as np

from . import backend
from .distributed import GradientAverager
from .kernels import NonFiniteError as NonFiniteInput
from .runlog import METRICS, MetricsLog, Progress


class NonFiniteError(RuntimeError):
    """Training produced a NaN or an infinity (``collective``: every rank met it alike)."""

    def __init__(self, message, collective=True):
        super().__init__(message)
        self.collective = collective


def _finite_sum(arrays):
    """Whether every array is finite: one sum of their sums (a NaN or an inf anywhere makes it non-finite)."""
    sums = [a.sum(dtype=np.float64) for a in arrays if a is not None and a.size]
    return not sums or bool(np.isfinite(float(backend.to_numpy(sum(sums[1:], sums[0])))))


def _state_finite(model_state):
    return _finite_sum([a for a in model_state.values() if a.dtype.kind == "f"])


def run_steps(compute, optimizer, start, run, out, checkpoint, evaluate_now, grad_report=None, comm=None,
              model_state=None):
    """Train from step ``start`` to ``run.steps``, then evaluate; returns the final test record (also logged).

    ``run`` is the trainer's config (``minivq.config``: steps, resume, eval_every,
    checkpoint_every, log_every, skip_nonfinite, progress); ``out`` the run folder.
    ``compute(step)`` builds the graph of one step and returns ``(loss, checked,
    extra, bar_text)``: ``checked`` holds the float loss terms that must be
    finite, ``extra`` more fields for the log. A non-finite value anywhere in a
    step is a divergence: a loss term, the quantiser's input (the nearest-code
    search refuses NaN and inf) or a gradient. It stops training
    (``NonFiniteError``, naming the step and where; the last checkpoint kept, if
    there is one) or, with ``skip_nonfinite``, skips the step and counts it,
    unless the model's own state (``model_state()``, its parameters and buffers)
    is no longer finite, which no skipping can mend. A NaN or inf met while
    evaluating (``evaluate_now()``) is a divergence too. ``grad_report()``, if given,
    is called after backward on logged steps and returns more fields for the log.
    ``checkpoint(step)`` and ``evaluate_now()`` are the trainer's. NumPy's
    floating-point warnings are silenced inside a step: the checks above say more.

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
    skipped, step = 0, start
    last_good = start if run.resume else None      # the step of the checkpoint in ``out``, if there is one

    def diverged(step, where):
        kept = f"the checkpoint of step {last_good} is kept in {out}" if last_good is not None else \
            f"no checkpoint was written (the first was due at step {min(run.checkpoint_every, steps)})"
        skip = "" if run.skip_nonfinite else ", or pass --skip-nonfinite to skip such steps"
        return NonFiniteError(f"step {step}: {where}; {kept}; if the learning rate is too high, lower --lr{skip}")

    def input_not_finite(step, exc, doing=""):
        """Where a NaN/inf in the quantiser's input was met; under several ranks, the end of the job."""
        where = f"{doing}the quantiser's input became non-finite ({exc})"
        if parallel:                     # this rank alone: the ranks cannot skip together
            raise NonFiniteError(f"step {step}: {where}", collective=False) from None
        return where

    def evaluate(step):
        """The test metrics at ``step``; a NaN or inf met on the way is a divergence too."""
        with np.errstate(all="ignore"):
            try:
                metrics = evaluate_now()
            except NonFiniteInput as exc:
                raise diverged(step, input_not_finite(step, exc, "evaluating, ")) from None
        bad = [k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)]
        if bad:
            raise diverged(step, f"evaluating, {', '.join(bad)} became non-finite ({metrics})")
        return dict(metrics, step=step, split="test")

    t_start = time.perf_counter()
    try:
        for step in range(start + 1, steps + 1):
            with np.errstate(all="ignore"):
                try:
                    loss, checked, extra, text = compute(step)
                    bad = [k for k, v in checked.items() if not math.isfinite(v)]
                    where = f"{', '.join(bad)} became non-finite ({checked})" if bad else None
                except NonFiniteInput as exc:       # the forward pass met a NaN/inf before any loss was made
                    loss, checked, extra, text = None, {}, {}, ""
                    where = input_not_finite(step, exc)
                optimizer.zero_grad()
                if where is None:
                    loss.backward()
                    if average_gradients is not None:
                        average_gradients()
                    if not _finite_sum([p.grad for p in optimizer.params]):
                        where = "the gradients became non-finite (the loss terms were finite)"
                        optimizer.zero_grad()
                if where is not None and not run.skip_nonfinite:
                    raise diverged(step, where)
                if where is not None and model_state is not None and not _state_finite(model_state()):
                    raise diverged(step, f"{where}, and the model's parameters or buffers are no longer finite, "
                                         f"which skipping steps cannot mend")
                logged = step % run.log_every == 0 or step == steps
                if where is not None:
                    skipped += 1
                else:
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
                log.write(evaluate(step))
            if step % run.checkpoint_every == 0 or step == steps:
                checkpoint(step)
                last_good = step
    except KeyboardInterrupt:
        # The interrupted step may have half-updated the parameters: keep the last checkpoint instead.
        bar.close()
        kept = f"the checkpoint of step {last_good} is in {out}, continue with --resume" if last_good is not None \
            else "no checkpoint was written yet"
        raise KeyboardInterrupt(f"interrupted at step {step}; {kept}") from None
    bar.close()
    final = evaluate(steps)
    log.write(final)
    return final
