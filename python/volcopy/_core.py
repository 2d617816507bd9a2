"""The boundary to the native engine: the only module that touches cffi's ``ffi`` and ``lib``.

Everything here takes and returns plain Python values; errors come back as volcopy exceptions.
"""

from __future__ import annotations

import errno
import mmap
import threading
from collections import namedtuple
from collections.abc import Callable

from ._native import ffi, lib
from ._version import version
from .errors import Cancelled, CheckpointError, CopyIOError, EngineUnavailable, InvalidRequest
from .rate import RateLimit

CHUNK_SIZE = lib.VC_CHUNK_SIZE
MAX_BUFFER_BYTES = lib.VC_MAX_BUFFER_BYTES
DIGEST_SIZE = lib.VC_DIGEST_SIZE
KIND_FILE = lib.VC_KIND_FILE
KIND_BLOCKDEV = lib.VC_KIND_BLOCKDEV
KIND_RBD = lib.VC_KIND_RBD

ENGINES = {
    "auto": lib.VC_ENGINE_AUTO,
    "io_uring": lib.VC_ENGINE_URING,
    "aio": lib.VC_ENGINE_AIO,
    "sync": lib.VC_ENGINE_SYNC,
    "threads": lib.VC_ENGINE_THREADS,
}
ENGINE_NAMES = {number: name for name, number in ENGINES.items()}
_OPERATIONS = {
    lib.VC_OP_READ: "read",
    lib.VC_OP_WRITE: "write",
    lib.VC_OP_FLUSH: "flush",
    lib.VC_OP_ZERO: "zero",
    lib.VC_OP_SETUP: "setup",
    lib.VC_OP_CHECKPOINT: "checkpoint",
}


def _check_version() -> None:
    native = ffi.string(lib.vc_version()).decode()
    if native != version:
        raise ImportError(f"volcopy {version} found a native core of version {native}: reinstall volcopy")


_check_version()


def engine_unavailable_reason(name: str) -> str | None:
    """None when the engine can run here, otherwise why not."""
    error = ffi.new("struct vc_error *")
    if lib.vc_engine_available(ENGINES[name], error) == 0:
        return None
    return ffi.string(error.message).decode(errors="replace")


def checkpoint_resume_offset(path: str) -> int:
    """Where a copy would resume from this checkpoint file (0 when it is new, missing or unreadable)."""
    return lib.vc_checkpoint_resume_offset(path.encode())


def chunk_count(length: int) -> int:
    return (length + CHUNK_SIZE - 1) // CHUNK_SIZE


# DIGEST_SIZE bytes per chunk, as the engine records them: a chunk of zeros as 16 zero bytes.
ChunkDigests = bytearray | mmap.mmap


def new_chunk_digests(length: int) -> ChunkDigests:
    """Zero-filled room for a volume's chunk digests. A private anonymous mapping, not a bytearray (which
    writes every byte): the pages of a huge sparse volume's holes are never touched, so they take no
    memory (16 MiB per TiB otherwise)."""
    size = chunk_count(length) * DIGEST_SIZE
    if not size:
        return bytearray()
    digests = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE)
    try:  # a huge page would make one digest cost 2 MiB; a kernel without them refuses the advice
        digests.madvise(mmap.MADV_NOHUGEPAGE)
    except OSError:
        pass
    return digests


# The records here are named tuples, not dataclasses: importing dataclasses (and inspect with it) took
# a fifth of a short copy's start-up (the bench's W7).
class Endpoint(namedtuple("Endpoint", "fd fd_buffered kind direct name rbd", defaults=(None,))):
    """One side of a copy as the engine takes it: name is for messages; rbd, for KIND_RBD, is the image's
    handle from rbd_open."""

    __slots__ = ()


def _fill_endpoint(target, endpoint: Endpoint) -> None:
    target.fd, target.fd_buffered = endpoint.fd, endpoint.fd_buffered
    target.kind, target.direct = endpoint.kind, endpoint.direct
    target.rbd = endpoint.rbd if endpoint.rbd is not None else ffi.NULL


class Watermark:
    """How far a running copy has written dst: the copy's engine stores it at every turn, and the engine
    verifying dst reads no further (the cell the two share)."""

    def __init__(self) -> None:
        self.cell = ffi.new("uint64_t *")


class Fingerprints(namedtuple("Fingerprints", "src dst request")):
    """What a checkpoint must match to be resumed (fingerprint.py says what each covers)."""

    __slots__ = ()


NativeResult = namedtuple(
    "NativeResult",
    "bytes_read bytes_written bytes_skipped bytes_zero bytes_from_cache resumed_from engine digest "
    "chunk_digests",
)


class _Progress:
    """Carries the caller's progress function through the engine; an exception it raises cancels the
    copy and is raised again once the engine has stopped."""

    def __init__(self, callback: Callable[[int, int], bool]):
        self.callback = callback
        self.exception: BaseException | None = None

    def __call__(self, done: int, total: int) -> int:
        try:
            return 1 if self.callback(done, total) else 0
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            self.exception = exc
            return 1


@ffi.def_extern()
def _vc_progress_callback(ctx, done, total):
    return ffi.from_handle(ctx)(done, total)


def run(
    src: Endpoint,
    dst: Endpoint | None,
    *,
    length: int,
    engine: str,
    block_size: int,
    queue_depth: int,
    sparse: bool,
    dst_is_zero: bool,
    digest: bool,
    rate_limit: int | RateLimit,
    extents,
    checkpoint: str | None,
    fingerprints: Fingerprints | None,
    dst_new: bool,
    progress: Callable[[int, int], bool] | None,
    cancel: threading.Event | None = None,
    src_from_cache: bool = False,
    written_until: Watermark | None = None,
    readable_until: Watermark | None = None,
) -> NativeResult:
    """Runs one copy (or, without dst, one digest) in the engine, on a thread of its own: this thread
    waits for it, so a KeyboardInterrupt (Ctrl-C) stops the engine within 50 ms and is raised again once
    what was in flight has completed. Setting ``cancel`` stops it with Cancelled. The GIL is released
    meanwhile."""
    p = ffi.new("struct vc_copy_params *")
    keep = []  # cdata that must outlive the call
    _fill_endpoint(p.src, src)
    if dst is None:
        p.dst.fd = p.dst.fd_buffered = -1
    else:
        _fill_endpoint(p.dst, dst)
    p.length = length
    p.engine = ENGINES[engine]
    p.block_size = block_size
    p.queue_depth = queue_depth
    p.flags = (
        (lib.VC_FLAG_SPARSE if sparse else 0)
        | (lib.VC_FLAG_DST_IS_ZERO if dst_is_zero else 0)
        | (lib.VC_FLAG_DIGEST if digest else 0)
        | (lib.VC_FLAG_DST_NEW if dst_new else 0)
        | (lib.VC_FLAG_SRC_FROM_CACHE if src_from_cache else 0)
    )
    live = rate_limit if isinstance(rate_limit, RateLimit) else None
    p.rate_limit = live.bytes_per_second if live else rate_limit
    follow_rate = None
    if live:
        rate_cell = ffi.new("uint64_t *", p.rate_limit)  # the closure holds it, not keep: it is written
        p.rate_live = rate_cell  # until the engine has returned

        def follow_rate() -> None:
            rate_cell[0] = live.bytes_per_second

    for name, watermark in (("written_until", written_until), ("readable_until", readable_until)):
        if watermark is not None:
            setattr(p, name, watermark.cell)
            keep.append(watermark)
    chunk_digests = None
    if digest:
        chunk_digests = new_chunk_digests(length)
        p.chunk_digests = ffi.from_buffer("uint8_t[]", chunk_digests, require_writable=True)
        keep.append(p.chunk_digests)
    if extents is not None:
        buffer = ffi.from_buffer("int64_t[]", extents)
        keep.append(buffer)
        p.extents = buffer
        p.n_extents = len(extents)
    if checkpoint is not None:
        path = ffi.new("char[]", checkpoint.encode())
        keep.append(path)
        p.checkpoint_path = path
    if fingerprints is not None:
        p.fingerprint_src, p.fingerprint_dst = fingerprints.src, fingerprints.dst
        p.fingerprint_request = fingerprints.request
    stop = ffi.new("int32_t *")
    keep.append(stop)
    p.cancel = stop
    reporter = None
    if progress is not None:
        reporter = _Progress(progress)
        handle = ffi.new_handle(reporter)
        keep.append(handle)
        p.progress = lib._vc_progress_callback
        p.progress_ctx = handle

    result = ffi.new("struct vc_copy_result *")
    error = ffi.new("struct vc_error *")
    rc = _run_stoppable(p, result, error, stop, cancel, keep, follow_rate)
    if reporter is not None and reporter.exception is not None:
        raise reporter.exception
    if rc < 0:
        raise _exception(rc, error, src, dst, checkpoint)
    return NativeResult(
        bytes_read=result.bytes_read,
        bytes_written=result.bytes_written,
        bytes_skipped=result.bytes_skipped,
        bytes_zero=result.bytes_zero,
        bytes_from_cache=result.bytes_from_cache,
        resumed_from=result.resumed_from,
        engine=ENGINE_NAMES[result.engine],
        digest=bytes(ffi.buffer(result.digest, DIGEST_SIZE)).hex() if digest else None,
        chunk_digests=chunk_digests,
    )


def _run_stoppable(
    params, result, error, stop, cancel: threading.Event | None, keep: list, each_step: Callable | None
) -> int:
    """vc_copy on its own thread while this one waits in 50 ms steps: a signal's Python handler runs
    only on the main thread between bytecodes, never inside a C call, so the wait is where Ctrl-C lands.
    Either way the engine sees the stop flag at its next turn and returns once what it has in flight
    has completed (its checkpoint saved).

    The wait is on an Event, not Thread.join: a join interrupted by KeyboardInterrupt marks the thread
    as ended while it still runs (CPython's _wait_for_tstate_lock), and the caller would then close
    descriptors the engine is still using. each_step: called at every step (a rate limit to follow)."""
    outcome = []
    entered, done = threading.Event(), threading.Event()

    def call() -> None:  # holds everything the engine points into until it returns
        entered.set()
        try:
            outcome.append(lib.vc_copy(params, result, error))
        finally:
            keep.clear()
            done.set()

    try:
        threading.Thread(target=call, name="volcopy-engine", daemon=True).start()
        while not done.wait(0.05):
            if cancel is not None and cancel.is_set():
                stop[0] = 1
            if each_step is not None:
                each_step()
    except BaseException:
        # Interrupted inside start(), the thread may or may not exist: one that does enters at once.
        if entered.is_set() or entered.wait(1.0):
            _wait_for_engine(done, stop)
        raise
    return outcome[0]


def _wait_for_engine(done: threading.Event, stop) -> None:
    """After a KeyboardInterrupt: stop the engine and wait until it has let go of every buffer and
    descriptor; a second Ctrl-C only makes it wait again."""
    stop[0] = 1
    while not done.is_set():
        try:
            done.wait()
        except BaseException:  # noqa: BLE001 - the engine must end before anything is freed
            stop[0] = 1


def _exception(rc: int, error, src: Endpoint, dst: Endpoint | None, checkpoint: str | None) -> Exception:
    err = error.err or -rc
    message = ffi.string(error.message).decode(errors="replace")
    if err == errno.ECANCELED:
        return Cancelled("copy cancelled" + (" (resumable from its checkpoint)" if checkpoint else ""))
    if error.op == lib.VC_OP_SETUP:
        if err == errno.EOPNOTSUPP:
            return EngineUnavailable(message)
        if err == errno.EINVAL:
            return InvalidRequest(message)
    if error.side == lib.VC_SIDE_CHECKPOINT and err in (errno.ESTALE, errno.EBADMSG):  # another's; damaged
        return CheckpointError(message)
    names = {
        lib.VC_SIDE_SRC: src.name,
        lib.VC_SIDE_DST: dst.name if dst else None,
        lib.VC_SIDE_CHECKPOINT: checkpoint,
    }
    return CopyIOError(err, message, names.get(error.side), error.offset, _OPERATIONS.get(error.op, "I/O"))


def extents_of(volume: Endpoint, length: int):
    """The data extents of [0, length) as an (N, 2) int64 numpy array."""
    import numpy as np  # only here: a copy's start-up need not pay for numpy

    endpoint = ffi.new("struct vc_endpoint *")
    _fill_endpoint(endpoint, volume)
    cap = 4096
    out = np.empty((cap, 2), dtype=np.int64)
    buffer = ffi.from_buffer("int64_t[]", out, require_writable=True)
    next_offset = ffi.new("uint64_t *")
    parts, start = [], 0
    while start < length:
        n = lib.vc_extents(endpoint, start, length, buffer, cap, next_offset)
        if n < 0:
            raise CopyIOError(-n, "cannot list the extents", None, start, "read")
        parts.append(out[:n].copy())
        start = next_offset[0]
    return np.concatenate(parts) if parts else np.empty((0, 2), dtype=np.int64)


def is_zero(buffer) -> bool:
    """The engine's zero detection on a buffer (for the micro-benchmarks and tests)."""
    return bool(lib.vc_is_zero(ffi.from_buffer(buffer), len(buffer)))


def hash128(buffer) -> bytes:
    """The engine's canonical XXH3-128 of a buffer."""
    out = ffi.new("uint8_t[16]")
    lib.vc_hash128(ffi.from_buffer(buffer), len(buffer), out)
    return bytes(ffi.buffer(out, DIGEST_SIZE))


def zero_chunk_digest(length: int, index: int) -> bytes:
    """The digest of chunk index of a volume of length bytes when it reads as zeros."""
    return hash128(bytes(min(CHUNK_SIZE, length - index * CHUNK_SIZE)))


def first_differing_chunk(a: ChunkDigests, b: ChunkDigests) -> int | None:
    """The index of the first chunk whose digests differ, or None. Compared a piece at a time: a copy
    of the whole would take 16 MiB per TiB."""
    piece = 65536 * DIGEST_SIZE
    for start in range(0, max(len(a), len(b)), piece):
        left, right = a[start : start + piece], b[start : start + piece]
        if left != right:
            at = next(
                i
                for i in range(0, max(len(left), len(right)), DIGEST_SIZE)
                if left[i : i + DIGEST_SIZE] != right[i : i + DIGEST_SIZE]
            )
            return (start + at) // DIGEST_SIZE
    return None


# ---------------------------------------------------------------- RBD images


# snap_id: None for the image itself; modified: librbd's modification time (seconds, nanoseconds)
RBDInfo = namedtuple("RBDInfo", "size object_size snap_id pool_id modified fsid image_id")


def rbd_compiled() -> bool:
    return bool(lib.vc_rbd_compiled())


def rbd_open(
    pool: str,
    namespace: str,
    image: str,
    snap: str | None,
    conf: str | None,
    user: str | None,
    options: tuple[tuple[str, str], ...],
    *,
    write: bool,
    create_size: int | None,
    own_clients: int = 0,
) -> tuple[object, bool]:
    """Opens an image (creating one of create_size bytes when asked and missing); returns its handle
    and whether it was created. own_clients: clients of the caller's own that have it open, not counted
    as someone else using it. Raises OSError with librbd's errno and the reason."""
    keep = [ffi.new("char[]", text.encode()) for text in (pool, namespace, image)]
    spec = ffi.new("struct vc_rbd_spec *")
    spec.pool, spec.pool_namespace, spec.image = keep
    for field, text in (("snap", snap), ("conf", conf), ("user", user)):
        if text is not None:
            keep.append(ffi.new("char[]", text.encode()))
            setattr(spec, field, keep[-1])
    strings = [ffi.new("char[]", text.encode()) for pair in options for text in pair]
    pairs = ffi.new("char *[]", strings) if strings else ffi.NULL
    spec.options, spec.n_options = pairs, len(options)
    spec.own_clients = own_clients
    flags = (lib.VC_RBD_WRITE if write else 0) | (lib.VC_RBD_CREATE if create_size is not None else 0)
    handle = ffi.new("struct vc_rbd **")
    created = ffi.new("int *")
    error = ffi.new("struct vc_error *")
    cdata = (keep, strings, pairs, spec, handle, created, error)  # alive until the open ends
    rc = _open_stoppable(
        lambda: lib.vc_rbd_open(spec, flags, create_size or 0, handle, created, error), handle, cdata
    )
    if rc < 0:
        raise OSError(error.err or -rc, ffi.string(error.message).decode(errors="replace"))
    return handle[0], bool(created[0])


def _open_stoppable(open_image: Callable[[], int], handle, cdata) -> int:
    """Opening an image can wait on the monitors (client_mount_timeout) or on another client's watch:
    on a thread of its own, so that a Ctrl-C is raised at once. librados cannot be interrupted, so the
    thread goes on (holding what the call points into) and closes what it opened once the open ends."""
    outcome, done, lock = [], threading.Event(), threading.Lock()
    abandoned = []

    def run() -> None:
        rc = open_image()
        with lock:  # exactly one of the two threads closes an image nobody will use
            outcome.append(rc)
            if abandoned and rc == 0:
                lib.vc_rbd_close(handle[0])
        done.set()
        cdata  # noqa: B018 - kept referenced until here

    threading.Thread(target=run, name="volcopy-rbd-open", daemon=True).start()
    try:
        while not done.wait(0.05):
            pass
    except BaseException:
        with lock:
            abandoned.append(True)
            if outcome and outcome[0] == 0:
                lib.vc_rbd_close(handle[0])
        raise
    return outcome[0]


def rbd_info(handle) -> RBDInfo:
    info = ffi.new("struct vc_rbd_info *")
    rc = lib.vc_rbd_info(handle, info)
    if rc < 0:
        raise OSError(-rc, "cannot read the image's identity")
    return RBDInfo(
        size=info.size,
        object_size=info.object_size,
        snap_id=None if info.snap_id == 2**64 - 1 else info.snap_id,
        pool_id=info.pool_id,
        modified=(info.modified_sec, info.modified_nsec),
        fsid=ffi.string(info.fsid).decode(),
        image_id=ffi.string(info.image_id).decode(),
    )


def rbd_read(handle, offset: int, size: int) -> bytes:
    buffer = ffi.new("char[]", size)
    n = lib.vc_rbd_read(handle, buffer, size, offset)
    if n < 0:
        raise OSError(-n, "cannot read the image")
    return bytes(ffi.buffer(buffer, n))


def rbd_close(handle) -> None:
    lib.vc_rbd_close(handle)


def rbd_remove(handle) -> None:
    """Closes the image and deletes it."""
    rc = lib.vc_rbd_remove(handle)
    if rc < 0:
        raise OSError(-rc, "cannot remove the image")


def rbd_deep_copy(src, dst, progress: Callable[[int, int], bool] | None = None) -> None:
    """librbd copies src into dst's name (dst is replaced: see vc_rbd_deep_copy). progress(objects
    done, objects) is called from librbd's threads; an exception it raises is raised here once the
    copy has ended (librbd cannot stop one)."""
    error = ffi.new("struct vc_error *")
    reporter = _Progress(progress) if progress is not None else None
    handle = ffi.new_handle(reporter) if reporter is not None else ffi.NULL
    callback = lib._vc_progress_callback if reporter is not None else ffi.NULL
    rc = lib.vc_rbd_deep_copy(src, dst, callback, handle, error)
    if reporter is not None and reporter.exception is not None:
        raise reporter.exception
    if rc < 0:
        raise OSError(error.err or -rc, ffi.string(error.message).decode(errors="replace"))
