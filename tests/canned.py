"""A loopback HTTP server that answers every request with the status, headers and bytes a test sets."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class Canned:
    """A loopback HTTP server answering every request with the bytes a test sets."""

    def __init__(self) -> None:
        self.status = 200
        self.body = b"{}"
        self.headers: dict[str, str] = {"Content-Type": "application/json"}
        self.length = True
        canned = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                self.send_response(canned.status)
                for k, v in canned.headers.items():
                    self.send_header(k, v)
                if canned.length:
                    self.send_header("Content-Length", str(len(canned.body)))
                else:
                    self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(canned.body)

            do_GET = do_POST = _answer

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
