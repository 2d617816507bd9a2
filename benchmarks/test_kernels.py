"""Micro-benchmarks of the engine's hot kernels (pytest-benchmark). Not part of the test suite:

    pytest benchmarks/test_kernels.py --benchmark-columns=mean,stddev,ops

Each prints throughput in GB/s (from the median round) besides pytest-benchmark's table.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
import pytest

import volcopy
from volcopy import _core

MiB = 1 << 20
BUFFER = 64 * MiB


def _throughput(benchmark, nbytes: int) -> None:
    gbps = nbytes / benchmark.stats.stats.median / 1e9  # the median: one slow round of five skews a mean
    benchmark.extra_info["GB/s"] = round(gbps, 2)
    print(f"\n{benchmark.name}: {gbps:.2f} GB/s")


def test_zero_detection_of_a_zero_buffer(benchmark):
    """The worst case: every byte must be looked at."""
    buffer = np.zeros(BUFFER, dtype=np.uint8)
    assert benchmark(_core.is_zero, buffer)
    _throughput(benchmark, BUFFER)


def test_digest_of_1_mib_chunks(benchmark):
    buffer = np.frombuffer(np.random.default_rng(2).bytes(BUFFER), dtype=np.uint8)
    benchmark(lambda: [_core.hash128(buffer[i : i + MiB]) for i in range(0, BUFFER, MiB)])
    _throughput(benchmark, BUFFER)


@pytest.fixture(scope="module")
def tmpfs_volume():
    directory = tempfile.mkdtemp(dir="/dev/shm")
    src = os.path.join(directory, "src.img")
    with open(src, "wb") as f:
        f.write(np.random.default_rng(3).bytes(512 * MiB))
    yield src, os.path.join(directory, "dst.img")
    for name in os.listdir(directory):
        os.unlink(os.path.join(directory, name))
    os.rmdir(directory)


@pytest.mark.parametrize("engine", ["io_uring", "aio", "sync", "threads"])
def test_engine_copy_tmpfs_to_tmpfs(benchmark, tmpfs_volume, engine):
    """The engine's own overhead: memory to memory, nothing hides it."""
    src, dst = tmpfs_volume

    def copy():
        if os.path.exists(dst):
            os.unlink(dst)
        return volcopy.copy(src, dst, engine=engine)

    result = benchmark.pedantic(copy, rounds=5, warmup_rounds=1)
    assert result.bytes_read == 512 * MiB
    _throughput(benchmark, 512 * MiB)
