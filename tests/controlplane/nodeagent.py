"""The test cluster's node agent: the one component that is ours, standing in for kubelets,
a container runtime and a storage provisioner.

    python -m tests.controlplane.nodeagent --kubeconfig F --root DIR [--nodes K] [--gpus N]
        [--fast-pods SECONDS] [--image IMAGE[=TARGET] ...] [--layer IMAGE=DIR ...]

- Registers K Nodes with the given capacity (cpu, memory, `nvidia.com/gpu`) and keeps them Ready
  (a status at start, then Lease heartbeats, as kubelets do).
- Provisions PersistentVolumes for the `local` StorageClass, which it marks default (as
  local-path-provisioner does): a directory per claim, deleted when the claim is released.
- Runs each Pod scheduled to its Nodes (pods.py): the container command as a local process.
  Images: the node "has" the configured images, all of them this checkout's code on this
  interpreter, each with its Dockerfile target's ENTRYPOINT, CMD, USER, WORKDIR and ENV (images.py);
  any other image waits in ErrImagePull / ImagePullBackOff.
  `--layer IMAGE=DIR` adds a layer to IMAGE, as an image built FROM another adds its files: DIR is a
  virtualenv whose interpreter comes first on the image's PATH and is its VIRTUAL_ENV (its
  site-packages holds what the layer adds, e.g. a ranker module or a sitecustomize). The suite's
  stage image is `--image NAME=e2e --layer NAME=DIR`: the `e2e` target's config, the layer its files.

Everything a Job needs beyond that (indexes, retries, failure policies, garbage collection) is the
real controller-manager's. All addresses are 127.0.0.1: pods resolve every pod name to loopback.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import shutil
import signal
import stat
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.controlplane import binaries, images, logserver, podspec
from tests.controlplane.pods import PodWorker
from tests.controlplane.rest import MERGE, ApiException, Rest

log = logging.getLogger("node-agent")
PROVISIONER = "idpo.dev/local-path"
STORAGE_CLASS = "local"
LEASE_SECONDS = 40
HEARTBEAT_SECONDS = 10
REPO = Path(__file__).parents[2]
# What the "image" passes on from this machine's environment: OpenBLAS needs these on some CPUs.
IMAGE_ENV_PASSTHROUGH = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "LANG", "LC_ALL", "TZ")


def micro_now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def image_mounts(paths: list[Path], target: str | None = None) -> list[dict[str, Any]]:
    """Read-only binds of the interpreter, its virtualenv and this checkout, bound in place (or at
    `target`) last, as an image's own files are always there: a volume at /tmp must not hide a
    checkout below /tmp, and a directory only root may enter (/root is 0700) is masked with an empty
    one (`mask`)."""
    out: list[dict[str, Any]] = []
    for path in sorted({p.resolve() for p in paths}):
        if any(path.is_relative_to(m["source"]) for m in out):
            continue
        where = Path(target) if target else path
        hidden = next((a for a in reversed(where.parents) if not os.stat(a).st_mode & stat.S_IXOTH), None)
        out.append(
            {"source": str(path), "target": str(where), "readOnly": True, "mask": str(hidden) if hidden else None}
        )
    return out


class Agent:
    def __init__(self, args: argparse.Namespace) -> None:
        self.rest = Rest(args.kubeconfig)
        self.root = Path(args.root)
        self.nodes = [f"idpo-node-{i}" for i in range(args.nodes)]
        self.capacity = {"cpu": args.cpu, "memory": args.memory, "pods": "250", "nvidia.com/gpu": str(args.gpus)}
        self.free_gpus = {n: set(range(args.gpus)) for n in self.nodes}
        self.fast_pods: float | None = args.fast_pods
        # Image -> its config from the Dockerfile (ENTRYPOINT, CMD, USER, WORKDIR, ENV): images.py.
        self.images: dict[str, images.ImageConfig] = images.load(images.parse_images(args.image))
        self.layers = images.parse_layers(args.layer, self.images)
        venv_bin = Path(sys.executable).parent
        # The image's interpreter and virtualenv are this machine's: PATH and VIRTUAL_ENV say so.
        self.machine_env = {
            "PATH": f"{venv_bin}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            **{k: os.environ[k] for k in IMAGE_ENV_PASSTHROUGH if k in os.environ},
        }
        self.venv = sys.prefix
        shared = [Path(sys.prefix), Path(sys.base_prefix), REPO]
        # What the Dockerfile copies into WORKDIR is this checkout: it is there, read-only.
        self.image_mounts = {
            image: image_mounts([*shared, *([self.layers[image]] if image in self.layers else [])])
            + (image_mounts([REPO], config.workdir) if config.workdir.strip("/") else [])
            for image, config in self.images.items()
        }
        # In-cluster clients reach the apiserver on loopback, never through the Service's ClusterIP.
        port = str(args.apiserver_port)
        self.service_env = {
            "KUBERNETES_SERVICE_HOST": "127.0.0.1",
            "KUBERNETES_SERVICE_PORT": port,
            "KUBERNETES_SERVICE_PORT_HTTPS": port,
        }
        self.workers: dict[str, PodWorker] = {}
        self.uids: dict[tuple[str, str], str] = {}  # (namespace, pod name) -> uid, for the log endpoint
        self.services: dict[tuple[str, str], dict[str, Any]] = {}  # (namespace, name): for cluster DNS
        self.log_port = logserver.serve(self.locate_log, args.tls_cert, args.tls_key, args.ca)
        self.lock = threading.Lock()
        self.hosts_lock = threading.Lock()
        self.stop = threading.Event()

    # -- nodes -------------------------------------------------------------------------------------
    def node_status(self, name: str) -> dict[str, Any]:
        stamp = podspec.now()
        ready = {
            "type": "Ready",
            "status": "True",
            "reason": "KubeletReady",
            "message": "node agent is posting ready status",
        }
        pressure = [
            {"type": kind, "status": "False", "reason": f"KubeletHas{ok}"}
            for kind, ok in (
                ("MemoryPressure", "SufficientMemory"),
                ("DiskPressure", "NoDiskPressure"),
                ("PIDPressure", "SufficientPID"),
            )
        ]
        return {
            "capacity": self.capacity,
            "allocatable": self.capacity,
            "conditions": [{**c, "lastHeartbeatTime": stamp, "lastTransitionTime": stamp} for c in [*pressure, ready]],
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": name}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": self.log_port}},
            "nodeInfo": {
                "machineID": name,
                "systemUUID": name,
                "bootID": name,
                "kernelVersion": os.uname().release,
                "osImage": "idpo node agent",
                "containerRuntimeVersion": "idpo-node-agent://0.1",
                "kubeletVersion": binaries.kubernetes_version(),
                "kubeProxyVersion": "",
                "operatingSystem": "linux",
                "architecture": "amd64",
            },
        }

    def register(self) -> None:
        for name in self.nodes:
            labels = {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64"}
            self.rest.create(
                "/api/v1/nodes", {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels}}
            )
            self.rest.patch(f"/api/v1/nodes/{name}/status", {"status": self.node_status(name)}, MERGE)

    def heartbeat(self) -> None:
        while not self.stop.is_set():
            for name in self.nodes:
                lease = {
                    "apiVersion": "coordination.k8s.io/v1",
                    "kind": "Lease",
                    "metadata": {"name": name, "namespace": "kube-node-lease"},
                    "spec": {"holderIdentity": name, "leaseDurationSeconds": LEASE_SECONDS, "renewTime": micro_now()},
                }
                path = "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases"
                try:
                    if self.rest.patch(f"{path}/{name}", {"spec": lease["spec"]}, MERGE) is None:
                        self.rest.create(path, lease)
                except Exception as err:  # the apiserver may be restarting; the next beat retries
                    log.warning("heartbeat of %s: %s", name, err)
            self.stop.wait(HEARTBEAT_SECONDS)

    def take_gpus(self, node: str | None, count: int) -> list[int]:
        with self.lock:
            free = sorted(self.free_gpus.get(node or "", set()))[:count]
            self.free_gpus.get(node or "", set()).difference_update(free)
            return free

    def release_gpus(self, node: str | None, gpus: list[int]) -> None:
        with self.lock:
            self.free_gpus.get(node or "", set()).update(gpus)

    # -- storage -----------------------------------------------------------------------------------
    def install_storage_class(self) -> None:
        self.rest.create(
            "/apis/storage.k8s.io/v1/storageclasses",
            {
                "apiVersion": "storage.k8s.io/v1",
                "kind": "StorageClass",
                "metadata": {
                    "name": STORAGE_CLASS,
                    "annotations": {"storageclass.kubernetes.io/is-default-class": "true"},
                },
                "provisioner": PROVISIONER,
                "reclaimPolicy": "Delete",
                "volumeBindingMode": "Immediate",
            },
        )

    def on_claim(self, kind: str, claim: dict[str, Any]) -> None:
        meta, spec = claim["metadata"], claim["spec"]
        wanted = (meta.get("annotations") or {}).get("volume.kubernetes.io/storage-provisioner") == PROVISIONER
        if (
            kind == "DELETED"
            or not wanted
            or spec.get("volumeName")
            or claim.get("status", {}).get("phase") != "Pending"
        ):
            return
        name = f"pvc-{meta['uid']}"
        directory = self.root / "volumes" / name
        directory.mkdir(parents=True, exist_ok=True)
        directory.chmod(0o777)  # any uid may write, as local-path-provisioner's directories
        self.rest.create(
            "/api/v1/persistentvolumes",
            {
                "apiVersion": "v1",
                "kind": "PersistentVolume",
                "metadata": {"name": name, "annotations": {"pv.kubernetes.io/provisioned-by": PROVISIONER}},
                "spec": {
                    "capacity": {"storage": spec["resources"]["requests"]["storage"]},
                    "accessModes": spec["accessModes"],
                    "persistentVolumeReclaimPolicy": "Delete",
                    "storageClassName": spec.get("storageClassName") or STORAGE_CLASS,
                    "hostPath": {"path": str(directory), "type": "Directory"},
                    "claimRef": {
                        "kind": "PersistentVolumeClaim",
                        "namespace": meta["namespace"],
                        "name": meta["name"],
                        "uid": meta["uid"],
                    },
                },
            },
        )

    def on_volume(self, kind: str, volume: dict[str, Any]) -> None:
        ours = (volume["metadata"].get("annotations") or {}).get("pv.kubernetes.io/provisioned-by") == PROVISIONER
        if kind == "DELETED" or not ours or volume.get("status", {}).get("phase") != "Released":
            return
        shutil.rmtree(volume["spec"]["hostPath"]["path"], ignore_errors=True)
        self.rest.delete(f"/api/v1/persistentvolumes/{volume['metadata']['name']}")

    # -- pods --------------------------------------------------------------------------------------
    def on_pod(self, kind: str, pod: dict[str, Any]) -> None:
        if pod["spec"].get("nodeName") not in self.nodes:
            return
        uid, meta = pod["metadata"]["uid"], pod["metadata"]
        with self.lock:
            worker = self.workers.get(uid)
            self.uids[(meta["namespace"], meta["name"])] = uid
        if kind == "DELETED":
            with self.lock:
                self.uids.pop((meta["namespace"], meta["name"]), None)
            if worker:
                worker.request_stop(0)
            # Logs and volumes live as long as the pod object, as a kubelet keeps them.
            shutil.rmtree(self.root / "pods" / uid, ignore_errors=True)
            shutil.rmtree(self.memory_dir(uid), ignore_errors=True)
            return
        if worker is None:
            if pod.get("status", {}).get("phase") in ("Succeeded", "Failed"):
                if meta.get("deletionTimestamp"):
                    self.finalize(pod)
                return
            worker = PodWorker(self, pod)
            with self.lock:
                self.workers[uid] = worker
            worker.start()
        if meta.get("deletionTimestamp"):
            worker.request_stop(float(meta.get("deletionGracePeriodSeconds") or 0))

    def locate_log(self, namespace: str, pod: str, container: str) -> tuple[Path, Callable[[], bool]] | None:
        with self.lock:
            uid = self.uids.get((namespace, pod))
        if uid is None:
            return None
        return self.root / "pods" / uid / container / "log", lambda: uid in self.workers

    def memory_dir(self, uid: str) -> Path:
        return Path("/dev/shm") / f"idpo-node-agent-{uid}"

    def finalize(self, pod: dict[str, Any]) -> None:
        """The kubelet's last word on a pod: delete it for good, if it is still the same pod."""
        meta = pod["metadata"]
        body = {"gracePeriodSeconds": 0, "preconditions": {"uid": meta["uid"]}}
        self.rest.delete(f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}", body)

    def forget(self, uid: str) -> None:
        with self.lock:
            self.workers.pop(uid, None)

    def on_service(self, kind: str, service: dict[str, Any]) -> None:
        meta = service["metadata"]
        key = (meta["namespace"], meta["name"])
        with self.lock:
            if kind == "DELETED":
                self.services.pop(key, None)
            else:
                self.services[key] = service
        self.hosts_changed(meta["namespace"])

    def hosts_changed(self, namespace: str) -> None:
        """Rewrite the hosts files of a namespace's pods with what cluster DNS would answer there:
        called when a Service or a pod's IP comes or goes."""
        with self.hosts_lock:  # serialized whole: a write computed earlier must not land last
            with self.lock:
                workers = [w for w in self.workers.values() if w.namespace == namespace]
                services = [s for (ns, _), s in self.services.items() if ns == namespace]
            # A pod has its IP once Running, and is ready then (the node agent runs no readiness probes).
            addressed = [(w.pod, True) for w in workers if w.phase == "Running"]
            names = [n for s in services for n in podspec.service_names(s, addressed)]
            for worker in workers:
                worker.write_hosts(names)

    # -- watches -----------------------------------------------------------------------------------
    def watch(self, path: str, handle: Callable[[str, dict[str, Any]], None]) -> None:
        """List, then watch from the list's version; relist after an error or a 410 Gone."""
        while not self.stop.is_set():
            try:
                listed = self.rest.call("GET", path)
                for item in listed["items"]:
                    handle("ADDED", item)
                version = listed["metadata"]["resourceVersion"]
                while not self.stop.is_set():
                    for event in self.rest.watch(path, version, timeoutSeconds="300"):
                        version = event["object"]["metadata"]["resourceVersion"]
                        if event["type"] != "BOOKMARK":
                            handle(event["type"], event["object"])
            except ApiException as err:
                if err.status != 410:
                    log.warning("watch %s: %s", path, err.reason)
                    self.stop.wait(1)
            except Exception:
                log.exception("watch %s", path)
                self.stop.wait(1)

    def run(self) -> None:
        self.register()
        self.install_storage_class()
        threads = [
            threading.Thread(target=self.heartbeat, daemon=True),
            threading.Thread(target=self.watch, args=("/api/v1/persistentvolumeclaims", self.on_claim), daemon=True),
            threading.Thread(target=self.watch, args=("/api/v1/persistentvolumes", self.on_volume), daemon=True),
            threading.Thread(target=self.watch, args=("/api/v1/pods", self.on_pod), daemon=True),
            threading.Thread(target=self.watch, args=("/api/v1/services", self.on_service), daemon=True),
        ]
        for thread in threads:
            thread.start()
        log.info("nodes %s ready; images %s", ", ".join(self.nodes), ", ".join(self.images))
        self.stop.wait()
        with self.lock:
            workers = list(self.workers.values())
        for worker in workers:  # stop the containers with the node, as a kubelet's node going away
            worker.request_stop(0)
        for worker in workers:
            worker.join(10)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tests.controlplane.nodeagent", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--root", required=True, help="folder for pod and volume data")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus", type=int, default=0, help="nvidia.com/gpu per node")
    parser.add_argument("--cpu", default="32", help="cpu capacity per node")
    parser.add_argument("--memory", default="128Gi", help="memory capacity per node")
    parser.add_argument("--fast-pods", type=float, help="complete pods after this many seconds, without running them")
    images.add_arguments(parser)
    parser.add_argument("--apiserver-port", type=int, required=True)
    parser.add_argument("--tls-cert", required=True, help="serving certificate for the log endpoint")
    parser.add_argument("--tls-key", required=True)
    parser.add_argument("--ca", required=True, help="CA of the apiserver's kubelet client certificate")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    agent = Agent(args)
    signal.signal(signal.SIGTERM, lambda *_: agent.stop.set())
    signal.signal(signal.SIGINT, lambda *_: agent.stop.set())
    agent.run()


if __name__ == "__main__":
    main()
