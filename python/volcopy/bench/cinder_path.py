"""Cinder's own copy of an RBD volume, as a peer in ``volcopy bench``:

    python -m volcopy.bench.cinder_path SRC DST SIZE

A volume on RBD reaches Cinder's copy_volume as os-brick's RBD connector hands it over: an
``os_brick.initiator.linuxrbd.RBDVolumeIOWrapper`` over an ``rbd.Image``, a file object with no
descriptor. With a file object on either side, ``cinder.volume.volume_utils.copy_volume`` takes its
file path (``_copy_volume_with_file``): it opens a path side with ``open(path, 'rb'/'wb')`` and moves
the volume 4 MiB at a time, a read then a write, and flushes dst at the end (``_transfer_data``). This
does the same, with the same os-brick classes the connector uses (RBDClient, RBDVolume,
RBDImageMetadata, RBDVolumeIOWrapper) and librbd's settings as the cluster's conf leaves them, as the
connector's generated conf does.

Two differences, both to measure what the volume gets: Cinder runs each read and write in eventlet's
thread pool (one at a time, as here), and a file dst is fsynced at the end (Cinder's flush stops at
Python's buffer; every tool in the harness is made to put its data on the disk).

SRC and DST are named as volcopy names them (rbd:POOL/IMAGE:conf=PATH, or a file's path); an RBD dst
must exist (Cinder creates the volume before it copies into it).
"""

from __future__ import annotations

import os
import sys

from ..rbd_volume import is_rbd, parse

MiB = 1 << 20
CHUNK = 4 * MiB  # volume_utils._copy_volume_with_file: _transfer_data(..., units.Mi * 4)


def _open(name: str, write: bool):
    """What os-brick's RBD connector returns for an image (RBDConnector._get_rbd_handle), or the file
    Cinder opens for a path."""
    if not is_rbd(name):
        return open(name, "wb" if write else "rb")
    from os_brick.initiator import linuxrbd

    spec = parse(name)
    client = linuxrbd.RBDClient(spec.user, spec.pool, conffile=spec.conf)
    volume = linuxrbd.RBDVolume(client, spec.image, read_only=not write)
    return linuxrbd.RBDVolumeIOWrapper(linuxrbd.RBDImageMetadata(volume, spec.pool, spec.user, spec.conf))


def transfer(src, dst, length: int) -> None:
    """volume_utils._transfer_data without its logging and eventlet: read, write, repeat; flush."""
    remaining = length
    for _ in range(-(-length // CHUNK)):
        data = src.read(min(CHUNK, remaining))
        if data == b"":
            break
        dst.write(data)
        remaining -= len(data)
    dst.flush()


def main(argv: list[str]) -> int:
    src_name, dst_name, size = argv[0], argv[1], int(argv[2])
    src = _open(src_name, write=False)
    try:
        dst = _open(dst_name, write=True)
        try:
            transfer(src, dst, size)
            if not is_rbd(dst_name):
                os.fsync(dst.fileno())
        finally:
            dst.close()
    finally:
        src.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
