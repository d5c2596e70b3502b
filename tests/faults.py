"""Real faults for the tests, on 127.0.0.1 only.

- :class:`MotoProcess`: moto's S3 server as a separate OS process (the session's ThreadedMotoServer
  runs inside the test process and cannot be paused), so a test can SIGSTOP and SIGCONT it.
- :class:`ThrottlingProxy`: a small real HTTP proxy that answers ``503 SlowDown`` (with S3's XML
  error body) to every second request and forwards the others to an upstream server, counting what
  it saw per client (boto3 vs pyarrow's AWS SDK) so a test can show that both retried.
- :class:`KillOnMarker`: SIGKILL of a Ray Train worker's OS process at a point the worker marks.
"""
from __future__ import annotations

import http.client
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

from builders import free_port

# Hop-by-hop headers are the proxy's own business, never forwarded.
_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}


class MotoProcess:
    """``python -m moto.server`` on 127.0.0.1 in its own process (own process group, so a
    SIGSTOP reaches it and nothing else)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=1).read()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"moto server on {self.endpoint} did not start") from None
                time.sleep(0.2)

    def pause(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)  # a stopped process would not act on SIGTERM
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _client(headers) -> str:
    agent = headers.get("User-Agent", "")
    if "Boto3" in agent or "Botocore" in agent:
        return "boto3"
    if "aws-sdk-cpp" in agent:
        return "pyarrow"
    return "other"


def s3_error_body(code: str, message: str) -> bytes:
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}'
            f'</Message><RequestId>hello-ray-fault-proxy</RequestId></Error>').encode()


ERRORS = {  # status, S3 error code, message: what S3 answers
    "SlowDown": (503, "SlowDown", "Please reduce your request rate."),
    "AccessDenied": (403, "AccessDenied", "Access Denied"),
}


class ThrottlingProxy:
    """An HTTP proxy on 127.0.0.1 in front of an S3 server that answers S3 errors for real.

    - ``every=2``: every second request gets ``503 SlowDown`` (S3's XML error body); the retry
      of a request just throttled always passes: real SlowDown is rate-based and a client's
      backoff earns it room, and with concurrent requests a strict alternation could otherwise
      throttle one request on every attempt. ``every=0``: no throttling.
    - :meth:`fail_next`: the next ``n`` requests all get an error (an outage longer than a
      client's own retries), e.g. ``AccessDenied`` to show what is *not* retried.

    ``seen`` counts requests per client (boto3 / pyarrow), ``throttled`` the errors sent,
    ``retried`` the throttled requests that the same client sent again; ``log`` lists
    (client, method, path, status sent or 0 when forwarded).
    """

    def __init__(self, upstream: str, every: int = 2) -> None:
        self.upstream = urlparse(upstream)
        self.every = every
        self.seen: Counter[str] = Counter()
        self.throttled: Counter[str] = Counter()
        self.retried: Counter[str] = Counter()
        self.log: list[tuple[str, str, str, int]] = []
        self._pending: set[tuple[str, str, str, str]] = set()
        self._outage: list[str] = []  # error names for the next requests
        self._n = 0
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def fail_next(self, n: int, error: str = "SlowDown") -> None:
        with self._lock:
            self._outage = [error] * n

    def pending(self) -> set[tuple[str, str, str, str]]:
        """The throttled requests never sent again: (client, method, path, range)."""
        with self._lock:
            return set(self._pending)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _decide(self, client: str, method: str, path: str, span: str) -> str | None:
        """Count the request; the name of the error to answer, or None to forward it.
        ``span``: its Range header (the parts of one object read in parallel differ in it)."""
        with self._lock:
            self._n += 1
            self.seen[client] += 1
            ident = (client, method, path, span)
            retry = ident in self._pending
            self._pending.discard(ident)
            self.retried[client] += retry
            if self._outage:
                error: str | None = self._outage.pop()
            elif self.every and not retry and self._n % self.every == 0:
                error = "SlowDown"
            else:
                error = None
            if error:
                self.throttled[client] += 1
                self._pending.add(ident)
            self.log.append((client, method, path, ERRORS[error][0] if error else 0))
            return error

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect

            def log_message(self, *args) -> None:  # quiet: the counters are the record
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = bytearray()
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass  # trailers
                            return bytes(out)
                        out += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _answer(self, error: str) -> None:
                status, code, message = ERRORS[error]
                body = s3_error_body(code, message)
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _forward(self, body: bytes) -> None:
                up = proxy.upstream
                conn = http.client.HTTPConnection(up.hostname, up.port, timeout=120)
                try:
                    # The client's own Host header (it is signed) and headers, the body re-sent whole.
                    conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                    for k, v in self.headers.items():
                        if k.lower() not in _HOP and k.lower() not in ("content-length", "expect"):
                            conn.putheader(k, v)
                    conn.putheader("Content-Length", str(len(body)))
                    conn.endheaders(body)
                    resp = conn.getresponse()
                    data = resp.read()
                    self.send_response(resp.status, resp.reason)
                    for k, v in resp.getheaders():
                        if k.lower() not in _HOP and k.lower() != "content-length":
                            self.send_header(k, v)
                    length = resp.getheader("Content-Length") if self.command == "HEAD" else None
                    self.send_header("Content-Length", length or str(len(data)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                finally:
                    conn.close()

            def _handle(self) -> None:
                body = self._body()  # always consumed, so the connection stays usable
                error = proxy._decide(_client(self.headers), self.command, self.path,
                                      self.headers.get("Range", ""))
                if error:
                    self._answer(error)
                else:
                    self._forward(body)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        return Handler


class KillOnMarker:
    """A thread that waits for a Train worker's kill-drill marker (launcher.KillDrill: the worker
    writes its pid into the store, then waits) and kills that OS process with SIGKILL.

    ``pid`` / ``cmdline`` say what was killed (the process title of a Ray Train worker starts
    with ``ray::``); ``gone`` that the process had vanished within 10 s of the signal.
    """

    def __init__(self, store, key: str, drill, timeout_s: float = 600.0) -> None:
        import pickle

        self.store = pickle.loads(pickle.dumps(store))  # own clients: the driver uses the original
        self.mkey, self.name = drill.marker(key)
        self.timeout_s = timeout_s
        self.pid: int | None = None
        self.cmdline = ""
        self.gone = False
        self.killed_at = float("nan")     # wall clock (time.time) of the signal
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        while not self._stop.is_set() and time.monotonic() < deadline:
            if self.name in self.store.list_files(self.mkey):
                pid = int(self.store.get_bytes(self.mkey, self.name))
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        self.cmdline = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
                except OSError:
                    self.cmdline = ""
                os.kill(pid, signal.SIGKILL)
                self.killed_at = time.time()
                self.pid = pid
                end = time.monotonic() + 10
                while time.monotonic() < end and not self.gone:
                    self.gone = not os.path.exists(f"/proc/{pid}") or _zombie(pid)
                    time.sleep(0.05)
                return
            self._stop.wait(0.25)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(15)


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True
