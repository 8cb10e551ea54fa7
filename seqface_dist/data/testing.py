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
