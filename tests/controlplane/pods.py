"""One pod on the node agent, from scheduled to terminal: a thread per pod.

The worker does what a kubelet does for a pod, in its order: pull the images (or fail with
ErrImagePull / ImagePullBackOff), resolve env and volumes (a missing ConfigMap, Secret or key
waits with CreateContainerConfigError or ContainerCreating, retried), run init containers one by
one and then the containers as processes (launch.py), honour activeDeadlineSeconds and graceful
deletion (SIGTERM to the process group, SIGKILL after the grace period), report the exit code,
reason and termination message, and finally delete the pod object once it is terminal.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tests.controlplane import podspec
from tests.controlplane.podspec import Waiting
from tests.controlplane.rest import STRATEGIC

if TYPE_CHECKING:
    from tests.controlplane.nodeagent import Agent

log = logging.getLogger("node-agent")
LAUNCH = Path(__file__).with_name("launch.py")
RETRY_SECONDS = 2.0


class Stopped(Exception):
    """The pod was deleted while the worker waited."""


class PodWorker(threading.Thread):
    def __init__(self, agent: Agent, pod: dict[str, Any]) -> None:
        super().__init__(daemon=True, name=f"pod-{pod['metadata']['name']}")
        self.agent, self.pod = agent, pod
        meta = pod["metadata"]
        self.uid, self.name, self.namespace = meta["uid"], meta["name"], meta["namespace"]
        self.path = f"/api/v1/namespaces/{self.namespace}/pods/{self.name}"
        self.dir = agent.root / "pods" / self.uid
        self.deleted = threading.Event()
        self.grace = 30.0
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.gpus: list[int] = []
        self.hosts = self.dir / "hosts"
        self.phase = "Pending"  # as last reported

    # -- called from the agent's watch thread ------------------------------------------------------
    def request_stop(self, grace: float) -> None:
        self.grace = min(self.grace, grace)
        self.deleted.set()

    # -- status ------------------------------------------------------------------------------------
    def _status(
        self, phase: str, statuses: list[dict[str, Any]], *, init: list[dict[str, Any]] | None = None, **extra: Any
    ) -> None:
        status: dict[str, Any] = {
            "phase": phase,
            "conditions": podspec.conditions(phase, extra.pop("condition_reason", None)),
            "hostIP": "127.0.0.1",
            "hostIPs": [{"ip": "127.0.0.1"}],
            "containerStatuses": statuses,
            **extra,
        }
        if phase != "Pending":
            status |= {"podIP": "127.0.0.1", "podIPs": [{"ip": "127.0.0.1"}]}
        if init is not None:
            status["initContainerStatuses"] = init
        status.setdefault("startTime", self.start_time)
        self.agent.rest.patch(self.path + "/status", {"status": status}, STRATEGIC)
        if phase != self.phase:
            self.phase = phase
            self.agent.hosts_changed(self.namespace)  # its IP came or went: headless Services' names too

    def _waiting(self, reason: str, message: str) -> None:
        state = {"waiting": {"reason": reason, "message": message}}
        self._status("Pending", [podspec.container_status(c, self.uid, state) for c in self.pod["spec"]["containers"]])

    def _sleep(self, seconds: float) -> None:
        if self.deleted.wait(seconds):
            raise Stopped

    # -- the pod's life ----------------------------------------------------------------------------
    def run(self) -> None:
        self.start_time = podspec.now()
        try:
            self._run()
        except Stopped:
            pass
        except Exception as err:  # a bug here must not leave the pod Running forever
            log.exception("pod %s/%s", self.namespace, self.name)
            state = {"terminated": {"exitCode": 128, "reason": "StartError", "message": f"node agent: {err}"}}
            statuses = [podspec.container_status(c, self.uid, state) for c in self.pod["spec"]["containers"]]
            self._status("Failed", statuses, reason="NodeAgentError", message=str(err)[:1000])
        finally:
            self.agent.release_gpus(self.pod["spec"].get("nodeName"), self.gpus)
            if self.deleted.is_set():
                self.agent.finalize(self.pod)
            self.agent.forget(self.uid)

    def _run(self) -> None:
        spec = self.pod["spec"]
        init, containers = spec.get("initContainers", []), spec["containers"]
        self._pull(init + containers)
        self.dir.mkdir(parents=True, exist_ok=True)
        mounts = self._prepare_volumes()
        plans = {c["name"]: self._plan(c, mounts) for c in init + containers}
        self.agent.hosts_changed(self.namespace)
        deadline = spec.get("activeDeadlineSeconds")
        self.deadline = time.monotonic() + deadline if deadline else None
        if self.agent.fast_pods is not None:
            return self._fast(containers)
        init_done: list[dict[str, Any]] = []
        for container in init:
            pending = [
                podspec.container_status(c, self.uid, {"waiting": {"reason": "PodInitializing"}}) for c in containers
            ]
            running = {"running": {"startedAt": podspec.now()}}
            self._status("Pending", pending, init=[*init_done, podspec.container_status(container, self.uid, running)])
            result = self._execute({container["name"]: plans[container["name"]]})[container["name"]]
            init_done.append(podspec.container_status(container, self.uid, result))
            if result["terminated"]["exitCode"] != 0:
                waiting = {"waiting": {"reason": "PodInitializing"}}
                self._status(
                    "Failed", [podspec.container_status(c, self.uid, waiting) for c in containers], init=init_done
                )
                return
        running = {"running": {"startedAt": podspec.now()}}
        self._status(
            "Running", [podspec.container_status(c, self.uid, running) for c in containers], init=init_done or None
        )
        results = self._execute({c["name"]: plans[c["name"]] for c in containers})
        statuses = [podspec.container_status(c, self.uid, results[c["name"]]) for c in containers]
        failed = any(r["terminated"]["exitCode"] != 0 for r in results.values())
        extra: dict[str, Any] = {}
        if self.deadline_hit:
            extra = {
                "reason": "DeadlineExceeded",
                "message": "Pod was active on the node longer than the specified deadline",
            }
        self._status("Failed" if failed else "Succeeded", statuses, init=init_done or None, **extra)

    def _pull(self, containers: list[dict[str, Any]]) -> None:
        missing = [c["image"] for c in containers if c["image"] not in self.agent.images]
        reason = "ErrImagePull"
        while missing:
            image = missing[0]
            message = f'failed to pull image "{image}": not found (this node has: {", ".join(self.agent.images)})'
            if reason == "ImagePullBackOff":
                message = f'Back-off pulling image "{image}": ErrImagePull: {message}'
            self._waiting(reason, message)
            self._sleep(RETRY_SECONDS)
            reason = "ImagePullBackOff"

    def _retrying(self, step: Any) -> Any:
        """Runs `step` until it stops raising Waiting (a Secret created later lets the pod start)."""
        shown = None
        while True:
            try:
                return step()
            except Waiting as wait:
                if shown != (wait.reason, wait.message):
                    self._waiting(wait.reason, wait.message)
                    shown = (wait.reason, wait.message)
                self._sleep(RETRY_SECONDS)

    # -- volumes -----------------------------------------------------------------------------------
    def _fetch(self, kind: str, name: str) -> dict[str, Any] | None:
        plural = {"ConfigMap": "configmaps", "Secret": "secrets", "PersistentVolumeClaim": "persistentvolumeclaims"}[
            kind
        ]
        return self.agent.rest.get(f"/api/v1/namespaces/{self.namespace}/{plural}/{name}")

    def _prepare_volumes(self) -> dict[str, Path]:
        return self._retrying(lambda: {v["name"]: self._volume(v) for v in self.pod["spec"].get("volumes", [])})

    def _files(self, target: Path, files: dict[str, bytes], mode: int) -> Path:
        target.mkdir(parents=True, exist_ok=True)
        for rel, data in files.items():
            path = target / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            path.chmod(mode)
        return target

    def _projected(self, source: dict[str, Any], kind: str) -> dict[str, bytes]:
        """A ConfigMap's or Secret's keys (or the listed items) as files; {} when optional and absent."""
        name = source.get("name") or source.get("secretName")
        obj = self._fetch(kind, name)
        if obj is None:
            if source.get("optional"):
                return {}
            raise Waiting("ContainerCreating", f'MountVolume.SetUp failed: {kind.lower()} "{name}" not found')
        data = {k: v.encode() for k, v in (obj.get("data") or {}).items()}
        if kind == "Secret":
            data = {k: base64.b64decode(v) for k, v in data.items()}
        data |= {k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()}
        items = source.get("items")
        if not items:
            return data
        missing = [i["key"] for i in items if i["key"] not in data]
        if missing and not source.get("optional"):
            raise Waiting(
                "ContainerCreating", f"MountVolume.SetUp failed: {kind.lower()} {name} has no key {missing[0]}"
            )
        return {i["path"]: data[i["key"]] for i in items if i["key"] in data}

    def _downward(self, items: list[dict[str, Any]]) -> dict[str, bytes]:
        fake = {"env": [{"name": i["path"], "valueFrom": {k: v for k, v in i.items() if k != "path"}} for i in items]}
        env = podspec.container_env(self.pod, fake, {}, self._fetch)
        return {path: value.encode() for path, value in env.items()}

    def _volume(self, volume: dict[str, Any]) -> Path:
        local = self.dir / "volumes" / volume["name"]
        if "emptyDir" in volume:
            if volume["emptyDir"].get("medium") == "Memory":
                local = self.agent.memory_dir(self.uid) / volume["name"]  # tmpfs, as the kubelet's
            local.mkdir(parents=True, exist_ok=True)
            local.chmod(0o777)
            return self._own(local)
        if "persistentVolumeClaim" in volume:
            name = volume["persistentVolumeClaim"]["claimName"]
            claim = self._fetch("PersistentVolumeClaim", name)
            volume_name = (claim or {}).get("spec", {}).get("volumeName")
            if not volume_name:
                raise Waiting("ContainerCreating", f'persistentvolumeclaim "{name}" is not bound')
            pv = self.agent.rest.get(f"/api/v1/persistentvolumes/{volume_name}") or {}
            source = pv.get("spec", {}).get("hostPath") or pv.get("spec", {}).get("local") or {}
            if not source.get("path"):
                raise Waiting("ContainerCreating", f"volume {volume_name} has no local path on this node")
            return self._own(Path(source["path"]))
        mode = volume.get("configMap", volume.get("secret", volume.get("projected", {}))).get("defaultMode", 0o644)
        if "configMap" in volume:
            return self._files(local, self._projected(volume["configMap"], "ConfigMap"), mode)
        if "secret" in volume:
            return self._files(local, self._projected(volume["secret"], "Secret"), mode)
        if "downwardAPI" in volume:
            return self._files(local, self._downward(volume["downwardAPI"]["items"]), mode)
        if "projected" in volume:
            files: dict[str, bytes] = {}
            for source in volume["projected"]["sources"]:
                if "configMap" in source:
                    files |= self._projected(source["configMap"], "ConfigMap")
                elif "secret" in source:
                    files |= self._projected(source["secret"], "Secret")
                elif "downwardAPI" in source:
                    files |= self._downward(source["downwardAPI"]["items"])
                elif "serviceAccountToken" in source:
                    files[source["serviceAccountToken"]["path"]] = self._token(source["serviceAccountToken"]).encode()
            return self._files(local, files, mode)
        raise Waiting("ContainerCreating", f"volume {volume['name']}: this node agent cannot mount {sorted(volume)}")

    def _token(self, source: dict[str, Any]) -> str:
        account = self.pod["spec"].get("serviceAccountName", "default")
        request = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {
                "audiences": [source["audience"]] if source.get("audience") else None,
                "expirationSeconds": source.get("expirationSeconds", 3600),
                "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": self.name, "uid": self.uid},
            },
        }
        path = f"/api/v1/namespaces/{self.namespace}/serviceaccounts/{account}/token"
        return self.agent.rest.call("POST", path, request)["status"]["token"]

    def _own(self, path: Path) -> Path:
        """fsGroup, as the kubelet's OnRootMismatch policy: group-own the volume, setgid dirs."""
        group = (self.pod["spec"].get("securityContext") or {}).get("fsGroup")
        if group is None or path.stat().st_gid == group:
            return path
        for root, dirs, files in os.walk(path):
            for name in [*dirs, *files]:
                os.lchown(os.path.join(root, name), -1, group)
            for name in dirs:
                os.chmod(os.path.join(root, name), os.stat(os.path.join(root, name)).st_mode | 0o2070)
        os.chown(path, -1, group)
        path.chmod(path.stat().st_mode | 0o2070)
        return path

    # -- containers --------------------------------------------------------------------------------
    def _plan(self, container: dict[str, Any], volumes: dict[str, Path]) -> dict[str, Any]:
        def build() -> dict[str, Any]:
            uid, gid, groups = podspec.identity(self.pod, container, self.agent.image_user)
            env = podspec.container_env(self.pod, container, self._image_env(container, uid), self._fetch)
            return {
                "argv": podspec.command(container, env),
                "env": env,
                "uid": uid,
                "gid": gid,
                "groups": groups,
            }

        plan = self._retrying(build)
        home = self.dir / container["name"]
        home.mkdir(parents=True, exist_ok=True)
        termination = home / "termination-log"
        termination.touch()
        termination.chmod(0o666)  # written by the container's user
        mounts = [
            {
                "source": str(volumes[m["name"]] / m.get("subPath", "")),
                "target": m["mountPath"],
                "readOnly": m.get("readOnly", False),
            }
            for m in container.get("volumeMounts", [])
        ]
        mounts += [
            {"source": str(self.hosts), "target": "/etc/hosts", "readOnly": True},
            {"source": str(termination), "target": container.get("terminationMessagePath", podspec.TERMINATION_LOG)},
            *self.agent.image_mounts,
        ]
        security = container.get("securityContext") or {}
        return plan | {
            "hostname": podspec.hostname(self.pod),
            "mounts": mounts,
            "readOnlyRoot": bool(security.get("readOnlyRootFilesystem")),
            "workingDir": container.get("workingDir", "/"),
            "startError": str(home / "start-error"),
            "termination": str(termination),
            "log": str(home / "log"),
        }

    def _image_env(self, container: dict[str, Any], uid: int) -> dict[str, str]:
        env = dict(self.agent.image_env)
        layer = self.agent.images.get(container["image"])
        if layer is not None:
            env["PATH"] = f"{layer / 'bin'}:{env['PATH']}"
        env |= {"HOSTNAME": podspec.hostname(self.pod), "HOME": "/root" if uid == 0 else "/"}
        env |= self.agent.service_env
        gpus = int((container.get("resources", {}).get("limits") or {}).get("nvidia.com/gpu", 0))
        if gpus:
            self.gpus += self.agent.take_gpus(self.pod["spec"].get("nodeName"), gpus)
            env["NVIDIA_VISIBLE_DEVICES"] = ",".join(str(g) for g in self.gpus[-gpus:])
        return env

    def write_hosts(self, neighbours: list[str]) -> None:
        if self.dir.exists():
            with self.hosts.open("w") as f:  # in place: bind-mounted files keep their inode
                f.write(podspec.hosts_file(podspec.host_names(self.pod), neighbours))

    def _execute(self, plans: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """Runs the containers together until all exit; their terminated states, by name."""
        started = podspec.now()
        for name, plan in plans.items():
            plan_file = Path(plan["log"]).with_name("plan.json")
            plan_file.write_text(json.dumps(plan))
            with open(plan["log"], "ab") as out:
                self.processes[name] = subprocess.Popen(
                    [sys.executable, str(LAUNCH), str(plan_file)],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                    env={"PATH": os.environ["PATH"]},
                )
        self.deadline_hit = False
        while any(p.poll() is None for p in self.processes.values()):
            if self.deleted.wait(0.2):
                self._kill(self.grace)
            elif self.deadline is not None and time.monotonic() > self.deadline:
                self.deadline_hit = True
                self._kill(0)
        results = {}
        for name, proc in self.processes.items():
            results[name] = {"terminated": self._terminated(plans[name], proc.returncode, started)}
        self.processes = {}
        return results

    def _terminated(self, plan: dict[str, Any], code: int, started: str) -> dict[str, Any]:
        start_error = Path(plan["startError"])
        container = next(
            c
            for c in self.pod["spec"].get("initContainers", []) + self.pod["spec"]["containers"]
            if c["name"] == Path(plan["log"]).parent.name
        )
        if code < 0:
            code = 128 - code  # killed by a signal: 128+n, as a runtime reports it
        if start_error.exists() and start_error.read_text():
            return {
                "exitCode": code,
                "reason": "StartError",
                "message": start_error.read_text(),
                "startedAt": started,
                "finishedAt": podspec.now(),
            }
        written = Path(plan["termination"]).read_text(errors="replace")
        tail = Path(plan["log"]).read_text(errors="replace")[-8192:] if Path(plan["log"]).exists() else ""
        message = podspec.termination_message(container, written, tail, code)
        state = {
            "exitCode": code,
            "reason": "Completed" if code == 0 else "Error",
            "startedAt": started,
            "finishedAt": podspec.now(),
        }
        return state | ({"message": message} if message else {})

    def _kill(self, grace: float) -> None:
        """SIGTERM to each container's process group, SIGKILL to what outlives the grace period."""
        for proc in self.processes.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(p.poll() is None for p in self.processes.values()):
            time.sleep(0.1)
        for proc in self.processes.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def _fast(self, containers: list[dict[str, Any]]) -> None:
        """Fast-pods mode: Running, then Succeeded after the set time with a canned stage summary."""
        running = {"running": {"startedAt": podspec.now()}}
        self._status("Running", [podspec.container_status(c, self.uid, running) for c in containers])
        self._sleep(self.agent.fast_pods or 0)
        labels = self.pod["metadata"].get("labels", {})
        summary = {
            "stage": labels.get("idpo.dev/stage", "unknown"),
            "iteration": int(labels.get("idpo.dev/iteration", "0") or 0),
            "shard": int(labels.get("batch.kubernetes.io/job-completion-index", "0") or 0),
            "metrics": {"simulated": True},
        }
        done = {
            "terminated": {
                "exitCode": 0,
                "reason": "Completed",
                "message": json.dumps(summary),
                "finishedAt": podspec.now(),
            }
        }
        self._status("Succeeded", [podspec.container_status(c, self.uid, done) for c in containers])
