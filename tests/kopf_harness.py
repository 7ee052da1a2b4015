"""Calls the operator tests make on kmock's fake Kubernetes API, and waiting for the operator to act."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import kmock


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
