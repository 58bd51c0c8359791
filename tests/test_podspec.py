"""The node agent's reading of a Pod, as a kubelet reads it: env, identity, names, messages."""

from __future__ import annotations

import base64
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from idpo_operator.spec import DEFAULT_STAGE_IMAGE

from tests.controlplane import images, podspec
from tests.controlplane.images import ImageConfig
from tests.controlplane.podspec import Waiting

POD: dict[str, Any] = {
    "metadata": {"name": "p-0", "namespace": "ml", "uid": "u1", "labels": {"idpo.dev/stage": "train"}},
    "spec": {"nodeName": "n", "containers": [], "securityContext": {"runAsNonRoot": True, "fsGroup": 7}},
}
OBJECTS = {
    ("ConfigMap", "settings"): {"data": {"LEVEL": "debug", "MODE": "fast"}},
    ("Secret", "hub"): {"data": {"token": base64.b64encode(b"hf_abc").decode()}},
}


def fetch(kind: str, name: str) -> dict[str, Any] | None:
    return OBJECTS.get((kind, name))


def test_env_resolves_literals_references_and_value_sources_in_order() -> None:
    container = {
        "envFrom": [{"configMapRef": {"name": "settings"}, "prefix": "APP_"}],
        "env": [
            {"name": "A", "value": "x"},
            {"name": "B", "value": "$(A)-$(APP_MODE)-$$(A)-$(UNKNOWN)"},
            {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "hub", "key": "token"}}},
            {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "STAGE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['idpo.dev/stage']"}}},
        ],
    }
    env = podspec.container_env(POD, container, {"PATH": "/bin"}, fetch)
    assert env["APP_LEVEL"] == "debug" and env["B"] == "x-fast-$(A)-$(UNKNOWN)"
    assert (env["TOKEN"], env["POD"], env["STAGE"], env["PATH"]) == ("hf_abc", "p-0", "train", "/bin")


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ({"secretKeyRef": {"name": "absent", "key": "k"}}, 'secret "absent" not found'),
        ({"secretKeyRef": {"name": "hub", "key": "nope"}}, "couldn't find key nope in Secret ml/hub"),
        ({"configMapKeyRef": {"name": "absent", "key": "k"}}, 'configmap "absent" not found'),
    ],
    ids=["missing-secret", "missing-key", "missing-configmap"],
)
def test_a_missing_value_source_waits_with_create_container_config_error(source: dict, message: str) -> None:
    with pytest.raises(Waiting) as waiting:
        podspec.container_env(POD, {"env": [{"name": "X", "valueFrom": source}]}, {}, fetch)
    assert (waiting.value.reason, waiting.value.message) == ("CreateContainerConfigError", message)


def test_an_optional_missing_source_is_skipped() -> None:
    source = {"secretKeyRef": {"name": "absent", "key": "k", "optional": True}}
    assert "X" not in podspec.container_env(POD, {"env": [{"name": "X", "valueFrom": source}]}, {}, fetch)


def test_identity_takes_the_container_over_the_pod_over_the_image() -> None:
    assert podspec.identity(POD, {}, (1000, 1000)) == (1000, 1000, [7, 1000])
    arbitrary = {"securityContext": {"runAsUser": 1000680000}}  # OpenShift's restricted-v2: group 0
    assert podspec.identity(POD, arbitrary, (1000, 1000)) == (1000680000, 0, [0, 7])
    with pytest.raises(Waiting, match="runAsNonRoot and image will run as root"):
        podspec.identity(POD, {"securityContext": {"runAsUser": 0}}, (1000, 1000))


def test_a_pod_knows_its_own_names_and_finds_others_only_through_a_headless_service() -> None:
    def pod(index: int, **labels: str) -> dict:
        meta = {"name": f"t-{index}-abc", "namespace": "ml", "labels": {"app": "t", **labels}}
        return {"metadata": meta, "spec": {"hostname": f"t-{index}", "subdomain": "t"}}

    assert podspec.host_names(pod(0)) == ["t-0.t.ml.svc.cluster.local", "t-0"]  # the kubelet's /etc/hosts

    def service(**spec: object) -> dict:
        return {"metadata": {"name": "t", "namespace": "ml"}, "spec": {"selector": {"app": "t"}, **spec}}

    headless = service(clusterIP="None", publishNotReadyAddresses=True)
    names = podspec.service_names(headless, [(pod(1), False), (pod(2, app="other"), True)])
    assert {"t", "t-1.t", "t-1.t.ml", "t-1.t.ml.svc", "t-1.t.ml.svc.cluster.local"} <= set(names)
    assert "t-1" not in names and not any(n.startswith("t-2") for n in names)  # no bare names; selector
    assert podspec.service_names(service(clusterIP="None"), [(pod(1), False)]) == []  # not ready
    assert podspec.service_names(service(clusterIP="10.96.0.7"), [(pod(1), True)]) == []  # never sent to
    hosts = podspec.hosts_file(podspec.host_names(pod(0)), names)
    assert "127.0.0.1\tt-1.t\n" in hosts and hosts.count("t-0.t.ml.svc.cluster.local") == 1


def test_the_termination_message_falls_back_to_the_log_tail_only_on_error() -> None:
    fallback = {"terminationMessagePolicy": "FallbackToLogsOnError"}
    log = "\n".join(f"line {i}" for i in range(200))
    assert podspec.termination_message(fallback, "", log, 1).startswith("line 120")
    assert podspec.termination_message(fallback, "", log, 0) == ""
    assert podspec.termination_message({}, "", log, 1) == ""
    assert podspec.termination_message(fallback, "x" * 5000, log, 1) == "x" * 4096


def test_the_command_and_args_replace_the_images_entrypoint_and_cmd_as_a_kubelet_does() -> None:
    image = ImageConfig(entrypoint=["idpo", "operator"], cmd=["--all-namespaces"])
    env = {"NS": "ml"}
    assert podspec.command({}, env, image) == ["idpo", "operator", "--all-namespaces"]
    assert podspec.command({"args": ["-n", "$(NS)"]}, env, image) == ["idpo", "operator", "-n", "ml"]  # CMD replaced
    assert podspec.command({"command": ["python"]}, env, image) == ["python"]  # ENTRYPOINT and CMD dropped
    assert podspec.command({"command": ["echo"], "args": ["$(NS)"]}, env, image) == ["echo", "ml"]
    cmd_only = ImageConfig(cmd=["python", "-m", "idpo_jobs.generate", "--help"])
    assert podspec.command({}, env, cmd_only) == ["python", "-m", "idpo_jobs.generate", "--help"]
    assert podspec.command({"args": ["python", "-V"]}, env, cmd_only) == ["python", "-V"]
    with pytest.raises(Waiting, match="no command specified") as waiting:
        podspec.command({}, env, ImageConfig())
    assert waiting.value.reason == "CreateContainerError"


def test_the_images_defaults_are_read_from_their_dockerfile_targets() -> None:
    text = """
# syntax=docker/dockerfile:1.7
FROM python:3.11-slim AS base
ENV A=1 PATH=/opt/venv/bin:$PATH \\
    B="two words"
WORKDIR /app
USER 1000:1000
ENTRYPOINT ["idpo", "operator"]
CMD ["--all-namespaces"]

FROM base AS child
WORKDIR sub
CMD exec python -V
ENV C=${A}3

FROM base AS reset
ENTRYPOINT ["tini", "--"]
"""
    targets = images.dockerfile_targets(text)
    base, child, reset = targets["base"], targets["child"], targets["reset"]
    assert (base.entrypoint, base.cmd, base.workdir, base.uid_gid()) == (
        ["idpo", "operator"],
        ["--all-namespaces"],
        "/app",
        (1000, 1000),
    )
    assert base.env == {"A": "1", "PATH": "/opt/venv/bin:", "B": "two words"}
    assert child.cmd == ["/bin/sh", "-c", "exec python -V"] and child.workdir == "/app/sub"  # shell form
    assert child.entrypoint == ["idpo", "operator"] and child.env["C"] == "13"  # inherited from base
    assert reset.entrypoint == ["tini", "--"] and reset.cmd == []  # a new ENTRYPOINT clears the CMD
    # This checkout's images: the stage image runs its CMD, the operator image its ENTRYPOINT.
    ours = images.load(images.default_images())
    stage, operator = ours[DEFAULT_STAGE_IMAGE], next(c for i, c in ours.items() if "idpo-operator" in i)
    assert stage.argv(None, None)[:3] == ["python", "-m", "idpo_jobs.generate"] and stage.uid_gid() == (1000, 1000)
    assert operator.argv(None, ["--help"]) == ["idpo", "operator", "--help"] and operator.workdir == "/app"


def test_the_suites_stage_image_is_the_e2e_target_with_a_layer_for_an_image_the_node_has() -> None:
    ours = images.load({DEFAULT_STAGE_IMAGE: "e2e"})
    jobs = images.load({DEFAULT_STAGE_IMAGE: "jobs"})[DEFAULT_STAGE_IMAGE]
    # FROM jobs, with one torch thread per process (a test node's many small pods share a few cores)
    assert ours[DEFAULT_STAGE_IMAGE] == replace(jobs, env={**jobs.env, "OMP_NUM_THREADS": "1"})
    assert images.parse_layers([f"{DEFAULT_STAGE_IMAGE}=/opt/layer"], ours) == {DEFAULT_STAGE_IMAGE: Path("/opt/layer")}
    for wrong in ("other:1=/opt/layer", DEFAULT_STAGE_IMAGE):  # an image the node lacks; no folder
        with pytest.raises(ValueError, match="want IMAGE=DIR for one of the images"):
            images.parse_layers([wrong], ours)
