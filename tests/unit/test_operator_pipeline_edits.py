"""An edited ModelPipeline reruns exactly the stages whose cache keys changed, and its status keeps
nothing of an attempt or a spec it no longer describes (issue [9/11], faults 2 and 3)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from kubeforge.spec.load import parse_manifest
from kubeforge_operator.rayjob import (
    LABEL_GENERATION,
    NextStep,
    next_step,
    pipeline_status,
    stage_rayjob,
    stage_views,
    superseded,
)
from kubeforge_operator.reconciling import write_status
from tests.unit.test_operator_builders import CONFIG, NOW, OWNER, STAGES, quickstart_document

pytestmark = pytest.mark.unit


def edited(**sections: dict[str, Any]) -> Any:
    """The quickstart with some fields of some sections changed: {section: {field: value}}."""
    doc = quickstart_document()
    for section, fields in sections.items():
        doc["spec"][section].update(fields)
    return parse_manifest(doc)


ORIGINAL = edited()


def job(pipeline: Any, stage: str, attempt: int, job_status: str, generation: int = 1) -> dict[str, Any]:
    out = stage_rayjob(pipeline, stage, OWNER, CONFIG, attempt=attempt, generation=generation)
    out["status"] = {"jobStatus": job_status, "endTime": "2026-01-01T11:00:00Z"}
    return out


def all_succeeded() -> list[dict[str, Any]]:
    return [job(ORIGINAL, stage, 1, "SUCCEEDED") for stage in STAGES]


def phases(pipeline: Any, jobs: list[dict[str, Any]]) -> dict[str, str]:
    return {view.name: view.phase for view in stage_views(pipeline, jobs, {}, NOW)}


def test_a_stage_key_changes_with_its_section_and_its_inputs_only() -> None:
    before = ORIGINAL.stage_keys()
    after = edited(evaluate={"max_new_tokens": 17}).stage_keys()
    assert [s for s in STAGES if before[s] != after[s]] == ["evaluate", "promote"]
    assert stage_rayjob(ORIGINAL, "data", OWNER, CONFIG, generation=3)["metadata"]["labels"][LABEL_GENERATION] == "3"


def test_an_edit_of_a_late_section_reruns_it_and_what_reads_it() -> None:
    pipeline = edited(evaluate={"max_new_tokens": 17})
    assert phases(pipeline, all_succeeded()) == {
        "data": "Succeeded", "pretrain": "Succeeded", "finetune": "Succeeded", "evaluate": "Pending",
        "quantize": "Succeeded", "promote": "Pending"}
    views = stage_views(pipeline, all_succeeded(), {}, NOW)
    # The first try of the edited stage, under a new RayJob name.
    assert next_step(views, NOW) == NextStep("evaluate", 1)
    name = stage_rayjob(pipeline, "evaluate", OWNER, CONFIG)["metadata"]["name"]
    assert name.startswith("quickstart-evaluate-") and name not in {j["metadata"]["name"] for j in all_succeeded()}
    status = pipeline_status(pipeline, all_succeeded(), previous={}, now=NOW, generation=2)
    assert status["phase"] == "Running" and status["modelVersion"] is None
    assert status["stages"]["evaluate"] == {"phase": "Pending", "attempts": 0}
    # The stages the edit left alone say which generation produced their outputs.
    assert status["stages"]["quantize"]["generation"] == 1 and status["observedGeneration"] == 2
    # Undone: the RayJobs made for the original keys count again, and nothing reruns.
    assert set(phases(ORIGINAL, all_succeeded()).values()) == {"Succeeded"}


def test_an_edit_of_an_early_section_reruns_everything_after_it() -> None:
    pipeline = edited(pretrain={"objective": "causal", "train": {"lr": 1.0e-3, "warmup_steps": 20, "max_steps": 300, "batch_size": 16}})
    assert phases(pipeline, all_succeeded()) == {"data": "Succeeded", **{s: "Pending" for s in STAGES[1:]}}
    rerun = [*all_succeeded(), job(pipeline, "pretrain", 1, "SUCCEEDED", generation=2)]
    assert next_step(stage_views(pipeline, rerun, {}, NOW), NOW) == NextStep("finetune", 1)
    status = pipeline_status(pipeline, rerun, previous={}, now=NOW, generation=2)
    assert status["stages"]["pretrain"]["rayJob"] == rerun[-1]["metadata"]["name"]
    assert status["stages"]["pretrain"]["generation"] == 2 and status["stages"]["data"]["generation"] == 1


def test_retries_count_the_attempts_of_the_current_spec() -> None:
    """Two failures under the old spec do not use up the edited stage's retries (spec.cluster.retries: 1)."""
    failing = [job(ORIGINAL, "data", 1, "SUCCEEDED"), job(ORIGINAL, "pretrain", 1, "FAILED"),
               job(ORIGINAL, "pretrain", 2, "FAILED")]
    assert phases(ORIGINAL, failing)["pretrain"] == "Failed"
    fixed = edited(pretrain={"objective": "causal", "train": {"lr": 1.0e-3, "warmup_steps": 20, "max_steps": 300, "batch_size": 16}})
    assert next_step(stage_views(fixed, failing, {}, NOW), NOW) == NextStep("pretrain", 1)
    once = [*failing, job(fixed, "pretrain", 1, "FAILED", generation=2)]
    (view,) = [v for v in stage_views(fixed, once, {}, NOW) if v.name == "pretrain"]
    assert (view.phase, view.attempts) == ("Pending", 1)


def test_an_edit_stops_the_running_rayjobs_it_made_pointless() -> None:
    jobs = [job(ORIGINAL, "data", 1, "SUCCEEDED"), job(ORIGINAL, "pretrain", 1, "RUNNING")]
    assert superseded(ORIGINAL, jobs) == []
    # Not the finished data RayJob: it counts again should the edit be undone.
    assert superseded(edited(data={"redact": {"emails": False}}), jobs) == [jobs[1]["metadata"]["name"]]
    assert superseded(edited(evaluate={"max_new_tokens": 17}), jobs) == []  # pretrain is unchanged


class Recorder:
    """A kube.Client that records the merge patches sent to it."""

    def __init__(self) -> None:
        self.patches: list[dict[str, Any]] = []

    async def merge_patch(self, url: str, body: dict[str, Any]) -> None:
        self.patches.append(body)


def test_the_status_of_a_retry_keeps_nothing_of_the_failed_attempt() -> None:
    failed = job(ORIGINAL, "data", 1, "FAILED")
    failed["status"]["message"] = "worker OOMKilled"
    stored: dict[str, Any] = {}
    client = Recorder()
    asyncio.run(write_status(client, "url", stored,  # type: ignore[arg-type]
                             pipeline_status(ORIGINAL, [failed], previous={}, now=NOW, generation=1)))
    assert "OOMKilled" in stored["stages"]["data"]["message"] and stored["stages"]["data"]["completionTime"]

    retry = job(ORIGINAL, "data", 2, "RUNNING")
    del retry["status"]["endTime"]
    asyncio.run(write_status(client, "url", stored,  # type: ignore[arg-type]
                             pipeline_status(ORIGINAL, [failed, retry], previous=stored, now=NOW, generation=1)))
    # What the API server merges: a null removes the key, a key left out would stay.
    data_patch = client.patches[-1]["status"]["stages"]["data"]
    assert data_patch["message"] is None and data_patch["completionTime"] is None
    assert "message" not in stored["stages"]["data"] and "completionTime" not in stored["stages"]["data"]
    assert stored["stages"]["data"]["rayJob"] == retry["metadata"]["name"]

    # Nothing new: nothing is written.
    count = len(client.patches)
    asyncio.run(write_status(client, "url", stored,  # type: ignore[arg-type]
                             pipeline_status(ORIGINAL, [failed, retry], previous=stored, now=NOW, generation=1)))
    assert len(client.patches) == count


def test_a_partial_write_leaves_the_other_keys_alone() -> None:
    stored: dict[str, Any] = {"phase": "RollingOut", "rollout": {"phase": "progressing", "step": 1, "reason": "x"}}
    client = Recorder()
    asyncio.run(write_status(client, "url", stored, {"rollout": {"phase": "progressing", "step": 2}}))  # type: ignore[arg-type]
    assert client.patches == [{"status": {"rollout": {"step": 2, "reason": None}}}]
    assert stored == {"phase": "RollingOut", "rollout": {"phase": "progressing", "step": 2}}
