"""The realism layer over kmock: each gap it fills, checked through the real client and kubectl."""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request
from typing import Any

import pytest
from idpo_operator.crd import crd
from idpo_operator.spec import GROUP, PLURAL, VERSION
from kubernetes import client, config

from tests.harness.emulator import ServedEmulator

NS = "t"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    with ServedEmulator(tmp_path_factory.mktemp("api") / "kubeconfig") as srv:
        srv.call(lambda e: e.register_crd(crd()))
        yield srv


@pytest.fixture(scope="module")
def api(server: ServedEmulator) -> client.ApiClient:
    return config.new_client_from_config(str(server.kubeconfig))


def run_body(name: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "idpo.dev/v1alpha1", "kind": "IterativeDPORun", "metadata": {"name": name}, "spec": spec}


def create_run(api: client.ApiClient, name: str, **spec: Any) -> dict[str, Any]:
    return client.CustomObjectsApi(api).create_namespaced_custom_object(
        GROUP, VERSION, NS, PLURAL, run_body(name, **spec)
    )


def patch_run(api: client.ApiClient, name: str, body: Any, status: bool = False) -> dict[str, Any]:
    custom = client.CustomObjectsApi(api)
    fn = custom.patch_namespaced_custom_object_status if status else custom.patch_namespaced_custom_object
    return fn(GROUP, VERSION, NS, PLURAL, name, body)


def kubectl(server: ServedEmulator, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"KUBECONFIG": str(server.kubeconfig), "PATH": os.environ["PATH"], "HOME": str(server.kubeconfig.parent)}
    return subprocess.run(["kubectl", "-n", NS, *args], capture_output=True, text=True, env=env, timeout=60)


def test_create_fills_metadata_like_an_apiserver(api: client.ApiClient) -> None:
    cm = client.CoreV1Api(api).create_namespaced_config_map(NS, {"metadata": {"generateName": "cfg-"}})
    meta = cm.metadata
    assert meta.namespace == NS and meta.name.startswith("cfg-") and len(meta.name) == 9
    assert meta.uid and meta.resource_version and meta.generation == 1 and meta.creation_timestamp


def test_status_and_spec_writes_are_isolated_and_generation_tracks_spec(api: client.ApiClient) -> None:
    created = create_run(api, "iso", iterations=2)
    assert "status" not in created
    after_status = patch_run(api, "iso", {"status": {"phase": "Running"}, "spec": {"iterations": 9}}, status=True)
    assert after_status["spec"]["iterations"] == 2 and after_status["metadata"]["generation"] == 1
    after_spec = patch_run(api, "iso", {"spec": {"iterations": 3}, "status": {"phase": "Hacked"}})
    assert after_spec["status"] == {"phase": "Running"} and after_spec["metadata"]["generation"] == 2
    assert int(after_spec["metadata"]["resourceVersion"]) > int(after_status["metadata"]["resourceVersion"])


def test_crd_defaults_prune_and_validate_with_cel(api: client.ApiClient) -> None:
    created = create_run(api, "dflt", iterations=1, unknownField=True)
    assert "unknownField" not in created["spec"] and created["spec"]["generation"]["responsesPerPrompt"] == 5
    with pytest.raises(client.ApiException) as err:
        create_run(api, "bad", ranking={"ranker": "function", "model": None})
    assert err.value.status == 422 and "spec.ranking.function: Invalid value: ranker 'function'" in err.value.body
    with pytest.raises(client.ApiException) as err:
        patch_run(api, "dflt", {"spec": {"model": {"name": "other"}}})  # transition rule: only on update
    assert err.value.status == 422 and "model.name is immutable" in err.value.body


def test_json_patch_with_a_stale_resource_version_is_a_conflict(api: client.ApiClient) -> None:
    create_run(api, "jp")
    stale = [
        {"op": "test", "path": "/metadata/resourceVersion", "value": "0"},
        {"op": "add", "path": "/metadata/annotations", "value": {"a": "b"}},
    ]
    with pytest.raises(client.ApiException) as err:
        patch_run(api, "jp", stale)
    assert err.value.status == 422


def test_label_and_field_selectors_filter_lists(api: client.ApiClient) -> None:
    core = client.CoreV1Api(api)
    for name, tier in (("sel-a", "x"), ("sel-b", "y")):
        core.create_namespaced_config_map(NS, {"metadata": {"name": name, "labels": {"tier": tier}}})
    listed = core.list_namespaced_config_map(NS, label_selector="tier in (y)")
    assert [c.metadata.name for c in listed.items] == ["sel-b"]
    assert [
        c.metadata.name for c in core.list_namespaced_config_map(NS, field_selector="metadata.name=sel-a").items
    ] == ["sel-a"]
    raw = json.loads(core.list_namespaced_config_map(NS, label_selector="tier!=x", _preload_content=False).data)
    assert (raw["kind"], raw["apiVersion"]) == ("ConfigMapList", "v1")
    assert "sel-a" not in [i["metadata"]["name"] for i in raw["items"]]


def test_watches_filter_by_label_selector(server: ServedEmulator, api: client.ApiClient) -> None:
    url = f"{server.url}/api/v1/namespaces/{NS}/configmaps?watch=true&labelSelector=tier%3Dy"
    with urllib.request.urlopen(url, timeout=5) as stream:
        first = json.loads(stream.readline())
        with pytest.raises(TimeoutError):
            stream.readline()  # sel-a (tier=x) is never streamed
    assert first["type"] == "ADDED" and first["object"]["metadata"]["name"] == "sel-b"


def test_deleting_an_owner_collects_what_it_owns_transitively(api: client.ApiClient) -> None:
    core = client.CoreV1Api(api)
    owner = core.create_namespaced_config_map(NS, {"metadata": {"name": "gc-owner"}})

    def owned(name: str, uid: str) -> Any:
        ref = {"apiVersion": "v1", "kind": "ConfigMap", "name": "x", "uid": uid}
        return core.create_namespaced_config_map(NS, {"metadata": {"name": name, "ownerReferences": [ref]}})

    child = owned("gc-child", owner.metadata.uid)
    owned("gc-grandchild", child.metadata.uid)
    core.delete_namespaced_config_map("gc-owner", NS)
    names = {c.metadata.name for c in core.list_namespaced_config_map(NS).items}
    assert not names & {"gc-owner", "gc-child", "gc-grandchild"}


def test_discovery_namespaces_and_short_names_work_for_kubectl(server: ServedEmulator, api: client.ApiClient) -> None:
    core_v1 = json.loads(urllib.request.urlopen(f"{server.url}/api/v1", timeout=5).read())
    assert core_v1["groupVersion"] == "v1"
    assert all(not r["shortNames"] for r in core_v1["resources"] if "/" in r["name"])
    assert NS in [n.metadata.name for n in client.CoreV1Api(api).list_namespace().items]
    assert kubectl(server, "get", "pvc").returncode == 0


def test_kubectl_get_shows_the_crd_printer_columns(server: ServedEmulator, api: client.ApiClient) -> None:
    create_run(api, "cols")
    patch_run(
        api,
        "cols",
        {
            "status": {
                "phase": "Running",
                "progress": "1/3",
                "currentStage": "rank",
                "conditions": [{"type": "Ready", "status": "False"}],
            }
        },
        status=True,
    )
    out = kubectl(server, "get", "idpo", "cols")
    assert out.returncode == 0, out.stderr
    header, row = out.stdout.splitlines()
    assert header.split() == ["NAME", "PHASE", "ITERATION", "STAGE", "READY", "AGE"]
    assert row.split()[:5] == ["cols", "Running", "1/3", "rank", "False"]
    assert "MESSAGE" in kubectl(server, "get", "idpo", "cols", "-o", "wide").stdout


def test_a_crd_applied_with_kubectl_is_established_served_and_enforced(server: ServedEmulator) -> None:
    body = crd()  # the run CRD under another group and kind, so the module's registration is untouched
    body["metadata"]["name"] = "widgets.test.idpo.dev"
    body["spec"]["group"] = "test.idpo.dev"
    body["spec"]["names"] = {"kind": "Widget", "listKind": "WidgetList", "plural": "widgets", "singular": "widget"}
    env = {"KUBECONFIG": str(server.kubeconfig), "PATH": os.environ["PATH"], "HOME": str(server.kubeconfig.parent)}

    def apply(obj: dict[str, Any]) -> subprocess.CompletedProcess[str]:
        command = ["kubectl", "-n", NS, "apply", "--validate=false", "-f", "-"]
        return subprocess.run(command, input=json.dumps(obj), capture_output=True, text=True, env=env, timeout=60)

    applied = apply(body)
    assert applied.returncode == 0, applied.stderr
    established = kubectl(server, "wait", "--for=condition=Established", "crd/widgets.test.idpo.dev", "--timeout=10s")
    assert established.returncode == 0, established.stderr
    widget = {"apiVersion": "test.idpo.dev/v1alpha1", "kind": "Widget", "metadata": {"name": "w"}}
    refused = apply({**widget, "spec": {"iterations": 0}})
    assert refused.returncode != 0 and "spec.iterations" in refused.stderr
    assert apply({**widget, "spec": {}}).returncode == 0
    assert kubectl(server, "get", "widgets", "w", "-o", "jsonpath={.spec.iterations}").stdout == "3"  # defaulted


def test_kubectl_get_watch_streams_printer_rows(server: ServedEmulator, api: client.ApiClient) -> None:
    create_run(api, "watched")
    env = {"KUBECONFIG": str(server.kubeconfig), "PATH": os.environ["PATH"], "HOME": str(server.kubeconfig.parent)}
    watch = subprocess.Popen(
        ["kubectl", "-n", NS, "get", "idpo", "watched", "-w", "--request-timeout=5s"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert watch.stdout is not None
    listed = [watch.stdout.readline().split(), watch.stdout.readline().split()]  # kubectl lists, then watches
    assert listed[0][:3] == ["NAME", "PHASE", "ITERATION"] and listed[1][0] == "watched"
    time.sleep(1)  # the watch opens just after the list
    patch_run(api, "watched", {"status": {"phase": "Running", "currentStage": "generate"}}, status=True)
    out, err = watch.communicate(timeout=30)
    assert ["watched", "Running"] in [line.split()[:2] for line in out.splitlines()], out + err
