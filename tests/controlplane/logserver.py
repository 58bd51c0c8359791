"""The node agent's slice of the kubelet API: `/containerLogs/<ns>/<pod>/<container>`, so
`kubectl logs [-f] [--tail N]` works. The apiserver calls it over TLS with its kubelet client
certificate, which must be signed by the cluster CA; the agent's serving certificate is too."""

from __future__ import annotations

import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

# (namespace, pod, container) -> (log file, whether the container may still write to it)
Locate = Callable[[str, str, str], tuple[Path, Callable[[], bool]] | None]


def serve(locate: Locate, cert: str, key: str, ca: str) -> int:
    """Starts the server on a free loopback port in a daemon thread; returns the port."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *_: object) -> None:
            pass

        def do_GET(self) -> None:
            url = urllib.parse.urlparse(self.path)
            parts = url.path.strip("/").split("/")
            found = locate(*parts[1:4]) if len(parts) == 4 and parts[0] == "containerLogs" else None
            if found is None:
                self.send_error(404, "no such container on this node")
                return
            path, alive = found
            query = urllib.parse.parse_qs(url.query)
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            text = path.read_bytes() if path.exists() else b""
            if "tailLines" in query:
                lines = text.splitlines(keepends=True)
                text = b"".join(lines[-int(query["tailLines"][0]) :]) if int(query["tailLines"][0]) else b""
            self.wfile.write(text)
            sent = path.stat().st_size if path.exists() else 0
            while query.get("follow") == ["true"] and alive():
                time.sleep(0.2)
                with path.open("rb") as f:
                    f.seek(sent)
                    more = f.read()
                if more:
                    self.wfile.write(more)
                    self.wfile.flush()
                    sent += len(more)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    context.load_verify_locations(ca)
    context.verify_mode = ssl.CERT_REQUIRED  # only the apiserver (a client certificate of our CA)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server.server_address[1]
