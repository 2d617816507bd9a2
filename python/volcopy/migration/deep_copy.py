"""The pool-to-pool path inside one Ceph cluster: librbd's deep copy of src's image into dst's name.

One call copies the image object by object, unallocated objects skipped. It is not a copy by the OSDs:
the bytes still pass through this host (read from src's OSDs, written to dst's; measured on the test
cluster, a dense 64 MiB image moved 128 MiB over the loopback, as the engine does), and librbd offers no
way to stop it or resume it. dst must be replaceable (empty, of src's size, without snapshots, open
nowhere else) and src without snapshots (they would be carried onto dst); otherwise, and across
clusters, the caller copies with the engine.
"""

from __future__ import annotations

from collections.abc import Callable

from ..errors import InvalidRequest
from ..rbd_volume import RBDSpec, open_image


def deep_copy(src: RBDSpec, dst: RBDSpec, progress: Callable[[int, int], None] | None = None) -> str | None:
    """Copies src onto dst with rbd_deep_copy. None once done; otherwise why it was not done, with dst
    as it was (created empty when it did not exist, as the engine would). progress(done, total) in bytes.
    An I/O failure (CopyIOError) leaves dst partly written, for the caller to copy over or discard."""
    source = open_image(src, "src")
    try:
        target = open_image(dst, "dst", write=True, create_size=source.info.size)
        try:
            if not source.same_cluster(target):
                return f"src and dst are in different clusters ({source.info.fsid}, {target.info.fsid})"
            if source.identity == target.identity:
                return "src and dst are the same image"
            source.deep_copy_to(target, progress)
            return None
        except InvalidRequest as refused:
            return str(refused)
        finally:
            target.close()
    finally:
        source.close()
