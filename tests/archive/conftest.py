"""Local HTTP servers on 127.0.0.1 for the archive tests (there is no internet here).

``mast_server`` replays real MAST responses recorded by astroquery's test suite
(tests/data/mast/, see its README) and applies the ``t_min``, ``t_max``, ``obs_collection``
and ``filters`` criteria of each request to the recorded rows, as MAST does. ``file_server`` serves real FITS files with
failures injected per path: HTTP 503, dropped connections, truncated bodies, corrupted bytes,
and optional HTTP Range support.
"""

from __future__ import annotations

import json
import threading
import urllib.parse
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

MAST_DATA = Path(__file__).resolve().parents[1] / "data" / "mast"


class _Server:
    """A ThreadingHTTPServer in a daemon thread; ``url`` is its base URL."""

    def __init__(self, handler):
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.httpd.owner = self
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        # a short poll interval: shutdown() waits up to one interval
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02},
                                       daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


# ----------------------------------------------------------------------------- MAST replay

class _MastHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_POST(self):
        server = self.server.owner
        body = self.rfile.read(int(self.headers.get("Content-Length", 0))).decode()
        with server.lock:
            failure = server.failures.pop(0) if server.failures else None
        if failure == "drop":
            self.close_connection = True
            self.connection.shutdown(2)
            return
        if isinstance(failure, int):
            self._send(failure, b'{"status": "ERROR", "msg": "injected"}')
            return
        if self.path.startswith("/portal/Mashup/Mashup.asmx/columnsconfig"):
            self._send(200, (MAST_DATA / "columnsconfig.json").read_bytes())
            return
        with server.lock:
            if server.invoke_failures.pop(0) if server.invoke_failures else False:
                # HTTP 200 carrying MAST's own error status
                self._send(200, b'{"status": "ERROR", "msg": "Request timed out on the server"}')
                return
        form = urllib.parse.parse_qs(body)
        request = json.loads(form["request"][0])
        with server.lock:
            server.requests.append(request)
        service = request["service"]
        if service == "Mast.Caom.Filtered.Position":
            self._send(200, _filtered(MAST_DATA / "advSearchPos.json", request["params"]))
        elif service == "Mast.Caom.Products":
            self._send(200, (MAST_DATA / "products.json").read_bytes())
        else:
            self._send(400, b'{"status": "ERROR", "msg": "not recorded"}')

    def _send(self, status: int, payload: bytes):
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


def _filtered(path: Path, params: dict) -> bytes:
    """The recorded response with the request's t_min range and obs_collection applied."""
    recorded = json.loads(path.read_text())
    rows = recorded["data"]
    for flt in params.get("filters", []):
        name, values = flt["paramName"], flt["values"]
        if name in ("t_min", "t_max"):
            lo, hi = values[0]["min"], values[0]["max"]
            rows = [r for r in rows if lo <= r[name] <= hi]
        elif name in ("obs_collection", "filters"):  # ';'-separated, any element matches
            rows = [r for r in rows if set(str(r[name]).split(";")) & set(values)]
    recorded["data"] = rows
    recorded["paging"].update(rows=len(rows), rowsFiltered=len(rows), rowsTotal=len(rows))
    return json.dumps(recorded).encode()


@pytest.fixture
def mast_server():
    server = _Server(_MastHandler)
    server.failures = []  # per request: an HTTP status to answer with, or "drop"
    server.invoke_failures = []  # per service request: True = answer with MAST's ERROR status
    yield server
    server.close()


# ----------------------------------------------------------------------------- file server

class _FileHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        server = self.server.owner
        path = urllib.parse.urlparse(self.path).path
        with server.lock:
            server.requests.append({"path": path, "range": self.headers.get("Range")})
            queue = server.failures.get(path)
            failure = queue.pop(0) if queue else None
        data = server.files.get(path)
        if data is None:
            self._plain(404)
            return
        if failure == 503:
            self._plain(503)
            return
        if failure == "drop":
            self.close_connection = True
            self.connection.shutdown(2)
            return
        if failure == "corrupt":
            # flip 100 bytes in the middle (data, not the final block's padding); same size
            mid = len(data) // 2
            data = data[:mid] + bytes(b ^ 0xFF for b in data[mid:mid + 100]) + data[mid + 100:]
        start = 0
        range_header = self.headers.get("Range")
        if range_header and path not in server.no_range:
            start = int(range_header.split("=")[1].split("-")[0])
        body = data[start:]
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Accept-Ranges", "none" if path in server.no_range else "bytes")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Type", "application/fits")
        self.end_headers()
        if failure == "truncate":
            # promise the whole body, send a third of it, hang up
            self.wfile.write(body[: len(body) // 3])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)
            return
        self.wfile.write(body)

    def _plain(self, status: int):
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture
def file_server():
    server = _Server(_FileHandler)
    server.files = {}  # url path -> bytes
    server.failures = defaultdict(list)  # url path -> [503 | "drop" | "truncate" | "corrupt"]
    server.no_range = set()
    yield server
    server.close()
