"""The block size and queue depth a copy or a digest runs with when the caller leaves them to us."""

from __future__ import annotations

from . import _core
from .volume import Volume

DEFAULT_BLOCK_SIZE = 1 << 20
DEFAULT_QUEUE_DEPTH = 16
# From a block device: 16 MiB in flight all the same, in 4 MiB requests. A device has no holes to skip,
# so every byte is read, and each request costs the kernel about the same whatever its size: 16 GiB
# loop device to loop device took 0.31-0.33 s of system time in 1 MiB x 16, 0.14-0.20 s in 4 MiB x 4,
# in the same wall time (benchmarks/results/README.md). Files keep 1 MiB x 16 (sweep.md).
DEVICE_BLOCK_SIZE = 4 << 20
DEVICE_QUEUE_DEPTH = 4


def default_geometry(source: Volume, block_size: int | None, queue_depth: int | None) -> tuple[int, int]:
    """The block size and queue depth the caller left to us, chosen by the kind of source."""
    device = source.kind == _core.KIND_BLOCKDEV
    if block_size is None:
        block_size = DEVICE_BLOCK_SIZE if device else DEFAULT_BLOCK_SIZE
    if queue_depth is None:
        queue_depth = DEVICE_QUEUE_DEPTH if device else DEFAULT_QUEUE_DEPTH
    return block_size, queue_depth
