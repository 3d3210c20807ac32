"""A static HTTP server on 127.0.0.1 serving in-memory files, counting requests (a stand-in for dataset mirrors)."""

from __future__ import annotations

import contextlib
import threading
from collections import Counter
from collections.abc import Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _Quiet(BaseHTTPRequestHandler):
    def log_message(self, *args: object) -> None:  # keep test output clean
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        """Clients that hang up early (a checksum failure aborts a download) are not errors here."""


@contextlib.contextmanager
def serve(handler_cls: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """Run `handler_cls` on an ephemeral 127.0.0.1 port; yields the base URL (no trailing slash)."""
    server = _Server(("127.0.0.1", 0), handler_cls)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


class FileServer:
    """Files by URL path; `hits` counts GETs per path."""

    def __init__(self, files: Mapping[str, bytes]) -> None:
        self.files = dict(files)
        self.hits: Counter[str] = Counter()

    def handler(self) -> type[BaseHTTPRequestHandler]:
        """A request handler class bound to this server's files."""
        owner = self

        class Handler(_Quiet):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                path = self.path.split("?")[0]
                owner.hits[path] += 1
                body = owner.files.get(path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        return Handler

    def running(self) -> contextlib.AbstractContextManager[str]:
        """Context manager: the base URL while the server runs."""
        return serve(self.handler())
