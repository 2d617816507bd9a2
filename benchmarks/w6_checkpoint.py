"""The size of a copy's checkpoint on W6: an 8 TiB sparse file holding 1 GiB in 4096 extents of 256 KiB.

    python benchmarks/w6_checkpoint.py [WORKDIR]      (default /var/tmp/volcopy-w6; about 8 GiB free)

Copies W6 with a checkpoint, cancels it once past 90%, prints the checkpoint's size, then resumes the
copy and checks the result against the source's digest. The checkpoint holds a record per chunk with
data below its watermark (csrc/checkpoint.c), so it grows with the data, not with the 8 TiB.
"""

from __future__ import annotations

import shutil
import sys
import threading
from pathlib import Path

import volcopy
from volcopy._core import checkpoint_resume_offset
from volcopy.bench.workloads import make_spread

TiB = 1 << 40


def main() -> None:
    workdir = Path(sys.argv[1] if len(sys.argv) > 1 else "/var/tmp/volcopy-w6")
    workdir.mkdir(parents=True, exist_ok=True)
    src, dst, checkpoint = workdir / "src.img", workdir / "dst.img", workdir / "copy.ckpt"
    try:
        make_spread(str(src), 8 * TiB, 4096, 256 << 10)
        past_90 = threading.Event()
        try:  # slowed to 256 MiB/s so that progress, every 100 ms, sees 90% go by
            volcopy.copy(
                src,
                dst,
                checkpoint=checkpoint,
                cancel=past_90,
                rate_limit=256 << 20,
                progress=lambda done, total: done > total * 0.9 and past_90.set(),
            )
        except volcopy.Cancelled:
            pass
        watermark = checkpoint_resume_offset(str(checkpoint))
        size = checkpoint.stat().st_size
        print(f"stopped at {watermark} ({watermark / (8 * TiB):.1%}): checkpoint {size} bytes")
        result = volcopy.copy(src, dst, checkpoint=checkpoint)
        expected = volcopy.digest(src)
        print(f"resumed from {result.resumed_from}: digest {result.digest}, source's {expected}")
        sys.exit(0 if result.digest == expected else 1)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
