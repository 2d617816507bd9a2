"""Checkpoints and resume after SIGKILL at random moments, cancel, the rate limit (also changed while
the copy runs), progress reports, the GIL, and bounded memory. Copies run in a subprocess (the CLI)
where they are to be killed."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest

import volcopy
from conftest import MiB, fill_garbage, needs_root_for_loop, read_all, reference_digest, write_layout
from volcopy._core import checkpoint_resume_offset

SIZE = 192 * MiB
RATE = 64 * MiB  # slow enough to be killed mid-copy: 3 s, with a checkpoint due every 2 s


@pytest.fixture(scope="module")
def dense_source(tmp_path_factory):
    """A dense volume with a zero stretch and an odd tail, written once for the module."""
    path = tmp_path_factory.mktemp("resume") / "src.img"
    size = SIZE + 4097
    content = bytearray(write_layout(path, size, [(0, size)], seed=11))
    with open(path, "r+b") as f:
        f.seek(50 * MiB)
        f.write(bytes(20 * MiB))
    content[50 * MiB : 70 * MiB] = bytes(20 * MiB)
    return path, reference_digest(bytes(content)), bytes(content)


def checkpoint_watermark(path) -> int:
    """How far the checkpoint says the copy durably got."""
    return checkpoint_resume_offset(str(path))


def start_copy(src, dst, checkpoint, *extra) -> subprocess.Popen:
    args = [
        sys.executable,
        "-m",
        "volcopy.cli",
        "copy",
        str(src),
        str(dst),
        "--checkpoint",
        str(checkpoint),
        "--rate",
        str(RATE),
        "--json",
        *extra,
    ]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish_copy(src, dst, checkpoint) -> dict:
    proc = start_copy(src, dst, checkpoint)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    return json.loads(out)


def kill_at(proc: subprocess.Popen, seconds: float) -> None:
    time.sleep(seconds)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_copy_resumes_after_sigkill_at_random_moments(dense_source, tmp_path):
    src, digest, content = dense_source
    dst, checkpoint = tmp_path / "dst.img", tmp_path / "copy.ckpt"
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    moments = [round(rng.uniform(0.05, 2.9), 3) for _ in range(3)]
    print(f"kill moments (seed {seed}): {moments}")
    for moment in moments:  # killed again and again: each run resumes the last one's checkpoint
        kill_at(start_copy(src, dst, checkpoint), moment)

    result = finish_copy(src, dst, checkpoint)

    assert result["digest"] == digest
    assert read_all(dst) == content
    assert not checkpoint.exists(), "a finished copy removes its checkpoint"


def wait_for_checkpoint(proc: subprocess.Popen, checkpoint, timeout: float = 30) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        mark = checkpoint_watermark(checkpoint)
        if mark:
            return mark
        time.sleep(0.02)
    raise AssertionError("no checkpoint was written in time")


def test_copy_killed_after_a_checkpoint_resumes_from_it(dense_source, tmp_path):
    src, digest, content = dense_source
    dst, checkpoint = tmp_path / "dst.img", tmp_path / "copy.ckpt"
    proc = start_copy(src, dst, checkpoint)
    mark = wait_for_checkpoint(proc, checkpoint)
    kill_at(proc, 0.3)

    result = finish_copy(src, dst, checkpoint)

    assert result["resumed_from"] >= mark > 0
    assert result["bytes_read"] + result["bytes_skipped"] == result["size"] - result["resumed_from"]
    assert result["digest"] == digest
    assert read_all(dst) == content


@needs_root_for_loop
def test_copy_to_loop_device_resumes_after_sigkill(dense_source, tmp_path, loops):
    src, digest, content = dense_source
    dst = loops.create(len(content) + 512 * 7, garbage=True)
    checkpoint = tmp_path / "copy.ckpt"
    proc = start_copy(src, dst, checkpoint)
    wait_for_checkpoint(proc, checkpoint)
    kill_at(proc, random.uniform(0.0, 0.5))

    result = finish_copy(src, dst, checkpoint)

    assert result["resumed_from"] > 0
    assert result["digest"] == digest
    assert read_all(dst, len(content)) == content


def test_checkpoint_of_another_copy_is_refused(dense_source, tmp_path):
    src, _digest, _content = dense_source
    checkpoint = tmp_path / "copy.ckpt"
    proc = start_copy(src, tmp_path / "dst.img", checkpoint)
    wait_for_checkpoint(proc, checkpoint)
    kill_at(proc, 0)
    write_layout(tmp_path / "other.img", 4 * MiB, [(0, 4 * MiB)], seed=1)

    with pytest.raises(volcopy.CheckpointError, match="another copy"):
        volcopy.copy(tmp_path / "other.img", tmp_path / "dst.img", checkpoint=checkpoint)


def run_in_thread(fn):
    outcome: dict = {}

    def target():
        try:
            outcome["result"] = fn()
        except BaseException as exc:  # noqa: BLE001 - inspected by the test
            outcome["error"] = exc
        outcome["ended"] = time.monotonic()

    thread = threading.Thread(target=target)
    thread.start()
    return thread, outcome


@pytest.mark.parametrize("engine", ["auto", "threads"])
def test_cancel_stops_within_200_ms_and_can_resume(engine, dense_source, tmp_path):
    src, digest, content = dense_source
    cancel = threading.Event()
    checkpoint = tmp_path / "copy.ckpt"
    thread, outcome = run_in_thread(
        lambda: volcopy.copy(
            src, tmp_path / "dst.img", engine=engine, rate_limit=RATE, cancel=cancel, checkpoint=checkpoint
        )
    )
    time.sleep(2.3)  # past the first checkpoint
    cancel.set()
    set_at = time.monotonic()
    thread.join(timeout=10)

    assert isinstance(outcome.get("error"), volcopy.Cancelled)
    latency = outcome["ended"] - set_at
    print(f"cancel latency: {latency * 1000:.0f} ms")
    assert latency < 0.2
    resumed = volcopy.copy(src, tmp_path / "dst.img", checkpoint=checkpoint)
    assert resumed.resumed_from > 0
    assert resumed.digest == digest
    assert read_all(tmp_path / "dst.img") == content


def test_cancelled_copy_without_checkpoint_leaves_no_half_written_file(dense_source, tmp_path):
    src, _digest, _content = dense_source
    cancel = threading.Event()
    cancel.set()

    with pytest.raises(volcopy.Cancelled):
        volcopy.copy(src, tmp_path / "dst.img", cancel=cancel)
    assert not (tmp_path / "dst.img").exists()


def test_rate_limit_holds_within_5_percent_over_any_2_seconds(tmp_path):
    rate, size = 16 * MiB, 56 * MiB
    write_layout(tmp_path / "src.img", size, [(0, size)], seed=12)
    samples = []

    result = volcopy.copy(
        tmp_path / "src.img",
        tmp_path / "dst.img",
        rate_limit=rate,
        progress=lambda done, total: samples.append((time.monotonic(), done)),
    )

    average = size / result.seconds
    print(f"target {rate} B/s, average {average:.0f} B/s ({average / rate:.3f} x)")
    # Never above the limit; below it by the copy's start and final flush, which on this VM put the
    # average at 0.92-1.00 x over three runs each of the builds before and after the fault work.
    assert 0.90 * rate <= average <= 1.05 * rate
    # progress counts finished blocks, so allow one block of measurement granularity per window
    worst = 0.0
    for i, (t0, d0) in enumerate(samples):
        for t1, d1 in samples[i + 1 :]:
            if t1 - t0 >= 2.0:
                worst = max(worst, (d1 - d0 - MiB) / (t1 - t0))
                break
    print(f"worst 2 s window: {worst / rate:.3f} x the limit")
    assert worst <= 1.05 * rate


def test_a_rate_limit_changed_during_the_copy_is_followed_from_then_on(tmp_path):
    """A RateLimit raised from 8 to 24 MiB/s after 2 s (as a mover's budget is, when its other copy
    ends): the copy keeps to the first rate before, and goes at the second after."""
    slow, fast, size = 8 * MiB, 24 * MiB, 64 * MiB
    write_layout(tmp_path / "src.img", size, [(0, size)], seed=13)
    limit = volcopy.RateLimit(slow)
    samples, started = [], time.monotonic()

    def progress(done, total):
        now = time.monotonic()
        samples.append((now, done))
        if now - started >= 2.0 and limit.bytes_per_second == slow:
            limit.bytes_per_second = fast
            samples.append(("raised", now))

    volcopy.copy(tmp_path / "src.img", tmp_path / "dst.img", rate_limit=limit, progress=progress)

    [raised_at] = [t for mark, t in samples if mark == "raised"]
    before = [(t, d) for t, d in samples if t != "raised" and t <= raised_at]
    after = [(t, d) for t, d in samples if t != "raised" and t >= raised_at + 0.1]  # the engine's 50 ms
    rate_before = (before[-1][1] - before[0][1] - MiB) / (before[-1][0] - before[0][0])
    rate_after = (after[-1][1] - after[0][1]) / (after[-1][0] - after[0][0])
    print(f"before {rate_before / MiB:.1f} MiB/s, after {rate_after / MiB:.1f} MiB/s")
    assert rate_before <= 1.05 * slow
    assert 0.85 * fast <= rate_after <= 1.05 * fast + MiB / (after[-1][0] - after[0][0])
    assert read_all(tmp_path / "dst.img") == read_all(tmp_path / "src.img")
    with pytest.raises(volcopy.InvalidRequest, match="whole number of bytes per second, not 0"):
        limit.bytes_per_second = 0


def test_progress_reports_finished_bytes_about_ten_times_a_second(tmp_path):
    size = 40 * MiB
    write_layout(tmp_path / "src.img", size, [(0, size)], seed=13)
    calls = []

    result = volcopy.copy(
        tmp_path / "src.img",
        tmp_path / "dst.img",
        rate_limit=20 * MiB,
        progress=lambda d, t: calls.append((time.monotonic(), d, t, threading.get_ident())),
    )

    assert calls[-1][1:3] == (size, size), "the last report is the end"
    assert all(a[1] <= b[1] for a, b in zip(calls, calls[1:], strict=False)), "done never goes back"
    assert len({c[3] for c in calls}) == 1, "called from the one copying thread"
    assert len(calls) <= result.seconds * 10 + 3
    assert len(calls) >= result.seconds * 5


def test_copy_releases_the_gil(tmp_path):
    size = 24 * MiB
    write_layout(tmp_path / "src.img", size, [(0, size)], seed=14)
    thread, outcome = run_in_thread(
        lambda: volcopy.copy(tmp_path / "src.img", tmp_path / "dst.img", rate_limit=48 * MiB)
    )
    spins = 0
    while thread.is_alive():
        spins += 1
    thread.join()

    assert "result" in outcome
    assert spins > 100_000, f"the main thread ran only {spins} loops while the copy ran"


@needs_root_for_loop
def test_memory_stays_bounded_by_the_queue(tmp_path, loops):
    device = loops.create(2048 * MiB)  # 2 GiB of zeros to read and scan
    script = (
        "import resource, sys, volcopy\n"
        "def rss(field):\n"
        "    for line in open('/proc/self/status'):\n"
        "        if line.startswith(field): return int(line.split()[1]) * 1024\n"
        "before = rss('VmRSS:')\n"
        "r = volcopy.copy(sys.argv[1], sys.argv[2], block_size=1 << 20, queue_depth=16)\n"
        "print(rss('VmHWM:') - before, r.bytes_zero)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, device, str(tmp_path / "dst.img")],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    growth, zero = int(out[0]), int(out[1])

    print(f"peak RSS growth during a 2 GiB copy: {growth / MiB:.1f} MiB")
    assert zero == 2048 * MiB
    assert growth <= 16 * MiB + 16 * MiB, "more than queue_depth * block_size plus a constant"


@needs_root_for_loop
def test_zeroing_a_device_counts_against_the_rate_and_keeps_it_thin(tmp_path, loops):
    """A src of 48 MiB of hole onto a device full of garbage is all zeroing: BLKZEROOUT may write every
    byte, so at 16 MiB/s it takes about 3 s. A loop device turns it into punched holes: its file stays
    thin."""
    with open(tmp_path / "src.img", "wb") as f:
        f.truncate(48 * MiB)
    backing = tmp_path / "dst-backing.img"
    fill_garbage(backing, 48 * MiB)
    dst = loops.attach(backing)

    result = volcopy.copy(tmp_path / "src.img", dst, rate_limit=16 * MiB)

    print(f"48 MiB of zeroing at 16 MiB/s: {result.seconds:.2f} s")
    assert 0.95 * 3 <= result.seconds <= 3 * 1.2
    assert read_all(dst) == bytes(48 * MiB)
    assert os.stat(backing).st_blocks * 512 <= MiB, "the zeroed device's file is a hole again"
