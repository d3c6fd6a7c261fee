"""The run folder: its file names, the check that it is writable, the JSONL metrics log and the progress bar.

A run lives in one folder (``--out``):
    checkpoint.npz       the latest checkpoint (model, optimiser, step, random state), written atomically
    metrics.jsonl        one JSON object per logged training step and per evaluation
    reconstructions.png  test images (top of each pair) above their reconstructions, at the end
"""
import json
import os
import sys
import time

from .io import remove_stale_temporaries

CHECKPOINT = "checkpoint.npz"
METRICS = "metrics.jsonl"
RECONSTRUCTIONS = "reconstructions.png"


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
