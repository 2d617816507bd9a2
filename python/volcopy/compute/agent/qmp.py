"""One QMP connection to one QEMU (the qemu.qmp library), with its events delivered to a callback.

The connection is owned by a thread of its own that runs the connection's event loop; other threads
hand it commands. (The library's synchronous shim runs its loop in whichever thread calls, which a
threaded server cannot use safely.) It connects on first use and again after a failure: a QEMU that
was started again is a new connection, never a silent continuation of the old one.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable

from qemu.qmp import ExecuteError, QMPClient, QMPError

log = logging.getLogger(__name__)

# The events the handoff acts on; others are logged at debug level only.
WATCHED_EVENTS = {"SHUTDOWN", "STOP", "RESUME", "BLOCK_JOB_ERROR", "BLOCK_IO_ERROR"}
CONNECT_TIMEOUT = 10.0  # seconds


class QemuError(Exception):
    """QEMU refused or failed a command, or cannot be reached; the message says which."""


class QemuGone(QemuError):
    """The connection broke during a command: QEMU exited (or was killed) under it."""


class Qmp:
    def __init__(
        self,
        socket_path: str,
        on_event: Callable[[str, dict], None] | None = None,
        timeout: float = 300.0,
    ):
        self.socket_path = socket_path
        self.on_event = on_event
        self.timeout = timeout
        self._client: QMPClient | None = None
        self._events_task: asyncio.Task | None = None
        self._connecting = asyncio.Lock()  # QMP serves one client at a time: one connect at a time
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"qmp {socket_path}", daemon=True)
        self._thread.start()

    def cmd(self, command: str, /, **args):
        future = asyncio.run_coroutine_threadsafe(self._execute(command, args), self._loop)
        return future.result(self.timeout)

    async def _execute(self, command: str, args: dict):
        async with self._connecting:
            if self._client is None:
                await self._connect()
            client = self._client
        try:
            return await client.execute(command, args or None)
        except ExecuteError as exc:
            raise QemuError(f"{command}: {exc}") from None
        except (OSError, EOFError, QMPError) as exc:
            await self._drop(client)
            raise QemuGone(f"QEMU went away during {command}: {exc}") from None

    async def _connect(self) -> None:
        """Only called once the caller knows QEMU runs (its pid file is locked): any failure here is
        an error to report (a wrong path, a permission), never a sign that QEMU stopped."""
        client = QMPClient("volcopy-compute-agent")
        try:
            await asyncio.wait_for(client.connect(self.socket_path), CONNECT_TIMEOUT)
        except (OSError, QMPError, asyncio.TimeoutError) as exc:
            raise QemuError(f"cannot reach QEMU's QMP socket {self.socket_path}: {exc!r}") from None
        self._client = client
        self._events_task = asyncio.get_running_loop().create_task(self._consume_events(client))

    async def _consume_events(self, client: QMPClient) -> None:
        async for event in client.events:
            name, data = event["event"], event.get("data", {})
            if name not in WATCHED_EVENTS:
                log.debug("QEMU %s: event %s", self.socket_path, name)
                continue
            log.info("QEMU %s: event %s %s", self.socket_path, name, data)
            if self.on_event is not None:
                try:
                    self.on_event(name, data)
                except Exception:  # noqa: BLE001 - a handler's fault must not stop event delivery
                    log.exception("handling QEMU event %s failed", name)

    async def _drop(self, broken: QMPClient | None = None) -> None:
        """Closes the connection; with broken, only if that is still the connection (another
        command may have connected anew meanwhile)."""
        if broken is not None and broken is not self._client:
            return
        client, self._client = self._client, None
        if self._events_task is not None:
            self._events_task.cancel()
            self._events_task = None
        if client is not None:
            try:
                await client.disconnect()
            except Exception:  # noqa: BLE001 - closing a broken connection
                pass

    def drop(self) -> None:
        """Forgets the connection (QEMU stopped): the next command connects anew."""
        asyncio.run_coroutine_threadsafe(self._drop(), self._loop).result(self.timeout)

    def close(self) -> None:
        self.drop()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
