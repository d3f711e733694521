"""A local HTTP file server for tests, with faults: ``with FileServer(folder) as server: server.url("x.tar")``.

It serves the files of ``folder`` on 127.0.0.1 from a thread (``http.server``). ``server.faults[name]`` makes
requests for that file fail, for the next ``times`` requests (None: every one):

- ``"404"`` / ``"500"``: that status, no body;
- ``"short"``: a ``Content-Length`` of the whole file but only its first half, then the connection closes;
- ``"die"``: the headers and a quarter of the body, then the connection is dropped (a server dying mid-shard);
- ``"stall"``: the connection is accepted and never answered (until the server stops).

``server.requests`` lists the paths asked for, in order.
"""

from __future__ import annotations

import http.server
import threading
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Fault", "FileServer"]


@dataclass
class Fault:
    kind: str  # 404, 500, short, die, stall
    times: int | None = None  # requests it applies to; None: all


class FileServer:
    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.faults: dict[str, Fault] = {}
        self.requests: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                name = urllib.parse.unquote(urllib.parse.urlparse(self.path).path).lstrip("/")
                with server._lock:
                    server.requests.append(name)
                    fault = server.faults.get(name)
                    kind = None
                    if fault is not None and (fault.times is None or fault.times > 0):
                        kind = fault.kind
                        if fault.times is not None:
                            fault.times -= 1
                path = server.folder / name
                if kind == "stall":
                    server._stop.wait()
                    return
                if kind in ("404", "500") or not path.is_file():
                    self.send_error(int(kind or 404))
                    return
                data = path.read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if kind == "short":
                    self.wfile.write(data[: len(data) // 2])
                    self.close_connection = True
                elif kind == "die":
                    self.wfile.write(data[: len(data) // 4])
                    self.wfile.flush()
                    self.connection.shutdown(2)
                    self.close_connection = True
                else:
                    self.wfile.write(data)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        # shutdown() waits for serve_forever to look at its flag, every poll_interval (0.5 s by default)
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    def url(self, name: str = "") -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def __enter__(self) -> FileServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()
