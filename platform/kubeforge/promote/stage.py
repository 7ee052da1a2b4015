"""`run(spec, ctx)`: gate the pipeline's candidate, wait for approval if asked, then move its alias.

The candidate is the last model the pipeline produced (quantized, else fine-tuned, else pretrained),
already registered by the executor when its stage finished. A failed gate fails the stage with a
report naming every gate that failed; no alias moves. With `approval`, the stage marks the version
`pending` and polls MLflow until `kubeforge models approve` flips it, so the wait survives a restart:
a rerun finds the approval (or keeps waiting) instead of asking again.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from typing import Any

from kubeforge import metrics as prometheus
from kubeforge.context import StageContext
from kubeforge.errors import StageError
from kubeforge.promote.gates import evaluate_gates, report
from kubeforge.spec.promotion import ApprovalSpec, PromotionSpec
from kubeforge.stages.promote import PROMOTE, PromoteResult
from kubeforge.tracking import TAG_PREFIX

STAGE = PROMOTE.name
GATES_TAG = f"{TAG_PREFIX}gates"
APPROVAL_TAG = f"{TAG_PREFIX}approval"


def _wait_for_approval(registry: Any, model: str, version: str, spec: ApprovalSpec, ctx: StageContext) -> str:
    """Block until the version is approved; returns who approved it."""
    current = registry.version(model, version)
    if current.approval == "approved":
        return current.tags.get(f"{TAG_PREFIX}approved_by", "unknown")
    if current.approval != "pending":
        registry.set_tags(model, version, {APPROVAL_TAG: "pending"})
    ctx.reporter.log(
        f"{STAGE}: version {version} of '{model}' passed its gates and awaits approval; approve it with\n"
        f"    kubeforge models approve {model} {version} --reason '...'"
    )
    gauge = prometheus.PROMOTION_AWAITING_APPROVAL.labels(ctx.pipeline_name, version)
    gauge.set(1)
    deadline = time.monotonic() + spec.timeout_s
    try:
        while time.monotonic() < deadline:
            current = registry.version(model, version)
            if current.approval == "approved":
                return current.tags.get(f"{TAG_PREFIX}approved_by", "unknown")
            if current.approval != "pending":
                raise StageError(STAGE, f"version {version} of '{model}' is no longer awaiting approval "
                                        f"(approval: {current.approval}); nothing was promoted")
            time.sleep(min(spec.poll_s, max(0.0, deadline - time.monotonic())))
    finally:
        gauge.set(0)
    raise StageError(
        STAGE,
        f"version {version} of '{model}' was not approved within {spec.timeout_s:g}s; approve it with "
        f"`kubeforge models approve {model} {version} --reason ...` and rerun to continue",
        resumable=True,
    )


def run(spec: PromotionSpec, ctx: StageContext) -> PromoteResult:
    from kubeforge.registry.audit import CHALLENGER, CHAMPION, current_user
    from kubeforge.registry.client import Registry

    source = ctx.latest_model()
    if source is None:
        raise StageError(STAGE, "needs a model to promote: the output of the pretrain, finetune or quantize stage")
    registered = source.registered
    if registered is None:
        raise StageError(
            STAGE,
            f"the {source.name} stage's model in {source.directory} was never registered (made by an older "
            f"KubeForge?); delete that folder and rerun so the stage registers its model",
        )
    model, version = registered.model, registered.version
    registry = Registry(ctx.tracker.tracking_uri)

    outcomes = evaluate_gates(list(spec.gates), {name: out.result for name, out in ctx.inputs.items()})
    table = report(outcomes)
    (ctx.out_dir / "gates.md").write_text(f"# Gates for '{model}' version {version}\n\n{table}")
    (ctx.out_dir / "gates.json").write_text(json.dumps([o.as_dict() for o in outcomes], indent=2))
    ctx.tracker.log_artifact(ctx.out_dir / "gates.md")
    ctx.tracker.log_artifact(ctx.out_dir / "gates.json")
    for outcome in outcomes:
        prometheus.PROMOTION_GATE.labels(ctx.pipeline_name, outcome.gate.metric).set(1 if outcome.passed else 0)
        ctx.reporter.log(f"{STAGE}: gate {outcome.gate.metric}: {'pass' if outcome.passed else 'FAIL'} "
                         f"({outcome.detail})")
    failed = [o for o in outcomes if not o.passed]
    verdict = "failed" if failed else ("passed" if outcomes else "none")
    registry.set_tags(model, version, {GATES_TAG: verdict})
    ctx.tracker.set_tags({GATES_TAG: verdict, f"{TAG_PREFIX}candidate_version": version})
    ctx.tracker.log_metrics({"gates_passed": len(outcomes) - len(failed), "gates_failed": len(failed)})
    if failed:
        lines = "\n".join(f"  {o.gate.metric}: {o.detail}" for o in failed)
        raise StageError(
            STAGE,
            f"version {version} of '{model}' failed {len(failed)} of {len(outcomes)} gates; it is registered "
            f"but not {spec.alias}:\n{lines}",
        )

    approved_by = None
    if spec.approval is not None and spec.approval.required:
        approved_by = _wait_for_approval(registry, model, version, spec.approval, ctx)

    user = current_user()
    reason = f"pipeline {ctx.pipeline_name} passed {len(outcomes)} gate(s)" + (
        f", approved by {approved_by}" if approved_by else "")
    audit = []
    aliases = [CHALLENGER, CHAMPION] if spec.alias == CHAMPION else [CHALLENGER]
    for alias in aliases:
        holder = registry.alias(model, alias)
        if holder is not None and holder.version == version:
            continue  # a resumed stage that already moved it
        record = registry.move_alias(model, alias, version, action="promote", reason=reason, user=user)
        audit.append(asdict(record))
        ctx.reporter.log(f"{STAGE}: {alias}: version {record.from_version or 'none'} -> {version}")
    return PromoteResult(
        model=model,
        version=version,
        candidate_stage=source.name,
        aliases=aliases,
        gates=[o.as_dict() for o in outcomes],
        gates_verdict=verdict,
        approved_by=approved_by,
        audit=audit,
        report="gates.md",
    )
