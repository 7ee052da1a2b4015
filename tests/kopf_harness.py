"""Calls the operator tests make on kmock's fake Kubernetes API, and waiting for the operator to act."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import kmock

RESOURCES = [
    ("kubeforge.io/v1alpha1/modeldeployments", "ModelDeployment", True, {"status"}),
    ("kubeforge.io/v1alpha1/modelpipelines", "ModelPipeline", True, {"status"}),
    ("ray.io/v1/rayservices", "RayService", True, {"status"}),
    ("ray.io/v1/rayjobs", "RayJob", True, {"status"}),
    ("v1/configmaps", "ConfigMap", True, set()),
    ("v1/events", "Event", True, set()),
    ("v1/namespaces", "Namespace", False, set()),
    ("apiextensions.k8s.io/v1/customresourcedefinitions", "CustomResourceDefinition", False, set()),
]
"""What the operator's handlers watch and write, and what kopf discovers before it starts (namespaces
and CRDs, even with scanning off)."""


def serve_resources(api: kmock.KubernetesEmulator) -> None:
    """Make the fake API server know RESOURCES, as discovery on a cluster with KubeRay would."""
    for resource, kind, namespaced, subresources in RESOURCES:
        api.resources[resource] = kmock.ResourceInfo(
            kind=kind, namespaced=namespaced, subresources=subresources,
            verbs={"get", "list", "watch", "create", "patch", "update", "delete"},
        )


async def get(api: kmock.KubernetesEmulator, url: str) -> Any:
    """The object at `url`, or None when the fake API server has none."""
    async with api.get(url) as response:
        return await response.json() if response.status == 200 else None


async def send(api: kmock.KubernetesEmulator, method: str, url: str, body: Any = None) -> Any:
    async with api.request(method, url, json=body) as response:
        assert response.status < 300, await response.text()
        return await response.json()


async def eventually(probe: Callable[[], Any], what: str, timeout: float = 20.0) -> Any:
    """The first truthy result of `probe()`, polled every 0.1 s (the operator reacts asynchronously)."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = await probe()
        if last:
            return last
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")
