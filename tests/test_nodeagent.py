"""The node agent runs what a kubelet runs: a plain Job (a platform team's, not the operator's) whose
container gives no command gets its image's ENTRYPOINT and CMD, from the Dockerfile target that builds
the image, and `args` replace the CMD. Only on the local control plane: the images are ours."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from idpo_operator.spec import DEFAULT_STAGE_IMAGE
from kubernetes import client, config

from tests.controlplane import images
from tests.harness.cluster import RESTRICTED, Target

pytestmark = pytest.mark.slow
SECURE = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "runAsNonRoot": True,
    "seccompProfile": {"type": "RuntimeDefault"},
}


@pytest.fixture
def namespace(kube: Target) -> Iterator[tuple[client.ApiClient, str]]:
    if kube.plane is None:
        pytest.skip("the images' defaults are this checkout's Dockerfile on the local control plane only")
    api = config.new_client_from_config(str(kube.kubeconfig))
    name = f"plain-{uuid.uuid4().hex[:8]}"
    core = client.CoreV1Api(api)
    core.create_namespace({"metadata": {"name": name, "labels": RESTRICTED}})
    try:
        yield api, name
    finally:
        core.delete_namespace(name)


def run_job(api: client.ApiClient, namespace: str, container: dict[str, Any], timeout: float = 300) -> dict:
    """A Job of one container, as a platform team writes it; the terminated state of its pod."""
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "plain"},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "automountServiceAccountToken": False,
                    "containers": [{"name": "main", "securityContext": SECURE, **container}],
                }
            },
        },
    }
    client.BatchV1Api(api).create_namespaced_job(namespace, job)
    core = client.CoreV1Api(api)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pods = json.loads(core.list_namespaced_pod(namespace, _preload_content=False).data)["items"]
        states = [s["state"] for p in pods for s in p.get("status", {}).get("containerStatuses", [])]
        if any("terminated" in s for s in states):
            (pod,) = pods
            log = core.read_namespaced_pod_log(pod["metadata"]["name"], namespace)
            return {**states[0]["terminated"], "log": log}
        waiting = [s["waiting"] for s in states if s.get("waiting", {}).get("reason", "").endswith("Error")]
        assert not waiting, waiting
        time.sleep(0.5)
    raise AssertionError(f"the Job's pod did not finish: {pods}")


def test_a_container_without_a_command_runs_its_images_entrypoint_and_cmd(namespace) -> None:
    api, name = namespace
    ran = run_job(api, name, {"image": DEFAULT_STAGE_IMAGE})  # the jobs target: CMD python -m ... --help
    assert ran["exitCode"] == 0 and "usage: python -m idpo_jobs.generate" in ran["log"], ran


def test_args_replace_the_cmd_and_keep_the_entrypoint(namespace) -> None:
    api, name = namespace
    operator = next(image for image, target in images.default_images().items() if target == "operator")
    ran = run_job(api, name, {"image": operator, "args": ["--help"]})  # ENTRYPOINT idpo operator
    assert ran["exitCode"] == 0 and "--leader-election-namespace" in ran["log"], ran
    assert "--all-namespaces" in ran["log"]  # the help of `idpo operator`, run in the image's WORKDIR
