"""A huge sparse volume costs what its data costs: the memory of its chunk digests and the size of its
checkpoint grow with the chunks that hold data, not with the volume. A 1 TiB file holding 64 extents
of 64 KiB: 16 MiB of chunk digests and a 16 MiB checkpoint before, a few pages and 1.5 KiB now."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import xxhash

import volcopy
from conftest import MiB
from volcopy._core import checkpoint_resume_offset

TiB = 1 << 40
EXTENT = 64 << 10
EXTENTS = [(k * (TiB // 64) + 3 * MiB, EXTENT) for k in range(64)]  # one every 16 GiB
RECORD = 24  # csrc/checkpoint.c: chunk index and digest
RECORDS_AT = 4096


@pytest.fixture(scope="module")
def huge_sparse(tmp_path_factory):
    """The 1 TiB file (on the root file system: ext4 takes files up to 16 TiB) and its digest, from
    the xxhash package: every chunk without data has the digest of 1 MiB of zeros."""
    path = tmp_path_factory.mktemp("huge") / "src.img"
    chunks = {}
    with open(path, "wb") as f:
        f.truncate(TiB)
        for n, (offset, length) in enumerate(EXTENTS):
            data = bytes([n + 1]) * length
            f.seek(offset)
            f.write(data)
            start = offset // MiB * MiB
            chunk = bytes(offset - start) + data + bytes(start + MiB - offset - length)
            chunks[offset // MiB] = xxhash.xxh3_128(chunk).digest()
    zero = xxhash.xxh3_128(bytes(MiB)).digest()
    volume = xxhash.xxh3_128()
    run = zero * 65536
    index = 0
    for data_chunk in sorted(chunks):  # the zero chunks between data chunks, in runs
        while data_chunk - index >= 65536:
            volume.update(run)
            index += 65536
        volume.update(zero * (data_chunk - index) + chunks[data_chunk])
        index = data_chunk + 1
    while index < TiB // MiB:
        n = min(65536, TiB // MiB - index)
        volume.update(zero * n)
        index += n
    return path, volume.hexdigest()


def copy_in_child(src, dst, **options) -> dict:
    """Copies in a fresh process: its peak RSS growth over the copy, and the result or the error."""
    script = (
        "import json, sys, threading, volcopy\n"
        "def rss(field):\n"
        "    for line in open('/proc/self/status'):\n"
        "        if line.startswith(field): return int(line.split()[1]) * 1024\n"
        "before = rss('VmRSS:')\n"
        "options = json.loads(sys.argv[3])\n"
        "if options.pop('stop_halfway', False):\n"
        "    options['cancel'] = halfway = threading.Event()\n"
        "    options['progress'] = lambda done, total: done > total // 2 and halfway.set()\n"
        "try:\n"
        "    r = volcopy.copy(sys.argv[1], sys.argv[2], **options)\n"
        "    out = {'digest': r.digest, 'resumed_from': r.resumed_from}\n"
        "except volcopy.VolcopyError as exc:\n"
        "    out = {'error': f'{type(exc).__name__}: {exc}'}\n"
        "out['growth'] = rss('VmHWM:') - before\n"
        "print(json.dumps(out))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(src), str(dst), json.dumps(options)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_a_huge_sparse_copy_keeps_memory_and_checkpoint_to_its_data(huge_sparse, tmp_path):
    """Stopped halfway, the copy leaves a checkpoint of one record per data chunk below its
    watermark; the run that resumes from it ends with the digest of the whole volume, and neither
    run's memory grows with the terabyte: 4 MiB of queue and a few pages of digests."""
    src, digest = huge_sparse
    dst, checkpoint = tmp_path / "dst.img", tmp_path / "copy.ckpt"
    options = {"checkpoint": str(checkpoint), "queue_depth": 4}

    # 4 MiB of data at 4 MiB/s: the copy runs for about a second, and progress comes every 100 ms
    stopped = copy_in_child(src, dst, stop_halfway=True, rate_limit=4 * MiB, **options)

    assert stopped["error"].startswith("Cancelled")
    watermark = checkpoint_resume_offset(str(checkpoint))
    below = sum(1 for offset, _ in EXTENTS if offset // MiB * MiB + MiB <= watermark)
    assert 0 < watermark < TiB and below >= 16
    assert os.path.getsize(checkpoint) == RECORDS_AT + below * RECORD
    assert stopped["growth"] < 12 * MiB, f"{stopped['growth'] / MiB:.1f} MiB for 1 TiB of mostly holes"

    resumed = copy_in_child(src, dst, **options)

    assert resumed["resumed_from"] == watermark
    assert resumed["digest"] == digest
    assert resumed["growth"] < 12 * MiB, f"{resumed['growth'] / MiB:.1f} MiB for 1 TiB of mostly holes"
    assert not checkpoint.exists()
    assert volcopy.digest(dst) == digest
    volcopy.verify(src, dst)  # raises VerifyError at the first difference


def test_a_checkpoint_whose_records_are_out_of_order_is_refused(huge_sparse, tmp_path):
    """The records are not covered by the header's checksum: two swapped (a disk that returns a
    block from elsewhere) are refused, never loaded as the digests of the wrong chunks."""
    src, _ = huge_sparse
    dst, checkpoint = tmp_path / "dst.img", tmp_path / "copy.ckpt"
    copy_in_child(src, dst, checkpoint=str(checkpoint), stop_halfway=True, rate_limit=4 * MiB)
    with open(checkpoint, "r+b") as f:
        f.seek(RECORDS_AT)
        first, second = f.read(RECORD), f.read(RECORD)
        f.seek(RECORDS_AT)
        f.write(second + first)

    outcome = copy_in_child(src, dst, checkpoint=str(checkpoint))

    assert outcome["error"] == (
        f"CheckpointError: cannot read checkpoint {checkpoint}: its records are out of order; "
        "remove it to start afresh"
    )
