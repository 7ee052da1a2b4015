"""What every stage's typed result shares: its JSON form in result.json, and what gates and lineage read.

A stage returns a frozen dataclass (its `Stage.result_type`); the executor writes it to the stage
folder's result.json and reads it back for the stages downstream (`kubeforge.context`), so no stage
reads another's result by string key. Fields hold plain JSON values (numbers, strings, lists and
dicts of them), so the file round-trips exactly.
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, Self


def finite(value: Any) -> float | None:
    """`value` as a float when it is a finite number (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


@dataclasses.dataclass(frozen=True)
class StageResult:
    """Base of the stages' results."""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Self:
        """Raises ValueError naming the fields a document lacks (one written by another KubeForge version)."""
        fields = dataclasses.fields(cls)
        missing = [
            f.name for f in fields
            if f.name not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        if missing:
            raise ValueError(f"no {', '.join(missing)}")
        names = {f.name for f in fields}
        return cls(**{k: v for k, v in data.items() if k in names})

    def gate_values(self, metric: str) -> tuple[float | None, float | None]:
        """The value of `metric` for a promotion gate, and the champion's where this stage scored one."""
        return finite(getattr(self, metric, None)), None

    def scored_metrics(self) -> list[str]:
        """The metrics this result has a value of (what a gate's error message lists)."""
        return sorted(f.name for f in dataclasses.fields(self) if finite(getattr(self, f.name)) is not None)


@dataclasses.dataclass(frozen=True)
class ModelLineage:
    """How a model version came to be, as tags on its registered version."""

    method: str
    """`pretrain-<objective>` or `<objective>-<method>` of the fine-tuning that made it."""
    format: str
    """`hf` (a Hugging Face model folder), `peft-adapter`, or a quantized format."""
    quantization: str = "none"
    lora_adapter: str | None = None
    """The folder of the stage's run artifacts holding a LoRA adapter of this version: a deployment may serve
    it over the base version instead of the merged weights (`spec.lora` of a ModelDeployment)."""


class ModelResult(StageResult, ABC):
    """A result that holds a model the executor registers in MLflow (`Stage.model_role` is set)."""

    model_dir: str | None
    """The folder (relative to the stage folder) of a plain Hugging Face model, when the stage made one."""

    @abstractmethod
    def model_artifact(self) -> str | None:
        """The folder (relative to the stage folder) holding the model, or None when it made none."""

    @abstractmethod
    def lineage(self) -> ModelLineage: ...
