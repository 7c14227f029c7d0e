"""Real loopback HTTP servers. HubServer serves files the way the Hugging Face hub does for ``hf_hub_download``:
``HEAD``/``GET /{org}/{repo}/resolve/{revision}/{path}`` with ``X-Repo-Commit`` and ``ETag`` headers, and
``X-Error-Code`` on 404s. Tests point ``HF_ENDPOINT`` at it; huggingface_hub itself is not mocked.
ResettingServer resets every connection; FolderServer serves the files of a folder."""

from __future__ import annotations

import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class HubServer:
    def __init__(self, root: Path):
        self.root = Path(root)  # root/{org}/{repo}/{files}
        self.requests: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _resolve(self):
                parts = self.path.split("?")[0].strip("/").split("/")
                server.requests.append(f"{self.command} {self.path}")
                if len(parts) < 5 or parts[2] != "resolve":
                    return None, "RepoNotFound"
                repo = server.root / parts[0] / parts[1]
                if not repo.is_dir():
                    return None, "RepoNotFound"
                f = repo.joinpath(*parts[4:])
                return (f, None) if f.is_file() else (None, "EntryNotFound")

            def _headers(self, f):
                data = f.read_bytes()
                self.send_response(200)
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("ETag", '"' + hashlib.sha256(data).hexdigest() + '"')
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Content-Type", "application/octet-stream")
                self.end_headers()
                return data

            def _missing(self, code):
                self.send_response(404)
                self.send_header("X-Error-Code", code)
                self.send_header("X-Error-Message", code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_HEAD(self):
                f, err = self._resolve()
                if f is None:
                    return self._missing(err)
                self._headers(f)

            def do_GET(self):
                f, err = self._resolve()
                if f is None:
                    return self._missing(err)
                self.wfile.write(self._headers(f))

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


class ResettingServer:
    """A loopback TCP server that accepts each connection and closes it at once (a broken proxy): the client sees
    the connection reset before any response."""

    def __init__(self):
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.connections = 0

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            conn.close()

    def __enter__(self):
        threading.Thread(target=self._serve, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.sock.close()


class FolderServer:
    """A loopback HTTP server of a folder's files (the standard library's ``SimpleHTTPRequestHandler``: plain
    ``GET``, 404 for a missing file), as a web server or a bucket's HTTP endpoint serves shards and images.
    ``requests`` lists the paths asked for."""

    def __init__(self, root: Path):
        import functools
        from http.server import SimpleHTTPRequestHandler

        requests = self.requests = []

        class Handler(SimpleHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def send_head(self):
                requests.append(self.path)
                return super().send_head()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self):
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
