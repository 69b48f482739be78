"""A real HTTP file server on 127.0.0.1 for download tests, with switches for the ways servers fail.

    server = FileServer({"/model.safetensors": data}).start()
    server.url("/model.safetensors")        # http://127.0.0.1:PORT/model.safetensors
    server.ranges = False                   # ignore Range headers, always answer 200 with everything
    server.cut_after, server.cuts = 1000, 1 # the next response longer than 1000 bytes stops after 1000
    server.corrupt = 1                      # the next response flips bytes in the middle of the body
    server.requests                         # [(path, Range header or None), ...] in arrival order
    server.if_ranges                        # the If-Range header of each request (None if absent)
    server.stop()

Every answer carries a strong ETag (the sha256 of the bytes served at that path, quoted), and a
Range request with an `If-Range` that is not the current ETag gets the whole file (200), as RFC 9110
says; `server.if_range = False` makes the server ignore If-Range (a broken cache). Like the hub:
`server.publish_sha256 = True` adds `X-Linked-Etag: "<sha256>"` to every answer, and
`server.redirects = {"/a": "/b"}` answers /a with a 302 to /b that carries the X-Linked-Etag of /b.
`server.sizes = False` sends `Content-Range: bytes a-b/*`; `server.lengths = False` sends no Content-Length.

Range support is implemented here (single ranges `bytes=a-b` and `bytes=a-`), so tests do not depend
on how a particular stdlib version's file server behaves.
"""
from __future__ import annotations

import hashlib
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FileServer:
    """A local HTTP server for weights files, in a thread: Range requests (or not, `ranges`), and
    one-shot faults on demand (a response cut after `cut_after` bytes, a body with flipped bytes)."""

    def __init__(self, files: dict):
        self.files = dict(files)        # path -> bytes
        self.ranges = True
        self.cut_after, self.cuts = None, 0
        self.corrupt = 0
        self.requests = []
        self.if_ranges = []
        self.if_range = True
        self.publish_sha256 = False
        self.redirects = {}
        self.sizes = True               # False: Content-Range says '/*' (size unknown)
        self.lengths = True             # False: no Content-Length, the body ends when the connection closes
        self._lock = threading.Lock()
        self._httpd = None

    @classmethod
    def serving(cls, files: dict):
        """A started server holding the bytes of local files: FileServer.serving({"/model.safetensors": path})."""
        data = {}
        for key, path in files.items():
            with open(path, "rb") as f:
                data[key] = f.read()
        return cls(data).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}{path}"

    def start(self) -> "FileServer":
        server = self

        class Handler(BaseHTTPRequestHandler):
            """Hands each GET to this FileServer."""

            def do_GET(self):
                server._serve(self)

            def log_message(self, *args):   # keep pytest output clean
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        # a short poll interval makes stop() quick (the default 0.5 s would dominate the test time)
        threading.Thread(target=self._httpd.serve_forever, args=(0.02,), daemon=True).start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def _take(self, counter: str) -> bool:
        """Consume one use of a one-shot switch (cuts, corrupt)."""
        with self._lock:
            if getattr(self, counter) > 0:
                setattr(self, counter, getattr(self, counter) - 1)
                return True
            return False

    def _serve(self, h: BaseHTTPRequestHandler) -> None:
        rng = h.headers.get("Range")
        with self._lock:
            self.requests.append((h.path, rng))
            self.if_ranges.append(h.headers.get("If-Range"))
        if h.path in self.redirects:
            target = self.redirects[h.path]
            h.send_response(302)
            h.send_header("Location", self.url(target))
            if target in self.files:
                h.send_header("X-Linked-Etag", f'"{hashlib.sha256(self.files[target]).hexdigest()}"')
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        data = self.files.get(h.path)
        if data is None:
            h.send_error(404, "Not Found")
            return
        sha = hashlib.sha256(data).hexdigest()
        size, status, start, end = len(data), 200, 0, len(data)
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng or "")
        if_range = h.headers.get("If-Range")
        if self.if_range and if_range is not None and if_range != f'"{sha}"':
            m = None                   # the file changed since the client's first answer: all of it
        if self.ranges and m:
            start = int(m.group(1))
            end = min(int(m.group(2)) + 1, size) if m.group(2) else size
            if start >= size or end <= start:
                h.send_response(416)
                h.send_header("Content-Range", f"bytes */{size}")
                h.send_header("Content-Length", "0")
                h.end_headers()
                return
            status = 206
        body = data[start:end]
        if self._take("corrupt") and body:
            mid = len(body) // 2
            body = body[:mid] + bytes(b ^ 0xFF for b in body[mid:mid + 16]) + body[mid + 16:]
        h.send_response(status)
        h.send_header("Content-Type", "application/octet-stream")
        if self.lengths:
            h.send_header("Content-Length", str(len(body)))
        h.send_header("Accept-Ranges", "bytes" if self.ranges else "none")
        h.send_header("ETag", f'"{sha}"')
        if self.publish_sha256:
            h.send_header("X-Linked-Etag", f'"{sha}"')
        if status == 206:
            h.send_header("Content-Range", f"bytes {start}-{end - 1}/{size if self.sizes else '*'}")
        h.end_headers()
        if self.cut_after is not None and len(body) > self.cut_after and self._take("cuts"):
            h.wfile.write(body[:self.cut_after])
            h.wfile.flush()
            h.close_connection = True
            h.connection.shutdown(socket.SHUT_RDWR)   # the client sees EOF mid-body
            return
        h.wfile.write(body)


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (connecting to it is refused)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port
