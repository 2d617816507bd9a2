"""Ctrl-C and cancel stop copy, digest and verify at once: SIGINT to the command (exit 130, and where its
checkpoint resumes), KeyboardInterrupt in the API (``_thread.interrupt_main``, with or without a progress
function), and cancel with no rate limit, also while zeroing and on unaligned extents.

Runs are made long enough to be stopped in the middle without a rate limit by a large volume that stores
nothing: a loop device over an 8 GiB sparse file reads at a few GiB/s (every byte of a device is read),
so the engine has its usual 32 MiB in flight and finishes them within milliseconds of a stop. A slow disk
(a loop device over nbdkit, tests/nbd_devices.py) stands in where one request must take a while."""

from __future__ import annotations

import _thread
import fcntl
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from nbd_devices import BLKFLSBUF, nbd_devices  # noqa: F401 - a fixture

import volcopy
from conftest import ENGINES, MiB, read_all, reference_digest, write_layout
from volcopy._core import checkpoint_resume_offset

LATENCY = 0.2  # the promise: stopped within 200 ms
OPERATIONS = ["copy", "digest", "verify"]
BIG = 64 << 30


@pytest.fixture
def big_disk(loops):
    """BIG bytes of zeros on a loop device, stored as a sparse file: reading them takes seconds (8 GiB
    took 0.63 s here, too close to the tests' 0.5 s before they interrupt)."""
    return loops.create(BIG)


@pytest.fixture
def slow_disk(nbd_devices, workdir):  # noqa: F811 - the fixture imported above
    """A 16 MiB disk of random data whose every request takes 150 ms."""
    device = nbd_devices.faulty(16 * MiB)
    content = write_layout(workdir / "content.img", 16 * MiB, [(0, 16 * MiB)], seed=31)
    with open(device.path, "r+b", buffering=0) as f:
        f.write(content)
        os.fsync(f.fileno())
        # Out of the loop device's page cache: else the buffered (unaligned) reads find it there and
        # never wait for the slow disk (a copy that ended before its cancel, seen once in CI).
        fcntl.ioctl(f.fileno(), BLKFLSBUF)
    device.fail(delay=0.15)
    return device, content


def command(operation: str, src: str, other: str, workdir) -> list[str]:
    args = {"copy": [src, str(workdir / "dst.img")], "digest": [src], "verify": [src, other]}
    return [sys.executable, "-m", "volcopy.cli", operation, *args[operation]]


@pytest.mark.parametrize("operation", OPERATIONS)
def test_ctrl_c_stops_the_command_with_exit_130(operation, big_disk, loops, workdir):
    other = loops.create(BIG)
    proc = subprocess.Popen(command(operation, big_disk, other, workdir), stderr=subprocess.PIPE, text=True)
    wait_until_it_opens(proc, big_disk)  # a loaded machine may take longer than a fixed pause to start
    time.sleep(0.1)
    assert proc.poll() is None, "still running when interrupted"
    proc.send_signal(signal.SIGINT)
    sent = time.monotonic()
    _, err = proc.communicate(timeout=10)
    stopped = time.monotonic() - sent

    print(f"{operation}: exited {stopped * 1000:.0f} ms after SIGINT")
    assert proc.returncode == 130, err
    assert "volcopy: interrupted" in err and "Traceback" not in err
    assert stopped < 1.0


def wait_until_it_opens(proc: subprocess.Popen, path: str, timeout: float = 30.0) -> None:
    """Until the command has opened path: it is then in its operation, past Python's start."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if any(
                os.readlink(f"/proc/{proc.pid}/fd/{fd}") == path for fd in os.listdir(f"/proc/{proc.pid}/fd")
            ):
                return
        except OSError:  # an fd closed while listed
            pass
        time.sleep(0.005)
    raise AssertionError(f"the command never opened {path}")


def wait_until_it_handles_sigint(proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """Until Python has installed its SIGINT handler (SigCgt in /proc): a SIGINT before that kills the
    process outright, which says nothing about volcopy."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(f"/proc/{proc.pid}/status") as f:
            caught = next(int(line.split()[1], 16) for line in f if line.startswith("SigCgt:"))
        if caught & (1 << (signal.SIGINT - 1)):
            return
        time.sleep(0.01)
    raise AssertionError("the command never installed a SIGINT handler")


def test_ctrl_c_says_where_the_checkpoint_resumes_and_the_same_command_finishes(workdir):
    """The reproduction: SIGINT 1.5 s into `copy --rate 2M` of 16 MiB used to run the copy to the end."""
    content = write_layout(workdir / "src.img", 16 * MiB, [(0, 16 * MiB)], seed=32)
    args = [
        sys.executable,
        "-m",
        "volcopy.cli",
        "copy",
        str(workdir / "src.img"),
        str(workdir / "dst.img"),
        "--rate",
        "2M",
        "--checkpoint",
        str(workdir / "copy.ckpt"),
    ]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_until_it_handles_sigint(proc)
    time.sleep(2.5)  # past the first checkpoint (every 2 s)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=10)

    assert proc.returncode == 130, err
    resume_at = checkpoint_resume_offset(str(workdir / "copy.ckpt"))
    assert resume_at > 0
    assert f"the same command resumes at byte {resume_at}" in err
    finished = subprocess.run(args[:-4] + args[-2:] + ["--json"], capture_output=True, text=True, timeout=60)
    assert finished.returncode == 0, finished.stderr
    assert f'"resumed_from": {resume_at}' in finished.stdout
    assert read_all(workdir / "dst.img") == content


def run(operation: str, src: str, other: str, workdir, **options):
    if operation == "copy":
        return volcopy.copy(src, workdir / "dst.img", **options)
    if operation == "digest":
        return volcopy.digest(src)
    return volcopy.verify(src, other)


@pytest.mark.parametrize(
    "operation,progress", [("copy", False), ("copy", True), ("digest", False), ("verify", False)]
)
def test_keyboard_interrupt_reaches_the_caller(operation, progress, big_disk, loops, workdir):
    other = loops.create(BIG)
    options = {"progress": lambda done, total: None} if progress else {}
    running, sent = [True], []

    def interrupt():
        if running[0]:  # never into pytest itself
            sent.append(time.monotonic())
            _thread.interrupt_main()

    threading.Timer(0.5, interrupt).start()
    with pytest.raises(KeyboardInterrupt):
        try:
            run(operation, big_disk, other, workdir, **options)
        finally:
            running[0] = False
    stopped = time.monotonic() - sent[0]

    print(f"{operation}: KeyboardInterrupt {stopped * 1000:.0f} ms after interrupt_main")
    assert stopped < LATENCY
    if operation == "copy":
        assert not (workdir / "dst.img").exists(), "without a checkpoint the file it created is removed"


@pytest.mark.parametrize("engine", ENGINES)
def test_cancel_without_a_rate_limit_stops_a_copy_within_200_ms(engine, big_disk, workdir):
    cancel = threading.Event()
    timer = threading.Timer(0.5, cancel.set)
    timer.start()

    started = time.monotonic()
    with pytest.raises(volcopy.Cancelled):
        volcopy.copy(
            big_disk, workdir / "dst.img", engine=engine, cancel=cancel, checkpoint=workdir / "copy.ckpt"
        )
    stopped = time.monotonic() - started - 0.5

    print(f"cancel latency: {stopped * 1000:.0f} ms")
    assert stopped < LATENCY
    assert 0 < checkpoint_resume_offset(str(workdir / "copy.ckpt")) < BIG


@pytest.mark.parametrize("engine", ENGINES)
def test_cancel_stops_a_copy_that_is_only_zeroing(engine, nbd_devices, workdir):  # noqa: F811
    """src is all hole and dst a slow disk (it writes every zero): the whole copy is zeroing dst, 16 MiB
    a call. (Without a checkpoint: with one, the time also holds the flush its save needs.)"""
    device = nbd_devices.faulty(256 * MiB)
    fill = os.urandom(MiB)
    with open(device.path, "r+b", buffering=0) as f:
        for at in range(0, 256 * MiB, 16 * MiB):  # something to zero in every piece
            os.pwrite(f.fileno(), fill, at)
    device.fail(delay=0.02)
    with open(workdir / "src.img", "wb") as f:
        f.truncate(256 * MiB)
    cancel = threading.Event()
    threading.Timer(0.3, cancel.set).start()

    started = time.monotonic()
    with pytest.raises(volcopy.Cancelled):
        volcopy.copy(workdir / "src.img", device.path, engine=engine, cancel=cancel)
    stopped = time.monotonic() - started - 0.3

    print(f"cancel latency while zeroing: {stopped * 1000:.0f} ms")
    assert stopped < LATENCY
    zeroed = [r for r in device.requests() if r.op in ("zero", "trim")]
    assert 0 < len(zeroed) < 16, "it was zeroing dst, and stopped before the end"
    device.heal()
    result = volcopy.copy(workdir / "src.img", device.path)
    assert result.digest == reference_digest(bytes(256 * MiB))
    assert read_all(device.path, 256 * MiB) == bytes(256 * MiB)


@pytest.mark.parametrize("engine", ENGINES)
def test_cancel_and_progress_reach_a_copy_of_unaligned_extents(engine, slow_disk, workdir):
    """Unaligned extents go through the page cache one at a time; each turn of that path reports and
    sees a cancel too."""
    device, _content = slow_disk
    extents = [(i * 64 * 1024 + 1, 40_000) for i in range(256)]
    cancel = threading.Event()
    reports = []
    threading.Timer(1.0, cancel.set).start()

    started = time.monotonic()
    with pytest.raises(volcopy.Cancelled):
        volcopy.copy(
            device.path,
            workdir / "dst.img",
            engine=engine,
            extents=extents,
            cancel=cancel,
            progress=lambda done, total: reports.append(done),
        )
    stopped = time.monotonic() - started - 1.0

    print(f"cancel latency on unaligned extents: {stopped * 1000:.0f} ms, {len(reports)} progress reports")
    assert stopped < LATENCY
    assert len(reports) >= 5 and reports[-1] > 0
