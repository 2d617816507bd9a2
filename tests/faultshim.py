"""Fault injection for the engine's tests: runs a process under tests/faultshim.c (LD_PRELOAD).

    from faultshim import fault_env, injections

    env = fault_env("pwrite", nth=2, errno="ENOSPC", path=str(dst))
    proc = subprocess.run([sys.executable, "-m", "volcopy.cli", "copy", src, dst, "--engine", "sync"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert [i.call for i in injections(proc.stderr)] == ["pwrite"]

The shim is compiled with gcc once per process (a test session) into a temporary directory, removed at
exit. What each variable means is documented at the top of faultshim.c. The counters are per process: a
child process that inherits the environment loads the shim too and counts from zero, so run the command
under test directly (subprocess's own timeout rather than timeout(1)); with "io_uring_enter" a child
without the shim is killed by the inherited seccomp filter the first time it submits to an io_uring.
"""

from __future__ import annotations

import atexit
import errno as errno_module
import os
import re
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

SOURCE = Path(__file__).with_name("faultshim.c")

# pread covers pread, pread64, __pread_chk, __pread64_chk and the preadv family, pwrite the same;
# fallocate covers fallocate(64) and posix_fallocate(64).
CALLS = (
    "pread",
    "pwrite",
    "fallocate",
    "fdatasync",
    "fsync",
    "ioctl",
    "io_submit",
    "io_uring_submit",
    "io_uring_enter",  # a seccomp trap on io_uring_enter(2) that submits: needs no PLT call (x86_64)
)
SHORT_CALLS = ("pread", "pwrite", "io_submit")

# Every variable the shim reads: a caller's own are dropped so that only what fault_env says applies.
_VARIABLES = (
    "FAULT_CALL",
    "FAULT_NTH",
    "FAULT_COUNT",
    "FAULT_ERRNO",
    "FAULT_SHORT",
    "FAULT_PATH",
    "FAULT_IOCTL_REQ",
    "FAULT_LOG",
    "FAULTSHIM_SECCOMP_FILTER",
)

_lock = threading.Lock()
_built: Path | None = None


class FaultShimUnavailable(RuntimeError):
    """The shim cannot be built here (no gcc, or it failed)."""


def build(cc: str | None = None) -> Path:
    """The compiled shim, built on first use in this process and reused after."""
    global _built
    with _lock:
        if _built is not None and _built.exists():
            return _built
        cc = cc or os.environ.get("CC") or "gcc"
        if shutil.which(cc) is None:
            raise FaultShimUnavailable(f"{cc} not found: the fault shim needs a C compiler")
        directory = Path(tempfile.mkdtemp(prefix="faultshim-"))
        atexit.register(shutil.rmtree, directory, ignore_errors=True)
        target = directory / "faultshim.so"
        cmd = [cc, "-shared", "-fPIC", "-O2", "-o", str(target), str(SOURCE), "-ldl"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise FaultShimUnavailable(f"{' '.join(cmd)} failed:\n{proc.stderr}")
        _built = target
        return target


def _errno_value(value: str | int) -> str:
    if isinstance(value, int):
        return str(value)
    if value.isdigit():
        return value
    number = getattr(errno_module, value, None)
    if not isinstance(number, int):
        raise ValueError(f"unknown errno name {value!r}")
    return str(number)  # the number: the shim's table of names is not complete


def fault_env(
    call: str | list[str] | tuple[str, ...],
    *,
    nth: int = 1,
    count: int | str = 1,
    errno: str | int = "EIO",
    short: bool = False,
    path: str | os.PathLike | None = None,
    ioctl_request: int | None = None,
    log: str | os.PathLike | None = None,
    base: dict[str, str] | None = None,
) -> dict[str, str]:
    """An environment (``base``, default os.environ, plus the shim) that faults ``call``.

    call: one of CALLS, or several sharing one counter. nth: the first matching call to fault (1-based);
    count: how many in a row (0 or "all": every one from nth on). errno: a name or a number. short: the
    call transfers half (pread/pwrite) or submits half of its iocbs (io_submit) instead of failing.
    path: count only calls on descriptors whose path contains this (not applied to io_uring_submit and
    io_uring_enter). ioctl_request: count only this ioctl request. log: append the injection lines to
    this file rather than to the process's stderr.
    """
    calls = [call] if isinstance(call, str) else list(call)
    unknown = [c for c in calls if c not in CALLS]
    if unknown or not calls:
        raise ValueError(f"unknown call(s) {unknown or calls}; choose from {', '.join(CALLS)}")
    if short and any(c not in SHORT_CALLS for c in calls):
        raise ValueError(f"short applies to {', '.join(SHORT_CALLS)} only")
    if nth < 1:
        raise ValueError("nth counts from 1")
    if count != "all" and (not isinstance(count, int) or count < 0):
        raise ValueError('count is a number >= 0 or "all"')
    env = {k: v for k, v in (os.environ if base is None else base).items() if k not in _VARIABLES}
    shim = str(build())
    preload = env.get("LD_PRELOAD", "")
    env["LD_PRELOAD"] = f"{shim} {preload}".strip() if shim not in preload.split() else preload
    env["FAULT_CALL"] = ",".join(calls)
    env["FAULT_NTH"] = str(nth)
    env["FAULT_COUNT"] = str(count)
    env["FAULT_ERRNO"] = _errno_value(errno)
    if short:
        env["FAULT_SHORT"] = "1"
    if path is not None:
        env["FAULT_PATH"] = os.fspath(path)
    if ioctl_request is not None:
        env["FAULT_IOCTL_REQ"] = hex(ioctl_request)
    if log is not None:
        env["FAULT_LOG"] = os.fspath(log)
    return env


@dataclass
class Injection:
    """One fault the shim injected, parsed from its line."""

    pid: int
    call: str  # the function that was hit: pread64, pwrite, __pread_chk, preadv64v2, io_submit, ...
    n: int  # which matching call it was (1-based, per process)
    fd: int
    offset: int  # -1 where the call has none
    length: int
    result: str | None  # "-EIO", or None for a short transfer
    short: int | None  # bytes (pread/pwrite) or iocbs (io_submit) let through by a short transfer
    path: str
    extra: dict[str, str] = field(default_factory=dict)  # mode=, req=, nr= op= iocb=, pending= ...


_LINE = re.compile(r"^faultshim: (?P<fields>.*?) path=(?P<path>.*)$")


def injections(text: str | os.PathLike) -> list[Injection]:
    """The injections reported in ``text`` (a process's stderr), or in the file at a Path (FAULT_LOG)."""
    if isinstance(text, os.PathLike):
        try:
            text = Path(text).read_text()
        except FileNotFoundError:
            return []
    found = []
    for line in text.splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        fields = dict(part.split("=", 1) for part in m.group("fields").split() if "=" in part)
        known = {"pid", "call", "n", "fd", "offset", "len", "result", "short"}
        found.append(
            Injection(
                pid=int(fields["pid"]),
                call=fields["call"],
                n=int(fields["n"]),
                fd=int(fields["fd"]),
                offset=int(fields["offset"]),
                length=int(fields["len"]),
                result=fields.get("result"),
                short=int(fields["short"]) if "short" in fields else None,
                path=m.group("path"),
                extra={k: v for k, v in fields.items() if k not in known},
            )
        )
    return found


def other_lines(stderr: str) -> list[str]:
    """stderr without the shim's own lines."""
    return [line for line in stderr.splitlines() if not line.startswith("faultshim: ")]


def native_module() -> Path:
    """The engine's installed shared module."""
    import volcopy

    found = sorted(Path(volcopy.__file__).parent.glob("_native*.so"))
    if not found:
        raise FileNotFoundError("volcopy's _native module is not installed")
    return found[0]


def plt_calls(module: str | os.PathLike | None = None) -> set[str]:
    """The functions a shared object calls through its PLT/GOT: those an LD_PRELOAD definition replaces.

    Read from its dynamic relocations (readelf, binutils). io_uring_submit is in this set while liburing,
    linked statically into the module, keeps default visibility and the module is not linked -Bsymbolic;
    otherwise the shim's "io_uring_enter" is the way to fail a submission.
    """
    module = native_module() if module is None else Path(module)
    out = subprocess.run(
        ["readelf", "-W", "--relocs", str(module)], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    names = set()
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 5 and ("JUMP_SLOT" in parts[2] or "GLOB_DAT" in parts[2]):
            names.add(parts[4].split("@")[0])
    return names
