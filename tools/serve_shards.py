#!/usr/bin/env python
"""Serve a shard folder over HTTP with Range and HEAD, as object stores do (what data.root=http://... reads).

    python tools/serve_shards.py ROOT PORT [--host 127.0.0.1] [--fail-every N] [--reset-every N] [--log FILE]

Then ``data.root=http://HOST:PORT/<dataset folder>``. Python's own http.server answers neither
Range requests nor HEAD sizes the way the reader (fsspec) needs; this handler does. It binds
127.0.0.1 unless told otherwise. The tests and tools/bench_data.py start it as a real server;
for retry tests it can misbehave on purpose: ``--fail-every N`` answers every N-th GET with 503,
``--reset-every N`` sends half of every N-th GET's body and then drops the connection. ``--log``
appends one "GET path" line per GET served. Prints "ready" once it listens.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_RANGE = re.compile(r"bytes=(\d+)-(\d*)$")


def make_handler(root: str, fail_every: int, reset_every: int, log: str | None):
    lock, gets = threading.Lock(), [0]

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # keep test output clean
            pass

        def _file(self) -> str | None:
            rel = self.path.split("?", 1)[0].lstrip("/")
            path = os.path.realpath(os.path.join(root, rel))
            return path if path.startswith(os.path.realpath(root) + os.sep) and os.path.isfile(path) else None

        def do_HEAD(self) -> None:
            path = self._file()
            if path is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(os.path.getsize(path)))
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()

        def do_GET(self) -> None:
            path = self._file()
            if path is None:
                self.send_error(404)
                return
            with lock:
                gets[0] += 1
                n = gets[0]
                if log:
                    with open(log, "a") as f:
                        f.write(f"GET {self.path}\n")
            if fail_every and n % fail_every == 0:
                self.send_error(503, "injected failure")
                return
            size = os.path.getsize(path)
            start, end = 0, size - 1
            m = _RANGE.match(self.headers.get("Range", ""))
            if m:
                start = int(m.group(1))
                end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
                if start >= size:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{size}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
            with open(path, "rb") as f:
                f.seek(start)
                body = f.read(end - start + 1)
            self.send_response(206 if m else 200)
            if m:
                self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            if reset_every and n % reset_every == 0 and len(body) > 1:
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                self.close_connection = True
                try:
                    self.connection.shutdown(2)
                except OSError:  # the client went first
                    pass
                return
            self.wfile.write(body)

    return Handler


class _Server(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):  # clients hanging up are normal
            super().handle_error(request, client_address)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("root")
    p.add_argument("port", type=int)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--fail-every", type=int, default=0)
    p.add_argument("--reset-every", type=int, default=0)
    p.add_argument("--log")
    args = p.parse_args()
    server = _Server((args.host, args.port), make_handler(args.root, args.fail_every, args.reset_every, args.log))
    server.daemon_threads = True
    print("ready", flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
