"""The operator's few Kubernetes API calls, through kopf's own client.

kopf authenticates once (in-cluster service account, kubeconfig, or a `@kopf.on.login` handler in
tests) and keeps the credentials in its vault; its client uses them, retries transient network and
5xx failures, and raises typed errors (`APIConflictError`, `APINotFoundError`...). That client lives
in `kopf._cogs`, which is why pyproject pins kopf to one exact version.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Mapping
from typing import Any

import kopf
from kopf._cogs.clients import api
from kopf._cogs.clients import errors as api_errors

from kubeforge_operator import GROUP, VERSION

MERGE_PATCH = {"Content-Type": "application/merge-patch+json"}


def pipeline_url(namespace: str, name: str, subresource: str = "") -> str:
    url = f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/modelpipelines/{name}"
    return f"{url}/{subresource}" if subresource else url


def deployment_url(namespace: str, name: str, subresource: str = "") -> str:
    url = f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/modeldeployments/{name}"
    return f"{url}/{subresource}" if subresource else url


def rayservices_url(namespace: str, name: str = "") -> str:
    url = f"/apis/ray.io/v1/namespaces/{namespace}/rayservices"
    return f"{url}/{name}" if name else url


def rayjobs_url(namespace: str, name: str = "") -> str:
    url = f"/apis/ray.io/v1/namespaces/{namespace}/rayjobs"
    return f"{url}/{name}" if name else url


def configmaps_url(namespace: str, name: str = "") -> str:
    url = f"/api/v1/namespaces/{namespace}/configmaps"
    return f"{url}/{name}" if name else url


class Client:
    """Calls made on behalf of one handler: its settings (timeouts, backoffs) and its logger."""

    def __init__(self, settings: kopf.OperatorSettings, logger: kopf.Logger) -> None:
        self.settings = settings
        self.logger = logger

    async def get(self, url: str) -> dict[str, Any] | None:
        """The object, or None when it does not exist."""
        try:
            return dict(await api.get(url, settings=self.settings, logger=self.logger))
        except api_errors.APINotFoundError:
            return None

    async def list(self, url: str, label_selector: Mapping[str, str]) -> list[dict[str, Any]]:
        selector = ",".join(f"{key}={value}" for key, value in label_selector.items())
        query = urllib.parse.urlencode({"labelSelector": selector})
        listing = await api.get(f"{url}?{query}", settings=self.settings, logger=self.logger)
        items = listing.get("items") or []
        # Filtered again here: the selector is an optimisation of the server's, not a guarantee we rely on.
        return [
            item for item in items
            if all((item.get("metadata", {}).get("labels") or {}).get(k) == v for k, v in label_selector.items())
        ]

    async def create(self, url: str, body: Mapping[str, Any]) -> bool:
        """True when created, False when an object of that name already exists (names are deterministic,
        so a second reconciliation racing this one created the very same object)."""
        try:
            await api.post(url, payload=dict(body), settings=self.settings, logger=self.logger)
        except api_errors.APIConflictError:
            return False
        return True

    async def merge_patch(self, url: str, patch: Mapping[str, Any]) -> dict[str, Any] | None:
        """JSON merge patch; None when the object is gone."""
        try:
            return dict(await api.patch(url, payload=dict(patch), headers=MERGE_PATCH,
                                        settings=self.settings, logger=self.logger))
        except api_errors.APINotFoundError:
            return None

    async def delete(self, url: str) -> bool:
        """True when a deletion was requested, False when the object was already gone."""
        try:
            # Background: the API server's garbage collector removes what the object owns (a RayJob's
            # RayCluster and submitter Job) after it, so deleting a pipeline does not wait on pods.
            await api.delete(url, payload={"propagationPolicy": "Background"},
                             settings=self.settings, logger=self.logger)
        except api_errors.APINotFoundError:
            return False
        return True
