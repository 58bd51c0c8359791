"""A Kubernetes API for tests: kmock's KubernetesEmulator plus the realism it lacks (kmock 0.8).

Filled here (each covered by tests/test_emulator.py):
- metadata on create: namespace from the URL, uid, resourceVersion, generation, creationTimestamp,
  generateName; resourceVersion bumps on every write; generation bumps on spec changes only;
- status subresource isolation: `/status` writes only status, main writes never status;
- JSON patch (RFC 6902, a failed `test` op is a 422) as well as merge patch;
- label and field selectors on list and watch; watches answer as JSON (and as Tables when asked), so
  `kubectl get -w` works;
- `GET /api/v1/namespaces` (kmock answers 500) lists the namespaces in use;
- lists carry kind/apiVersion; core discovery says groupVersion "v1"; subresources have no short names;
- ownerReference garbage collection (background cascade) on delete;
- CRDs created or patched through the API (`kubectl apply -f crds/`) are served at once;
- CRD enforcement for registered CRDs: structural schema with defaults and pruning, and CEL rules
  (cel-python), on create and update, answered with 422 like an apiserver;
- server-side Table rendering of a CRD's printer columns, so `kubectl get` shows them.

Still not emulated (tests must not rely on them): admission webhooks, RBAC/authn, PUT, server-side
apply, watch bookmarks/resourceVersion resumption, field managers, quotas, the scheduler, controllers
(Jobs are driven by tests/harness/kubelet.py), strategic-merge list semantics (merged as merge patch),
namespace objects (`/api/v1/namespaces` lists the namespaces that hold objects, and its watch never
reports changes).
"""

from __future__ import annotations

import asyncio
import copy
import datetime as dt
import itertools
import re
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import attrs
import jsonpatch
import yaml
from kmock import KubernetesEmulator, KubernetesError, resource
from kmock._internal import apps, dicts, enums, rendering

from tests.harness import schema as crd_schema

RESOURCES: dict[str, dict[str, Any]] = {
    "v1/pods": {"kind": "Pod", "namespaced": True, "subresources": ["status", "log"]},
    "v1/configmaps": {"kind": "ConfigMap", "namespaced": True, "shortnames": ["cm"]},
    "v1/persistentvolumeclaims": {
        "kind": "PersistentVolumeClaim",
        "namespaced": True,
        "shortnames": ["pvc"],
        "subresources": ["status"],
    },
    "v1/events": {"kind": "Event", "namespaced": True, "shortnames": ["ev"]},
    "v1/namespaces": {"kind": "Namespace", "namespaced": False, "shortnames": ["ns"]},
    "batch/v1/jobs": {"kind": "Job", "namespaced": True, "subresources": ["status"]},
    "apiextensions.k8s.io/v1/customresourcedefinitions": {
        "kind": "CustomResourceDefinition",
        "namespaced": False,
        "shortnames": ["crd", "crds"],
        "subresources": ["status"],
    },
}
CRDS = resource("apiextensions.k8s.io", "v1", "customresourcedefinitions")
VERBS = ["create", "delete", "get", "list", "patch", "watch"]


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def merge_diff(old: Any, new: Any) -> Any:
    """The merge patch that turns `old` into `new` (None removes a key)."""
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return new
    out = {k: None for k in old if k not in new}
    for k, v in new.items():
        if k not in old or old[k] != v:
            out[k] = merge_diff(old.get(k), v)
    return out


def _selector_match(selector: str, labels: dict[str, str]) -> bool:
    for term in filter(None, (t.strip() for t in re.split(r",(?![^(]*\))", selector))):
        if m := re.fullmatch(r"(\S+?)\s*(==|=|!=)\s*(\S*)", term):
            key, op, value = m.groups()
            if (labels.get(key) == value) != (op != "!="):
                return False
        elif m := re.fullmatch(r"(\S+)\s+(in|notin)\s+\((.*)\)", term):
            key, op, values = m.group(1), m.group(2), {v.strip() for v in m.group(3).split(",")}
            if (labels.get(key) in values) != (op == "in"):
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


def _field_match(selector: str, obj: dict[str, Any]) -> bool:
    for term in filter(None, selector.split(",")):
        m = re.fullmatch(r"([\w.]+?)\s*(==|=|!=)\s*(.*)", term)
        if not m:
            continue
        value: Any = obj
        for part in m.group(1).split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if (str(value if value is not None else "") == m.group(3)) != (m.group(2) != "!="):
            return False
    return True


def _matches(request: rendering.Request, obj: dict[str, Any]) -> bool:
    labels = obj.get("metadata", {}).get("labels") or {}
    return _selector_match(request.params.get("labelSelector", ""), labels) and _field_match(
        request.params.get("fieldSelector", ""), obj
    )


def _age(stamp: str | None) -> str:
    if not stamp:
        return "<unknown>"
    seconds = int((dt.datetime.now(dt.UTC) - dt.datetime.fromisoformat(stamp.replace("Z", "+00:00"))).total_seconds())
    return f"{seconds}s" if seconds < 120 else f"{seconds // 60}m"


def _jsonpath(obj: Any, path: str) -> Any:
    """The small JSONPath subset printer columns use: `.a.b` and `.list[?(@.k=="v")].field`."""
    value = obj
    for part in re.findall(r"\.(\w+)(\[\?\(@\.\w+==\"[^\"]*\"\)\])?", path):
        name, flt = part
        value = value.get(name) if isinstance(value, dict) else None
        if flt and isinstance(value, list):
            key, want = re.match(r"\[\?\(@\.(\w+)==\"([^\"]*)\"\)\]", flt).groups()  # type: ignore[union-attr]
            value = next((v for v in value if v.get(key) == want), None)
    return value


def _set_data(request: rendering.Request, data: Any) -> None:
    """kmock's Request is frozen; the rewritten body must stay on the same (logged) request."""
    object.__setattr__(request, "data", data)


@attrs.define(kw_only=True)
class RealisticEmulator(KubernetesEmulator):
    crds: dict[resource, dict[str, Any]] = attrs.field(factory=dict)
    # Calls answered before kmock parses them (and so missing from its request log).
    _unparsed: list[tuple[str, str, str, str]] = attrs.field(factory=list, init=False)
    _versions: Iterator[int] = attrs.field(factory=lambda: itertools.count(1), init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        for key, info in RESOURCES.items():
            self.resources[key] = {**info, "verbs": VERBS, "singular": info["kind"].lower()}

    # -- registration --------------------------------------------------------------------------
    def register_crd(self, crd: dict[str, Any]) -> None:
        spec = crd["spec"]
        for version in spec["versions"]:
            res = resource(spec["group"], version["name"], spec["names"]["plural"])
            self.resources[res] = {
                "kind": spec["names"]["kind"],
                "namespaced": spec["scope"] == "Namespaced",
                "singular": spec["names"]["singular"],
                "verbs": VERBS,
                "shortnames": spec["names"].get("shortNames", []),
                "categories": spec["names"].get("categories", []),
                "subresources": list(version.get("subresources", {})),
            }
            self.crds[res] = {
                "schema": version["schema"]["openAPIV3Schema"],
                "columns": version.get("additionalPrinterColumns", []),
                "qualified_kind": f"{spec['names']['kind']}.{spec['group']}",
                "status": "status" in version.get("subresources", {}),
            }

    def _kind(self, res: resource) -> str:
        info = self.resources.get(res)
        return info.kind if info is not None and info.kind else (res.plural or "").capitalize()

    def _stored(self, res: resource, namespace: str | None, name: str | None) -> dict[str, Any] | None:
        key = (res, namespace, name)
        if key in self.objects and not self.objects[key].deleted:
            return copy.deepcopy(self.objects[key].raw)
        return None

    # -- what kmock cannot parse --------------------------------------------------------------
    async def __call__(self, raw_request: Any) -> Any:
        """`/api/v1/namespaces` breaks kmock's path parser (500); kopf lists and watches it."""
        import aiohttp.web

        if re.fullmatch(r"/api/v1/namespaces/?", raw_request.path) and raw_request.method == "GET":
            watch = raw_request.query.get("watch") in ("true", "1")
            agent = raw_request.headers.get("User-Agent", "")
            self._unparsed.append((agent, "watch" if watch else "list", "", "namespaces"))
            if watch:
                response = aiohttp.web.StreamResponse(headers={"Content-Type": "application/json"})
                await response.prepare(raw_request)
                await asyncio.sleep(float(raw_request.query.get("timeoutSeconds", 300)))
                return response
            names = sorted({ns for (_, ns, _) in self.objects if ns} | {"default"})
            return aiohttp.web.json_response(
                {
                    "apiVersion": "v1",
                    "kind": "NamespaceList",
                    "metadata": {"resourceVersion": str(next(self._versions))},
                    "items": [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": n}} for n in names],
                }
            )
        return await super().__call__(raw_request)

    def api_calls(self) -> set[tuple[str, str, str, str]]:
        """Every resource request served, as (user agent, RBAC verb, API group, resource[/subresource])."""
        verbs = {
            enums.action.LIST: "list",
            enums.action.WATCH: "watch",
            enums.action.FETCH: "get",
            enums.action.CREATE: "create",
            enums.action.DELETE: "delete",
        }
        calls = set(self._unparsed)
        for request in list(self._requests):
            if request.resource is None or request.action is None or not request.resource.plural:
                continue  # discovery and other non-resource URLs
            verb = verbs.get(request.action) or ("patch" if request.method == enums.method.PATCH else "update")
            name = request.resource.plural + (f"/{request.subresource}" if request.subresource else "")
            agent = next((v for k, v in request.headers.items() if k.lower() == "user-agent"), "")
            calls.add((agent, verb, request.resource.group or "", name))
        return calls

    # -- writes --------------------------------------------------------------------------------
    async def _handle(self, request: rendering.Request) -> Any:
        res = request.resource
        deleted_uid = None
        if res is not None and request.action == enums.action.CREATE:
            self._on_create(request)
        elif res is not None and request.action == enums.action.UPDATE and request.name:
            self._on_update(request)
        elif res is not None and request.action == enums.action.DELETE and request.name:
            old = self._stored(res, request.namespace, request.name)
            deleted_uid = old and old["metadata"].get("uid")
        response = await super()._handle(request)
        if deleted_uid:
            await self._collect_garbage({deleted_uid})
        if res == CRDS and request.action in (enums.action.CREATE, enums.action.UPDATE) and request.subresource is None:
            stored = self._stored(res, None, request.name or (request.data or {}).get("metadata", {}).get("name"))
            if stored is not None:
                self.register_crd(stored)  # an apiserver establishes it within moments; here at once
        return response

    def _on_create(self, request: rendering.Request) -> None:
        res, data = request.resource, copy.deepcopy(request.data or {})
        meta = data.setdefault("metadata", {})
        if request.namespace:
            meta["namespace"] = request.namespace
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        meta.update(
            uid=str(uuid.uuid4()), resourceVersion=str(next(self._versions)), generation=1, creationTimestamp=now()
        )
        crd = self.crds.get(res)
        if crd is not None:
            if crd["status"]:
                data.pop("status", None)
            data = self._enforce(crd, data, None)
        if res == CRDS:  # registered at once (see _handle), so `kubectl wait --for=condition=Established` returns
            ready = {"status": "True", "lastTransitionTime": now()}
            data["status"] = {"conditions": [{"type": t, **ready} for t in ("NamesAccepted", "Established")]}
        _set_data(request, data)

    def _on_update(self, request: rendering.Request) -> None:
        res = request.resource
        old = self._stored(res, request.namespace, request.name)
        if old is None:
            return  # kmock answers 404
        patch = request.data
        if isinstance(patch, list):  # RFC 6902 JSON patch
            try:
                new = jsonpatch.apply_patch(old, patch)
            except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as err:
                # e.g. a failed `test` of metadata.resourceVersion (optimistic concurrency): 422, as the apiserver
                raise KubernetesError(status=422, reason="Invalid", message=f"the JSON patch failed: {err}") from None
        else:
            new = dicts.patch_dict(copy.deepcopy(old), patch or {})
        crd = self.crds.get(res)
        has_status = res in self.resources and "status" in self.resources[res].subresources
        if request.subresource == "status":
            new = {**old, "status": new.get("status")}
        elif has_status:
            new["status"] = old.get("status")
        if crd is not None and request.subresource != "status":
            new = self._enforce(crd, new, old)
        meta = new.setdefault("metadata", {})
        for fixed in ("uid", "creationTimestamp", "namespace", "name"):
            if fixed in old["metadata"]:
                meta[fixed] = old["metadata"][fixed]
        meta["resourceVersion"] = str(next(self._versions))
        if new.get("spec") != old.get("spec"):
            meta["generation"] = old["metadata"].get("generation", 1) + 1
        _set_data(request, merge_diff(old, new))

    def _enforce(self, crd: dict[str, Any], obj: dict[str, Any], old: dict[str, Any] | None) -> dict[str, Any]:
        errors, cleaned = crd_schema.admit(crd["schema"], obj, old)
        if errors:
            name = obj.get("metadata", {}).get("name")
            raise KubernetesError(
                status=422,
                reason="Invalid",
                message=f'{crd["qualified_kind"]} "{name}" is invalid: ' + "; ".join(errors),
            )
        return cleaned

    async def _collect_garbage(self, uids: set[str]) -> None:
        """Background cascade: delete every object owned by a deleted one, transitively."""
        while uids:
            doomed = []
            async with self._lock:
                for key, obj in list(self.objects.items()):
                    if obj.deleted:
                        continue
                    owners = {o.get("uid") for o in obj.get("metadata", {}).get("ownerReferences", [])}
                    if owners & uids:
                        doomed.append((key, obj))
                for (res, _, _), obj in doomed:
                    raw = obj.raw
                    obj.delete()
                    await self._buses[res].put({"type": "DELETED", "object": raw})
            uids = {obj.last.raw["metadata"]["uid"] for _, obj in doomed}

    async def _serve_create(self, request: rendering.Request) -> Any:
        return rendering.Response(payload=await super()._serve_create(request), status=201)  # as the apiserver

    # -- reads ---------------------------------------------------------------------------------
    async def _serve_list(self, request: rendering.Request) -> Any:
        listed = await super()._serve_list(request)
        items = [i for i in listed["items"] if _matches(request, i)]
        res = request.resource
        group_version = f"{res.group}/{res.version}" if res.group else res.version
        body = {
            "apiVersion": group_version,
            "kind": f"{self._kind(res)}List",
            "metadata": {"resourceVersion": str(next(self._versions))},
            "items": items,
        }
        return self._table(request, items) or body

    async def _serve_fetch(self, request: rendering.Request) -> Any:
        obj = await super()._serve_fetch(request)
        return self._table(request, [obj]) or obj

    def _serve_watch(self, request: rendering.Request) -> rendering.Response:
        async def events() -> AsyncIterator[Any]:
            async for event in super(RealisticEmulator, self)._serve_watch(request):
                if isinstance(event, dict) and not _matches(request, event.get("object", {})):
                    continue
                table = isinstance(event, dict) and self._table(request, [event["object"]])
                yield {**event, "object": table} if table else event  # `kubectl get -w` asks for Tables

        # kmock streams without a content type, which kubectl refuses.
        return rendering.Response(payload=events(), headers={"Content-Type": "application/json"})

    async def _serve_version(self, request: rendering.Request) -> Any:
        body = await super()._serve_version(request)
        if request.resource.group == "":
            body["groupVersion"] = request.resource.version
        for entry in body["resources"]:
            if "/" in entry["name"]:
                entry["shortNames"] = []
                entry["categories"] = []
        return body

    def _table(self, request: rendering.Request, items: list[dict[str, Any]]) -> dict[str, Any] | None:
        crd = self.crds.get(request.resource)
        accept = next((v for k, v in request.headers.items() if k.lower() == "accept"), "")
        if crd is None or "as=Table" not in accept:
            return None
        columns = [{"name": "Name", "type": "string", "format": "name", "description": "", "priority": 0}] + [
            {"name": c["name"], "type": c["type"], "format": "", "description": "", "priority": c.get("priority", 0)}
            for c in crd["columns"]
        ]

        def cell(obj: dict[str, Any], column: dict[str, Any]) -> Any:
            value = _jsonpath(obj, column["jsonPath"])
            return _age(value) if column["type"] == "date" else ("" if value is None else value)

        rows = [
            {
                "cells": [o["metadata"]["name"]] + [cell(o, c) for c in crd["columns"]],
                "object": {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": o["metadata"]},
            }
            for o in items
        ]
        return {
            "kind": "Table",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": {},
            "columnDefinitions": columns,
            "rows": rows,
        }


class ServedEmulator:
    """The emulator on 127.0.0.1 in a background thread, with a kubeconfig pointing at it."""

    def __init__(self, kubeconfig: Path) -> None:
        self.kubeconfig = kubeconfig
        self.emulator: RealisticEmulator | None = None
        self.url = ""
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._main, daemon=True)

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._serve())

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        async with RealisticEmulator() as emulator, apps.Server(emulator) as server:
            self.emulator = emulator
            self.url = str(server.url).rstrip("/")
            self._ready.set()
            await self._stop.wait()

    def call(self, fn: Any) -> Any:
        """Run `fn(emulator)` on the server's loop (the emulator is not thread-safe)."""

        async def wrapper() -> Any:
            return fn(self.emulator)

        return asyncio.run_coroutine_threadsafe(wrapper(), self._loop).result(10)

    def __enter__(self) -> ServedEmulator:
        self._thread.start()
        if not self._ready.wait(20):
            raise RuntimeError("emulator did not start")
        self.kubeconfig.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "current-context": "emulator",
                    "clusters": [{"name": "emulator", "cluster": {"server": self.url}}],
                    "users": [{"name": "tester", "user": {}}],
                    "contexts": [
                        {
                            "name": "emulator",
                            "context": {"cluster": "emulator", "user": "tester", "namespace": "default"},
                        }
                    ],
                }
            )
        )
        return self

    def __exit__(self, *exc: object) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
