"""kopf handlers: each a one-line hand-off to a plain async function that tests call directly.

Importing this module registers them in kopf's default registry. The operator's configuration
reaches them through kopf's `memo` (`memo.config`), set once by `__main__` (or by a test). kopf
hands its `settings` (API timeouts and backoffs) to activity handlers only, so the startup handler
keeps them in the memo for the API calls of the others.
"""

from __future__ import annotations

from typing import Any

import kopf

from kubeforge_operator import GROUP, VERSION, deployment, loop, pipeline
from kubeforge_operator.config import configure_kopf
from kubeforge_operator.rayjob import LABEL_PIPELINE
from kubeforge_operator.rayservice import LABEL_DEPLOYMENT


@kopf.on.startup()
async def startup(*, settings: kopf.OperatorSettings, memo: Any, **_: Any) -> None:
    memo.settings = configure_kopf(settings)


@kopf.on.resume(GROUP, VERSION, pipeline.PLURAL)
@kopf.on.create(GROUP, VERSION, pipeline.PLURAL)
@kopf.on.update(GROUP, VERSION, pipeline.PLURAL)
async def pipeline_changed(*, namespace: str | None, name: str, memo: Any, logger: kopf.Logger, **_: Any) -> None:
    await pipeline.reconcile(namespace or "", name, config=memo.config, settings=memo.settings, logger=logger)


@kopf.on.event("ray.io", "v1", "rayjobs", labels={LABEL_PIPELINE: kopf.PRESENT})
async def rayjob_changed(*, body: kopf.Body, memo: Any, logger: kopf.Logger, **_: Any) -> None:
    await pipeline.rayjob_changed(body, config=memo.config, settings=memo.settings, logger=logger)


@kopf.on.delete(GROUP, VERSION, pipeline.PLURAL)
async def pipeline_deleted(*, namespace: str | None, name: str, uid: str, memo: Any, logger: kopf.Logger,
                           **_: Any) -> None:
    await pipeline.delete_children(namespace or "", name, uid, settings=memo.settings, logger=logger)


# ModelDeployments have no deletion handler: their RayService's ownerReference has the garbage
# collector remove it, and nothing outside the cluster needs undoing.
@kopf.on.resume(GROUP, VERSION, deployment.PLURAL)
@kopf.on.create(GROUP, VERSION, deployment.PLURAL)
@kopf.on.update(GROUP, VERSION, deployment.PLURAL)
async def deployment_changed(*, namespace: str | None, name: str, memo: Any, logger: kopf.Logger, **_: Any) -> None:
    await deployment.reconcile(namespace or "", name, config=memo.config, settings=memo.settings, logger=logger,
                               measurements=memo.get(deployment.MEMO_KEY))


@kopf.timer(GROUP, VERSION, deployment.PLURAL, interval=deployment.POLL_S, when=deployment.rollout_running)
async def rollout_tick(*, namespace: str | None, name: str, memo: Any, logger: kopf.Logger, **_: Any) -> None:
    await deployment.reconcile(namespace or "", name, config=memo.config, settings=memo.settings, logger=logger,
                               measurements=memo.get(deployment.MEMO_KEY))


@kopf.timer(GROUP, VERSION, deployment.PLURAL, interval=loop.POLL_S, when=deployment.loop_configured)
async def loop_tick(*, namespace: str | None, name: str, memo: Any, logger: kopf.Logger, **_: Any) -> None:
    await deployment.reconcile(namespace or "", name, config=memo.config, settings=memo.settings, logger=logger,
                               measurements=memo.get(deployment.MEMO_KEY))


@kopf.on.event("ray.io", "v1", "rayservices", labels={LABEL_DEPLOYMENT: kopf.PRESENT})
async def rayservice_changed(*, body: kopf.Body, memo: Any, logger: kopf.Logger, **_: Any) -> None:
    await deployment.rayservice_changed(body, config=memo.config, settings=memo.settings, logger=logger,
                                        measurements=memo.get(deployment.MEMO_KEY))
