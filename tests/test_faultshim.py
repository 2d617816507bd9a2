"""The fault-injection shim (faultshim.c, faultshim.py) fires for real: each call it supports is failed
under each engine that makes it, and the copy fails with one error line; short transfers are retried
into an exact copy. Then the shim itself: every glibc name of pread/pwrite, an exact count across
threads, no stale descriptor paths, and configuration errors."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from faultshim import CALLS, fault_env, injections, other_lines, plt_calls

from conftest import MiB, needs_root_for_loop, read_all

TIMEOUT = 60
SIZE = 8 * MiB
BLKZEROOUT = 0x127F

FAMILIES = {
    "pread": {
        "pread",
        "pread64",
        "__pread_chk",
        "__pread64_chk",
        "preadv",
        "preadv64",
        "preadv2",
        "preadv64v2",
    },
    "pwrite": {"pwrite", "pwrite64", "pwritev", "pwritev64", "pwritev2", "pwritev64v2"},
    "fallocate": {"fallocate", "fallocate64", "posix_fallocate", "posix_fallocate64"},
}


def family(call: str) -> set[str]:
    return FAMILIES.get(call, {call})


def run(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"hung for {TIMEOUT} s under the fault: {' '.join(cmd)}\n{exc.stderr}")


def copy(src, dst, engine: str, env: dict[str, str], *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "volcopy.cli", "copy", str(src), str(dst), "--engine", engine, "--json"]
    return run(cmd + list(extra), env)


def random_file(path: Path, size: int, seed: int) -> Path:
    path.write_bytes(np.random.default_rng(seed).bytes(size))
    return path


def sparse_file(path: Path) -> Path:
    """Data, a hole and a zero block: a copy zeroes them in dst (fallocate, or BLKZEROOUT)."""
    rng = np.random.default_rng(7)
    with open(path, "wb") as f:
        f.truncate(SIZE)
        f.write(rng.bytes(2 * MiB))
        f.seek(4 * MiB)
        f.write(bytes(MiB))
        f.seek(6 * MiB)
        f.write(rng.bytes(MiB))
    return path


@pytest.fixture
def vol(tmp_path) -> Path:
    """Where sources and destinations live: FAULT_PATH, which leaves out the checkpoint and Python."""
    d = tmp_path / "vol"
    d.mkdir()
    return d


def assert_failed_by(proc: subprocess.CompletedProcess, call: str, path_part: str) -> list:
    fired = injections(proc.stderr)
    assert fired, f"the shim did not fire: {proc.stderr}"
    assert {i.call for i in fired} <= family(call), fired
    assert all(path_part in i.path for i in fired), fired
    assert proc.returncode == 1, proc.stderr
    errors = other_lines(proc.stderr)
    assert len(errors) == 1 and errors[0].startswith("volcopy: error: "), proc.stderr
    return fired


# ---------------------------------------------------------------- every call, on every engine that makes it

# (engine, call, nth, what): "data" is an aligned 8 MiB copy to a new file; "tail" a size that is not a
# multiple of 4096, whose last piece goes through the page cache with pread/pwrite under every engine;
# "zero" a sparse source onto an existing file, whose holes are punched with fallocate.
FILE_CASES = [
    ("sync", "pread", 2, "data"),
    ("sync", "pwrite", 2, "data"),
    ("sync", "fdatasync", 1, "data"),
    ("sync", "fallocate", 2, "zero"),
    ("threads", "pread", 2, "data"),
    ("threads", "pwrite", 2, "data"),
    ("threads", "fdatasync", 1, "data"),
    ("threads", "fallocate", 2, "zero"),
    ("aio", "io_submit", 1, "data"),  # the reads
    ("aio", "io_submit", 2, "data"),  # the writes
    ("aio", "pread", 1, "tail"),
    ("aio", "pwrite", 1, "tail"),
    ("aio", "fdatasync", 1, "data"),
    ("aio", "fallocate", 2, "zero"),
    ("io_uring", "io_uring_submit", 1, "data"),
    ("io_uring", "io_uring_submit", 2, "data"),
    ("io_uring", "io_uring_enter", 1, "data"),
    ("io_uring", "io_uring_enter", 2, "data"),
    ("io_uring", "pread", 1, "tail"),
    ("io_uring", "pwrite", 1, "tail"),
    ("io_uring", "fdatasync", 1, "data"),
    ("io_uring", "fallocate", 2, "zero"),
]


@pytest.mark.parametrize(
    "engine,call,nth,what", FILE_CASES, ids=[f"{e}-{c}-{n}-{w}" for e, c, n, w in FILE_CASES]
)
def test_a_faulted_call_fails_the_copy(tmp_path, vol, engine, call, nth, what):
    if what == "zero":
        src, dst = sparse_file(vol / "src"), random_file(vol / "dst", SIZE, 2)
    else:
        src, dst = random_file(vol / "src", SIZE + (1000 if what == "tail" else 0), 1), vol / "dst"
    env = fault_env(call, nth=nth, errno="ENOSPC" if call == "fallocate" else "EIO", path=vol)
    proc = copy(src, dst, engine, env, "--checkpoint", str(tmp_path / "ck"))
    fired = assert_failed_by(proc, call, "io_uring" if call.startswith("io_uring") else str(vol))
    assert [i.n for i in fired] == [nth]
    if call in ("pread", "pwrite", "fallocate"):
        assert fired[0].offset >= 0 and fired[0].length > 0
    if what == "tail":  # the piece after the last whole 4096 bytes, through the page cache
        assert fired[0].offset + fired[0].length == SIZE + 1000


# ---------------------------------------------------------------- short transfers are retried

SHORT_CASES = [("sync", "pread"), ("sync", "pwrite"), ("threads", "pread"), ("threads", "pwrite")]


@pytest.mark.parametrize("engine,call", SHORT_CASES)
def test_short_transfers_still_copy_exactly(vol, engine, call):
    src = random_file(vol / "src", SIZE, 3)
    proc = copy(src, vol / "dst", engine, fault_env(call, nth=2, count=4, short=True, path=vol))
    assert proc.returncode == 0, proc.stderr
    fired = injections(proc.stderr)
    assert sorted(i.n for i in fired) == [2, 3, 4, 5]  # worker threads may log out of order
    assert all(i.short == i.length // 2 for i in fired), fired
    assert read_all(vol / "dst") == read_all(src)
    assert json.loads(proc.stdout)["bytes_written"] == SIZE


def test_partial_io_submit_still_copies_exactly(vol):
    """io_submit taking only some of the iocbs (a short submission) is resubmitted."""
    src = random_file(vol / "src", SIZE, 4)
    proc = copy(src, vol / "dst", "aio", fault_env("io_submit", count="all", short=True, path=vol))
    assert proc.returncode == 0, proc.stderr
    fired = injections(proc.stderr)
    assert fired and all(i.short == int(i.extra["nr"]) // 2 for i in fired), fired
    assert read_all(vol / "dst") == read_all(src)


def test_a_failed_checkpoint_save_fails_the_copy(tmp_path, vol):
    """The checkpoint is saved every 2 s: a copy slowed to ~3 s saves one, and its fdatasync fails."""
    src = random_file(vol / "src", SIZE, 5)
    ck = tmp_path / "ck"
    proc = copy(
        src, vol / "dst", "sync", fault_env("fdatasync", path=ck), "--checkpoint", str(ck), "--rate", "3M"
    )
    fired = assert_failed_by(proc, "fdatasync", str(ck))
    assert fired[0].path == str(ck)


# ---------------------------------------------------------------- block devices: BLKZEROOUT and fsync


@needs_root_for_loop
@pytest.mark.parametrize("engine", ["sync", "threads", "aio", "io_uring"])
@pytest.mark.parametrize("call", ["ioctl", "fsync"])
def test_block_device_calls(vol, loops, engine, call):
    dst = loops.create(SIZE, garbage=True)
    if call == "fsync":
        src = random_file(vol / "src", SIZE, 6)
        assert_failed_by(copy(src, dst, engine, fault_env(call, path=dst)), call, dst)
        return
    # Zeroing a device: a punched hole first, BLKZEROOUT where that is refused, then written zeros.
    src = sparse_file(vol / "src")
    env = fault_env(
        ["fallocate", "ioctl"], count="all", errno="EOPNOTSUPP", path=dst, ioctl_request=BLKZEROOUT
    )
    proc = copy(src, dst, engine, env)
    assert proc.returncode == 0, proc.stderr
    fired = injections(proc.stderr)
    assert {i.call for i in fired} >= {"fallocate", "ioctl"}
    assert all(i.extra["req"] == hex(BLKZEROOUT) for i in fired if i.call == "ioctl")
    assert read_all(dst) == read_all(src)


# ---------------------------------------------------------------- the shim itself

VARIANTS = textwrap.dedent(
    """
    import ctypes, os, sys
    libc = ctypes.CDLL(None, use_errno=True)  # the global scope: the preloaded shim comes first
    fd = os.open(sys.argv[1], os.O_RDWR)
    buf = ctypes.create_string_buffer(8192)
    class iovec(ctypes.Structure):
        _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]
    iov = (iovec * 2)((ctypes.addressof(buf), 4096), (ctypes.addressof(buf) + 4096, 4096))
    n, off = ctypes.c_size_t(8192), ctypes.c_long(0)
    calls = {
        "pread": (buf, n, off), "pread64": (buf, n, off), "pwrite": (buf, n, off), "pwrite64": (buf, n, off),
        "__pread_chk": (buf, n, off, n), "__pread64_chk": (buf, n, off, n),
        "preadv": (iov, 2, off), "preadv64": (iov, 2, off),
        "pwritev": (iov, 2, off), "pwritev64": (iov, 2, off),
        "preadv2": (iov, 2, off, 0), "preadv64v2": (iov, 2, off, 0),
        "pwritev2": (iov, 2, off, 0), "pwritev64v2": (iov, 2, off, 0),
    }
    out = {}
    for name, args in calls.items():
        f = getattr(libc, name)
        f.restype = ctypes.c_ssize_t
        ctypes.set_errno(0)
        out[name] = [f(fd, *args), ctypes.get_errno()]
    print(__import__("json").dumps(out))
    """
)


def test_every_glibc_name_of_pread_and_pwrite(tmp_path):
    target = random_file(tmp_path / "f", 16384, 8)
    script = tmp_path / "variants.py"
    script.write_text(VARIANTS)
    cmd = [sys.executable, str(script), str(target)]

    proc = run(cmd, fault_env(["pread", "pwrite"], count="all", errno="EROFS", path=target))
    results = json.loads(proc.stdout)
    assert all(r == [-1, 30] for r in results.values()), results
    assert [i.call for i in injections(proc.stderr)] == list(results)

    proc = run(cmd, fault_env(["pread", "pwrite"], count="all", short=True, path=target))
    results = json.loads(proc.stdout)
    assert all(r == [4096, 0] for r in results.values()), results  # 8192 asked, half moved
    assert [i.short for i in injections(proc.stderr)] == [4096] * len(results)


SYNC_AND_ALLOCATE = textwrap.dedent(
    """
    import os, sys
    fd = os.open(sys.argv[1], os.O_RDWR)
    for name, call in [("fsync", lambda: os.fsync(fd)), ("fdatasync", lambda: os.fdatasync(fd)),
                       ("posix_fallocate", lambda: os.posix_fallocate(fd, 0, 8192))]:
        try:
            call()
            print(name, "ok")
        except OSError as e:
            print(name, e.errno)
    """
)


def test_sync_and_allocate_calls_made_by_python(tmp_path):
    target = random_file(tmp_path / "f", 4096, 9)
    script = tmp_path / "s.py"
    script.write_text(SYNC_AND_ALLOCATE)
    log = tmp_path / "log"
    proc = run(
        [sys.executable, str(script), str(target)],
        fault_env(["fsync", "fdatasync", "fallocate"], count="all", errno="EDQUOT", log=log),
    )
    assert proc.stdout.split() == ["fsync", "122", "fdatasync", "122", "posix_fallocate", "122"]
    assert proc.stderr == ""  # FAULT_LOG takes the lines
    assert [i.call for i in injections(log)] == ["fsync", "fdatasync", "posix_fallocate64"]


THREADS = textwrap.dedent(
    """
    import os, sys, threading
    fd = os.open(sys.argv[1], os.O_RDONLY)
    failed = []
    def work():
        for _ in range(300):
            try:
                os.pread(fd, 4096, 0)
            except OSError:
                failed.append(1)
    threads = [threading.Thread(target=work) for _ in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    print(len(failed))
    """
)


def test_the_count_is_exact_across_threads(tmp_path):
    target = random_file(tmp_path / "f", 4096, 10)
    script = tmp_path / "t.py"
    script.write_text(THREADS)
    proc = run(
        [sys.executable, str(script), str(target)], fault_env("pread", nth=500, count=700, path=target)
    )
    assert proc.stdout.strip() == "700"
    assert sorted(i.n for i in injections(proc.stderr)) == list(range(500, 1200))


REUSE = textwrap.dedent(
    """
    import os, sys
    a = os.open(sys.argv[1], os.O_RDONLY)
    os.pread(a, 1, 0)          # counted: 1
    os.close(a)
    b = os.open(sys.argv[2], os.O_RDONLY)
    assert a == b              # the same descriptor number, now another file
    os.pread(b, 1, 0)          # not counted
    os.close(b)
    a = os.open(sys.argv[1], os.O_RDONLY)
    try:
        os.pread(a, 1, 0)      # counted: 2, faulted
    except OSError as e:
        print("faulted", e.errno)
    """
)


def test_descriptors_are_resolved_afresh(tmp_path):
    (tmp_path / "wanted").write_bytes(b"x")
    (tmp_path / "other").write_bytes(b"y")
    script = tmp_path / "r.py"
    script.write_text(REUSE)
    proc = run(
        [sys.executable, str(script), str(tmp_path / "wanted"), str(tmp_path / "other")],
        fault_env("pread", nth=2, path="wanted"),
    )
    assert proc.stdout.strip() == "faulted 5", proc.stderr
    assert [(i.n, Path(i.path).name) for i in injections(proc.stderr)] == [(2, "wanted")]


def test_configuration_errors(tmp_path):
    env = fault_env("pread")
    env["FAULT_CALL"] = "pread,bogus"
    proc = run([sys.executable, "-c", "pass"], env)
    assert proc.returncode == 0 and "faultshim: config error: unknown FAULT_CALL bogus" in proc.stderr
    env = fault_env("fsync")
    env["FAULT_SHORT"] = "1"
    assert "config error" in run([sys.executable, "-c", "pass"], env).stderr
    for bad in [
        dict(call="preadx"),
        dict(call="fsync", short=True),
        dict(call="pread", nth=0),
        dict(call="pread", errno="ENOTANERRNO"),
        dict(call="pread", count=-1),
    ]:
        with pytest.raises(ValueError):
            fault_env(**bad)


def test_the_engine_calls_the_interposed_functions_through_its_plt():
    """io_uring_submit is liburing's, linked into the module: an LD_PRELOAD definition only replaces it
    while the module calls it through its PLT. If this fails (hidden visibility, -Bsymbolic, LTO), fault
    io_uring submissions with "io_uring_enter" instead."""
    calls = plt_calls()
    for name in set(CALLS) - {"io_uring_enter"}:  # that one is trapped with seccomp, not interposed
        assert name in calls, f"{name} is not called through the engine's PLT: the shim cannot replace it"
