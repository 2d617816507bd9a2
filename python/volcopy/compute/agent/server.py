"""The agent's listening socket: the standard library's WSGI server (wsgiref; one request per
connection, answered in HTTP/1.1 with Connection: close) with optional TLS, a fixed pool of worker
threads, and a deadline per request.

- A connection gets ``request_timeout`` seconds for its TLS handshake and its whole request, counted
  from when a worker takes it: one that sends nothing, or a byte at a time, is closed, and its worker
  serves the next.
- At most ``max_workers`` connections are served at once, by as many threads started with the server.
  The accept loop waits for a free worker before it takes the next connection, so the others wait in
  the listen backlog: threads never grow with the number of clients.
- The TLS handshake runs in the worker, under the deadline: in the accept loop a silent client would
  stall every other.
"""

from __future__ import annotations

import io
import logging
import queue
import socket
import ssl
import threading
import time
from wsgiref.simple_server import ServerHandler, WSGIRequestHandler, WSGIServer

log = logging.getLogger(__name__)

# After the answer, what a client still sends (a body refused with 413, say) is read and dropped for a
# while: a close with unread bytes resets the connection, and the client may lose the answer with it.
LINGER_SECONDS = 2.0
LINGER_BYTES = 1 << 20


def tls_context(cert_file: str, key_file: str, ca_file: str | None = None) -> ssl.SSLContext:
    """Raises OSError or ssl.SSLError when a file cannot be read or the key does not match."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_file, key_file)
    if ca_file:
        context.load_verify_locations(ca_file)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


class _DeadlineReader(io.RawIOBase):
    """The request's bytes, until its deadline: each read waits only for what is left of it."""

    def __init__(self, sock: socket.socket, deadline: float, timeout: float):
        self._sock, self._deadline, self._timeout = sock, deadline, timeout

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("the request did not arrive within request_timeout")
        self._sock.settimeout(remaining)
        try:
            return self._sock.recv_into(buffer)
        finally:
            self._sock.settimeout(self._timeout)  # writing the answer gets a timeout of its own


class _Response(ServerHandler):
    """HTTP/1.1, with the connection closed after each answer (the client is told so)."""

    http_version = "1.1"

    def cleanup_headers(self) -> None:
        super().cleanup_headers()
        self.headers["Connection"] = "close"


class _Handler(WSGIRequestHandler):
    server: AgentServer

    def setup(self) -> None:
        timeout = self.server.request_timeout
        deadline = time.monotonic() + timeout
        self.connection = self.request
        self.connection.settimeout(timeout)
        if isinstance(self.connection, ssl.SSLSocket):
            self.connection.do_handshake()
        self.rfile = io.BufferedReader(_DeadlineReader(self.connection, deadline, timeout))
        self.wfile = self.connection.makefile("wb")

    def handle(self) -> None:
        # wsgiref's own, with the response class above and the app told it runs in several threads
        self.raw_requestline = self.rfile.readline(65537)
        if len(self.raw_requestline) > 65536:
            self.requestline, self.request_version, self.command = "", "", ""
            self.send_error(414)
            return
        if not self.parse_request():
            return
        response = _Response(self.rfile, self.wfile, self.get_stderr(), self.get_environ(), multithread=True)
        response.request_handler = self
        response.run(self.server.get_app())

    def log_message(self, format, *args) -> None:  # noqa: A002 - the base class's name
        # the request line and status only: never a header (tokens) or a body (connection_info)
        log.info("%s %s", self.client_address[0], format % args)


class AgentServer(WSGIServer):
    def __init__(
        self,
        address: tuple[str, int],
        app,
        *,
        request_timeout: float,
        max_workers: int,
        ssl_context: ssl.SSLContext | None = None,
    ):
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.request_timeout = request_timeout
        self.ssl_context = ssl_context
        self._stopping = threading.Event()
        self._free_workers = threading.Semaphore(max_workers)
        self._connections: queue.SimpleQueue = queue.SimpleQueue()
        super().__init__(address, _Handler)
        # Started here, all of them: the thread count is fixed from the start. Daemons, as
        # ThreadingHTTPServer's were: a request still being served does not hold up the exit.
        for n in range(max_workers):
            threading.Thread(target=self._work, name=f"agent-worker-{n}", daemon=True).start()
        self.set_app(app)
        if ssl_context is not None:
            self.base_environ["HTTPS"] = "on"

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = f"[{host}]" if ":" in host else host
        return f"{'https' if self.ssl_context else 'http'}://{host}:{port}"

    def get_request(self):
        sock, address = super().get_request()
        if self.ssl_context is None:
            return sock, address
        return self.ssl_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), address

    def process_request(self, request, address) -> None:
        while not self._free_workers.acquire(timeout=0.2):
            if self._stopping.is_set():
                request.close()
                return
        self._connections.put((request, address))

    def _work(self) -> None:
        while True:
            self._serve(*self._connections.get())

    def _serve(self, request, address) -> None:
        served = False
        try:
            self.finish_request(request, address)
            served = True
        except Exception as exc:  # noqa: BLE001 - a client's failure (timeout, reset, no TLS) ends only it
            log.info("connection from %s dropped: %s", address[0], exc)
        finally:
            self._close(request, linger=served)
            self._free_workers.release()

    def _close(self, request, linger: bool) -> None:
        try:
            request.shutdown(socket.SHUT_WR)
            deadline, received = time.monotonic() + LINGER_SECONDS, 0
            while linger and received < LINGER_BYTES and (remaining := deadline - time.monotonic()) > 0:
                request.settimeout(remaining)
                data = request.recv(65536)
                if not data:
                    break
                received += len(data)
        except OSError:
            pass
        request.close()

    def stop(self) -> None:
        """From another thread than serve_forever's: stops accepting; requests being served finish."""
        self._stopping.set()
        self.shutdown()
