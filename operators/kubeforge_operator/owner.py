"""What every object the operator creates carries: its owner's reference and the managed-by label.

Used by the pure builders (`rayjob`, `rayservice`) and by the reconcilers, which check a child's
ownerReferences against the owner's uid before they adopt or delete it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from kubeforge.spec.pipeline import API_VERSION

MANAGED_BY = {"app.kubernetes.io/managed-by": "kubeforge-operator"}


@dataclass(frozen=True)
class Owner:
    """The ModelPipeline or ModelDeployment that owns what the operator creates for it."""

    name: str
    namespace: str
    uid: str
    kind: Literal["ModelPipeline", "ModelDeployment"] = "ModelPipeline"

    def reference(self) -> dict[str, Any]:
        return {
            "apiVersion": API_VERSION,
            "kind": self.kind,
            "name": self.name,
            "uid": self.uid,
            # Kubernetes deletes the children with the pipeline even if the operator is not running.
            "controller": True,
            "blockOwnerDeletion": True,
        }
