"""A kubelet and Job controller stand-in: runs each Job's pods as local subprocesses.

It polls Jobs through the API (any server: the emulator here), and for each index of an Indexed
Job creates a Pod object, runs the container's command with:
- volumes mapped to local directories (a PVC to `<root>/pvc/<claim>`, a ConfigMap's keys written
  to files, emptyDirs to temp dirs), mount paths rewritten in the command and env values;
- the container env (literal values) plus `JOB_COMPLETION_INDEX`;
- the termination message file (`IDPO_TERMINATION_LOG`, standing in for terminationMessagePath),
then writes Pod status (terminated state, exit code, message) and Job status (succeeded/failed
counts, Complete/Failed conditions) as the Job controller would, honouring `backoffLimit` and the
`podFailurePolicy` FailJob-on-exit-code rule. `python` in a command is this interpreter. A pod
deleted while it runs (with its Job, by garbage collection) has its process killed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from kubernetes import client

from tests.harness.emulator import now

JOB_NAME = "batch.kubernetes.io/job-name"
INDEX = "batch.kubernetes.io/job-completion-index"


class Kubelet:
    def __init__(self, api: client.ApiClient, namespace: str, root: Path) -> None:
        self.batch, self.core = client.BatchV1Api(api), client.CoreV1Api(api)
        self.namespace, self.root = namespace, root
        self.handled: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._workers: list[threading.Thread] = []

    def pvc_dir(self, claim: str) -> Path:
        return self.root / "pvc" / claim

    def __enter__(self) -> Kubelet:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        for worker in self._workers:
            worker.join(300)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                jobs = json.loads(self.batch.list_namespaced_job(self.namespace, _preload_content=False).data)["items"]
            except Exception:  # the server may be going away at teardown
                jobs = []
            for job in jobs:
                uid = job["metadata"]["uid"]
                if uid not in self.handled:
                    self.handled.add(uid)
                    worker = threading.Thread(target=self._run_job, args=(job,), daemon=True)
                    self._workers.append(worker)
                    worker.start()
            time.sleep(0.1)

    # -- one Job -------------------------------------------------------------------------------
    def _run_job(self, job: dict[str, Any]) -> None:
        name, spec = job["metadata"]["name"], job["spec"]
        completions = spec.get("completions", 1)
        backoff = spec.get("backoffLimit", 6)
        fail_codes = {
            code
            for rule in spec.get("podFailurePolicy", {}).get("rules", [])
            if rule["action"] == "FailJob"
            for code in rule.get("onExitCodes", {}).get("values", [])
        }
        self._patch_job(name, {"startTime": now(), "active": completions})
        pending, succeeded, failed, attempt = list(range(completions)), 0, 0, 0
        fatal: str | None = None
        while pending and fatal is None:
            results: dict[int, int | None] = {}

            def run(index: int, attempt: int = attempt, results: dict[int, int | None] = results) -> None:
                results[index] = self._run_pod(job, index, attempt)

            threads = [threading.Thread(target=run, args=(i,)) for i in pending]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            attempt += 1
            if any(results.get(i, 1) is None for i in pending):
                return  # the Job was deleted (its pods went with it): nothing left to report
            still = []
            for index in pending:
                code = results.get(index, 1)  # a pod whose runner crashed counts as failed
                if code == 0:
                    succeeded += 1
                    continue
                failed += 1
                if code in fail_codes:
                    fatal = (
                        f"Container {job['spec']['template']['spec']['containers'][0]['name']} for pod "
                        f"index {index} failed with exit code {code} matching FailJob rule"
                    )
                still.append(index)
            self._patch_job(name, {"succeeded": succeeded, "failed": failed, "active": len(still) if not fatal else 0})
            if failed > backoff and not fatal:
                fatal = "Job has reached the specified backoff limit"
            pending = still
        condition = {"status": "True", "lastTransitionTime": now()}
        if fatal:
            reason = "PodFailurePolicy" if "FailJob" in fatal else "BackoffLimitExceeded"
            status = {"conditions": [{**condition, "type": "Failed", "reason": reason, "message": fatal}]}
        else:
            status = {"completionTime": now(), "conditions": [{**condition, "type": "Complete"}]}
        self._patch_job(name, {**status, "active": 0})

    def _patch_job(self, name: str, status: dict[str, Any]) -> None:
        try:
            self.batch.patch_namespaced_job_status(name, self.namespace, {"status": status}, _preload_content=False)
        except client.ApiException as err:
            if err.status != 404:  # deleted meanwhile (cascade)
                raise

    def _run_pod(self, job: dict[str, Any], index: int, attempt: int) -> int | None:
        """Runs one pod; its exit code, or None when the pod was deleted (with its Job) meanwhile."""
        name = job["metadata"]["name"]
        template = job["spec"]["template"]
        pod_name = f"{name}-{index}-{attempt}"
        labels = {**template.get("metadata", {}).get("labels", {}), JOB_NAME: name, INDEX: str(index)}
        owner = {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "name": name,
            "uid": job["metadata"]["uid"],
            "controller": True,
        }
        self.core.create_namespaced_pod(
            self.namespace,
            {
                "metadata": {"name": pod_name, "labels": labels, "ownerReferences": [owner]},
                "spec": template["spec"],
                "status": {"phase": "Running", "startTime": now()},
            },
            _preload_content=False,  # responses unused; no client-side model validation of them
        )
        try:
            ran = self._execute(template["spec"], pod_name, index)
        except client.ApiException as err:
            if err.status != 404:  # the pod's ConfigMap went with a deleted Job
                raise
            ran = None
        if ran is None:
            return None
        code, message = ran
        phase = "Succeeded" if code == 0 else "Failed"
        try:
            self.core.patch_namespaced_pod_status(
                pod_name,
                self.namespace,
                {
                    "status": {
                        "phase": phase,
                        "containerStatuses": [
                            {
                                "name": template["spec"]["containers"][0]["name"],
                                "image": template["spec"]["containers"][0]["image"],
                                "imageID": "",
                                "restartCount": 0,
                                "ready": False,
                                "state": {"terminated": {"exitCode": code, "message": message, "finishedAt": now()}},
                            }
                        ],
                    }
                },
                _preload_content=False,
            )
        except client.ApiException as err:
            if err.status != 404:
                raise
            return None  # deleted just as it ended
        return code

    def _execute(self, pod: dict[str, Any], pod_name: str, index: int) -> tuple[int, str] | None:
        container = pod["containers"][0]
        workdir = Path(tempfile.mkdtemp(prefix=f"{pod_name}-", dir=self.root))
        mounts: dict[str, str] = {}
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for mount in container.get("volumeMounts", []):
            volume = volumes[mount["name"]]
            if "persistentVolumeClaim" in volume:
                local = self.pvc_dir(volume["persistentVolumeClaim"]["claimName"])
            elif "configMap" in volume:
                local = workdir / mount["name"]
                local.mkdir()
                cm = self.core.read_namespaced_config_map(volume["configMap"]["name"], self.namespace)
                for key, value in (cm.data or {}).items():
                    (local / key).write_text(value)
            else:
                local = workdir / mount["name"]
            local.mkdir(parents=True, exist_ok=True)
            mounts[mount["mountPath"]] = str(local)

        def mapped(value: str) -> str:
            for path, local in sorted(mounts.items(), key=lambda m: -len(m[0])):
                if value == path or value.startswith(path + "/"):
                    return local + value[len(path) :]
            return value

        termination = workdir / "termination-log"
        env = {**os.environ, "JOB_COMPLETION_INDEX": str(index), "IDPO_TERMINATION_LOG": str(termination)}
        env |= {e["name"]: mapped(str(e["value"])) for e in container.get("env", []) if "value" in e}
        command = [mapped(a) for a in container["command"] + container.get("args", [])]
        if command[0] == "python":
            command[0] = sys.executable
        with (workdir / "log").open("w") as log:
            process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
            code = self._supervise(process, pod_name)
        if code is None:
            return None
        message = termination.read_text() if termination.exists() else (workdir / "log").read_text()[-2000:]
        return code, message

    def _supervise(self, process: subprocess.Popen[bytes], pod_name: str, limit: float = 600) -> int | None:
        """Waits for the container; kills it, as a kubelet would, once its pod is deleted (None)."""
        deadline = time.monotonic() + limit
        while True:
            try:
                return process.wait(timeout=1)
            except subprocess.TimeoutExpired:
                pass
            try:
                self.core.read_namespaced_pod(pod_name, self.namespace, _preload_content=False)
            except client.ApiException as err:
                if err.status != 404:
                    raise
                process.kill()
                process.wait()
                return None
            if time.monotonic() > deadline:
                process.kill()
                return process.wait()
