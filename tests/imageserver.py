"""A local HTTP server for download tests and benchmarks: serves images and the ways fetching
them goes wrong. Binds to 127.0.0.1 only; use as a context manager so it always stops."""

from __future__ import annotations

import io
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image


def image_bytes(fmt: str, *, size: tuple[int, int] = (48, 40), colour: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    img = Image.new("RGB", size, colour)
    # a second colour block, so different images embed differently
    img.paste(tuple(255 - c for c in colour), (0, 0, size[0] // 2, size[1] // 2))
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


class ImageServer:
    """``routes`` maps a path to (content type, body); ``/slow/<path>`` serves ``<path>`` after
    ``slow_seconds``; anything else is a 404."""

    def __init__(self, routes: dict[str, tuple[str, bytes]] | None = None, *, slow_seconds: float = 3.0):
        self.routes = dict(routes or {})
        self.slow_seconds = slow_seconds
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                path = self.path.split("?", 1)[0]  # a query makes distinct urls for one image
                if path.startswith("/slow/"):
                    time.sleep(server.slow_seconds)
                    path = path[len("/slow"):]
                route = server.routes.get(path)
                try:
                    if route is None:
                        self.send_response(404)
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    ctype, body = route
                    self.send_response(200)
                    self.send_header("Content-Type", ctype)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeouts)
                    pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def url(self, path: str) -> str:
        return self.base_url + path

    def __enter__(self) -> "ImageServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=10)
