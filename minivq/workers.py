"""Data-parallel ranks as threads of one process: every core of a CPU busy without mpiexec.

One process whose BLAS spreads each GEMM over the cores leaves all but one of
them idle in the step's single-threaded parts (window copies, elementwise
passes, Python). Splitting the *batch* keeps every core busy instead: on a
2-core AVX-512 VM two ranks of one thread each run the default batch-128 step
1.3x faster than one process with two threads (benchmarks/NOTES.md, round 5).
MPI gives that already (``mpiexec -n 2 minivq train``); this module gives it
in one process, to users who have no MPI (``minivq train --workers 2``).

``run(fn, size)`` calls ``fn(comm)`` on ``size`` threads at once, each with a
``ThreadCommunicator`` of its own rank, with BLAS held to one thread for the
whole process and the compiled kernels to one thread per worker, and returns
rank 0's result. ``fn`` is the same per-rank code that runs under mpiexec
(``minivq.train`` takes any communicator), so every rank keeps its own model
replica, optimiser and random generator, and P workers take the step one
process takes with the whole batch, as P MPI ranks do (the tests hold both to
it). What the ranks share is what a process shares: the grad mode, the
backward hook and the random generator are per thread (``minivq.autograd``,
``minivq.backend``); NumPy's BLAS and the Numba kernels release the GIL, so the
ranks' arithmetic runs in parallel while their Python takes turns.

Collectives meet at a barrier: each rank puts its array in its slot, every
rank reads all the slots in rank order (so every rank ends with the same
bits), and a second barrier frees the slots for the next collective. Objects
and arrays handed to another rank are copies, as across processes.

Faults: an exception on one rank breaks the barrier; the others raise
``Stopped`` at their next collective and end, and ``run`` raises the failing
rank's exception (the lowest rank's where several failed, so an error that
every rank meets at the same point comes from rank 0). Ctrl-C, which only the
main thread receives, breaks it too, and every rank raises KeyboardInterrupt
at its next collective, so the trainer's own handling of an interrupt (the
last checkpoint kept) runs on rank 0 and its message is the one raised.
"""
import contextlib
import copy
import sys
import threading
import time

from . import backend, distributed
from .kernels import conv_threads, set_cpu_threads


class Stopped(Exception):
    """Raised in a rank whose collective was broken off because another rank failed."""


class _Group:
    """What the ranks of one ``run`` share: the slots of a collective, its barrier, why it was broken."""

    def __init__(self, size):
        self.size = size
        self.slots = [None] * size
        self.barrier = threading.Barrier(size)
        self.reason = Stopped
        self.values, self.values_lock = {}, threading.Lock()     # ``ThreadCommunicator.shared``

    def abort(self, reason):
        if not self.barrier.broken:
            self.reason = reason
            self.barrier.abort()


class ThreadCommunicator(distributed.Communicator):
    """The collectives of ``minivq.distributed.Communicator`` between threads of one process."""
    name = "threads"
    timed = True

    def __init__(self, group, rank):
        self.group, self.rank, self.size, self.local_rank = group, rank, group.size, rank
        self.seconds = 0.0

    def where(self):
        return f"worker {self.rank}"

    def _wait(self):
        start = time.perf_counter()
        try:
            self.group.barrier.wait()
        except threading.BrokenBarrierError:
            raise self.group.reason(f"{self.where()}: stopped, another worker failed"
                                    if self.group.reason is Stopped else "interrupted") from None
        self.seconds += time.perf_counter() - start

    def _exchange(self, value):
        """Every rank's ``value``, in rank order; the caller must be done with them before ``_release``."""
        self.group.slots[self.rank] = value
        self._wait()
        return self.group.slots

    def _release(self):
        self._wait()        # every rank has read the slots: the next collective may overwrite them

    def allreduce_sum(self, array):
        parts = self._exchange(array)
        total = parts[0].copy()
        for part in parts[1:]:
            total += part
        self._release()
        array[...] = total
        return array

    def bcast(self, array, root=0):
        source = self._exchange(array)[root]
        if self.rank != root:
            array[...] = source
        self._release()
        return array

    def allgather(self, array):
        xp = backend.get_array_module(array)
        gathered = xp.concatenate(self._exchange(array))
        self._release()
        return gathered

    def bcast_object(self, obj, root=0):
        source = self._exchange(obj)[root]
        mine = obj if self.rank == root else copy.deepcopy(source)
        self._release()
        return mine

    def allgather_object(self, obj):
        every = [obj if r == self.rank else copy.deepcopy(o) for r, o in enumerate(self._exchange(obj))]
        self._release()
        return every

    def shared(self, key, make):
        """The one value under ``key`` for every worker: the first to ask makes it (``make()``), the others
        get the same object, so it must be read-only (the datasets: one copy in memory, not one per
        worker). Where ``make()`` raises, nothing is kept and the next worker tries again."""
        with self.group.values_lock:
            if key not in self.group.values:
                self.group.values[key] = make()
            return self.group.values[key]

    def fail(self, line, code):
        """End the whole run: the line on stderr, the other ranks stopped, ``SystemExit(code)`` raised by ``run``."""
        print(line, file=sys.stderr, flush=True)
        self.group.abort(Stopped)
        raise SystemExit(code)


def one_process(device, dtype):
    """The block a run of one process (no ``--workers``, no MPI ranks) trains in.

    On the CPU, ``kernels.conv_threads(dtype)``: the convolutions spread each batch over this thread's
    Numba count of threads themselves, with BLAS held to one thread (float32 with Numba and
    threadpoolctl; elsewhere it changes nothing). On two cores the batch-128 step takes 0.78x the time of
    im2col with GEMMs threaded by the BLAS (benchmarks/NOTES.md, round 8). On a GPU, nothing.
    """
    return conv_threads(dtype) if backend.parse_device(device)[0] == "cpu" else contextlib.nullcontext()


def run(fn, size):
    """``fn(comm)`` on ``size`` worker threads (rank r gets a ``ThreadCommunicator`` of rank r); rank 0's result.

    With ``size == 1``, simply ``fn(distributed.SingleProcess())`` in this thread. BLAS runs one
    thread per call while the workers run (through threadpoolctl: a ValueError naming the
    install where it is missing, before any worker starts).
    """
    if size == 1:
        return fn(distributed.SingleProcess())
    group = _Group(size)
    results, errors = [None] * size, [None] * size
    finished = [threading.Event() for _ in range(size)]

    def body(rank):
        set_cpu_threads(1)
        try:
            results[rank] = fn(ThreadCommunicator(group, rank))
        except BaseException as exc:     # KeyboardInterrupt and SystemExit too: the main thread re-raises it
            errors[rank] = exc
            group.abort(Stopped)
        finally:
            finished[rank].set()

    def wait_for_all():
        # Events, not Thread.join: a join interrupted by Ctrl-C can mark a running thread as finished
        # (CPython's bpo-45274 fix releases the lock the running thread holds), and the next join
        # then returns at once, ending the process while rank 0 may still be writing a checkpoint
        for event in finished:
            event.wait()

    threads = [threading.Thread(target=body, args=(rank,), name=f"minivq-worker-{rank}", daemon=True)
               for rank in range(size)]
    try:
        one_blas_thread = backend.blas_threads(1)
    except ImportError as exc:
        raise ValueError(f"{size} workers need their BLAS held to one thread each: {exc}") from None
    with one_blas_thread:
        for thread in threads:
            thread.start()
        try:
            wait_for_all()
        except KeyboardInterrupt:
            group.abort(KeyboardInterrupt)
            wait_for_all()
    failed = [exc for exc in errors if exc is not None and not isinstance(exc, Stopped)]
    if failed:
        raise failed[0]
    if any(errors):         # only Stopped: cannot happen without a failure, but never return a partial result
        raise next(exc for exc in errors if exc is not None)
    return results[0]
