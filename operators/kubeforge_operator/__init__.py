"""The KubeForge operator (kopf): ModelPipelines become one KubeRay RayJob per stage.

`handlers` holds the kopf decorators, each a one-line hand-off to a plain async function
(`pipeline`, `deployment`); the builders, one module per Kubernetes resource (`rayjob`, `rayservice`,
sharing `pods`, `conditions` and `owner`), turn manifests into Kubernetes objects and what KubeRay
reports into a status without any I/O; `kube` is the only module that talks to the Kubernetes API.
Run it with `python -m kubeforge_operator` (configuration: `config.OperatorConfig`).
"""

GROUP = "kubeforge.io"
VERSION = "v1alpha1"
