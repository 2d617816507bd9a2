"""volcopy.digest() and volcopy.verify(): the volume digest computed by reading, and comparisons.

The digest: the first ``length`` bytes in 1 MiB chunks (the last may be shorter), XXH3-128 of each in
its canonical 16-byte big-endian form, and the hex XXH3-128 of those chunk digests concatenated.
"""

from __future__ import annotations

import threading

from . import _core
from .errors import Cancelled, VerifyError
from .volume import Volume, VolumeSpec, open_source


def hash_volume(
    volume: Volume,
    length: int,
    *,
    engine: str = "auto",
    block_size: int | None = None,
    queue_depth: int | None = None,
    cancel: threading.Event | None = None,
    behind: _core.Watermark | None = None,
) -> _core.NativeResult:
    """Reads a volume through the engine (holes cost nothing) and returns its digests. behind: the
    volume is a running copy's dst; read it only where that copy has written, waiting for it."""
    from .copier import DEFAULT_BLOCK_SIZE, DEFAULT_QUEUE_DEPTH  # copier imports this module

    return _core.run(
        volume.endpoint(),
        None,
        length=length,
        engine=engine,
        block_size=block_size or DEFAULT_BLOCK_SIZE,
        queue_depth=queue_depth or DEFAULT_QUEUE_DEPTH,
        sparse=True,
        dst_is_zero=False,
        digest=True,
        rate_limit=0,
        extents=None,
        checkpoint=None,
        fingerprints=None,
        dst_new=False,
        progress=None,
        cancel=cancel,
        readable_until=behind,
    )


class BackgroundHash:
    """hash_volume on a thread of its own: the engine releases the GIL, so it overlaps whatever this
    thread does meanwhile. ``failed`` is set when it raised (to stop the other side); stop() cancels it.
    stop() and result() return only once its engine has ended, through any Ctrl-C: the volume's
    descriptors must outlive it."""

    def __init__(self, volume: Volume, length: int, **options):
        self.failed, self._cancel, self._done = threading.Event(), threading.Event(), threading.Event()
        self._outcome: _core.NativeResult | BaseException | None = None
        options["cancel"] = self._cancel
        threading.Thread(target=self._run, args=(volume, length, options), daemon=True).start()

    def _run(self, volume: Volume, length: int, options: dict) -> None:
        try:
            self._outcome = hash_volume(volume, length, **options)
        except BaseException as exc:  # noqa: BLE001 - raised again by result()
            self._outcome = exc
            self.failed.set()
        finally:
            self._done.set()

    def _wait(self) -> None:
        try:
            self._done.wait()
        except BaseException:  # a Ctrl-C while waiting: stop the engine, and let it end first
            self._cancel.set()
            while not self._done.is_set():
                try:
                    self._done.wait()
                except BaseException:  # noqa: BLE001 - the engine must end first
                    pass
            raise

    @property
    def error(self) -> BaseException | None:
        return self._outcome if isinstance(self._outcome, BaseException) else None

    def stop(self) -> None:
        self._cancel.set()
        self._wait()

    def result(self) -> _core.NativeResult:
        self._wait()
        if self.error is not None:
            raise self.error
        return self._outcome


def _length_for(volume: Volume, length: int | None) -> int:
    from .copier import check_options  # the one place option checks live

    length = check_options("auto", None, None, "auto", None, length)[3]
    if length is None:
        return volume.size
    if length > volume.size:
        raise VerifyError(f"{volume.name} holds {volume.size} bytes, fewer than {length}", volume.size)
    return length


def digest(path: VolumeSpec, *, length: int | None = None) -> str:
    """The volume digest of the first ``length`` bytes (default: all of it)."""
    with open_source(path) as volume:
        return hash_volume(volume, _length_for(volume, length)).digest


def _read(volume: Volume, offset: int, size: int):
    import numpy as np  # only on the way to an error: start-up need not pay for it

    data = volume.read(offset, size)
    return np.frombuffer(data, dtype=np.uint8)


def _first_byte_difference(src: Volume, dst: Volume, offset: int, size: int) -> int | None:
    a, b = _read(src, offset, size), _read(dst, offset, size)
    if len(a) != len(b):
        return offset + min(len(a), len(b))
    differing = (a != b).nonzero()[0]
    return offset + int(differing[0]) if len(differing) else None


def first_difference(src: Volume, dst: Volume, chunk: int, length: int) -> int:
    """The first differing byte within a chunk whose digests differ."""
    offset = chunk * _core.CHUNK_SIZE
    found = _first_byte_difference(src, dst, offset, min(_core.CHUNK_SIZE, length - offset))
    return offset if found is None else found


def first_difference_in_extents(src: Volume, dst: Volume, extents) -> int | None:
    for offset, size in extents:
        for at in range(int(offset), int(offset + size), _core.CHUNK_SIZE):
            found = _first_byte_difference(src, dst, at, min(_core.CHUNK_SIZE, int(offset + size) - at))
            if found is not None:
                return found
    return None


def verify(src: VolumeSpec, dst: VolumeSpec, *, length: int | None = None) -> None:
    """Raises VerifyError naming the first differing offset unless dst reads as src over ``length``."""
    with open_source(src) as source, open_source(dst) as target:
        length = _length_for(source, length)
        if target.size < length:
            raise VerifyError(
                f"destination {target.name} holds {target.size} bytes, fewer than the {length} to compare",
                target.size,
            )
        # Both sides at once. A failure or a Ctrl-C on one side stops the other.
        dst_hash = BackgroundHash(target, length)
        try:
            src_result = hash_volume(source, length, cancel=dst_hash.failed)
        except BaseException as exc:
            dst_hash.stop()
            if isinstance(exc, Cancelled) and dst_hash.error is not None:
                raise dst_hash.error from None  # the cause, not the Cancelled it caused here
            raise
        dst_result = dst_hash.result()
        chunk = _core.first_differing_chunk(src_result.chunk_digests, dst_result.chunk_digests)
        if chunk is not None:
            offset = first_difference(source, target, chunk, length)
            raise VerifyError(f"{target.name} differs from {source.name} at offset {offset}", offset)
