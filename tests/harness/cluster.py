"""The e2e suite's cluster, reached only through a kubeconfig, kubectl and Jobs.

Two ways to get one, one interface for the tests:
- by default (and in CI), a real control plane of our own (tests/controlplane): etcd,
  kube-apiserver, kube-controller-manager, kube-scheduler and the node agent, on 127.0.0.1.
  The operator runs under the chart's ServiceAccount (a TokenRequest token), so the real
  authorizer enforces the chart's RBAC, and the apiserver's audit log records its calls;
- `IDPO_E2E_KUBECONFIG`: any cluster that can pull `IDPO_E2E_IMAGE` (the Dockerfile's `e2e` image,
  built from this checkout: the `jobs` image with the test rankers and hooks). Optional:
  `IDPO_E2E_NAMESPACE` (an existing namespace; otherwise one is created and deleted),
  `IDPO_E2E_STORAGE_CLASS`, `IDPO_E2E_PATIENCE` (a factor on every wait, default 5:
  image pulls and scheduling take time). The operator runs with that kubeconfig.

Either way the stage namespace enforces the restricted Pod Security profile, and the real operator
runs on this machine as a subprocess (as `kopf run` does in development), so a test can kill and
restart it. Tests reach the volume only through Jobs (`seed`, `run_job`), never through local
paths, and count pods through the API.
"""

from __future__ import annotations

import atexit
import datetime as dt
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
import uuid
import venv
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from idpo_operator import resources
from idpo_operator.crd import crd
from idpo_operator.policy import SAFE_ENV
from idpo_operator.resources import CONTAINER_SECURITY, POD_SECURITY, VOLUME_MOUNT
from idpo_operator.spec import DEFAULT_STAGE_IMAGE, GROUP, KIND, PLURAL, VERSION
from kubernetes import client, config, watch

from tests.harness import chart
from tests.harness.tiny import tiny_models

HARNESS_AGENT = "idpo-test-harness"
TESTS = Path(__file__).parents[1]
MARKERS_DIR = f"{VOLUME_MOUNT}/markers"  # tests' own files on the claim (logs, releases of holds)
HOLD_PREFIX = "idpo-test-hold"  # what tests/hooks/sitecustomize.py logs where it holds a stage
# What the suite's stage image adds to the jobs image (the Dockerfile's `e2e` target, `e2e_layer` on the
# local plane): stages run in isolated mode, so a module reaches them only by being in the image.
IMAGE_MODULES = {"rewards.py": TESTS / "rewards.py", "sitecustomize.py": TESTS / "hooks" / "sitecustomize.py"}
# Variables the suite's runs set besides the default ones: the test hooks' and test rankers' switches.
TEST_ENV = ["IDPO_TEST_*", "IDPO_FLAKY_MARKER", "IDPO_STUB_SUMMARY"]
SEED_MOUNT = "/etc/idpo-e2e"
JOB_NAME = "batch.kubernetes.io/job-name"
LOCAL_GPUS = 8  # nvidia.com/gpu on the local plane's node: what Kueue's quota tests count against
LOCAL_PATIENCE = 3.0  # the local plane's factor on every wait (IDPO_E2E_PATIENCE elsewhere)
RESTRICTED = {
    "pod-security.kubernetes.io/enforce": "restricted",
    "pod-security.kubernetes.io/enforce-version": "latest",
}


def hooked(env: list[dict[str, Any]], **variables: str) -> dict[str, Any]:
    """A run's `runtime` whose stages' test hooks (tests/hooks/sitecustomize.py, in the suite's stage image)
    are switched on by `variables` (IDPO_TEST_*); `env`: the run's other variables."""
    return {
        "env": [
            *(e for e in env if e["name"] not in variables),
            *({"name": name, "value": value} for name, value in variables.items()),
        ]
    }


def slowed(delay: float, log: str, env: list[dict[str, Any]]) -> dict[str, Any]:
    """A run's `runtime` whose stages report progress slowly and log it to `log` on the claim."""
    return hooked(env, IDPO_TEST_PROGRESS_DELAY=str(delay), IDPO_TEST_PROGRESS_LOG=log)


@dataclass(frozen=True)
class Hold:
    """A stage held at its report of `at` done (tests/hooks/sitecustomize.py) until `release` exists on
    the claim: `Cluster.hold` makes one, `Cluster.release` lets every later attempt through."""

    stage: str
    at: int
    release: str

    @property
    def env(self) -> dict[str, str]:
        return {"IDPO_TEST_HOLD_AT": f"{self.stage}:{self.at}", "IDPO_TEST_HOLD_UNTIL": self.release}

    @property
    def line(self) -> str:
        """What the held stage logs."""
        return f"{HOLD_PREFIX} {self.stage} {self.at}"


TOUCH = """
import pathlib, sys
path = pathlib.Path(sys.argv[1])
path.parent.mkdir(parents=True, exist_ok=True)
path.touch()
"""

# Puts the tiny models on the claim: a copy of the image's (`e2e_layer`), else built there. The builds are seeded,
# so a copy is what the build would write; it spares each seed Job a build (~10 CPU-s: it trains a tiny PairRM).
SEED_SCRIPT = """
import shutil, sys
from pathlib import Path
built = Path(sys.prefix, "idpo-tiny")
if built.is_dir():
    shutil.copytree(built, sys.argv[1], dirs_exist_ok=True)
else:
    from idpo_jobs.tiny import build_tiny
    build_tiny(sys.argv[1])
"""


def e2e_layer() -> Path:
    """The local plane's version of the Dockerfile's `e2e` target: a virtualenv whose site-packages holds
    IMAGE_MODULES and takes in this interpreter's own (the node agent puts it first on the image's PATH), and
    the tiny models under `idpo-tiny` for SEED_SCRIPT to copy (an image without them builds them). In a folder
    of its own that the pods' user may enter and read (pytest's temporary folders are private), removed when
    this process exits."""
    layer = Path(tempfile.mkdtemp(prefix="idpo-e2e-image-"))
    layer.chmod(0o755)
    atexit.register(shutil.rmtree, layer, ignore_errors=True)
    venv.EnvBuilder(symlinks=True).create(layer)
    site = Path(sysconfig.get_path("purelib", vars={"base": str(layer), "platbase": str(layer)}))
    (site / "_idpo_jobs_image.pth").write_text(f"import site; site.addsitedir({sysconfig.get_path('purelib')!r})\n")
    for name, source in IMAGE_MODULES.items():
        shutil.copy(source, site / name)
    models = shutil.copytree(tiny_models(), layer / "idpo-tiny", ignore=shutil.ignore_patterns("_SUCCESS"))
    for path in [models, *models.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)  # the cache is private: mkdtemp's folders, 0600 weights
    return layer


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def audit_stamp() -> str:
    """Now, as the audit log writes its timestamps (UTC, microseconds): such strings sort by time."""
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def start_server(
    command: list[str], log: Path, health: str, timeout: float, what: str, **popen: Any
) -> subprocess.Popen[bytes]:
    """Start a server in a session of its own (`stop_group` stops it whole), its output appended to `log`, and
    wait until `health` answers 200; if it exits or the `timeout` passes first, fail with the log's tail."""
    with log.open("ab") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **popen)
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(health, timeout=5) as answer:
                if answer.status == 200:
                    return proc
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_group(proc)
            tail = log.read_text(errors="replace")[-3000:]
            raise AssertionError(f"{what} did not come up (exit code {proc.returncode}):\n{tail}")
        time.sleep(0.25)


def stop_group(proc: subprocess.Popen[bytes] | None, grace: float = 30) -> None:
    """Stop a server started in a session of its own, children included: SIGTERM to its process group,
    SIGKILL after `grace` seconds."""
    if proc is not None and proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def kubectl_binary() -> str:
    """The kubectl built with the control plane (same minor as the apiserver), else the one on PATH."""
    from tests.controlplane import binaries

    built = binaries.cache_dir() / "kubectl"
    return str(built) if built.is_file() else (shutil.which("kubectl") or "kubectl")


@dataclass
class Target:
    """A cluster the suite may use: its admin kubeconfig, the stage image, and how to treat it."""

    kubeconfig: Path
    image: str
    patience: float
    plane: Any = None  # the local ControlPlane, when the cluster is ours
    namespace: str | None = None  # IDPO_E2E_NAMESPACE: use this one, do not create or delete it
    storage_class: str | None = None


def local_target(root: Path) -> Target:
    """Starts a control plane of our own; the caller stops it (`target.plane.stop()`). Its waits are three
    times the nominal ones: workers of a parallel run share the machine's cores."""
    from tests.controlplane.images import default_images
    from tests.controlplane.plane import ControlPlane, StartError

    # What the node agent "has" (this checkout's code) and the operator's default: the stage image is the
    # Dockerfile's `e2e` target, its config from the target and its files (rankers, hooks) a layer.
    image = DEFAULT_STAGE_IMAGE
    images = [f"{name}={target}" for name, target in {**default_images(), image: "e2e"}.items()]
    layers = [f"{image}={e2e_layer()}"]
    for attempt in range(3):
        try:
            plane = ControlPlane(
                root / "admin.kubeconfig", images=images, layers=layers, gpus=LOCAL_GPUS, log=lambda *_: None
            ).__enter__()
            return Target(plane.kubeconfig, image, patience=LOCAL_PATIENCE, plane=plane)
        except StartError as err:
            # A free port is free when probed: another worker's plane may take it before ours binds it.
            if "address already in use" not in str(err) or attempt == 2:
                raise
    raise AssertionError("unreachable")


def open_target(root: Path) -> Target:
    """`IDPO_E2E_KUBECONFIG`'s cluster, or else a local control plane."""
    kubeconfig = os.environ.get("IDPO_E2E_KUBECONFIG")
    if not kubeconfig:
        return local_target(root)
    image = os.environ.get("IDPO_E2E_IMAGE")
    if not image:
        raise RuntimeError("IDPO_E2E_KUBECONFIG needs IDPO_E2E_IMAGE: the jobs image, built from this checkout")
    return Target(
        Path(kubeconfig),
        image,
        patience=float(os.environ.get("IDPO_E2E_PATIENCE", "5")),
        namespace=os.environ.get("IDPO_E2E_NAMESPACE"),
        storage_class=os.environ.get("IDPO_E2E_STORAGE_CLASS"),
    )


class Cluster:
    """One namespace of a target, with the operator watching it."""

    def __init__(self, target: Target, root: Path, namespace: str) -> None:
        self.target, self.root = target, root
        self.kubeconfig, self.image, self.patience = target.kubeconfig, target.image, target.patience
        self.storage_class = target.storage_class
        # A parallel run's workers each have a namespace of their own, on a shared cluster too.
        worker = os.environ.get("PYTEST_XDIST_WORKER")
        self.namespace = target.namespace or (f"{namespace}-{worker}" if worker else namespace)
        self.owns_namespace = target.namespace is None
        self.operator: subprocess.Popen[bytes] | None = None
        self.operator_log = root / "operator.log"
        self.operator_kubeconfig = self.kubeconfig
        self.liveness, self.metrics_port = "", 0  # each operator start takes free ports (start_operator)
        self.kubectl_bin = kubectl_binary()
        self.policy_overrides: dict[str, Any] = {}  # over `write_policy`'s, for the operator started next
        self._audit: list[dict[str, Any]] = []  # operator_audit's events so far, and how far it has read
        self._audit_read = 0

    def __enter__(self) -> Cluster:
        self.api = config.new_client_from_config(str(self.kubeconfig))
        self.api.user_agent = HARNESS_AGENT  # tells the harness's calls apart from the operator's
        self.custom = client.CustomObjectsApi(self.api)
        self.batch, self.core = client.BatchV1Api(self.api), client.CoreV1Api(self.api)
        if self.owns_namespace:
            body = {"metadata": {"name": self.namespace, "labels": RESTRICTED}}
            self.core.create_namespace(body, _preload_content=False)
        self._wait_for(
            lambda: self._exists(self.core.read_namespaced_service_account, "default"), "default ServiceAccount"
        )
        if self.target.plane is not None:
            self.operator_kubeconfig = self._operator_identity()
        self.since = audit_stamp()
        self.install_crd()
        self._wait_for(self._crd_established, "Established CRD")
        self.start_operator()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_operator()
        if self.owns_namespace:
            self.core.delete_namespace(self.namespace, _preload_content=False)

    def _operator_identity(self) -> Path:
        """The chart's ServiceAccount and RBAC, and a kubeconfig with a token of that account."""
        docs = [d for d in chart.render() if d["kind"] in chart.RBAC_KINDS]
        namespace, account = chart.service_account(docs)
        self.kubectl("create", "namespace", namespace)  # AlreadyExists for the second module: fine
        applied = self.kubectl("apply", "-f", "-", stdin=yaml.safe_dump_all(docs), namespace=namespace)
        assert applied.returncode == 0, applied.stderr
        token = self.kubectl("create", "token", account, "--duration=24h", namespace=namespace)
        assert token.returncode == 0, token.stderr
        return self.target.plane.token_kubeconfig(self.root / "operator.kubeconfig", token.stdout.strip())

    def operator_audit(self) -> list[dict[str, Any]]:
        """The apiserver's audit events of the requests this cluster's operators made: by the chart's
        ServiceAccount, since this namespace's operator started (one plane serves a worker's modules one
        after another), and not through kubectl (a test's own calls with the operator's token)."""
        namespace, account = chart.service_account(chart.render())
        user = f"system:serviceaccount:{namespace}:{account}"
        # Read on from where the last call stopped (tests poll this), complete lines only: the apiserver may be
        # half-way through writing the last one.
        with self.target.plane.audit_log.open("rb") as log:
            log.seek(self._audit_read)
            lines = log.read().split(b"\n")[:-1]
        self._audit_read += sum(len(line) + 1 for line in lines)
        self._audit += [
            e
            for e in map(json.loads, lines)
            if e["user"]["username"] == user
            and e.get("objectRef")
            and e["requestReceivedTimestamp"] >= self.since
            and "kubectl" not in e.get("userAgent", "")
        ]
        return list(self._audit)

    def operator_requests(self, prefix: str = "") -> list[tuple[str, str, str]]:
        """(verb, group, resource) of each request the operator's identity made, from the audit log; with
        `prefix`, only those on objects whose name starts with it (a test's own runs and children)."""
        calls = []
        for event in self.operator_audit():
            if not event["objectRef"].get("name", "").startswith(prefix):
                continue
            ref = event["objectRef"]
            resource = ref["resource"] + (f"/{ref['subresource']}" if ref.get("subresource") else "")
            calls.append((event["verb"], ref.get("apiGroup", ""), resource))
        return calls

    def operator_calls(self, prefix: str = "") -> set[tuple[str, str, str]]:
        return set(self.operator_requests(prefix))

    def wait_for_calls(self, calls: set[tuple[str, str, str]]) -> None:
        """Until the operator made `calls`: one it makes on starting (a watch) reaches the audit log a moment later."""
        self._wait_for(lambda: self.operator_calls() >= calls, f"operator calls {sorted(calls)}")

    # -- the operator process ---------------------------------------------------------------------
    def start_operator(self) -> None:
        # Ports free now: one probed when the cluster began may have gone to another process since.
        self.liveness, self.metrics_port = f"http://127.0.0.1:{free_port()}/healthz", free_port()
        self.operator = self.spawn_operator(self.operator_log, self.liveness, self.metrics_port)

    def write_policy(self) -> Path:
        """What the suite's runs may ask for: this cluster's stage image and the one that cannot be pulled,
        the test rankers (tests/rewards.py) beside the shipped ones, the Secret the secret story names."""
        path = self.root / "policy.yaml"
        policy = {
            "images": [self.image, "registry.invalid/"],
            "functionModules": ["rewards", "idpo_jobs.rewards"],
            "secrets": ["hub-token"],
            "env": [*SAFE_ENV, *TEST_ENV],
            **self.policy_overrides,
        }
        path.write_text(yaml.safe_dump(policy))
        return path

    def spawn_operator(self, log_path: Path, liveness: str, metrics_port: int) -> subprocess.Popen[bytes]:
        """An operator process; it acts while it holds the leader-election Lease (in the chart's
        namespace, where its Role grants it, or in the test namespace on another cluster)."""
        lease_namespace = chart.RELEASE_NAMESPACE if self.target.plane is not None else self.namespace
        with log_path.open("a") as log:
            return subprocess.Popen(
                [
                    *(sys.executable, "-m", "idpo_operator", "operator", "-n", self.namespace, "-v"),
                    *("--liveness", liveness, "--metrics-port", str(metrics_port)),
                    *("--leader-election-namespace", lease_namespace),
                    *("--policy", str(self.write_policy())),
                ],
                env={**os.environ, "KUBECONFIG": str(self.operator_kubeconfig)},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def stop_operator(self, sig: int = signal.SIGTERM) -> None:
        if self.operator and self.operator.poll() is None:
            os.killpg(self.operator.pid, sig)
            self.operator.wait(30)

    # -- kubectl and reads ------------------------------------------------------------------------
    def kubectl(
        self, *args: str, stdin: str | None = None, namespace: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        env = {"KUBECONFIG": str(self.kubeconfig), "PATH": os.environ["PATH"], "HOME": str(self.root)}
        return subprocess.run(
            [self.kubectl_bin, "-n", namespace or self.namespace, *args],
            input=stdin,
            capture_output=True,
            text=True,
            env=env,
            timeout=60 * self.patience,
        )

    def apply(self, manifest: dict[str, Any]) -> subprocess.CompletedProcess[str]:
        """`kubectl apply`; a run without an image gets this cluster's stage image."""
        if manifest.get("kind") == KIND:
            runtime = manifest.setdefault("spec", {}).setdefault("runtime", {})
            runtime.setdefault("image", self.image)
        return self.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(manifest))

    def install_crd(self, body: dict[str, Any] | None = None) -> None:
        """Apply the CRD (the generated one by default) as `kubectl apply -f crds/` would."""
        applied = self.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(body or crd()))
        assert applied.returncode == 0, applied.stderr

    def run(self, name: str) -> dict[str, Any]:
        return self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name)

    def jobs(self, run: str) -> list[dict[str, Any]]:
        selector = f"{resources.LABEL_RUN}={resources.run_label(run)}"
        listed = self.batch.list_namespaced_job(self.namespace, label_selector=selector, _preload_content=False)
        return json.loads(listed.data)["items"]

    def pods(self, job: str) -> list[dict[str, Any]]:
        """The pods a Job started: one per attempt of each index, so a rerun shows as a second pod."""
        selector = f"{JOB_NAME}={job}"
        listed = self.core.list_namespaced_pod(self.namespace, label_selector=selector, _preload_content=False)
        return json.loads(listed.data)["items"]

    def wait(self, name: str, predicate: Any, timeout: float = 300) -> dict[str, Any]:
        deadline = time.monotonic() + timeout * self.patience
        status: dict[str, Any] = {}
        while time.monotonic() < deadline:
            if self.operator is not None and self.operator.poll() is not None:
                break  # the operator died: no point in waiting
            for status in self.statuses(name, seconds=2):
                if predicate(status):
                    return status
        tail = self.operator_log.read_text()[-3000:] if self.operator_log.exists() else ""
        raise AssertionError(f"gave up waiting on {name}: {json.dumps(status)[:2000]}\n--- operator log\n{tail}")

    def statuses(self, name: str, seconds: int) -> Iterator[dict[str, Any]]:
        """The run's status now, then each new one for up to `seconds`; {} while the run does not exist. A
        watch, not a poll: a status is seen as soon as it is written, and four workers reading their runs five
        times a second cost the machine more CPU than some of their tests. A predicate that reads more than the
        status (a Job list) is asked again at least every `seconds`."""
        try:
            run = self.run(name)
        except client.ApiException:
            yield {}
            time.sleep(0.2)
            return
        yield run.get("status") or {}
        stream = watch.Watch().stream(
            self.custom.list_namespaced_custom_object,
            GROUP,
            VERSION,
            self.namespace,
            PLURAL,
            field_selector=f"metadata.name={name}",
            resource_version=run["metadata"]["resourceVersion"],
            timeout_seconds=seconds,
        )
        try:
            for event in stream:
                if event["type"] in ("ADDED", "MODIFIED"):
                    yield event["object"].get("status") or {}
                elif event["type"] == "DELETED":
                    yield {}
                    return
        except client.ApiException:  # 410 Gone: the next call starts from a fresh read
            return

    def wait_phase(self, name: str, *phases: str, timeout: float = 300) -> dict[str, Any]:
        return self.wait(name, lambda s: s.get("phase") in phases, timeout)

    def _wait_for(self, check: Any, what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout * self.patience
        while not check():
            assert time.monotonic() < deadline, f"no {what} in namespace {self.namespace}"
            time.sleep(0.2)

    def _crd_established(self) -> bool:
        """`kubectl wait` errs on a CRD whose status has no conditions yet: poll it instead."""
        path = 'jsonpath={.status.conditions[?(@.type=="Established")].status}'
        got = self.kubectl("get", f"crd/{PLURAL}.{GROUP}", "-o", path)
        return got.returncode == 0 and got.stdout.strip() == "True"

    def _exists(self, read: Any, name: str) -> bool:
        try:
            read(name, self.namespace, _preload_content=False)
            return True
        except client.ApiException as err:
            if err.status != 404:
                raise
            return False

    # -- the volume, through Jobs -----------------------------------------------------------------
    def ensure_claim(self, claim: str) -> None:
        spec: dict[str, Any] = {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "2Gi"}}}
        if self.storage_class:
            spec["storageClassName"] = self.storage_class
        body = {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": claim}, "spec": spec}
        self._create_if_absent(self.core.create_namespaced_persistent_volume_claim, body)

    def _create_if_absent(self, create: Any, body: dict[str, Any]) -> None:
        try:
            create(self.namespace, body, _preload_content=False)
        except client.ApiException as err:
            if err.status != 409:
                raise

    def run_job(
        self,
        args: list[str],
        *,
        claim: str,
        config_map: str | None = None,
        timeout: float = 120,
    ) -> tuple[bool, str]:
        """Run `python <args>` in the stage image with `claim` at /workspace (and `config_map` at
        /etc/idpo-e2e); returns whether it succeeded and the pod's termination message (or log tail)."""
        name = f"e2e-{uuid.uuid4().hex[:8]}"
        mounts = [{"name": "workspace", "mountPath": VOLUME_MOUNT}, {"name": "tmp", "mountPath": "/tmp"}]
        volumes: list[dict[str, Any]] = [
            {"name": "workspace", "persistentVolumeClaim": {"claimName": claim}},
            {"name": "tmp", "emptyDir": {}},
        ]
        if config_map:
            mounts.append({"name": "seed", "mountPath": SEED_MOUNT, "readOnly": True})
            volumes.append({"name": "seed", "configMap": {"name": config_map}})
        container = {
            "name": "e2e",
            "image": self.image,
            "command": ["python", *args],
            "env": [{"name": "HOME", "value": "/tmp"}, {"name": "HF_HOME", "value": "/tmp/hf"}],
            "volumeMounts": mounts,
            "securityContext": CONTAINER_SECURITY,
            "terminationMessagePolicy": "FallbackToLogsOnError",
        }
        pod = {
            "restartPolicy": "Never",
            "automountServiceAccountToken": False,
            "securityContext": POD_SECURITY,
            "containers": [container],
            "volumes": volumes,
        }
        body = {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": name, "labels": {"app.kubernetes.io/part-of": "idpo-e2e"}},
            "spec": {"backoffLimit": 0, "template": {"spec": pod}},
        }
        self.batch.create_namespaced_job(self.namespace, body, _preload_content=False)
        deadline = time.monotonic() + timeout * self.patience
        while time.monotonic() < deadline:
            status = json.loads(self.batch.read_namespaced_job(name, self.namespace, _preload_content=False).data)
            done = {c["type"] for c in status.get("status", {}).get("conditions", []) if c["status"] == "True"}
            if done & {"Complete", "Failed"}:
                messages = [
                    s.get("state", {}).get("terminated", {}).get("message", "")
                    for p in self.pods(name)
                    for s in p.get("status", {}).get("containerStatuses", [])
                ]
                return "Complete" in done, "\n".join(messages)
            time.sleep(0.5)
        raise AssertionError(f"Job {name} ({args[:2]}) did not finish in time")

    def hold(self, stage: str, at: int) -> Hold:
        """A hold of `stage` at its report of `at` done, released by a file of its own on the claim."""
        return Hold(stage, at, f"{MARKERS_DIR}/{uuid.uuid4().hex}.release")

    def release(self, hold: Hold, claim: str) -> None:
        """Let the held stage (and every later attempt) through: create the hold's file on `claim`."""
        released, message = self.run_job(["-c", TOUCH, hold.release], claim=claim)
        assert released, message

    def pod_that_logged(self, job: str, text: str, timeout: float = 180) -> str:
        """The name of a running pod of `job` once its log shows `text`."""
        deadline = time.monotonic() + timeout * self.patience
        while time.monotonic() < deadline:
            for pod in self.pods(job):
                name = pod["metadata"]["name"]
                if pod["status"].get("phase") != "Running":
                    continue
                # Through the client, not a kubectl process per poll: pods log for minutes while they import.
                try:
                    log = self.core.read_namespaced_pod_log(name, self.namespace, _preload_content=False).data
                except client.ApiException:  # not serving logs yet (kubectl's output would be empty)
                    continue
                if text in log.decode(errors="replace"):
                    return name
            time.sleep(0.5)  # what it waits for is held there (`hold`): only latency, no window to miss
        raise AssertionError(f"no pod of {job} logged {text!r}: {json.dumps(self.pods(job))[:2000]}")

    def seed(self, claim: str) -> None:
        """Put the tiny models under `tiny/` on `claim`."""
        self.ensure_claim(claim)
        ok, message = self.run_job(["-c", SEED_SCRIPT, f"{VOLUME_MOUNT}/tiny"], claim=claim, timeout=300)
        assert ok, f"seeding {claim} failed: {message}"
