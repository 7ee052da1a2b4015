"""The promote stage: the pipeline's model gated, approved and given the `challenger` alias."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kubeforge.spec.promotion import PromotionSpec
from kubeforge.stages import Stage, scored_stages
from kubeforge.stages.results import StageResult


@dataclass(frozen=True)
class PromoteResult(StageResult):
    model: str
    version: str
    candidate_stage: str
    aliases: list[str]
    gates: list[dict[str, Any]]
    gates_verdict: str
    """`passed`, `failed` or `none` (no gates)."""
    approved_by: str | None
    audit: list[dict[str, Any]]
    report: str


PROMOTE: Stage[PromotionSpec, PromoteResult] = Stage(
    name="promote",
    section="promotion",
    spec_type=PromotionSpec,
    result_type=PromoteResult,
    run="kubeforge.promote.stage:run",
    # Its gates read any earlier stage's metrics, and it promotes the last model; the corpus's hash is
    # part of the lineage it records.
    reads=lambda: ("data", *(s.name for s in scored_stages())),
    needs_model="register",
)
