"""Faults never become wrong data: every engine, on files and loop devices, under real faults.

Each case ends in one of two outcomes. A failure is a CopyIOError with errno, offset and operation, its
checkpoint covers nothing past the failure, and the same copy run again without the fault ends exact.
A success is an exact copy. A hang fails the case (every run has a timeout).

The fault classes:
- syscalls: tests/faultshim.c (LD_PRELOAD) fails the Nth pread, pwrite, fallocate, fdatasync, fsync,
  ioctl, io_submit or io_uring_submit of the copy, or makes a transfer short;
- devices: a loop device over nbdkit (tests/nbd_devices.py) returns EIO for reads, writes or flushes
  at chosen offsets, below O_DIRECT and io_uring;
- power loss: a device with a volatile write cache loses what was not flushed, at a seeded random
  moment; the copy resumes from its checkpoint onto the device brought back.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import random
import subprocess
import sys
import time

import pytest
from faultshim import fault_env, injections
from nbd_devices import BLKFLSBUF, nbd_devices  # noqa: F401 - a fixture

from conftest import ENGINES, MiB, fill_garbage, needs_root_for_loop, read_all, reference_digest, write_layout
from volcopy._core import checkpoint_resume_offset

TIMEOUT = 60
SIZE = 16 * MiB
# Data, holes and a run of zeros: a copy reads, writes and zeroes (dst holds garbage before).
LAYOUT = [(0, 3 * MiB), (5 * MiB, 2 * MiB), (9 * MiB, 4 * MiB), (14 * MiB, 2 * MiB)]
ZERO_RUN = (10 * MiB, 2 * MiB)  # inside the third extent: read, found zero, zeroed in dst

# The copy in a process of its own (the shim is loaded at its start), reporting as JSON.
RUNNER = """
import json, sys, volcopy
src, dst, options = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
try:
    r = volcopy.copy(src, dst, **options)
    print(json.dumps({"ok": True, "digest": r.digest, "resumed_from": r.resumed_from}))
except volcopy.CopyIOError as e:
    print(json.dumps({"ok": False, "errno": e.errno, "operation": e.operation, "offset": e.offset,
                      "filename": e.filename, "message": str(e)}))
"""


def copy(src, dst, env=None, **options) -> dict:
    try:
        proc = subprocess.run(
            [sys.executable, "-c", RUNNER, str(src), str(dst), json.dumps(options)],
            env=env,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the copy hung under the fault:\n{exc.stderr}")
    assert proc.returncode == 0, proc.stderr
    outcome = json.loads(proc.stdout)
    outcome["injected"] = injections(proc.stderr)
    return outcome


@pytest.fixture
def source(workdir):
    path = workdir / "vol" / "src.img"
    path.parent.mkdir()
    content = bytearray(write_layout(path, SIZE, LAYOUT, seed=41))
    with open(path, "r+b") as f:
        f.seek(ZERO_RUN[0])
        f.write(bytes(ZERO_RUN[1]))
    content[ZERO_RUN[0] : sum(ZERO_RUN)] = bytes(ZERO_RUN[1])
    with open(path, "rb") as f:  # just written, it sits in the page cache: its reads must reach the disk
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    return path, bytes(content)


@pytest.fixture(params=["file", "loop"])
def destination(request, workdir):
    """dst full of garbage: a file, or a loop device (over a file: BLKZEROOUT, fsync)."""
    path = workdir / "vol" / "dst.img"
    fill_garbage(path, SIZE)
    if request.param == "file":
        return request.param, path
    if os.geteuid() != 0:
        pytest.skip("loop devices need root")
    return request.param, request.getfixturevalue("loops").attach(path)


def assert_failed_then_exact(outcome, source, dst, checkpoint, operation, err, offset=None, engine="auto"):
    """The failure names what failed; the checkpoint does not pass it; the rerun is exact."""
    src, content = source
    assert outcome["ok"] is False, outcome
    assert outcome["operation"] == operation, outcome
    assert outcome["errno"] == err, outcome
    if offset is not None:
        assert outcome["offset"] == offset, outcome
    resume_at = checkpoint_resume_offset(str(checkpoint))
    if operation != "flush":
        assert resume_at <= outcome["offset"], f"checkpoint at {resume_at}, past the failure: {outcome}"
    rerun = copy(src, dst, engine=engine, checkpoint=str(checkpoint))
    assert rerun["ok"], rerun
    assert rerun["resumed_from"] == resume_at
    assert rerun["digest"] == reference_digest(content)
    assert read_all(dst, SIZE) == content


# ---------------------------------------------------------------- syscalls (LD_PRELOAD)

# (engine, call, operation): which call carries which operation for an engine. aio and io_uring read
# and write in the kernel: only their submission can fail from user space.
DATA_CALLS = [
    ("sync", "pread", "read"),
    ("sync", "pwrite", "write"),
    ("threads", "pread", "read"),
    ("threads", "pwrite", "write"),
    ("aio", "io_submit", None),
    ("io_uring", "io_uring_submit", None),
]


@pytest.mark.parametrize("engine,call,operation", DATA_CALLS)
def test_a_failed_read_write_or_submit(engine, call, operation, source, destination, workdir):
    kind, dst = destination
    src = source[0]
    path = {"pread": src, "pwrite": dst}.get(call)
    # A submit batches whatever is ready: the reads go in the first, and how many more the writes take
    # depends on how the completions arrive (two in all, seen once in CI). The second always comes.
    nth = 2 if call.endswith("submit") else 3
    env = fault_env(call, nth=nth, errno="EIO", path=str(path) if path else None)
    checkpoint = workdir / "copy.ckpt"

    outcome = copy(src, dst, env=env, engine=engine, checkpoint=str(checkpoint))

    assert outcome["injected"], "the fault fired"
    expected = operation or outcome["operation"]
    assert expected in ("read", "write")
    assert outcome["filename"] == str(src if expected == "read" else dst)
    assert_failed_then_exact(outcome, source, dst, checkpoint, expected, errno.EIO, engine=engine)


@pytest.mark.parametrize("engine", ENGINES)
def test_a_failed_zeroing(engine, source, destination, workdir):
    """The first punched hole (in a file, or on a device: a write-zeroes request that may unmap) fails
    with ENOSPC."""
    kind, dst = destination
    env = fault_env("fallocate", nth=1, errno="ENOSPC", path=str(dst))
    checkpoint = workdir / "copy.ckpt"

    outcome = copy(source[0], dst, env=env, engine=engine, checkpoint=str(checkpoint))

    assert outcome["injected"], "the fault fired"
    assert outcome["filename"] == str(dst)
    assert_failed_then_exact(outcome, source, dst, checkpoint, "zero", errno.ENOSPC, engine=engine)


@pytest.mark.parametrize("engine", ENGINES)
def test_a_failed_flush_saves_nothing_after_it(engine, source, destination, workdir):
    """The first flush of dst (the first checkpoint's, 2 s in at 4 MiB/s) fails: nothing after it is
    trusted, so no checkpoint is saved at all, though Linux would let a second flush succeed."""
    kind, dst = destination
    env = fault_env("fdatasync" if kind == "file" else "fsync", nth=1, errno="EIO", path=str(dst))
    checkpoint = workdir / "copy.ckpt"

    outcome = copy(source[0], dst, env=env, engine=engine, checkpoint=str(checkpoint), rate_limit=4 * MiB)

    assert outcome["injected"], "the fault fired"
    assert checkpoint_resume_offset(str(checkpoint)) == 0
    assert_failed_then_exact(outcome, source, dst, checkpoint, "flush", errno.EIO, engine=engine)


# ---------------------------------------------------------------- the checkpoint file


@pytest.mark.parametrize(
    "call,nth,err",
    [
        ("pwrite", 1, "ENOSPC"),  # the header a new checkpoint gets at once
        ("fdatasync", 1, "EIO"),  # its sync
        ("pwrite", 2, "ENOSPC"),  # the records of the first save, 2 s in at 4 MiB/s
    ],
)
def test_a_failed_write_of_the_checkpoint(call, nth, err, source, workdir):
    """The checkpoint's own writes fail: the copy ends with a CopyIOError naming the checkpoint, which
    covers nothing past the failure, and the same copy run again ends exact."""
    dst, checkpoint = workdir / "vol" / "dst.img", workdir / "copy.ckpt"
    fill_garbage(dst, SIZE)
    env = fault_env(call, nth=nth, errno=err, path=str(checkpoint))

    outcome = copy(source[0], dst, env=env, checkpoint=str(checkpoint), rate_limit=4 * MiB)

    assert [i.call for i in outcome["injected"]] == [call]
    assert outcome["filename"] == str(checkpoint)
    assert_failed_then_exact(outcome, source, dst, checkpoint, "checkpoint", getattr(errno, err))


@pytest.mark.parametrize("nth", [1, 3])  # a header slot; the records (after both slots)
def test_a_failed_read_of_the_checkpoint_leaves_it_for_the_next_run(nth, source, workdir):
    """A checkpoint with records, saved before dst's last flush failed, cannot be read when the copy
    runs again: that run fails with EIO naming the checkpoint, rather than take the file for none and
    start it afresh, and the run after resumes from it exactly."""
    dst, checkpoint = workdir / "vol" / "dst.img", workdir / "copy.ckpt"
    fill_garbage(dst, SIZE)
    failed_flush = fault_env("fdatasync", nth=2, errno="EIO", path=str(dst))
    first = copy(source[0], dst, env=failed_flush, checkpoint=str(checkpoint), rate_limit=4 * MiB)
    saved, resume_at = checkpoint.read_bytes(), checkpoint_resume_offset(str(checkpoint))
    assert first["ok"] is False and resume_at > 0, first

    outcome = copy(source[0], dst, env=fault_env("pread", nth=nth, errno="EIO", path=str(checkpoint)),
                   checkpoint=str(checkpoint))  # fmt: skip

    assert (outcome["ok"], outcome["operation"], outcome["errno"]) == (False, "checkpoint", errno.EIO)
    assert outcome["filename"] == str(checkpoint)
    assert checkpoint.read_bytes() == saved
    rerun = copy(source[0], dst, checkpoint=str(checkpoint))
    assert rerun["ok"] and rerun["resumed_from"] == resume_at, rerun
    assert rerun["digest"] == reference_digest(source[1])
    assert read_all(dst, SIZE) == source[1]


@pytest.mark.parametrize(
    "engine,call",
    [
        ("sync", "pread"),
        ("sync", "pwrite"),
        ("threads", "pread"),
        ("threads", "pwrite"),
        ("aio", "io_submit"),
    ],
)
def test_short_transfers_end_exact(engine, call, source, destination):
    kind, dst = destination
    src, content = source
    path = {"pread": src, "pwrite": dst}.get(call)
    env = fault_env(call, nth=2, count=4, short=True, path=str(path) if path else None)

    outcome = copy(src, dst, env=env, engine=engine)

    assert 1 <= len(outcome["injected"]) <= 4, "the shortening fired"
    assert outcome["ok"], outcome
    assert outcome["digest"] == reference_digest(content)
    assert read_all(dst, SIZE) == content


def test_the_reproduction_a_resume_after_a_failed_zeroing_is_exact(workdir):
    """From the issue: src has data at [0, 1 MiB) and [5, 8 MiB) and a hole between; dst is 8 MiB of 0xFF;
    the first fallocate fails with ENOSPC. The rerun used to exit 0 with resumed_from 8388608 and a
    difference at byte 1048577."""
    content = write_layout(workdir / "src.img", 8 * MiB, [(0, MiB), (5 * MiB, 3 * MiB)], seed=42)
    (workdir / "dst.img").write_bytes(b"\xff" * 8 * MiB)
    checkpoint = workdir / "ck"
    env = fault_env("fallocate", nth=1, errno="ENOSPC", path=str(workdir / "dst.img"))

    failed = copy(workdir / "src.img", workdir / "dst.img", env=env, checkpoint=str(checkpoint))
    rerun = copy(workdir / "src.img", workdir / "dst.img", checkpoint=str(checkpoint))

    assert (failed["ok"], failed["operation"], failed["errno"], failed["offset"]) == (
        False,
        "zero",
        errno.ENOSPC,
        MiB,
    )
    assert rerun["ok"] and rerun["resumed_from"] <= MiB
    assert read_all(workdir / "dst.img") == content


# ---------------------------------------------------------------- devices (nbdkit behind a loop device)


@pytest.fixture
def device_source(nbd_devices, source):  # noqa: F811 - the fixture imported above
    device = nbd_devices.faulty(SIZE)
    with open(device.path, "r+b", buffering=0) as f:
        f.write(source[1])
        os.fsync(f.fileno())
        fcntl.ioctl(f.fileno(), BLKFLSBUF)  # reads must reach the device: none may come from the cache
    return device, source[1]


@pytest.mark.parametrize("engine", ENGINES)
def test_a_device_that_fails_a_read(engine, device_source, workdir):
    device, content = device_source
    device.fail(read=[(6 * MiB + 8192, 4096)])
    dst, checkpoint = workdir / "dst.img", workdir / "copy.ckpt"
    fill_garbage(dst, SIZE)

    outcome = copy(device.path, dst, engine=engine, checkpoint=str(checkpoint))

    assert (outcome["operation"], outcome["errno"], outcome["filename"]) == ("read", errno.EIO, device.path)
    assert 6 * MiB <= outcome["offset"] <= 6 * MiB + 8192
    device.heal()
    assert_failed_then_exact(
        outcome, (device.path, content), dst, checkpoint, "read", errno.EIO, engine=engine
    )


@pytest.mark.parametrize("engine", ENGINES)
def test_a_buffered_read_that_comes_back_short_is_not_taken_for_data(engine, device_source, workdir):
    """An unaligned extent goes through the page cache, where a failing device gives a short read, not
    EIO (nbdcopy's CVE-2022-0485 trusted one): the rest is asked for again and fails."""
    device, content = device_source
    device.fail(read=[(6 * MiB + 8192, 4096)])
    dst = workdir / "dst.img"
    fill_garbage(dst, SIZE)

    outcome = copy(device.path, dst, engine=engine, extents=[[6 * MiB + 1, 64 * 1024]])

    assert (outcome["ok"], outcome["operation"], outcome["errno"]) == (False, "read", errno.EIO), outcome
    assert 6 * MiB + 1 <= outcome["offset"] <= 6 * MiB + 8192 + 4096


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("fault", ["write", "flush"])
def test_a_device_that_fails_a_write_or_a_flush(engine, fault, nbd_devices, source, workdir):  # noqa: F811
    device = nbd_devices.faulty(SIZE)
    device.fail(**({"write": [(9 * MiB, 4096)]} if fault == "write" else {"flush": True}))
    checkpoint = workdir / "copy.ckpt"

    outcome = copy(source[0], device.path, engine=engine, checkpoint=str(checkpoint))

    assert (outcome["errno"], outcome["filename"]) == (errno.EIO, device.path), outcome
    if fault == "write":
        assert outcome["offset"] == 9 * MiB
    device.heal()
    assert_failed_then_exact(outcome, source, device.path, checkpoint, fault, errno.EIO, engine=engine)


# ---------------------------------------------------------------- power loss

SEEDS_PER_ENGINE = 3


@needs_root_for_loop
@pytest.mark.parametrize("engine", ENGINES)
def test_power_loss_at_random_moments_then_resume(engine, nbd_devices, source, workdir):  # noqa: F811
    """A copy at 4 MiB/s (checkpoints every 2 s) onto a disk with a volatile write cache loses power
    at a random moment: what was not flushed is gone, and the device comes back under another name.
    The copy resumes from its checkpoint (by dst's id) and ends exact; it resumes from past 0
    whenever a checkpoint was saved before the cut."""
    src, content = source
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    print(f"power loss seed {seed}")

    def command(dst: str, checkpoint, *extra: str) -> list[str]:
        return [
            sys.executable,
            "-m",
            "volcopy.cli",
            "copy",
            str(src),
            dst,
            "--engine",
            engine,
            "--checkpoint",
            str(checkpoint),
            "--dst-id",
            "volume-1",
            "--json",
            *extra,
        ]

    for round_ in range(SEEDS_PER_ENGINE):
        device = nbd_devices.power_loss(SIZE)
        checkpoint = workdir / f"copy-{round_}.ckpt"
        proc = subprocess.Popen(
            command(device.path, checkpoint, "--rate", "4M"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        moment = round(rng.uniform(0.2, 3.8), 2)
        time.sleep(moment)
        device.crash()
        _, err = proc.communicate(timeout=TIMEOUT)
        saved = checkpoint_resume_offset(str(checkpoint))
        print(f"  cut at {moment} s: exit {proc.returncode}, checkpoint at {saved}")
        if proc.returncode != 0:
            assert "volcopy: error:" in err and "Traceback" not in err, err

        path = device.restart()
        resumed = subprocess.run(command(path, checkpoint), capture_output=True, text=True, timeout=TIMEOUT)

        assert resumed.returncode == 0, resumed.stderr
        result = json.loads(resumed.stdout)
        if proc.returncode != 0:  # cut mid-copy (a finished copy removed its checkpoint)
            assert result["resumed_from"] == saved
        assert result["digest"] == reference_digest(content)
        assert read_all(path, SIZE) == content
        assert device.backing_bytes(0, SIZE) == content, "durable after the resumed copy's flush"
