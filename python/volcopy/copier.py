"""volcopy.copy(): the public entry point of the copy engine."""

from __future__ import annotations

import operator
import os
import threading
import time
from collections.abc import Callable

from . import _core
from .digest import BackgroundHash, first_difference, first_difference_in_extents, hash_volume
from .errors import Cancelled, CheckpointError, EngineUnavailable, InvalidRequest, VerifyError
from .rate import MAX_RATE, RateLimit
from .volume import Volume, VolumeSpec, describe, open_destination, open_source, overlaps

DEFAULT_BLOCK_SIZE = 1 << 20
# 32 MiB in flight: in the sweep (benchmarks/results/sweep.md, 5 interleaved rounds) every point with
# 32 MiB in flight beat every point with 16 on the disk (3.71-3.75 s against 3.89-4.02 s for 4 GiB) and
# 1 MiB x 32 beat 1 MiB x 16 from a loop device (1.10 against 1.26 s); on tmpfs the grid is flat. The
# cost is 16 MiB more of RSS (51 MiB, interpreter included).
DEFAULT_QUEUE_DEPTH = 32
MAX_BLOCK_SIZE = 64 << 20
MAX_QUEUE_DEPTH = 1024

TYPE_CHECKING = False  # as typing's, without importing typing: 5 ms of a short copy's start-up (W7)
if TYPE_CHECKING:
    import numpy as np

    # numpy is imported where it is needed, not here: it is most of a command's start-up time.
    ExtentsSpec = np.ndarray | list[tuple[int, int]]


class CopyResult:
    """What a copy did. Not a dataclass: importing dataclasses (and inspect with it) took a fifth of a
    short copy's start-up (the bench's W7)."""

    __slots__ = (
        "size",  # bytes covered: length
        "bytes_read",  # read from src
        "bytes_written",  # written to dst as data
        "bytes_skipped",  # holes of src, never read
        "bytes_zero",  # read, found zero, not written as data
        "seconds",
        "engine",
        "direct",
        "digest",  # the volume digest of src (None when extents were given)
        # 16 bytes per chunk as the engine records them: 16 zero bytes for a chunk of zeros (_core)
        "chunk_digest_bytes",
        "resumed_from",  # where a checkpoint let this run start
        "verified",
        "block_size",
        "queue_depth",
        "bytes_from_cache",  # of bytes_read, read from the page cache (direct="auto": what it held)
    )

    def __init__(
        self,
        size: int,
        bytes_read: int,
        bytes_written: int,
        bytes_skipped: int,
        bytes_zero: int,
        seconds: float,
        engine: str,
        direct: bool,
        digest: str | None,
        chunk_digest_bytes: _core.ChunkDigests | None,
        resumed_from: int = 0,
        verified: bool = False,
        block_size: int = DEFAULT_BLOCK_SIZE,
        queue_depth: int = DEFAULT_QUEUE_DEPTH,
        bytes_from_cache: int = 0,
    ):
        values = locals()
        for name in self.__slots__:
            object.__setattr__(self, name, values[name])

    def __setattr__(self, name, value):
        raise AttributeError(f"a CopyResult is read-only: cannot set {name}")

    def __repr__(self) -> str:
        return "CopyResult(" + ", ".join(f"{k}={v!r}" for k, v in self.as_dict().items()) + ")"

    def __eq__(self, other) -> bool:  # the chunk digests are left out, as from the repr: 16 MiB per TiB
        return isinstance(other, CopyResult) and self.as_dict() == other.as_dict()

    def __hash__(self) -> int:
        return hash(tuple(self.as_dict().values()))

    @property
    def chunk_digests(self) -> np.ndarray | None:
        """(chunks, 16) uint8: the canonical XXH3-128 of each 1 MiB chunk, for diffing two volumes. A new
        array of 16 MiB per TiB of volume, holes included: chunk_digest_bytes takes memory for the chunks
        that hold data only."""
        if self.chunk_digest_bytes is None:
            return None
        import numpy as np

        digests = np.frombuffer(self.chunk_digest_bytes, dtype=np.uint8).reshape(-1, _core.DIGEST_SIZE).copy()
        zeros = np.flatnonzero(~digests.any(axis=1))
        if len(zeros):
            digests[zeros] = np.frombuffer(_core.zero_chunk_digest(self.size, 0), dtype=np.uint8)
            if self.size % _core.CHUNK_SIZE and zeros[-1] == len(digests) - 1:
                digests[-1] = np.frombuffer(
                    _core.zero_chunk_digest(self.size, len(digests) - 1), dtype=np.uint8
                )
        return digests

    @property
    def rate(self) -> float:
        """Bytes of the volume covered per second."""
        return (self.size - self.resumed_from) / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict:
        """Everything but the chunk digests, for JSON."""
        return {name: getattr(self, name) for name in self.__slots__ if name != "chunk_digest_bytes"}


def _positive_int(value, what: str, low: int, high: int) -> int:
    try:
        if isinstance(value, bool):
            raise TypeError
        value = operator.index(value)  # int, numpy integers, anything integral
    except TypeError:
        raise InvalidRequest(f"{what} must be an integer, not {value!r}") from None
    if not low <= int(value) <= high:
        raise InvalidRequest(f"{what} must be between {low} and {high}, not {value}")
    return int(value)


def check_options(engine: str, block_size, queue_depth, direct, rate_limit, length) -> tuple:
    if engine not in _core.ENGINES:
        raise InvalidRequest(f"unknown engine {engine!r}; choose one of {', '.join(_core.ENGINES)}")
    if engine != "auto":
        reason = _core.engine_unavailable_reason(engine)
        if reason:
            raise EngineUnavailable(f"engine {engine} is not available here: {reason}")
    block_size = DEFAULT_BLOCK_SIZE if block_size is None else block_size
    block_size = _positive_int(block_size, "block_size", _core.CHUNK_SIZE, MAX_BLOCK_SIZE)
    if block_size % _core.CHUNK_SIZE:
        raise InvalidRequest(f"block_size must be a multiple of 1 MiB (the digest chunk), not {block_size}")
    queue_depth = DEFAULT_QUEUE_DEPTH if queue_depth is None else queue_depth
    queue_depth = _positive_int(queue_depth, "queue_depth", 1, MAX_QUEUE_DEPTH)
    if queue_depth * block_size > _core.MAX_BUFFER_BYTES:
        raise InvalidRequest(
            f"queue_depth * block_size is {queue_depth * block_size} bytes of buffers; at most "
            f"{_core.MAX_BUFFER_BYTES} (1 GiB) are allowed"
        )
    if direct not in (True, False, "auto"):
        raise InvalidRequest(f"direct must be True, False or 'auto', not {direct!r}")
    if rate_limit is not None and not isinstance(rate_limit, RateLimit):  # a RateLimit checks itself
        rate_limit = _positive_int(rate_limit, "rate_limit", 1, MAX_RATE)
    if length is not None:
        length = _positive_int(length, "length", 0, 1 << 62)
    return block_size, queue_depth, rate_limit or 0, length


def check_extents(extents: ExtentsSpec, length: int) -> np.ndarray:
    import numpy as np

    try:
        array = np.asarray(extents, dtype=np.int64)
    except (TypeError, ValueError):
        raise InvalidRequest("extents must be (offset, length) pairs of integers") from None
    if array.size == 0:
        return np.empty((0, 2), dtype=np.int64)
    if array.ndim != 2 or array.shape[1] != 2:
        raise InvalidRequest(f"extents must have the shape (N, 2), not {array.shape}")
    offsets, lengths = array[:, 0], array[:, 1]
    if (offsets < 0).any() or (lengths <= 0).any():
        raise InvalidRequest("extents need offsets >= 0 and lengths > 0")
    ends = offsets + lengths
    if (offsets[1:] < ends[:-1]).any():
        raise InvalidRequest("extents must be sorted by offset and must not overlap")
    if ends[-1] > length:
        raise InvalidRequest(f"extent ending at {ends[-1]} lies beyond the {length} bytes to copy")
    return np.ascontiguousarray(array)


def _fingerprints(source: Volume, target: Volume, length: int, extents, dst_id: str | None):
    from .fingerprint import fingerprints  # only a checkpoint needs it (hashlib, ctypes: start-up time)

    return fingerprints(source, target, length, extents, dst_id)


def _match_direct(source: Volume, target: Volume, direct) -> None:
    """With direct="auto", O_DIRECT is used only where both sides accept it. An RBD image has no page
    cache for a buffered file side to stay coherent with: the file side keeps O_DIRECT."""
    if source.rbd or target.rbd:
        return
    if direct == "auto" and source.direct != target.direct:
        for volume in (source, target):
            if volume.direct:
                os.close(volume.fd)
                volume.fd, volume.direct = volume.fd_buffered, False


class _AnyOf:
    """Set once any of its events is (None: never): what a copy polls as its cancel."""

    def __init__(self, *events: threading.Event | None):
        self.events = [event for event in events if event is not None]

    def is_set(self) -> bool:
        return any(event.is_set() for event in self.events)


def _progress_reporter(progress: Callable[[int, int], None] | None) -> Callable[[int, int], bool] | None:
    if progress is None:
        return None  # the engine then never takes the GIL back

    def report(done: int, total: int) -> bool:
        progress(done, total)
        return False

    return report


def copy(
    src: VolumeSpec,
    dst: VolumeSpec,
    *,
    length: int | None = None,
    engine: str = "auto",
    block_size: int | None = None,
    queue_depth: int | None = None,
    direct="auto",
    sparse: bool = True,
    dst_is_zero: bool = False,
    verify: bool = False,
    rate_limit: int | RateLimit | None = None,
    progress: Callable[[int, int], None] | None = None,
    cancel: threading.Event | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    dst_id: str | None = None,
    extents: ExtentsSpec | None = None,
) -> CopyResult:
    """Copies the first ``length`` bytes of src to dst; see the README for every option."""
    started = time.monotonic()
    block_size, queue_depth, rate_limit, length = check_options(
        engine, block_size, queue_depth, direct, rate_limit, length
    )
    checkpoint = os.fspath(checkpoint) if checkpoint is not None else None
    with open_source(src, direct) as source:
        if length is None:
            length = source.size
        elif length > source.size:
            raise InvalidRequest(
                f"length {length} lies beyond the end of source {source.name} ({source.size} bytes)"
            )
        if overlaps(source, dst):
            raise InvalidRequest(
                f"source {source.name} and destination {describe(dst)} are the same volume or share bytes "
                "(a partition and its disk, a device and one built on it, a loop device and its file)"
            )
        extent_array = check_extents(extents, length) if extents is not None else None
        with open_destination(dst, length, direct) as target:
            _match_direct(source, target, direct)
            readback = written = None
            options = {"engine": engine, "block_size": block_size, "queue_depth": queue_depth}
            try:
                # dst is read back while the copy runs, behind what it has written, not in a second pass.
                # Not an RBD image: its map of allocated extents is read once, and would miss the rest.
                if verify and extent_array is None and target.rbd is None:
                    written = _core.Watermark()
                    # A quarter of the copy's depth: it only trails the copy. Default depth, 5 interleaved
                    # runs each, 32 against 8: 4 GiB loop to loop with 5% data 0.613 against 0.577 s
                    # (median), 1 GiB file to file 1.886 against 1.952 s; peak RSS 78 against 54 MiB.
                    depth = {"queue_depth": max(1, queue_depth // 4)}
                    readback = BackgroundHash(target, length, behind=written, **(options | depth))
                native = _core.run(
                    source.endpoint(),
                    target.endpoint(),
                    length=length,
                    engine=engine,
                    block_size=block_size,
                    queue_depth=queue_depth,
                    sparse=sparse,
                    # A file we just created reads as zeros: its holes need no zeroing.
                    dst_is_zero=dst_is_zero or target.created,
                    digest=extent_array is None,
                    rate_limit=rate_limit,
                    extents=extent_array,
                    checkpoint=checkpoint,
                    fingerprints=(
                        _fingerprints(source, target, length, extent_array, dst_id) if checkpoint else None
                    ),
                    dst_new=target.created,
                    progress=_progress_reporter(progress),
                    # a read-back that failed stops the copy: its error is the one raised
                    cancel=_AnyOf(cancel, readback.failed) if readback is not None else cancel,
                    # What of src the page cache holds is read from it; direct=True means the disk.
                    src_from_cache=direct == "auto",
                    written_until=written,
                )
                readback_digests = None
                if readback is not None:  # the copy published all of dst: the read-back ends on its own
                    readback_digests = readback.result().chunk_digests
                elif verify and extent_array is None:  # an RBD image: read back now
                    readback_digests = hash_volume(target, length, **options).chunk_digests
            except BaseException as exc:
                failure = exc
                if readback is not None:
                    readback.stop()  # it must end before dst is closed
                    if isinstance(exc, Cancelled) and readback.error is not None:
                        failure = readback.error
                # Without a checkpoint to resume from, a file we created is only a half-written copy.
                if target.created and (checkpoint is None or isinstance(failure, CheckpointError)):
                    try:
                        target.remove_created()
                    except OSError as cleanup:  # the failure to report is the copy's (an OSD gone, say)
                        failure.add_note(f"the half-written destination {target.name} is left: {cleanup}")
                if failure is exc:
                    raise
                raise failure from None
            if checkpoint is not None and os.path.exists(checkpoint):
                os.unlink(checkpoint)
            if verify:
                _verify_copy(source, target, length, native, extent_array, readback_digests)
            return CopyResult(
                size=length,
                bytes_read=native.bytes_read,
                bytes_written=native.bytes_written,
                bytes_skipped=native.bytes_skipped,
                bytes_zero=native.bytes_zero,
                bytes_from_cache=native.bytes_from_cache,
                seconds=time.monotonic() - started,
                engine=native.engine,
                direct=source.direct and target.direct,
                digest=native.digest,
                chunk_digest_bytes=native.chunk_digests,
                resumed_from=native.resumed_from,
                verified=verify,
                block_size=block_size,
                queue_depth=queue_depth,
            )


def _verify_copy(source: Volume, target: Volume, length: int, native, extents, readback_digests) -> None:
    """Compares dst with src: its read-back digests against those the copy computed, or, when only some
    extents were copied, byte for byte over those extents."""
    if extents is not None:
        offset = first_difference_in_extents(source, target, extents)
    else:
        chunk = _core.first_differing_chunk(readback_digests, native.chunk_digests)
        offset = None if chunk is None else first_difference(source, target, chunk, length)
    if offset is not None:
        raise VerifyError(
            f"destination {target.name} differs from source {source.name} at offset {offset}", offset
        )
