"""`spec.evaluate`: score the pipeline's model against its base and the registered champion."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator, model_validator

from kubeforge.spec.base import StrictModel

PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]

SHIPPED_HARNESS_TASKS = ("stdlib_funcname", "stdlib_complete")
"""The lm-evaluation-harness tasks KubeForge ships (`kubeforge/evaluate/harness_tasks/`), built at run time
from the Python standard library's source."""
HARNESS_TASK_NAME = r"^[a-z][a-z_]*$"
"""Task names end up in metric names (`harness_<task>_<metric>`), which promotion gates may name and whose
pattern allows lower-case letters and underscores only."""


class HarnessSpec(StrictModel):
    """Few-shot evaluation with EleutherAI's lm-evaluation-harness on local task files, fully offline.
    Each task's metrics are reported as `harness_<task>_<metric>` (`_<filter>` appended for a filter other
    than the harness's default `none`), for the candidate, its base and the champion alike."""

    tasks: Annotated[list[str], Field(min_length=1)] = Field(default_factory=lambda: list(SHIPPED_HARNESS_TASKS))
    """Shipped tasks (`stdlib_funcname`: pick the function that a standard-library docstring documents, out
    of 4, by log-likelihood; `stdlib_complete`: generate the last line of a standard-library function,
    exact match) or the `task:` names of YAML files in `task_dir`."""
    num_fewshot: NonNegativeInt = 0
    """Solved examples put before each question (drawn from the task's fewshot split)."""
    limit: PositiveInt | None = 20
    """Questions per task (the first ones); null: all of them."""
    task_dir: str | None = None
    """A folder of your own lm-evaluation-harness task YAML files (relative paths resolve against the
    manifest's folder). Each must read local files only: `dataset_path` one of json, csv, parquet, text and
    `dataset_kwargs.data_files` naming existing files (relative to the YAML file's folder)."""

    @field_validator("tasks")
    @classmethod
    def _names(cls, tasks: list[str]) -> list[str]:
        import re

        for name in tasks:
            if not re.fullmatch(HARNESS_TASK_NAME, name):
                raise ValueError(f"task name {name!r} must be lower-case letters and underscores")
        repeated = sorted({n for n in tasks if tasks.count(n) > 1})
        if repeated:
            raise ValueError(f"{', '.join(repeated)} listed twice")
        return tasks

    @model_validator(mode="after")
    def _known_tasks(self) -> HarnessSpec:
        if self.task_dir is None:
            unknown = [n for n in self.tasks if n not in SHIPPED_HARNESS_TASKS]
            if unknown:
                raise ValueError(
                    f"tasks: unknown task {unknown[0]!r} (shipped: {', '.join(SHIPPED_HARNESS_TASKS)}; set "
                    "task_dir to a folder of your own task YAML files)"
                )
        return self


class EvaluateSpec(StrictModel):
    """Held-out perplexity and generation metrics of the candidate (the fine-tuned model, or the
    pretrained one when there is no fine-tuning), its base model and the current champion."""

    max_examples: PositiveInt = 50
    """Held-out task examples to generate for (the first ones of the test split)."""
    max_new_tokens: PositiveInt = 128
    perplexity_batches: PositiveInt = 20
    """Batches of the data stage's test split scored for perplexity."""
    batch_size: PositiveInt = 8
    doctest_timeout_s: PositiveFloat = 5.0
    """Time limit of each generated function's doctest run (a subprocess without network)."""
    allow_unconfined_doctests: bool = False
    """Run generated code's doctests on Kubernetes even where the pod can give them no network namespace
    (`unshare` needs user namespaces, which most container runtimes' seccomp profiles refuse) or no write
    sandbox (Landlock). Off, the stage fails there instead; on a laptop they always run, and the stage
    logs how they are confined."""
    compare_base: bool = True
    """Also score the base model the candidate was fine-tuned from."""
    champion: str | None = None
    """Registered MLflow model whose `champion` alias to compare against; null means the pipeline's name.
    No champion registered yet means no comparison."""
    use_gpu: bool = False
    harness: HarnessSpec | None = None
    """Also run lm-evaluation-harness tasks on every scored model (causal language models only)."""
