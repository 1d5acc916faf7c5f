"""A plain stdlib HTTP server on $CIRRUS_HOST:$CIRRUS_PORT (no framework, no Cirrus import)."""

import json
import os
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    def _answer(self, status: int, value: object) -> None:
        body = json.dumps(value).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path.startswith("/ready"):
            unready = os.environ.get("PLAIN_UNREADY_FILE", "")
            ready = os.environ.get("PLAIN_READY", "yes") == "yes" and not (unready and os.path.exists(unready))
            self._answer(200 if ready else 500, {"ready": ready})
            return
        if self.path.startswith("/sleep"):
            time.sleep(float(self.path.partition("?")[2] or 1))
        prefix = self.headers.get("x-forwarded-prefix", "")
        self._answer(200, {"path": self.path, "prefix": prefix, "pid": os.getpid()})

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length", "0"))
        data = self.rfile.read(length)
        self._answer(201, {"echo": data.decode(), "path": self.path})

    def log_message(self, format: str, *args: object) -> None:
        print("plain:", format % args, file=sys.stderr, flush=True)


if __name__ == "__main__":
    ThreadingHTTPServer((os.environ["CIRRUS_HOST"], int(os.environ["CIRRUS_PORT"])), Handler).serve_forever()
