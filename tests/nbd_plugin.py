"""An nbdkit Python plugin for tests: a disk over a backing file that fails on demand or loses power.

    nbdkit python nbd_plugin.py file=BACKING [control=FAULTS.json] [writeback=1] [log=LOG]

file       the backing file (its size is the disk's size); opened read-write.
control    a JSON file read again whenever it changes (replace it atomically, by rename). While it
           exists, requests that match it fail:
               {"errno": "EIO",
                "read":  true | [[offset, length], ...],   # NBD pread
                "write": true | [[offset, length], ...],   # NBD pwrite, zero and trim
                "flush": true,                             # NBD flush (and the flush of a FUA write)
                "corrupt": [[offset, length], ...],        # reads there succeed, every byte inverted
                "delay": 0.05}                             # seconds every request takes first
           ``true`` fails every request of that kind; a list fails those that overlap a range.
           A missing file (or a missing key) fails nothing. ``delay`` makes a slow disk, for tests
           that must stop a copy in the middle (Ctrl-C, cancel).
writeback  a disk with a volatile write cache: writes are kept in this process's memory (pending)
           and read back from there; only a flush (or a write with FUA) copies them into the
           backing file and fdatasyncs it. Killing nbdkit (SIGKILL) is a power cut: what was
           pending is lost and the backing file holds exactly the durable content.
           Without writeback, writes go straight to the backing file (still made durable only by
           a flush).
log        one line per request ("pwrite 4096 8192 flags=0x0", "flush", "FAULT pread ..."), as
           evidence of what the layers above (nbdfuse, the loop device) actually send.

Used by tests/nbd_devices.py; nothing here is imported by the tests themselves.
"""

import builtins
import errno
import json
import os
import time

import nbdkit

API_VERSION = 2
BLOCK = 4096  # the granule of the pending (volatile) cache
builtins_open = builtins.open  # ``open`` below is the nbdkit callback

_params = {"file": None, "control": None, "writeback": False, "log": None}
_fd = -1
_size = 0
_pending: dict[int, bytes] = {}  # block number -> BLOCK bytes written but not yet flushed
_log = None
_control_key = None
_faults: dict = {}


# ------------------------------------------------------------------ configuration


def config(key, value):
    if key in ("file", "control", "log"):
        _params[key] = value
    elif key == "writeback":
        _params[key] = value.strip().lower() in ("1", "true", "yes", "on")
    else:
        raise RuntimeError(f"nbd_plugin: unknown parameter {key}={value}")


def config_complete():
    if not _params["file"]:
        raise RuntimeError("nbd_plugin: file=BACKING is required")


def get_ready():
    global _fd, _size, _log
    _fd = os.open(_params["file"], os.O_RDWR | os.O_CLOEXEC)
    _size = os.fstat(_fd).st_size
    if _params["log"]:
        _log = builtins_open(_params["log"], "a", buffering=1)  # noqa: SIM115 - lives as long as nbdkit
        _log.write(f"ready size={_size} writeback={int(_params['writeback'])}\n")


def thread_model():
    # A write-back disk serves one request at a time: its pending cache needs no lock. Otherwise requests
    # run in parallel, as on a real disk: a slow one ("delay") is slow in latency, not in throughput.
    if _params["writeback"]:
        return nbdkit.THREAD_MODEL_SERIALIZE_ALL_REQUESTS
    return nbdkit.THREAD_MODEL_PARALLEL


def open(readonly):  # noqa: A001 - the name nbdkit calls
    return {}


def get_size(h):
    return _size


def block_size(h):
    return (1, BLOCK, 32 * 1024 * 1024)


def can_write(h):
    return True


def can_flush(h):
    return True


def can_fua(h):
    return nbdkit.FUA_NATIVE


def can_trim(h):
    return True


def can_zero(h):
    return True


def can_fast_zero(h):
    return False


def can_multi_conn(h):
    # Pending writes are per-process, so a flush on any connection would cover all of them;
    # advertising it anyway is unnecessary: nbdfuse uses one connection.
    return False


def can_cache(h):
    return nbdkit.CACHE_NONE


def can_extents(h):
    return False


def is_rotational(h):
    return False


# ------------------------------------------------------------------ faults


def _load_faults():
    global _control_key, _faults
    path = _params["control"]
    if not path:
        return
    try:
        st = os.stat(path)
    except FileNotFoundError:
        _control_key, _faults = None, {}
        return
    key = (st.st_ino, st.st_mtime_ns, st.st_size)
    if key == _control_key:
        return
    try:
        with builtins_open(path) as f:
            faults = json.load(f)
    except (OSError, ValueError):
        return  # being replaced; keep the previous table
    _control_key, _faults = key, faults


def _check(kind, op, offset=0, count=0):
    _load_faults()
    if _faults.get("delay"):
        time.sleep(_faults["delay"])
    spec = _faults.get(kind)
    if not spec:
        return
    if spec is not True:
        end = offset + count
        if not any(offset < o + n and o < end for o, n in spec):
            return
    name = _faults.get("errno", "EIO")
    err = getattr(errno, name, errno.EIO)
    _note(f"FAULT {op} {offset} {count} {name}")
    nbdkit.set_error(err)
    raise OSError(err, f"nbd_plugin: injected {name} into {op} at {offset}+{count}")


def _note(line):
    if _log is not None:
        _log.write(line + "\n")


# ------------------------------------------------------------------ data


def _backing_read(offset, count):
    data = os.pread(_fd, count, offset)
    if len(data) < count:  # the backing file is the disk's size; pad defensively
        data += bytes(count - len(data))
    return data


def _backing_write(offset, data):
    view = memoryview(data)
    while view:
        n = os.pwrite(_fd, view, offset)
        view = view[n:]
        offset += n


def _read(offset, count):
    """The disk as the client sees it: pending blocks over the backing file."""
    if not _pending:
        return _backing_read(offset, count)
    out = bytearray(_backing_read(offset, count))
    first, last = offset // BLOCK, (offset + count - 1) // BLOCK
    for b in range(first, last + 1):
        block = _pending.get(b)
        if block is None:
            continue
        bstart = b * BLOCK
        lo, hi = max(offset, bstart), min(offset + count, bstart + BLOCK)
        out[lo - offset : hi - offset] = block[lo - bstart : hi - bstart]
    return bytes(out)


def _write(offset, data, durable):
    if not _params["writeback"]:
        _backing_write(offset, data)
        if durable:
            os.fdatasync(_fd)
        return
    count = len(data)
    first, last = offset // BLOCK, (offset + count - 1) // BLOCK
    for b in range(first, last + 1):
        bstart = b * BLOCK
        lo, hi = max(offset, bstart), min(offset + count, bstart + BLOCK)
        if lo == bstart and hi == bstart + BLOCK:
            block = bytes(data[lo - offset : hi - offset])
        else:
            block = bytearray(_read(bstart, min(BLOCK, _size - bstart)).ljust(BLOCK, b"\0"))
            block[lo - bstart : hi - bstart] = data[lo - offset : hi - offset]
            block = bytes(block)
        if durable:
            _pending.pop(b, None)
        else:
            _pending[b] = block
    if durable:
        # FUA: this write (and only this one) is durable when the reply goes out.
        _backing_write(offset, data)
        os.fdatasync(_fd)


def _flush():
    for b in sorted(_pending):
        bstart = b * BLOCK
        _backing_write(bstart, _pending[b][: max(0, min(BLOCK, _size - bstart))])
    _pending.clear()
    os.fdatasync(_fd)


# ------------------------------------------------------------------ requests


def pread(h, buf, offset, flags):
    count = len(buf)
    _note(f"pread {offset} {count}")
    _check("read", "pread", offset, count)
    buf[:] = _read(offset, count)
    for o, n in _faults.get("corrupt", []):  # silent corruption: the disk returns wrong bytes
        lo, hi = max(offset, o), min(offset + count, o + n)
        if lo < hi:
            _note(f"CORRUPT pread {lo} {hi - lo}")
            buf[lo - offset : hi - offset] = bytes(b ^ 0xFF for b in buf[lo - offset : hi - offset])


def pwrite(h, buf, offset, flags):
    count = len(buf)
    fua = bool(flags & nbdkit.FLAG_FUA)
    _note(f"pwrite {offset} {count} flags={flags:#x}{' FUA' if fua else ''}")
    _check("write", "pwrite", offset, count)
    if fua:
        _check("flush", "fua", offset, count)
    _write(offset, buf, durable=fua)


def zero(h, count, offset, flags):
    fua = bool(flags & nbdkit.FLAG_FUA)
    _note(f"zero {offset} {count} flags={flags:#x}{' FUA' if fua else ''}")
    _check("write", "zero", offset, count)
    if fua:
        _check("flush", "fua", offset, count)
    _write(offset, bytes(count), durable=fua)


def trim(h, count, offset, flags):
    fua = bool(flags & nbdkit.FLAG_FUA)
    _note(f"trim {offset} {count} flags={flags:#x}{' FUA' if fua else ''}")
    _check("write", "trim", offset, count)
    if fua:
        _check("flush", "fua", offset, count)
    _write(offset, bytes(count), durable=fua)  # a trimmed range reads back as zeros


def flush(h, flags):
    _note(f"flush pending_blocks={len(_pending)}")
    _check("flush", "flush")
    _flush()
