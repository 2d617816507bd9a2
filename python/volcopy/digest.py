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
) -> _core.NativeResult:
    """Reads a volume through the engine (holes cost nothing) and returns its digests."""
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
    )


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
        # Both sides at once: the engine releases the GIL, so the two reads overlap. A failure or a Ctrl-C
        # on one side stops the other.
        results: dict = {}
        stop, dst_done = threading.Event(), threading.Event()

        def hash_into(key: str, volume: Volume) -> None:
            try:
                results[key] = hash_volume(volume, length, cancel=stop)
            except BaseException as exc:  # noqa: BLE001 - raised again below
                results[key] = exc
                stop.set()

        def hash_dst() -> None:
            try:
                hash_into("dst", target)
            finally:
                dst_done.set()

        threading.Thread(target=hash_dst).start()
        hash_into("src", source)
        try:
            dst_done.wait()
        except BaseException:  # a Ctrl-C while waiting for dst: stop it, and let it end before closing
            stop.set()
            while not dst_done.is_set():
                try:
                    dst_done.wait()
                except BaseException:  # noqa: BLE001 - dst's engine must end first
                    pass
            raise
        failures = [v for v in results.values() if isinstance(v, BaseException)]
        if failures:  # the cause, not the Cancelled it caused on the other side
            raise next((f for f in failures if not isinstance(f, Cancelled)), failures[0])
        chunk = _core.first_differing_chunk(results["src"].chunk_digests, results["dst"].chunk_digests)
        if chunk is not None:
            offset = first_difference(source, target, chunk, length)
            raise VerifyError(f"{target.name} differs from {source.name} at offset {offset}", offset)
