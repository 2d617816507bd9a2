"""What the agent does to a running QEMU, over QMP (the qemu.qmp library).

The guest's disk is a device whose BlockBackend sits on a node graph. Fencing puts a local qcow2
overlay on top (blockdev-snapshot), so the guest keeps writing while src gets nothing; cancel commits
the overlay back into src; complete re-points the overlay's backing from src to dst (blockdev-reopen)
and commits it into dst. Each step here is idempotent or checks the graph first, so that a restarted
agent can run the same step again.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import threading
import time

from qemu.qmp import ExecuteError, QMPClient, QMPError

JOB_POLL_SECONDS = 0.02
CONNECT_PATIENCE_SECONDS = 1.0


class QemuError(Exception):
    """QEMU refused or failed a command; the message is QEMU's own."""


class QemuNotRunning(QemuError):
    """The server's QMP socket does not answer: its QEMU is not running."""


def short_name(prefix: str, *parts: str) -> str:
    """Node and job names (QEMU allows 31 characters) derived from ids that may be long UUIDs."""
    return prefix + hashlib.blake2b("/".join(parts).encode(), digest_size=8).hexdigest()


class Qmp:
    """One QMP connection to one QEMU, owned by a thread of its own that runs the connection's event
    loop; other threads hand it commands. (The library's synchronous shim runs its loop in whichever
    thread calls, which a threaded server cannot use safely.) It connects on first use and again
    after a failure."""

    def __init__(self, socket_path: str, timeout: float = 300.0):
        self.socket_path = socket_path
        self.timeout = timeout
        self._client: QMPClient | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"qmp {socket_path}", daemon=True)
        self._thread.start()

    def is_running(self) -> bool:
        try:
            self.cmd("query-status")
            return True
        except QemuNotRunning:
            return False

    def cmd(self, command: str, /, **args):
        future = asyncio.run_coroutine_threadsafe(self._execute(command, args), self._loop)
        return future.result(self.timeout)

    async def _execute(self, command: str, args: dict):
        if self._client is None:
            self._client = await self._connect()
        try:
            result = await self._client.execute(command, args or None)
        except ExecuteError as exc:
            raise QemuError(f"{command}: {exc}") from None
        except (OSError, EOFError, QMPError) as exc:
            await self._drop()
            raise QemuNotRunning(f"QEMU went away during {command}: {exc}") from None
        self._client.events.clear()  # events are not used; do not let them pile up
        return result

    async def _connect(self) -> QMPClient:
        """A QEMU that is starting refuses connections for a moment after its socket file appears, as
        does the stale socket of one that died: only a refusal that lasts means "not running"."""
        deadline = time.monotonic() + CONNECT_PATIENCE_SECONDS
        while True:
            client = QMPClient("volcopy-compute-agent")
            try:
                await client.connect(self.socket_path)
                return client
            except (OSError, QMPError) as exc:
                if time.monotonic() >= deadline:
                    raise QemuNotRunning(
                        f"QEMU is not running (QMP socket {self.socket_path}: {exc})"
                    ) from None
            await asyncio.sleep(0.05)

    async def _drop(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                await client.disconnect()
            except Exception:  # noqa: BLE001 - closing a broken connection
                pass

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._drop(), self._loop).result(self.timeout)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()


def _device(qmp: Qmp, qdev: str) -> dict:
    for block in qmp.cmd("query-block"):
        path = block.get("qdev", "")
        if path == qdev or path.startswith(f"/machine/peripheral/{qdev}/"):
            return block
    raise QemuError(f"no disk device {qdev!r} in this QEMU")


def top_node(qmp: Qmp, qdev: str) -> str:
    """The node the device's BlockBackend sits on."""
    inserted = _device(qmp, qdev).get("inserted")
    if not inserted:
        raise QemuError(f"disk device {qdev!r} has no medium")
    return inserted["node-name"]


def nodes(qmp: Qmp) -> dict[str, dict]:
    return {n["node-name"]: n for n in qmp.cmd("query-named-block-nodes")}


WRITTEN_BITMAP = "volcopy-written"


def track_writes(qmp: Qmp, overlay: str) -> None:
    """A dirty bitmap on the overlay counts what the guest writes while fenced, whatever path the write
    takes (the device's own statistics miss writes that do not come from the device model)."""
    if WRITTEN_BITMAP not in {b["name"] for b in nodes(qmp).get(overlay, {}).get("dirty-bitmaps", [])}:
        qmp.cmd("block-dirty-bitmap-add", node=overlay, name=WRITTEN_BITMAP)


def bytes_written(qmp: Qmp, overlay: str) -> int:
    """Bytes of the disk the guest changed since the fence (in the bitmap's 64 KiB granules)."""
    for bitmap in nodes(qmp).get(overlay, {}).get("dirty-bitmaps", []):
        if bitmap["name"] == WRITTEN_BITMAP:
            return bitmap["count"]
    raise QemuError(f"overlay {overlay} has no write tracking")


def add_overlay(qmp: Qmp, overlay_path: str, file_node: str, node: str, size: int) -> None:
    """A fresh qcow2 file and its two nodes, not yet in the device's chain."""
    existing = nodes(qmp)
    if node in existing:
        return
    if file_node not in existing:
        # The guest's writes land here: readable by root alone (qemu-img keeps an existing file's mode).
        os.close(os.open(overlay_path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
        os.chmod(overlay_path, 0o600)
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", overlay_path, str(size)],
            check=True,
            capture_output=True,
        )
        qmp.cmd("blockdev-add", driver="file", **{"node-name": file_node, "filename": overlay_path})
    qmp.cmd("blockdev-add", driver="qcow2", file=file_node, backing=None, **{"node-name": node})


def snapshot(qmp: Qmp, base: str, overlay: str) -> None:
    """Moves the device onto the overlay; from its return on, nothing writes to base. QEMU drains
    base's in-flight requests before it switches."""
    qmp.cmd("blockdev-snapshot", node=base, overlay=overlay)


def repoint_backing(qmp: Qmp, overlay: str, overlay_file: str, backing: str) -> None:
    """blockdev-reopen takes the node's whole option set; these are the ones add_overlay used."""
    qmp.cmd(
        "blockdev-reopen",
        options=[{"driver": "qcow2", "node-name": overlay, "file": overlay_file, "backing": backing}],
    )


def add_raw_volume(qmp: Qmp, node: str, path: str, is_block_device: bool) -> None:
    if node in nodes(qmp):
        return
    qmp.cmd(
        "blockdev-add",
        driver="raw",
        file={
            "driver": "host_device" if is_block_device else "file",
            "filename": path,
            "cache": {"direct": True},
        },
        **{"node-name": node},
    )


def delete_node(qmp: Qmp, node: str) -> None:
    if node in nodes(qmp):
        qmp.cmd("blockdev-del", **{"node-name": node})


def _job(qmp: Qmp, job_id: str) -> dict | None:
    for job in qmp.cmd("query-jobs"):
        if job["id"] == job_id:
            return job
    return None


def commit_active(qmp: Qmp, job_id: str, overlay: str) -> None:
    """Merges the overlay into its backing node and moves the device down onto that node: an active
    block-commit, completed once it is ready. Picks up a job a previous agent left running."""
    if _job(qmp, job_id) is None:
        qmp.cmd("block-commit", device=overlay, **{"job-id": job_id, "auto-dismiss": False})
    completed = False
    while True:
        job = _job(qmp, job_id)
        if job is None:
            return  # dismissed by an earlier run of this step
        status = job["status"]
        if status == "ready" and not completed:
            qmp.cmd("job-complete", id=job_id)
            completed = True
        elif status == "concluded":
            qmp.cmd("job-dismiss", id=job_id)
            if job.get("error"):
                raise QemuError(f"block-commit {job_id} failed: {job['error']}")
            return
        time.sleep(JOB_POLL_SECONDS)
