"""Data-parallel training across processes and machines: MPI on CPUs, NCCL on GPUs.

The route ChainerMN took for NumPy/CuPy engines: processes started by
``mpiexec``, talking through mpi4py, and, for CuPy arrays, through NCCL
(``cupy.cuda.nccl``, reached through ``minivq.backend``) with its unique id
shared over MPI. Nothing here is a transport of its own.

A ``Communicator`` offers the few collectives training needs, on NumPy or
CuPy arrays; each returns its result (in the given array where it can):

    allreduce_sum(a)      the element-wise sum over ranks (gradients, EMA statistics, metrics)
    bcast(a, root=0)      rank 0's array on every rank (k-means centres, restart rows)
    allgather(a)          every rank's array, concatenated along axis 0 (equal shapes)
    bcast_object(o), allgather_object(o)   small Python objects, during setup only
    fail(line, code)      end the whole job after an error only this rank may have seen
    shared(key, make)     a read-only value made once per process (the threads of minivq.workers share it)

``SingleProcess`` does nothing (the ordinary run); ``MPICommunicator`` uses
mpi4py (host buffers; CuPy arrays are staged through host memory, the
fallback); ``NCCLCommunicator`` sends CuPy arrays through NCCL on the current
stream and everything else through its MPI communicator.

``from_environment()`` picks one: a process started by mpiexec is recognised
by the variables the launchers set (``PMI_SIZE``/``PMI_RANK`` from MPICH and
Intel MPI, ``OMPI_COMM_WORLD_SIZE``/``OMPI_COMM_WORLD_RANK`` from Open MPI,
``MV2_COMM_WORLD_SIZE`` from MVAPICH, ``PMIX_RANK`` from PMIx launchers).
``MINIVQ_DISTRIBUTED=0`` ignores them, ``MINIVQ_DISTRIBUTED=1`` initialises
MPI even where none is set. mpi4py is imported only then.

Faults: every collective of ``MPICommunicator`` is a nonblocking one, and
rank 0 waits on it together with a receive posted for fault reports. A rank
that hits an error the others cannot know of sends its one-line message to
rank 0, which prints it and calls ``MPI_Abort`` for the whole job; if rank 0
does not pick it up within ``FAULT_GRACE`` seconds (it is computing, or gone),
the rank prints the line itself and aborts. A rank killed outright is reported
by mpiexec, which ends the others. Errors that every rank meets at the same
point (``CollectiveError``) need no abort: rank 0 reports them and every rank
exits normally.
"""
import hashlib
import json
import os
import socket
import sys
import time

import numpy as np

from . import backend

FAULT_TAG = 77          # point-to-point tag of fault reports, on minivq's own communicator
FAULT_BYTES = 4096      # the longest fault report
FAULT_GRACE = 10.0      # seconds a failing rank waits for rank 0 to report it and end the job

_SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
_RANK_VARIABLES = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK", "PMIX_RANK")
BACKENDS = ("auto", "mpi", "nccl")


class CollectiveError(ValueError):
    """An error every rank raises at the same point: rank 0 reports it, every rank exits with code 2."""


# ---------------------------------------------------------------- the launch
def _env_int(names):
    for name in names:
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return None


def env_rank():
    """This process's rank as the launcher's environment gives it, or None outside mpiexec."""
    return _env_int(_RANK_VARIABLES)


def launched():
    """(started by an MPI launcher?, the number of processes it started or None where it does not say)."""
    mode = os.environ.get("MINIVQ_DISTRIBUTED", "").strip()
    if mode == "0":
        return False, None
    size = _env_int(_SIZE_VARIABLES)
    return (mode == "1" or size is not None or env_rank() is not None), size


def from_environment():
    """The communicator for this process: ``SingleProcess`` unless mpiexec started several."""
    started, size = launched()
    if not started or size == 1:
        return SingleProcess()
    try:
        import mpi4py
        if "mpi4py.MPI" not in sys.modules:
            mpi4py.rc.thread_level = "funneled"    # only the main thread calls MPI
        from mpi4py import MPI
    except Exception as exc:    # ImportError, or mpi4py unable to load an MPI library
        count = f"{size} processes" if size else "several processes"
        raise CollectiveError(f"started by mpiexec ({count}) but mpi4py is not usable ({type(exc).__name__}: "
                              f"{exc}); install it with `pip install -e .[mpi]`") from None
    world = MPI.COMM_WORLD
    if size is not None and world.Get_size() != size:
        raise CollectiveError(f"mpiexec started {size} processes but MPI sees {world.Get_size()}: mpiexec and "
                              f"mpi4py use different MPI libraries; run the mpiexec of the MPI mpi4py loads "
                              f"({MPI.Get_library_version().splitlines()[0].strip()})")
    if world.Get_size() == 1:
        return SingleProcess()
    return MPICommunicator(world)


def rank_device(device, comm):
    """The device of this rank: on GPUs, rank r of a machine takes ``cuda:(N + r)`` for ``--device cuda:N``."""
    kind, index = backend.parse_device(device)
    if kind != "cuda" or comm.size == 1:
        return device
    index += comm.local_rank
    count = backend.device_count()
    if index >= count:
        raise ValueError(f"{comm.where()} would use cuda:{index} (--device {device} plus its rank "
                         f"{comm.local_rank} on this machine), but only {count} GPU(s) are visible; "
                         f"start at most {count - backend.parse_device(device)[1]} processes per machine")
    backend.use_device(f"cuda:{index}")      # CuPy's current device: NCCL and the kernels run there
    return f"cuda:{index}"


def for_device(comm, device, choice="auto"):
    """The communicator to train with: NCCL for a GPU where every rank has it ("auto", "nccl"), else ``comm``."""
    if choice not in BACKENDS:
        raise ValueError(f"unknown communication backend {choice!r}: use one of {', '.join(BACKENDS)}")
    if comm.size == 1 or choice == "mpi" or isinstance(comm, NCCLCommunicator):
        return comm
    on_gpu = backend.parse_device(device)[0] == "cuda"
    here = None
    if on_gpu:
        here = backend.nccl_unavailable()
    else:
        here = "NCCL needs --device cuda"
    reasons = comm.allgather_object(here)       # every rank must agree before NCCL's collective set-up
    missing = [(r, why) for r, why in enumerate(reasons) if why is not None]
    if not missing:
        return NCCLCommunicator(comm, device)
    if choice == "nccl":
        rank, why = missing[0]
        raise CollectiveError(f"--comm nccl: rank {rank} cannot use NCCL ({why}); use --comm mpi")
    if on_gpu and comm.rank == 0:
        print(f"minivq: NCCL is not usable on rank {missing[0][0]} ({missing[0][1]}); "
              f"GPU buffers go through MPI via host memory", file=sys.stderr)
    return comm


# ---------------------------------------------------------------- agreement
def config_digest(config):
    """SHA-256 of a JSON-able configuration, keys sorted."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


class agreement:
    """``with agreement(comm) as agreed: ...`` -- a set-up phase every rank finishes together.

    Every rank runs the block; at its end the ranks exchange notes: an error on
    any rank (the lowest such rank's message) is raised on all of them as a
    ``CollectiveError``, and so is a difference between the ``agreed.config``
    each set (compared by SHA-256, the first differing key named). So a rank
    never waits in a collective for a rank that has given up. With one process
    it changes nothing: errors pass through as they are.
    """

    def __init__(self, comm):
        self.comm, self.config = comm, None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if self.comm.size == 1 or (exc is not None and not isinstance(exc, Exception)):
            return False        # one process; or KeyboardInterrupt and the like: the abort path
        message = None if exc is None else (" ".join(str(exc).split()) or type(exc).__name__)
        digest = None if self.config is None else config_digest(self.config)
        notes = self.comm.allgather_object((message, digest, self.config))
        for rank, (msg, _, _) in enumerate(notes):
            if msg is not None:
                raise CollectiveError(msg if rank == 0 else f"rank {rank}: {msg}") from None
        ours = notes[0][2] or {}
        for rank, (_, digest, theirs) in enumerate(notes):
            if digest != notes[0][1]:
                theirs = theirs or {}
                keys = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k)) or ["?"]
                key = keys[0]
                raise CollectiveError(f"the processes disagree on the configuration: rank {rank} has "
                                      f"{key}={theirs.get(key)!r} where rank 0 has {ours.get(key)!r}; start "
                                      f"every rank with the same flags, data and checkpoint") from None
        return False


# ---------------------------------------------------------------- communicators
class Communicator:
    """The collectives of data-parallel training (see the module docstring). Attributes:
    ``rank``, ``size``, ``local_rank`` (rank among the processes of this machine),
    ``seconds`` (time spent in collectives on this rank, when ``timed``)."""
    name = "?"
    rank, size, local_rank = 0, 1, 0
    seconds, timed = 0.0, False

    def where(self):
        return f"rank {self.rank} on {socket.gethostname()}"

    def allreduce_sum(self, array):
        raise NotImplementedError

    def bcast(self, array, root=0):
        raise NotImplementedError

    def allgather(self, array):
        raise NotImplementedError

    def bcast_object(self, obj, root=0):
        raise NotImplementedError

    def allgather_object(self, obj):
        raise NotImplementedError

    def fail(self, line, code):
        raise NotImplementedError

    def shared(self, key, make):
        """A read-only value every rank of this process uses, made once: here, by ``make()`` (ranks in
        processes of their own each make their own; threads of one process share it, ``minivq.workers``)."""
        return make()

    def close(self):
        pass


class SingleProcess(Communicator):
    """One process: every collective returns its input."""
    name = "single"

    def allreduce_sum(self, array):
        return array

    def bcast(self, array, root=0):
        return array

    def allgather(self, array):
        return array

    def bcast_object(self, obj, root=0):
        return obj

    def allgather_object(self, obj):
        return [obj]

    def fail(self, line, code):
        print(line, file=sys.stderr, flush=True)
        sys.exit(code)


class MPICommunicator(Communicator):
    """Collectives through mpi4py on host buffers; CuPy arrays are copied to the host and back."""
    name = "mpi"
    timed = True

    def __init__(self, world):
        from mpi4py import MPI
        self.MPI = MPI
        self.comm = world.Dup()         # minivq's own context: its messages never match anyone else's
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        node = self.comm.Split_type(MPI.COMM_TYPE_SHARED)
        self.local_rank = node.Get_rank()
        node.Free()
        self._report = bytearray(FAULT_BYTES)
        self._faults = (self.comm.Irecv(self._report, source=MPI.ANY_SOURCE, tag=FAULT_TAG)
                        if self.rank == 0 else None)

    def _wait(self, request):
        """Wait for a collective; on rank 0, report a fault of another rank instead if one comes first."""
        start = time.perf_counter()
        if self._faults is None:
            request.Wait()
        else:
            status = self.MPI.Status()
            if self.MPI.Request.Waitany([request, self._faults], status) == 1:
                text = bytes(self._report[:status.Get_count(self.MPI.BYTE)]).decode("utf-8", "replace")
                code, _, line = text.partition("\n")
                print(line, file=sys.stderr, flush=True)
                self.comm.Abort(int(code) if code.isdigit() else 1)
        self.seconds += time.perf_counter() - start

    def _host(self, array):
        host = np.ascontiguousarray(backend.to_numpy(array))
        return host, (lambda result: result) if host is array else \
            (lambda result: backend.to_device(result, backend.array_device(array)))

    def allreduce_sum(self, array):
        host, back = self._host(array)
        self._wait(self.comm.Iallreduce(self.MPI.IN_PLACE, host, op=self.MPI.SUM))
        return back(host)

    def bcast(self, array, root=0):
        host, back = self._host(array)
        self._wait(self.comm.Ibcast(host, root=root))
        return back(host)

    def allgather(self, array):
        host, back = self._host(array)
        gathered = np.empty((self.size,) + host.shape, host.dtype)
        self._wait(self.comm.Iallgather(host, gathered))
        return back(gathered.reshape((-1,) + host.shape[1:]))

    def bcast_object(self, obj, root=0):
        return self.comm.bcast(obj, root=root)

    def allgather_object(self, obj):
        return self.comm.allgather(obj)

    def fail(self, line, code):
        if self.rank != 0:      # let rank 0 say it, so the job's one error line comes from rank 0
            report = f"{code}\n{line}".encode("utf-8")[:FAULT_BYTES]
            try:
                request = self.comm.Isend(report, dest=0, tag=FAULT_TAG)
                deadline = time.monotonic() + FAULT_GRACE
                while not request.Test() and time.monotonic() < deadline:
                    time.sleep(0.05)
                time.sleep(max(0.0, deadline - time.monotonic()))    # rank 0 ends the job meanwhile
            except Exception:
                pass
        print(line, file=sys.stderr, flush=True)
        self.comm.Abort(code)

    def close(self):
        if self._faults is not None:
            self._faults.Cancel()
            self._faults.Wait()
            self._faults = None


class NCCLCommunicator(Communicator):
    """CuPy arrays through NCCL on the current stream (asynchronous to the host); anything else through MPI.

    ``timing = True`` synchronises the stream around each NCCL call so that
    ``seconds`` counts its real duration (costs the overlap; for benchmarks).
    """
    name = "nccl"

    def __init__(self, mpi, device):
        self.mpi = mpi
        backend.require_cuda(backend.parse_device(device)[1])     # the one-line error where there is no such GPU
        self.rank, self.size, self.local_rank = mpi.rank, mpi.size, mpi.local_rank
        uid = mpi.bcast_object(backend.nccl_unique_id() if mpi.rank == 0 else None)
        self.comm = backend.nccl_communicator(mpi.size, uid, mpi.rank)
        self.timing = False

    @property
    def timed(self):
        return self.timing

    @property
    def seconds(self):
        return self.mpi.seconds + self._nccl_seconds

    _nccl_seconds = 0.0

    def _call(self, fn, *args):
        stream = backend.current_stream()
        if self.timing:
            stream.synchronize()
            start = time.perf_counter()
        fn(*args, stream.ptr)
        if self.timing:
            stream.synchronize()
            self._nccl_seconds += time.perf_counter() - start

    def allreduce_sum(self, array):
        if backend.array_device(array) == "cpu":
            return self.mpi.allreduce_sum(array)
        array = backend.get_array_module(array).ascontiguousarray(array)
        self._call(self.comm.allReduce, array.data.ptr, array.data.ptr, array.size, backend.nccl_dtype(array.dtype),
                   backend.nccl_sum())
        return array

    def bcast(self, array, root=0):
        if backend.array_device(array) == "cpu":
            return self.mpi.bcast(array, root)
        array = backend.get_array_module(array).ascontiguousarray(array)
        self._call(self.comm.bcast, array.data.ptr, array.size, backend.nccl_dtype(array.dtype), root)
        return array

    def allgather(self, array):
        if backend.array_device(array) == "cpu":
            return self.mpi.allgather(array)
        xp = backend.get_array_module(array)
        array = xp.ascontiguousarray(array)
        gathered = xp.empty((self.size,) + array.shape, array.dtype)
        self._call(self.comm.allGather, array.data.ptr, gathered.data.ptr, array.size, backend.nccl_dtype(array.dtype))
        return gathered.reshape((-1,) + array.shape[1:])

    def bcast_object(self, obj, root=0):
        return self.mpi.bcast_object(obj, root)

    def allgather_object(self, obj):
        return self.mpi.allgather_object(obj)

    def fail(self, line, code):
        self.mpi.fail(line, code)

    def close(self):
        backend.current_stream().synchronize()
        self.comm.destroy()
        self.mpi.close()


# ---------------------------------------------------------------- gradients
class GradientAverager:
    """After backward: average every parameter's gradient over the ranks, with one allreduce per step.

    The gradients are copied into one preallocated flat buffer, summed over the
    ranks in a single call, divided by the number of ranks and handed back as
    views of that buffer. With equal local batches this is the gradient of the
    global batch's mean loss. A parameter without a gradient on this rank
    contributes zeros.
    """

    def __init__(self, comm, params):
        self.comm, self.params = comm, list(params)
        dtypes = {p.dtype for p in self.params}
        if len(dtypes) != 1:
            raise TypeError(f"gradient averaging needs parameters of one dtype, got {sorted(map(str, dtypes))}")
        self.buffer = None

    def __call__(self):
        if self.buffer is None:
            first = self.params[0].data
            xp = backend.get_array_module(first)
            self.buffer = xp.empty(sum(p.data.size for p in self.params), first.dtype)
        offset = 0
        for p in self.params:
            part = self.buffer[offset:offset + p.data.size]
            if p.grad is None:
                part[...] = 0
            else:
                part[...] = p.grad.reshape(-1)
            offset += p.data.size
        self.buffer = self.comm.allreduce_sum(self.buffer)
        self.buffer /= self.comm.size
        offset = 0
        for p in self.params:
            p.grad = self.buffer[offset:offset + p.data.size].reshape(p.shape)
            offset += p.data.size


# ---------------------------------------------------------------- quantiser statistics
class BatchReducer:
    """What training injects into a quantiser (``quantizer.reducer``) under data parallelism.

    The quantisers (``minivq.nn``) know nothing of processes: they ask a reducer
    for the sums, the rows and the choices of the global batch, and a single
    process's reducer returns its own batch (``minivq.nn.quantizers.LocalBatch``).
    This one answers through the communicator, so every rank takes the same
    codebook step that one process would take with the whole batch.
    """

    def __init__(self, comm):
        self.comm = comm

    @property
    def rank(self):
        return self.comm.rank

    @property
    def size(self):
        return self.comm.size

    def sum(self, array):
        return self.comm.allreduce_sum(array)

    def gather(self, array):
        return self.comm.allgather(array)

    def broadcast(self, array):
        return self.comm.bcast(array)
