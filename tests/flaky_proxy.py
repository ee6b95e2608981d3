"""A fault-injecting HTTP proxy in front of the moto S3 server, for the flaky-store tests: stdlib only,
bound to 127.0.0.1.

Each request draws from one seeded `random.Random`: with probability `rate` it gets a fault, chosen
among those that fit its method:
  slowdown   503 SlowDown (S3's answer under load), before the request reaches the server;
  reset      the connection closed with a TCP RST (SO_LINGER 0), before the request reaches the server;
  delay      the request forwarded (so applied) and its answer held past the client's read timeout;
  lost_reply a PUT/POST/DELETE forwarded and applied, answered 500 InternalError (half the faults of
             such requests, which are few).
Requests arrive from several processes at once, so which request gets which fault depends on their
order; the rate, the kinds and the draws are seeded. `down = True` makes every request a 503 from then
on (a store that never recovers). `counts` tallies what was injected.
"""

from __future__ import annotations

import http.client
import random
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

FAULTS = ("slowdown", "reset", "delay", "lost_reply")
WRITES = ("PUT", "POST", "DELETE")
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "trailer", "upgrade"}


def _s3_error(code: str, message: str) -> bytes:
    return (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{message}</Message>'
            "<RequestId>flaky-proxy</RequestId></Error>").encode()


class FlakyProxy:
    def __init__(self, upstream_port: int, rate: float = 0.1, seed: int = 0, faults=FAULTS, delay: float = 3.0):
        self.upstream_port = upstream_port
        self.rate, self.faults, self.delay = rate, tuple(faults), delay
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.down = False
        self.counts = {name: 0 for name in (*FAULTS, "down", "passed")}
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as botocore's pools expect

            def log_message(self, *args):  # quiet
                pass

            def _any(self):
                proxy.handle(self)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any

        class Server(ThreadingHTTPServer):
            def handle_error(self, request, client_address):  # a reset connection is the point, not news
                pass

        self.server = Server(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, name="flaky-proxy", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # ------------------------------------------------------------------ one request
    def choose(self, method: str) -> str | None:
        with self.lock:
            if self.down:
                self.counts["down"] += 1
                return "down"
            if self.rng.random() >= self.rate:
                self.counts["passed"] += 1
                return None
            kinds = [f for f in self.faults if f != "lost_reply" or method in WRITES]
            if method in WRITES and "lost_reply" in kinds:  # the rarer requests: half their faults are lost replies
                kinds += ["lost_reply"] * (len(kinds) - 2)
            fault = self.rng.choice(kinds) if kinds else None
            self.counts[fault or "passed"] += 1
            return fault

    def handle(self, req: BaseHTTPRequestHandler) -> None:
        body = self._read_body(req)
        fault = self.choose(req.command)
        if fault in ("slowdown", "down"):
            self._reply(req, 503, {"Content-Type": "application/xml"},
                        _s3_error("SlowDown", "Please reduce your request rate."))
            return
        if fault == "reset":
            self._reset(req)
            return
        status, headers, data = self._forward(req, body)
        if fault == "delay":
            time.sleep(self.delay)
            self._reset(req)  # the client gave up long ago
            return
        if fault == "lost_reply":
            self._reply(req, 500, {"Content-Type": "application/xml"},
                        _s3_error("InternalError", "We encountered an internal error. Please try again."))
            return
        self._reply(req, status, headers, data)

    @staticmethod
    def _read_body(req) -> bytes:
        if req.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(req.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while req.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(req.rfile.read(size))
                req.rfile.readline()
            return b"".join(chunks)
        length = int(req.headers.get("Content-Length") or 0)
        return req.rfile.read(length) if length else b""

    def _forward(self, req, body: bytes):
        conn = http.client.HTTPConnection("127.0.0.1", self.upstream_port, timeout=120)
        try:
            headers = {k: v for k, v in req.headers.items() if k.lower() not in HOP_BY_HOP and k.lower() != "expect"}
            headers["Content-Length"] = str(len(body))
            conn.request(req.command, req.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, {k: v for k, v in resp.getheaders() if k.lower() not in HOP_BY_HOP}, data
        finally:
            conn.close()

    @staticmethod
    def _reply(req, status: int, headers: dict, data: bytes) -> None:
        try:
            req.send_response(status)
            for k, v in headers.items():
                if k.lower() not in ("content-length", "date", "server"):
                    req.send_header(k, v)
            told = {k.lower(): v for k, v in headers.items()}.get("content-length", "0")
            req.send_header("Content-Length", told if req.command == "HEAD" else str(len(data)))
            req.end_headers()
            if req.command != "HEAD":
                req.wfile.write(data)
        except OSError:  # the client went away
            req.close_connection = True

    @staticmethod
    def _reset(req) -> None:
        try:
            req.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        req.close_connection = True
        try:
            req.connection.close()
        except OSError:
            pass
