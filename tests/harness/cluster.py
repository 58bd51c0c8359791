"""A whole test cluster: the API emulator, the kubelet stand-in, and the real operator process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from idpo_operator.crd import crd
from idpo_operator.spec import GROUP, PLURAL, VERSION
from kubernetes import client, config

from tests.harness.emulator import ServedEmulator
from tests.harness.kubelet import Kubelet

NAMESPACE = "e2e"
HARNESS_AGENT = "idpo-test-harness"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Cluster:
    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.root = root
        self.kubeconfig = root / "kubeconfig"
        self.env = env
        self.server = ServedEmulator(self.kubeconfig)
        self.operator: subprocess.Popen[bytes] | None = None
        self.operator_log = root / "operator.log"
        self.liveness = f"http://127.0.0.1:{free_port()}/healthz"
        self.metrics_port = free_port()

    def __enter__(self) -> Cluster:
        self.server.__enter__()
        self.server.call(lambda e: e.register_crd(crd()))
        self.api = config.new_client_from_config(str(self.kubeconfig))
        self.api.user_agent = HARNESS_AGENT  # tells the harness's calls apart from the operator's
        self.custom = client.CustomObjectsApi(self.api)
        self.batch, self.core = client.BatchV1Api(self.api), client.CoreV1Api(self.api)
        self.kubelet = Kubelet(self.api, NAMESPACE, self.root, env=self.env).__enter__()
        self.start_operator()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_operator()
        self.kubelet.__exit__()
        self.server.__exit__()

    # -- the operator process ---------------------------------------------------------------------
    def start_operator(self) -> None:
        env = {**os.environ, **self.env, "KUBECONFIG": str(self.kubeconfig)}
        log = self.operator_log.open("a")
        self.operator = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "idpo_operator",
                "operator",
                "-n",
                NAMESPACE,
                "-v",
                "--liveness",
                self.liveness,
                "--metrics-port",
                str(self.metrics_port),
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def stop_operator(self, sig: int = signal.SIGTERM) -> None:
        if self.operator and self.operator.poll() is None:
            os.killpg(self.operator.pid, sig)
            self.operator.wait(30)

    # -- helpers ----------------------------------------------------------------------------------
    def kubectl(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        env = {"KUBECONFIG": str(self.kubeconfig), "PATH": os.environ["PATH"], "HOME": str(self.root)}
        return subprocess.run(
            ["kubectl", "-n", NAMESPACE, *args], input=stdin, capture_output=True, text=True, env=env, timeout=60
        )

    def apply(self, manifest: dict[str, Any]) -> subprocess.CompletedProcess[str]:
        return self.kubectl("apply", "--validate=false", "-f", "-", stdin=yaml.safe_dump(manifest))

    def run(self, name: str) -> dict[str, Any]:
        return self.custom.get_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, name)

    def jobs(self, run: str) -> list[dict[str, Any]]:
        res = self.batch.list_namespaced_job(NAMESPACE, label_selector=f"idpo.dev/run={run}", _preload_content=False)
        return json.loads(res.data)["items"]

    def wait(self, name: str, predicate: Any, timeout: float = 300) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        status: dict[str, Any] = {}
        while time.monotonic() < deadline:
            if self.operator is not None and self.operator.poll() is not None:
                break  # the operator died: no point in waiting
            try:
                status = self.run(name).get("status") or {}
            except client.ApiException:
                status = {}
            if predicate(status):
                return status
            time.sleep(0.2)
        tail = self.operator_log.read_text()[-3000:] if self.operator_log.exists() else ""
        raise AssertionError(f"gave up waiting on {name}: {json.dumps(status)[:2000]}\n--- operator log\n{tail}")

    def operator_calls(self) -> set[tuple[str, str, str]]:
        """(verb, group, resource) of every API call the operator process made (kopf's or ours)."""
        calls = self.server.call(lambda e: e.api_calls())
        return {
            (verb, group, res) for agent, verb, group, res in calls if agent.startswith(("kopf", "OpenAPI-Generator"))
        }

    def wait_phase(self, name: str, *phases: str, timeout: float = 300) -> dict[str, Any]:
        return self.wait(name, lambda s: s.get("phase") in phases, timeout)
