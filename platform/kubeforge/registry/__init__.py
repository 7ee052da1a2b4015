"""The model registry: every model a pipeline produces as a version of one MLflow registered model,
the `challenger` and `champion` aliases, approvals, and the audit trail of every alias move.

`kubeforge.registry.client` imports MLflow only inside its methods, so importing this package stays light.
"""

from kubeforge.registry.audit import CHALLENGER, CHAMPION, AuditRecord, RegistryError, current_user
from kubeforge.registry.client import ModelSummary, Registry, VersionInfo

__all__ = [
    "CHALLENGER",
    "CHAMPION",
    "AuditRecord",
    "ModelSummary",
    "Registry",
    "RegistryError",
    "VersionInfo",
    "current_user",
]
