"""The run folder: its file names, the check that it is writable, the JSONL metrics log and the progress bar.

A run lives in one folder (``--out``):
    checkpoint.npz       the latest checkpoint (model, optimiser, step, random state), written atomically
    metrics.jsonl        one JSON object per logged training step and per evaluation
    reconstructions.png  test images (top of each pair) above their reconstructions, at the end
    .minivq-lock         while a run holds the folder: its pid (``RunFolder``)
"""
import json
import os
import sys
import time

from .io import atomic_write, check_output_path, make_temporary, open_regular, remove_stale_temporaries

try:
    import fcntl
except ImportError:     # not POSIX: runs are not locked
    fcntl = None

CHECKPOINT = "checkpoint.npz"
METRICS = "metrics.jsonl"
RECONSTRUCTIONS = "reconstructions.png"
RUN_FILES = (CHECKPOINT, METRICS, RECONSTRUCTIONS)
LOCK = ".minivq-lock"


def check_output_folder(out):
    """Create ``out`` and prove it is writable before any work is done (no run lock; see ``RunFolder``)."""
    check_output_path(out, folder=True)
    try:
        os.makedirs(out, exist_ok=True)
        fd, probe = make_temporary(out, suffix=".write-test")   # a fresh name: never through a planted link
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ValueError(f"output folder {out} is not writable ({exc.strerror or exc}); "
                         f"choose another with --out") from None


class RunFolder:
    """A run folder held by this process alone: ``with RunFolder(out) as folder: ...``.

    Opening it creates the folder, proves it writable, takes an exclusive lock
    (``fcntl.flock`` on ``.minivq-lock``, which names the holder's pid; a second
    run on the same folder is refused, naming it), refuses run files that are not
    regular files (a planted link or FIFO named ``metrics.jsonl``...), and only then
    removes the temporaries that killed writers left (those of live processes stay).
    Closing it removes the lock file and releases the lock.
    """

    def __init__(self, out):
        self.out = out
        self.fd = None
        check_output_folder(out)
        self._lock()
        try:
            for name in RUN_FILES:
                check_output_path(os.path.join(out, name))
            remove_stale_temporaries(out)
        except BaseException:
            self.close()
            raise

    def _lock(self):
        if fcntl is None:
            return
        path = os.path.join(self.out, LOCK)
        while True:
            check_output_path(path)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
                os.close(fd)
                raise ValueError(f"{self.out} is in use by another minivq run (pid {holder}); wait for it to end, "
                                 f"or choose another --out") from None
            try:
                same = os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:            # not a lock file its last holder removed while we waited for it
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                self.fd = fd
                return
            os.close(fd)

    def existing_run(self):
        """The files of an earlier run in the folder (an empty metrics log does not count)."""
        found = []
        for name in RUN_FILES:
            path = os.path.join(self.out, name)
            if os.path.isfile(path) and (name != METRICS or os.path.getsize(path) > 0):
                found.append(name)
        return found

    def clear(self):
        """Remove an earlier run's files (``--overwrite``)."""
        for name in RUN_FILES:
            try:
                os.unlink(os.path.join(self.out, name))
            except FileNotFoundError:
                pass

    def close(self):
        if self.fd is not None:
            try:
                os.unlink(os.path.join(self.out, LOCK))
            except OSError:
                pass
            os.close(self.fd)       # releases the lock
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class MetricsLog:
    """Append-only JSONL; on resume, records after the checkpoint's step are dropped first.

    The log is only ever opened as a regular file, never through a link (``minivq.io.open_regular``).
    """

    def __init__(self, path, resume_step=None, append=False, enabled=True):
        self.path = path if enabled else None
        if append or not enabled:
            return
        if resume_step is None:
            open_regular(path, "w").close()
        elif os.path.lexists(path):
            kept = []
            with open_regular(path) as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                    except ValueError:
                        continue            # a line cut short by a crash
                    if isinstance(rec, dict) and isinstance(rec.get("step", 0), int) \
                            and rec.get("step", 0) <= resume_step:
                        kept.append(line if line.endswith("\n") else line + "\n")
            atomic_write(path, lambda f: f.write("".join(kept).encode()))

    def write(self, record):
        if self.path is None:
            return
        with open_regular(self.path, "a") as f:
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
