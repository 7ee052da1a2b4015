"""`spec.promotion`: the gates a candidate must pass to become `challenger`, and who approves it."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from kubeforge.spec.base import StrictModel

PositiveFloat = Annotated[float, Field(gt=0)]

class Gate(StrictModel):
    """One condition on a metric: `min`/`max` bounds and/or `max_regression` against the champion."""

    metric: Annotated[str, Field(pattern=r"^[a-z_]+\.[a-z_]+$")]
    """`<stage>.<metric>`, e.g. `evaluate.perplexity`, `evaluate.rouge_l`, `quantize.perplexity_increase`."""
    min: float | None = None
    max: float | None = None
    max_regression: Annotated[float, Field(ge=0)] | None = None
    """Largest relative change for the worse against the current champion's score of the same metric
    (0.02: perplexity at most 2% higher, ROUGE-L at most 2% lower). Passes when there is no champion yet."""

    @model_validator(mode="after")
    def _has_a_condition(self) -> Gate:
        if self.min is None and self.max is None and self.max_regression is None:
            raise ValueError(f"gate on {self.metric}: set min, max or max_regression")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"gate on {self.metric}: min ({self.min}) is above max ({self.max})")
        if self.max_regression is not None:
            # Imported here: the stage registry declares this section, so it imports this module first.
            from kubeforge import stages

            scorers = [s.name for s in stages.all_stages() if s.scores_champion]
            if self.stage not in scorers:
                raise ValueError(
                    f"gate on {self.metric}: max_regression compares with the champion's score, which only the "
                    f"{' and '.join(scorers)} stage measures; use min/max, or gate an {scorers[0]}.* metric"
                )
        return self

    @property
    def stage(self) -> str:
        return self.metric.partition(".")[0]

    @property
    def name(self) -> str:
        return self.metric.partition(".")[2]


class ApprovalSpec(StrictModel):
    """A person's sign-off before the candidate gets its alias: the pipeline waits for
    `kubeforge models approve <model> <version>`."""

    required: bool = True
    timeout_s: PositiveFloat = 86400.0
    """How long the pipeline waits; afterwards the stage fails and a rerun waits again."""
    poll_s: PositiveFloat = 5.0


class PromotionSpec(StrictModel):
    """Register the pipeline's final model, gate it, and move the `challenger` (or `champion`) alias."""

    gates: list[Gate] = Field(default_factory=list)
    approval: ApprovalSpec | None = None
    alias: Literal["challenger", "champion"] = "challenger"
    """The alias a passing (and approved) candidate gets. `champion` also moves production's alias,
    skipping the canary that normally promotes a challenger."""
