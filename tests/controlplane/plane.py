"""One local Kubernetes control plane: etcd, kube-apiserver, kube-controller-manager,
kube-scheduler and our node agent, all on 127.0.0.1, started and stopped as one.

    with ControlPlane(Path("kubeconfig"), nodes=1, gpus=0) as plane:
        ...  # the admin kubeconfig exists once a node is Ready
        plane.start_kueue()  # Kueue's manager too, now or at start with `kueue=True`

Everything is Kubernetes' own code (and Kueue's) except the node agent (nodeagent.py), which runs
pods as local processes. Each process is ours by its own pid: stop() ends exactly those and removes
the temp dir.
"""

from __future__ import annotations

import base64
import ctypes
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from tests.controlplane import binaries, kueuesetup
from tests.controlplane.pki import PKI, write_kubeconfig

REPO = Path(__file__).parents[2]
PR_SET_PDEATHSIG = 1
SERVICE_CIDR = "10.96.0.0/16"  # allocated to Services, never routed: nothing here sends to it
# What the RBAC and API-call tests read: every request of a service account (the operator runs as the chart's),
# once, with verb, resource and user. Not the control plane's own accounts, nor the harness's and the node
# agent's certificate users: logging those too made the log tens of MB, re-read by tests that poll it.
AUDIT_POLICY = {
    "apiVersion": "audit.k8s.io/v1",
    "kind": "Policy",
    "omitStages": ["RequestReceived"],
    "rules": [
        {"level": "None", "userGroups": ["system:serviceaccounts:kube-system"]},
        {"level": "Metadata", "userGroups": ["system:serviceaccounts"]},
        {"level": "None"},
    ],
}
# The API paths of the kinds the harness installs (Kueue's manifests): kind -> (group/version, plural).
PATHS = {
    "Namespace": ("v1", "namespaces"),
    "CustomResourceDefinition": ("apiextensions.k8s.io/v1", "customresourcedefinitions"),
    "ClusterRole": ("rbac.authorization.k8s.io/v1", "clusterroles"),
    "ClusterRoleBinding": ("rbac.authorization.k8s.io/v1", "clusterrolebindings"),
    "Role": ("rbac.authorization.k8s.io/v1", "roles"),
    "RoleBinding": ("rbac.authorization.k8s.io/v1", "rolebindings"),
    "MutatingWebhookConfiguration": ("admissionregistration.k8s.io/v1", "mutatingwebhookconfigurations"),
    "ValidatingWebhookConfiguration": ("admissionregistration.k8s.io/v1", "validatingwebhookconfigurations"),
}


def die_with_parent() -> None:
    """Runs in each child before exec: a parent killed without cleanup takes its cluster along."""
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class StartError(RuntimeError):
    """A component did not come up; the message holds the tail of its log."""


class ControlPlane:
    def __init__(
        self,
        kubeconfig: Path,
        *,
        nodes: int = 1,
        gpus: int = 0,
        fast_pods: float | None = None,
        images: list[str] | None = None,
        layers: list[str] | None = None,
        kueue: bool = False,
        log: Any = print,
    ) -> None:
        self.kubeconfig, self.nodes, self.gpus, self.fast_pods = kubeconfig, nodes, gpus, fast_pods
        self.images, self.layers, self.kueue = images, layers, kueue
        self.log = log
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.dir = Path(tempfile.mkdtemp(prefix="idpo-controlplane-"))
        self.logs = self.dir / "logs"
        self.logs.mkdir()
        self.audit_log = self.dir / "audit.log"
        self.server = ""

    def __enter__(self) -> ControlPlane:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- processes ---------------------------------------------------------------------------------
    def _spawn(self, name: str, argv: list[str], **kwargs: Any) -> None:
        with (self.logs / f"{name}.log").open("ab") as out:
            self.processes[name] = subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=die_with_parent,
                **kwargs,
            )

    def _tail(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def _wait(self, name: str, ready: Any, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for proc_name, proc in self.processes.items():
                if proc.poll() is not None:
                    raise StartError(f"{proc_name} exited with {proc.returncode}:\n{self._tail(proc_name)}")
            if ready():
                return
            time.sleep(0.1)
        raise StartError(f"{name} was not ready after {timeout:.0f} s:\n{self._tail(name)}")

    def stop(self) -> None:
        # etcd last: an apiserver serving CRDs (Kueue's) waits on etcd as it shuts down.
        names = list(reversed(self.processes))
        for wave in ([n for n in names if n != "etcd"], [n for n in names if n == "etcd"]):
            for name in wave:
                proc = self.processes[name]
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGTERM)  # its own group: started with start_new_session
            for name in wave:
                proc = self.processes[name]
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        self.processes.clear()
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- the API, for readiness checks and what the harness installs --------------------------------
    def _get(self, path: str) -> tuple[int, bytes]:
        return self._request("GET", path)

    def _request(
        self, method: str, path: str, body: Any = None, content_type: str = "application/json"
    ) -> tuple[int, bytes]:
        context = ssl.create_default_context(cafile=str(self.pki.ca))
        admin = self.pki.clients["admin"]
        context.load_cert_chain(str(admin.cert), str(admin.key))
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.server + path, data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(request, context=context, timeout=30) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()
        except (urllib.error.URLError, OSError):
            return 0, b""

    def _object_path(self, doc: dict[str, Any]) -> str:
        version, plural = PATHS[doc["kind"]]
        namespace = doc["metadata"].get("namespace")
        prefix = "/api/v1" if version == "v1" else f"/apis/{version}"
        return f"{prefix}{f'/namespaces/{namespace}' if namespace else ''}/{plural}/{doc['metadata']['name']}"

    def apply(self, doc: dict[str, Any]) -> None:
        """Server-side apply as the harness (create or update, idempotent) of a kind in PATHS."""
        query = "?fieldManager=idpo-harness&force=true"
        code, body = self._request("PATCH", self._object_path(doc) + query, doc, "application/apply-patch+yaml")
        if code != 200 and code != 201:
            raise StartError(f"applying {doc['kind']} {doc['metadata']['name']}: {code} {body[:2000]!r}")

    def _established(self, doc: dict[str, Any]) -> bool:
        code, body = self._get(self._object_path(doc))
        conditions = json.loads(body).get("status", {}).get("conditions", []) if code == 200 else []
        return any(c["type"] == "Established" and c["status"] == "True" for c in conditions)

    def _ready_node(self) -> bool:
        code, body = self._get("/api/v1/nodes")
        if code != 200:
            return False
        nodes = json.loads(body)["items"]
        ready = [
            n
            for n in nodes
            for c in n["status"].get("conditions", [])
            if c["type"] == "Ready" and c["status"] == "True"
        ]
        return len(ready) >= self.nodes

    # -- start -------------------------------------------------------------------------------------
    def start(self) -> None:
        started = time.monotonic()
        bins = binaries.build()
        self.pki = pki = PKI(self.dir / "pki")
        etcd_port, peer_port, api_port = free_port(), free_port(), free_port()
        self.server = f"https://127.0.0.1:{api_port}"

        etcd = f"http://127.0.0.1:{etcd_port}"
        peer = f"http://127.0.0.1:{peer_port}"
        self._spawn(
            "etcd",
            [
                str(bins / "etcd"),
                *("--name", "default", "--data-dir", str(self.dir / "etcd")),
                *("--listen-client-urls", etcd, "--advertise-client-urls", etcd),
                *("--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer),
                *("--initial-cluster", f"default={peer}", "--log-level", "warn"),
                "--unsafe-no-fsync",  # a test cluster: speed over durability
            ],
        )
        self._wait("etcd", lambda: _http_ok(f"{etcd}/health"), timeout=30)

        policy = self.dir / "audit-policy.yaml"
        policy.write_text(yaml.safe_dump(AUDIT_POLICY))
        self._spawn(
            "kube-apiserver",
            [
                str(bins / "kube-apiserver"),
                f"--etcd-servers={etcd}",
                *("--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", f"--secure-port={api_port}"),
                f"--tls-cert-file={pki.serving.cert}",
                f"--tls-private-key-file={pki.serving.key}",
                f"--client-ca-file={pki.ca}",
                "--service-account-issuer=https://kubernetes.default.svc",
                f"--service-account-key-file={pki.sa_pub}",
                f"--service-account-signing-key-file={pki.sa_key}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--authorization-mode=Node,RBAC",
                "--enable-admission-plugins=PodSecurity,OwnerReferencesPermissionEnforcement",
                f"--audit-policy-file={policy}",
                f"--audit-log-path={self.audit_log}",
                "--audit-log-format=json",
                f"--kubelet-client-certificate={pki.clients['kubelet-client'].cert}",
                f"--kubelet-client-key={pki.clients['kubelet-client'].key}",
                f"--kubelet-certificate-authority={pki.ca}",
                "--kubelet-preferred-address-types=InternalIP",
                "--endpoint-reconciler-type=none",  # the `kubernetes` Service would point at loopback
                "--profiling=false",
            ],
        )
        self._wait("kube-apiserver", lambda: self._get("/readyz")[0] == 200, timeout=90)

        kubeconfigs = {
            user: write_kubeconfig(self.dir / f"{user}.kubeconfig", pki.kubeconfig(self.server, user))
            for user in ("admin", "controller-manager", "scheduler", "node-agent")
        }
        self._spawn(
            "kube-controller-manager",
            [
                str(bins / "kube-controller-manager"),
                f"--kubeconfig={kubeconfigs['controller-manager']}",
                "--secure-port=0",
                "--leader-elect=false",
                "--use-service-account-credentials=true",
                f"--service-account-private-key-file={pki.sa_key}",
                f"--root-ca-file={pki.ca}",
                # A test cluster serves hundreds of runs from one machine: the client limits
                # (20 qps by default) must not be what a benchmark measures.
                "--kube-api-qps=500",
                "--kube-api-burst=1000",
                "--concurrent-job-syncs=20",
            ],
        )
        scheduler_config = self.dir / "scheduler.yaml"
        scheduler_config.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "kubescheduler.config.k8s.io/v1",
                    "kind": "KubeSchedulerConfiguration",
                    "clientConnection": {"kubeconfig": str(kubeconfigs["scheduler"]), "qps": 500, "burst": 1000},
                    "leaderElection": {"leaderElect": False},
                }
            )
        )
        self._spawn("kube-scheduler", [str(bins / "kube-scheduler"), f"--config={scheduler_config}", "--secure-port=0"])

        agent = [
            *(sys.executable, "-m", "tests.controlplane.nodeagent"),
            *("--kubeconfig", str(kubeconfigs["node-agent"]), "--root", str(self.dir / "node")),
            *("--nodes", str(self.nodes), "--gpus", str(self.gpus), "--apiserver-port", str(api_port)),
            *(
                "--tls-cert",
                str(pki.kubelet_serving.cert),
                "--tls-key",
                str(pki.kubelet_serving.key),
                "--ca",
                str(pki.ca),
            ),
        ]
        if self.fast_pods is not None:
            agent += ["--fast-pods", str(self.fast_pods)]
        for image in self.images or []:
            agent += ["--image", image]
        for layer in self.layers or []:
            agent += ["--layer", layer]
        self._spawn("node-agent", agent, cwd=REPO)
        self._wait("node-agent", self._ready_node, timeout=60)
        # The service-account controller made `default` in the default namespace: the
        # controller-manager is up and pods can be admitted.
        self._wait(
            "kube-controller-manager",
            lambda: self._get("/api/v1/namespaces/default/serviceaccounts/default")[0] == 200,
            timeout=60,
        )
        if self.kueue:  # before the kubeconfig: whoever waits for that file finds Kueue answering
            self.start_kueue()
        write_kubeconfig(self.kubeconfig, pki.kubeconfig(self.server, "admin"))
        self.log(
            f"control plane up in {time.monotonic() - started:.1f} s at {self.server}; kubeconfig {self.kubeconfig}"
        )

    # -- Kueue -------------------------------------------------------------------------------------
    def start_kueue(self) -> None:
        """Start Kueue's manager on this (running) plane, once: its CRDs Established, its RBAC, the
        manager on 127.0.0.1 as its own user, then its webhooks registered by loopback URL. Returns
        when the apiserver gets answers from both webhooks (a queued Job is suspended, a bad queue
        name refused). Idempotent: a second call while it runs does nothing."""
        running = self.processes.get("kueue")
        if running is not None and running.poll() is None:
            return
        self.processes.pop("kueue", None)  # one that died: start it afresh
        started = time.monotonic()
        folder = binaries.build_kueue()
        home = self.dir / "kueue"
        certs = home / "certs"
        certs.mkdir(parents=True, exist_ok=True)
        serving = self.pki.issue_serving("kueue-webhook", "kueue-webhook-service")
        shutil.copyfile(serving.cert, certs / "tls.crt")  # the names controller-runtime's server reads
        shutil.copyfile(serving.key, certs / "tls.key")
        webhook_port, health_port = free_port(), free_port()
        ca_bundle = base64.b64encode(self.pki.ca.read_bytes()).decode()
        objects = kueuesetup.objects(folder / "config", f"https://127.0.0.1:{webhook_port}", ca_bundle)
        for doc in objects["before"]:
            self.apply(doc)
        crds = [doc for doc in objects["before"] if doc["kind"] == "CustomResourceDefinition"]
        self._wait("kueue CRDs", lambda: all(self._established(doc) for doc in crds), timeout=60)

        config = home / "config.yaml"
        config.write_text(
            yaml.safe_dump(kueuesetup.configuration(webhook_port=webhook_port, health_port=health_port, cert_dir=certs))
        )
        kubeconfig = write_kubeconfig(home / "kubeconfig", self.pki.kubeconfig(self.server, "kueue"))
        self._spawn(
            "kueue",
            [
                *(sys.executable, "-m", "tests.controlplane.secretmount", "--scratch", str(home / "mounts")),
                f"{certs}:{kueuesetup.METRICS_CERTS}",
                "--",
                *(str(folder / "kueue"), f"--config={config}"),
            ],
            cwd=REPO,
            env={**os.environ, "KUBECONFIG": str(kubeconfig)},
        )
        self._wait("kueue", lambda: _http_ok(f"http://127.0.0.1:{health_port}/readyz"), timeout=60)
        for doc in objects["after"]:
            self.apply(doc)
        self._wait("kueue", self._kueue_answers, timeout=30)
        self.log(f"Kueue {binaries.kueue_version()} up in {time.monotonic() - started:.1f} s (:{webhook_port})")

    def _kueue_answers(self) -> bool:
        """Both webhooks are called: a Job naming a queue comes back suspended (mutating), one naming
        a queue that is no DNS name is refused (validating). Dry runs: nothing is stored."""
        code, body = self._request("POST", "/apis/batch/v1/namespaces/default/jobs?dryRun=All", _probe_job("probe"))
        if code != 201 or json.loads(body)["spec"].get("suspend") is not True:
            return False
        code, body = self._request("POST", "/apis/batch/v1/namespaces/default/jobs?dryRun=All", _probe_job("no_dns"))
        return code == 403 and 'webhook "vjob.kb.io" denied' in json.loads(body).get("message", "")

    def token_kubeconfig(self, path: Path, token: str) -> Path:
        """A kubeconfig that authenticates with `token` (e.g. a ServiceAccount's, from TokenRequest)."""
        return write_kubeconfig(path, self.pki.kubeconfig(self.server, "token", token=token))

    def pids(self) -> dict[str, int]:
        return {name: proc.pid for name, proc in self.processes.items()}


def _probe_job(queue: str) -> dict[str, Any]:
    container = {"name": "probe", "image": "probe", "command": ["true"]}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"generateName": "kueue-probe-", "labels": {"kueue.x-k8s.io/queue-name": queue}},
        "spec": {"template": {"spec": {"restartPolicy": "Never", "containers": [container]}}},
    }


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False
