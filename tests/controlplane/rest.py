"""A thin JSON client over the `kubernetes` package's connection: plain dicts in and out, the
patch type always explicit, and watches read line by line (no model classes on the hot path)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from kubernetes import config
from kubernetes.client.rest import ApiException

MERGE = "application/merge-patch+json"
STRATEGIC = "application/strategic-merge-patch+json"


class Rest:
    def __init__(self, kubeconfig: str) -> None:
        self.api = config.new_client_from_config(kubeconfig)
        self.api.user_agent = "idpo-node-agent"

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        query: dict[str, str] | None = None,
        content_type: str = "application/json",
        stream: bool = False,
        timeout: float = 30,
    ) -> Any:
        request = self.api.param_serialize(
            method,
            path,
            query_params=list((query or {}).items()),
            header_params={"Content-Type": content_type, "Accept": "application/json"},
            body=body,
            auth_settings=["BearerToken"],
        )
        response = self.api.call_api(*request, _request_timeout=None if stream else timeout)
        if not 200 <= response.status <= 299:
            response.read()
            raise ApiException.from_response(http_resp=response, body=None, data=None)
        if stream:
            return response.response
        data = response.read()
        return json.loads(data) if data else None

    def get(self, path: str) -> dict[str, Any] | None:
        """The object, or None when it does not exist."""
        try:
            return self.call("GET", path)
        except ApiException as err:
            if err.status == 404:
                return None
            raise

    def create(self, path: str, body: dict[str, Any]) -> dict[str, Any] | None:
        """Create; None when it exists already."""
        try:
            return self.call("POST", path, body)
        except ApiException as err:
            if err.status == 409:
                return None
            raise

    def patch(self, path: str, body: dict[str, Any], kind: str = STRATEGIC) -> dict[str, Any] | None:
        """Patch; None when the object is gone."""
        try:
            return self.call("PATCH", path, body, content_type=kind)
        except ApiException as err:
            if err.status == 404:
                return None
            raise

    def delete(self, path: str, body: dict[str, Any] | None = None) -> None:
        try:
            self.call("DELETE", path, body)
        except ApiException as err:
            if err.status not in (404, 409):  # gone, or a precondition (another uid) failed
                raise

    def watch(self, path: str, resource_version: str, **query: str) -> Iterator[dict[str, Any]]:
        """Events from `resource_version` on, until the server ends the watch (or 410 Gone raises)."""
        response = self.call(
            "GET",
            path,
            query={"watch": "true", "resourceVersion": resource_version, "allowWatchBookmarks": "true", **query},
            stream=True,
        )
        buffer = b""
        try:
            for chunk in response.stream(65536, decode_content=False):
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    if not line.strip():
                        continue
                    event = json.loads(line)
                    if event["type"] == "ERROR":
                        raise ApiException(
                            status=event["object"].get("code", 500), reason=event["object"].get("message")
                        )
                    yield event
        finally:
            response.release_conn()


def api_error(err: ApiException) -> str:
    try:
        return json.loads(err.body)["message"]
    except (TypeError, ValueError, KeyError):
        return str(err.reason)
