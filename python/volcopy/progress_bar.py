"""A one-line live progress bar for terminals: percent, bytes, rate, ETA."""

from __future__ import annotations

import sys
import time

from .units import format_size

TYPE_CHECKING = False  # as typing's, without importing typing (copier.py says why)
if TYPE_CHECKING:
    from typing import TextIO


class ProgressBar:
    WIDTH = 30

    def __init__(self, stream: TextIO = sys.stderr):
        self.stream = stream
        self.started = time.monotonic()
        self.shown = False

    def __call__(self, done: int, total: int) -> None:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        fraction = done / total if total else 1.0
        rate = done / elapsed
        eta = (total - done) / rate if rate > 0 else float("inf")
        filled = int(self.WIDTH * fraction)
        bar = "#" * filled + "." * (self.WIDTH - filled)
        eta_text = "--:--" if eta == float("inf") else f"{int(eta) // 60:02d}:{int(eta) % 60:02d}"
        self.stream.write(
            f"\r[{bar}] {100 * fraction:5.1f}%  {format_size(done)} / {format_size(total)}"
            f"  {format_size(rate)}/s  ETA {eta_text} "
        )
        self.stream.flush()
        self.shown = True

    def close(self) -> None:
        if self.shown:
            self.stream.write("\n")
            self.stream.flush()
