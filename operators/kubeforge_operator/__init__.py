"""The KubeForge operator (kopf): ModelPipelines become one KubeRay RayJob per stage.

`handlers` holds the kopf decorators, each a one-line hand-off to a plain async function
(`pipeline`); `builders` turns manifests into Kubernetes objects and RayJobs into a status without
any I/O; `kube` is the only module that talks to the Kubernetes API. Run it with
`python -m kubeforge_operator` (configuration: `config.OperatorConfig`).
"""

GROUP = "kubeforge.io"
VERSION = "v1alpha1"
