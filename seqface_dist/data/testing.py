"""Real S3 on loopback for tests and benchmarks: moto's server, and a connection-cutting proxy.

    with local_s3("shards") as endpoint:          # http://127.0.0.1:PORT, env set for boto3
        build_identity_tree(root, "s3://shards/ids")
        with CuttingProxy(endpoint, cut_after=20_000) as proxy:
            ...  # read through proxy.url: every connection dies after 20 kB of response

Needs the ``moto[server]`` test extra.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlparse

DUMMY_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
             "AWS_SESSION_TOKEN": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@contextmanager
def local_s3(*buckets: str) -> Iterator[str]:
    """Start moto's S3 server on 127.0.0.1 (free port), point boto3 at it, create buckets."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in [*DUMMY_ENV, "AWS_ENDPOINT_URL"]}
    os.environ.update(DUMMY_ENV)
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    try:
        from seqface_dist.data import s3

        for b in buckets:
            s3.client(endpoint).create_bucket(Bucket=b)
        yield endpoint
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        from seqface_dist.data import s3

        s3.configure("")  # a loader may have made this server the process's default
        server.stop()


_SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
              b"<Message>Please reduce your request rate.</Message></Error>")


class CuttingProxy:
    """A TCP proxy on loopback that resets every connection after ``cut_after`` bytes
    flowed back to the client (None: never). ``cuts`` counts the resets.

    With ``throttle_every`` = k, of every k new connections the first ``throttle_run`` get
    S3's throttling answer (HTTP 503 SlowDown) to their first request and are closed;
    ``throttled`` counts them. A run longer than botocore's own retries (5 attempts) makes
    the error reach the caller's retry loop."""

    def __init__(self, target_url: str, cut_after: int | None, throttle_every: int = 0,
                 throttle_run: int = 1):
        pr = urlparse(target_url)
        self.target = (pr.hostname, pr.port)
        self.cut_after = cut_after
        self.throttle_every, self.throttle_run = throttle_every, throttle_run
        self.cuts = 0
        self.throttled = 0
        self.connections = 0
        self._lock = threading.Lock()
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self._stop = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
                n = self.connections
            if self.throttle_every and (n - 1) % self.throttle_every < self.throttle_run:
                threading.Thread(target=self._throttle, args=(client,), daemon=True).start()
                continue
            upstream = socket.create_connection(self.target)
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _throttle(self, client: socket.socket) -> None:
        try:
            head = b""
            while b"\r\n\r\n" not in head:  # the request line and headers
                data = client.recv(65536)
                if not data:
                    return
                head += data
            client.sendall(b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\n"
                           b"Content-Length: %d\r\nConnection: close\r\n\r\n"
                           % len(_SLOW_DOWN) + _SLOW_DOWN)
            with self._lock:
                self.throttled += 1
        except OSError:
            pass
        finally:
            client.close()

    def _pump(self, src: socket.socket, dst: socket.socket, downstream: bool) -> None:
        sent = 0
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if downstream and self.cut_after is not None and sent + len(data) > self.cut_after:
                    dst.sendall(data[: max(0, self.cut_after - sent)])
                    with self._lock:
                        self.cuts += 1
                    # RST, not FIN: what a dropped connection looks like to the client.
                    dst.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    break
                dst.sendall(data)
                sent += len(data)
        except OSError:
            pass
        finally:
            # shutdown() first: close() alone would not wake the other pump's blocked recv(),
            # and the connection would stay open until it returns.
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def close(self) -> None:
        self._stop = True
        self._sock.close()

    def __enter__(self) -> CuttingProxy:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_EXPIRED = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>ExpiredToken</Code>'
            b"<Message>The provided token has expired.</Message></Error>")


class FaultProxy:
    """An HTTP proxy on loopback in front of an S3 endpoint that injects one fault into
    GETs of keys containing ``only`` (other requests pass through untouched):

    - ``cut_after`` = n: the first GET of each object sends n body bytes, then the
      connection is dropped, so the reader resumes with a ranged GET; then ``on_resume``:
      ``"forbid"`` answers 403 ExpiredToken, ``"replace"`` overwrites the object upstream
      first (the reader's If-Match then gets 412), ``"ignore_range"`` forwards the GET
      without Range/If-Match (200 with the whole object), None forwards it as it is;
    - ``forbid_all``: every matching GET gets 403;
    - ``trickle`` = (n, seconds): the body goes out n bytes at a time with a pause between.

    ``faults`` counts the injected faults; ``resumes`` the ranged GETs seen."""

    def __init__(self, target_url: str, only: str = ".tar", cut_after: int | None = None,
                 on_resume: str | None = None, forbid_all: bool = False,
                 trickle: tuple[int, float] | None = None):
        import http.server

        self.target = target_url
        self.only, self.cut_after, self.on_resume = only, cut_after, on_resume
        self.forbid_all, self.trickle = forbid_all, trickle
        self.faults = self.resumes = 0
        self._cut: set[str] = set()  # objects whose first GET was cut
        self._lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                proxy._get(self)

            def do_HEAD(self) -> None:
                proxy._forward(self, dict(self.headers), b"")

            def do_PUT(self) -> None:
                n = int(self.headers.get("Content-Length", 0))
                proxy._forward(self, dict(self.headers), self.rfile.read(n))

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def _upstream(self, method: str, path: str, headers: dict, body: bytes):
        import http.client

        pr = urlparse(self.target)
        conn = http.client.HTTPConnection(pr.hostname, pr.port, timeout=30)
        headers = {k: v for k, v in headers.items() if k.lower() not in ("host", "connection")}
        conn.request(method, path, body=body or None, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        return resp.status, resp.reason, resp.getheaders(), data

    def _forward(self, h, headers: dict, body: bytes, cut: int | None = None) -> None:
        status, reason, resp_headers, data = self._upstream(h.command, h.path, headers, body)
        h.send_response(status, reason)
        for k, v in resp_headers:
            if k.lower() not in ("connection", "transfer-encoding", "content-length"):
                h.send_header(k, v)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if h.command == "HEAD":
            return
        if cut is not None:
            h.wfile.write(data[:cut])
            h.wfile.flush()
            h.close_connection = True
            # FIN after the data (an RST could drop bytes still in flight, so where the
            # cut lands would vary): the client sees the body end short of Content-Length.
            h.connection.shutdown(socket.SHUT_WR)
            return
        if self.trickle is None or self.only not in h.path:
            h.wfile.write(data)
            return
        n, pause = self.trickle
        try:
            for i in range(0, len(data), n):
                h.wfile.write(data[i:i + n])
                h.wfile.flush()
                time.sleep(pause)
        except OSError:  # the reader gave up (deadline): expected
            h.close_connection = True

    def _error(self, h, status: int, body: bytes) -> None:
        with self._lock:
            self.faults += 1
        h.send_response(status)
        h.send_header("Content-Type", "application/xml")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def _get(self, h) -> None:
        headers = dict(h.headers)
        ranged = any(k.lower() == "range" for k in headers)
        if self.only not in h.path:
            return self._forward(h, headers, b"")
        if self.forbid_all:
            return self._error(h, 403, _EXPIRED)
        if ranged:
            with self._lock:
                self.resumes += 1
            if self.on_resume == "forbid":
                return self._error(h, 403, _EXPIRED)
            if self.on_resume == "replace":
                with self._lock:
                    self.faults += 1
                from seqface_dist.data import s3

                bucket, _, key = h.path.split("?")[0].lstrip("/").partition("/")
                s3.client(self.target).put_object(Bucket=bucket, Key=key, Body=b"new" * 100)
            if self.on_resume == "ignore_range":
                with self._lock:
                    self.faults += 1
                headers = {k: v for k, v in headers.items()
                           if k.lower() not in ("range", "if-match")}
            return self._forward(h, headers, b"")
        with self._lock:
            cut = self.cut_after is not None and h.path not in self._cut
            if cut:
                self._cut.add(h.path)
        return self._forward(h, headers, b"", self.cut_after if cut else None)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
