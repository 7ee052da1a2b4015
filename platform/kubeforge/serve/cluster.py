"""The application of a ModelDeployment on a Ray cluster that shares no disk with whoever deploys it:
the `import_path` of a KubeRay RayService's serveConfigV2, which the operator writes:

```yaml
applications:
  - name: quickstart
    route_prefix: /
    import_path: kubeforge.serve.cluster:app_builder
    args:
      deployment: {apiVersion: kubeforge.io/v1alpha1, kind: ModelDeployment, metadata: {...}, spec: {...}}
      variants:
        - {variant: stable, model: quickstart, version: "3"}
        - {variant: candidate, model: quickstart, version: "5"}
    deployments:
      - name: Router
        user_config: {weight: 20}
```

Versions are resolved by the operator (an alias can move; a running application must not change
model under it), and each replica downloads its version from $MLFLOW_TRACKING_URI
(`resolve.replica_model_folder`). The candidate's weight is the Router's `user_config`: changing it in
the RayService reconfigures the running router in place (`Router.reconfigure`), which is how the
operator moves a canary without restarting any replica.

Under `spec.lora` the application serves one base and an adapter per variant on the same replicas, and
what a rollout changes goes through user_config only, so a new candidate adapter loads into the running
replicas (`ModelServer.reconfigure`) and the router learns its label (`Router.reconfigure`):

```yaml
    args:
      deployment: {...}       # spec.model pinned to the base, without rollout and adapter URIs
                              # (spec.lora.max_loras keeps their number)
      variants: [{variant: base, model: quickstart, version: "2"}]
    deployments:
      - name: Router
        user_config: {weight: 20, sticky_header: null,
                      variants: {stable: {model: quickstart, version: "3"}, candidate: {...}}}
      - name: model-lora
        user_config: {adapters: {"quickstart:stable": "models:/quickstart/3", "quickstart:candidate": ...}}
```

Once a rollout has ended the operator keeps both variants at the final weight (100 after a promotion,
0 after a rollback) until the spec is edited. `args` are part of what Ray Serve hashes into the
application's code version, so dropping a variant from them would restart every replica of the
application, the winner's too; and KubeRay shrinks a worker group without the autoscaler by deleting a
random pod. Serving `@champion` alone is the user's deliberate redeploy (an edit of the spec).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from kubeforge.errors import KubeForgeError
from kubeforge.filesystems import is_uri
from kubeforge.serve.app import LORA_BASE, LORA_DEPLOYMENT, MONITOR_DEPLOYMENT, VARIANTS, VariantModel, build_app
from kubeforge.spec.deployment import LoraServing
from kubeforge.spec.load import parse_deployment

if TYPE_CHECKING:
    from ray.serve import Application

IMPORT_PATH = "kubeforge.serve.cluster:app_builder"
ROUTER_DEPLOYMENT = "Router"
"""The router's Serve deployment name, under which serveConfigV2 carries its `user_config`."""


def app_builder(args: Mapping[str, Any]) -> Application:
    """Ray Serve's application builder (`import_path` with `args`)."""
    document = parse_deployment(args.get("deployment"), source="args.deployment")
    raw = args.get("variants")
    if not isinstance(raw, list) or not raw:
        raise KubeForgeError("args.variants: expected a list of {variant, model, version}")
    allowed = (LORA_BASE,) if document.spec.lora is not None else VARIANTS
    variants = []
    for i, item in enumerate(raw):
        if not isinstance(item, Mapping) or item.get("variant") not in allowed or not item.get("model") or (
                not str(item.get("version", "")).isdigit()):
            raise KubeForgeError(f"args.variants.{i}: expected {{variant: {'|'.join(allowed)}, model: <name>, "
                                 f"version: <number>}} (got {item!r})")
        model, version = str(item["model"]), str(item["version"])
        variants.append(VariantModel(str(item["variant"]), model, version, f"models:/{model}/{version}"))
    capture = document.spec.capture
    if capture is not None and not (capture.path and is_uri(capture.path)):
        raise KubeForgeError("spec.capture.path: on a cluster the router's pod keeps no files; set an object-store "
                             f"URI (s3://bucket/prefix) it can write to (got {capture.path!r})")
    # The weight is the router's user_config, applied when its replica starts (and on every change).
    # The operator sets auth.token_env to a variable every pod of the RayService has (from a Secret).
    if document.spec.lora is not None:
        if len(variants) != 1:
            raise KubeForgeError("args.variants: under spec.lora, only the base (the adapters are user_config)")
        return build_app([], document.spec, weight=0, hand_over_token=False, base=variants[0])
    return build_app(variants, document.spec, weight=0, hand_over_token=False, monitor=document.metadata.name)


def serve_config(name: str, document: Mapping[str, Any], variants: list[dict[str, str]], weight: int,
                 base: dict[str, str] | None = None, sticky_header: str | None = None,
                 monitored: str | None = None) -> dict[str, Any]:
    """serveConfigV2 (as a dict) of one deployment: what the operator puts into its RayService. With a LoRA
    `base`, `variants` are its adapters and only the base and the deployment's settings are `args`. With
    `spec.monitor`, `monitored` is the version whose traffic the monitor reads (the one serving it all)."""
    router_config: dict[str, Any] = {"weight": weight}
    deployments = [{"name": ROUTER_DEPLOYMENT, "user_config": router_config}]
    if (document.get("spec") or {}).get("monitor") is not None:
        if monitored is None:
            raise KubeForgeError("monitored: the version the monitor reads is required with spec.monitor")
        deployments.append({"name": MONITOR_DEPLOYMENT, "user_config": {"version": monitored}})
    args: dict[str, Any]
    if base is None:
        args = {"deployment": dict(document), "variants": variants}
    else:
        spec = {key: value for key, value in document["spec"].items() if key != "rollout"}
        spec["model"] = f"models:/{base['model']}/{base['version']}"
        # The adapters' URIs are user_config; their number stays, as the engine's adapter slots.
        spec["lora"] = {**spec["lora"], "adapters": {}, "max_loras": LoraServing.model_validate(spec["lora"]).slots()}
        args = {"deployment": {**document, "spec": spec}, "variants": [{**base, "variant": LORA_BASE}]}
        router_config |= {"variants": {v["variant"]: {"model": v["model"], "version": v["version"]} for v in variants},
                          "sticky_header": sticky_header}
        adapters = {f"{v['model']}:{v['variant']}": f"models:/{v['model']}/{v['version']}" for v in variants}
        deployments.append({"name": LORA_DEPLOYMENT, "user_config": {"adapters": adapters}})
    return {
        "applications": [{
            "name": name,
            "route_prefix": "/",
            "import_path": IMPORT_PATH,
            "args": args,
            "deployments": deployments,
        }],
    }
