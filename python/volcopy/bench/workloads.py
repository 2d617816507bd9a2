"""Generated volumes for the quick start, the benchmarks and their smoke test.

python benchmarks/workloads.py sparse PATH --size 16G --allocated 0.05
python benchmarks/workloads.py dense PATH --size 4G
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from ..units import parse_size

MiB = 1 << 20
_PIECE = 4 * MiB  # random data is generated and written this much at a time: memory stays small


def _write_random(fd: int, rng: np.random.Generator, offset: int, length: int) -> None:
    for at in range(offset, offset + length, _PIECE):
        os.pwrite(fd, rng.bytes(min(_PIECE, offset + length - at)), at)


def make_dense(path: str, size: int, seed: int = 0) -> None:
    """Random data everywhere: nothing to skip, nothing to detect."""
    rng = np.random.default_rng(seed)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _write_random(fd, rng, 0, size)
        os.fsync(fd)
    finally:
        os.close(fd)


def sparse_extents(size: int, allocated: float, seed: int = 0, allocated_bytes: int | None = None):
    """Random extents of 64 KiB to 8 MiB covering ``allocated`` of ``size`` (or ``allocated_bytes``),
    placed at random 64 KiB-aligned offsets, sorted and disjoint."""
    rng = np.random.default_rng(seed)
    target = allocated_bytes if allocated_bytes is not None else int(size * allocated)
    grain = 64 << 10
    lengths = []
    while sum(lengths) < target:
        lengths.append(min(int(rng.integers(1, 129)) * grain, target - sum(lengths)))
    free = size - sum(lengths)
    gaps = np.sort(rng.integers(0, free // grain + 1, size=len(lengths))) * grain
    extents, shift = [], 0
    for gap, length in zip(gaps, lengths, strict=False):
        extents.append((int(gap) + shift, length))
        shift += length
    return extents


def _write_extents(path: str, size: int, extents, rng: np.random.Generator) -> None:
    """A file of ``size`` bytes: random data in the extents, holes elsewhere."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)
        for offset, length in extents:
            _write_random(fd, rng, offset, length)
        os.fsync(fd)
    finally:
        os.close(fd)


def make_sparse(
    path: str, size: int, allocated: float, seed: int = 0, allocated_bytes: int | None = None
) -> list:
    """A sparse image: random data in random extents, holes elsewhere; returns the extents."""
    extents = sparse_extents(size, allocated, seed, allocated_bytes)
    _write_extents(path, size, extents, np.random.default_rng(seed + 1))
    return extents


def make_spread(path: str, size: int, count: int, length: int, seed: int = 0) -> list:
    """A huge sparse image: ``count`` extents of random data, ``length`` bytes each, spread evenly over
    ``size`` (W6: 8 TiB apparent, 1 GiB of data in 4096 extents); returns the extents."""
    step = size // count // (64 << 10) * (64 << 10)
    extents = [(k * step, length) for k in range(count)]
    _write_extents(path, size, extents, np.random.default_rng(seed + 2))
    return extents


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("kind", choices=["sparse", "dense"])
    parser.add_argument("path")
    parser.add_argument("--size", type=parse_size, required=True)
    parser.add_argument("--allocated", type=float, default=0.05, help="fraction holding data (sparse)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.kind == "dense":
        make_dense(args.path, args.size, args.seed)
        print(f"{args.path}: {args.size} bytes of random data")
    else:
        extents = make_sparse(args.path, args.size, args.allocated, args.seed)
        data = sum(length for _, length in extents)
        print(f"{args.path}: {args.size} bytes, {data} in {len(extents)} random extents, holes elsewhere")


if __name__ == "__main__":
    main()
