"""`spec.tune`: hyper-parameter search with Ray Tune, Optuna (TPE) and ASHA over a training stage."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, model_validator

from kubeforge.spec.base import StrictModel

PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]

def _training_stages(schema: dict[str, Any]) -> None:
    """The schema of `target`: the stages that train (the registry declares them; it imports this module)."""
    from kubeforge import stages

    schema["enum"] = [s.name for s in stages.training_stages()]


class Dimension(StrictModel):
    """One searched setting: `loguniform`/`uniform` (low, high), `int` (low, high, inclusive) or `choice` (values)."""

    type: Literal["loguniform", "uniform", "int", "choice"]
    low: float | None = None
    high: float | None = None
    values: list[Any] | None = None

    @model_validator(mode="after")
    def _well_formed(self) -> Dimension:
        if self.type == "choice":
            if self.low is not None or self.high is not None:
                raise ValueError("a choice takes values, not low/high")
            if not self.values or len({repr(v) for v in self.values}) < 2:
                raise ValueError(f"a choice needs at least two different values (got {self.values})")
            # Optuna stores categorical choices as plain scalars (its journal and database storages too).
            if not all(v is None or isinstance(v, bool | int | float | str) for v in self.values):
                raise ValueError(f"choice values must be numbers, strings, booleans or null (got {self.values})")
            return self
        if self.values is not None:
            raise ValueError(f"a {self.type} dimension takes low and high, not values")
        if self.low is None or self.high is None:
            raise ValueError(f"a {self.type} dimension needs low and high")
        if self.low >= self.high:
            raise ValueError(f"low must be < high (got low={self.low:g}, high={self.high:g})")
        if self.type == "loguniform" and self.low <= 0:
            raise ValueError(f"a loguniform dimension needs low > 0 (got {self.low:g})")
        if self.type == "int" and (self.low != int(self.low) or self.high != int(self.high)):
            raise ValueError(f"an int dimension needs whole-number bounds (got {self.low:g}, {self.high:g})")
        return self


class AshaSettings(StrictModel):
    """Asynchronous successive halving: stop trials that trail at each rung."""

    grace_period: PositiveInt = 20
    """Optimizer steps every trial runs before it can be stopped."""
    reduction_factor: Annotated[int, Field(ge=2)] = 2
    """Only the best 1/reduction_factor of the trials at a rung continue to the next."""


class TuneSpec(StrictModel):
    """The search stage; its best configuration feeds the target stage that names it in
    `hyperparameters_from: tune`."""

    target: Annotated[str, Field(json_schema_extra=_training_stages)] = "finetune"
    """The training stage whose loop each trial runs (its manifest section is the starting point)."""
    search_space: Annotated[dict[str, Dimension], Field(min_length=1)]
    """Dotted paths into the target's section (e.g. `train.lr`, `lora.rank`) and their ranges."""
    metric: str | list[str] = "val_loss"
    """Metric to optimise, or several for a multi-objective (Pareto) search; ASHA prunes on the first."""
    mode: Literal["min", "max"] | list[Literal["min", "max"]] = "min"
    """One mode per metric (a single mode applies to all)."""
    num_samples: PositiveInt = 8
    """Number of trials."""
    max_concurrent: PositiveInt = 2
    """Trials that run at the same time."""
    searcher: Literal["tpe", "random"] = "tpe"
    """`tpe`: Optuna's TPE sampler (multi-objective when several metrics are given). `random`: Optuna's
    random sampler, the baseline."""
    scheduler: Literal["asha", "none"] = "asha"
    """`asha` stops unpromising trials early; `none` runs every trial to the end."""
    asha: AshaSettings | None = None
    """ASHA settings (defaults when omitted); only with scheduler `asha`."""
    max_steps: PositiveInt | None = None
    """Optimizer steps per trial; null means the target section's train.max_steps."""
    storage: str | None = None
    """Optuna storage URL for the study (e.g. postgresql://...); null means a journal file in the stage folder.
    A URL with a password belongs in `storage_env` instead: the operator refuses one here."""
    storage_env: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")] | None = None
    """The environment variable holding the storage URL, for URLs with credentials (on Kubernetes: a key of a
    Secret named in spec.cluster.env_secrets)."""
    cpus_per_trial: PositiveFloat = 1.0
    gpus_per_trial: Annotated[float, Field(ge=0)] = 0.0
    seed: int = 0

    @model_validator(mode="after")
    def _consistent(self) -> TuneSpec:
        if self.storage is not None and self.storage_env is not None:
            raise ValueError("storage_env: set storage or storage_env, not both")
        if isinstance(self.mode, list) and len(self.mode) != len(self.metrics):
            raise ValueError(f"mode: give one mode per metric ({len(self.metrics)}), or a single mode")
        if isinstance(self.metric, list) and len(set(self.metric)) != len(self.metric):
            raise ValueError(f"metric: each metric once (got {self.metric})")
        if self.asha is not None and self.scheduler != "asha":
            raise ValueError(f"asha: only used with scheduler 'asha' (got '{self.scheduler}')")
        grace = self.asha_settings.grace_period
        if self.scheduler == "asha" and self.max_steps is not None and self.max_steps <= grace:
            raise ValueError(
                f"max_steps: ({self.max_steps}) must exceed asha.grace_period ({grace}), "
                "or ASHA can never stop a trial"
            )
        return self

    @property
    def metrics(self) -> list[str]:
        return self.metric if isinstance(self.metric, list) else [self.metric]

    @property
    def modes(self) -> list[str]:
        return list(self.mode) if isinstance(self.mode, list) else [self.mode] * len(self.metrics)

    @property
    def asha_settings(self) -> AshaSettings:
        return self.asha or AshaSettings()


def field_paths(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every settable leaf path of a section model (`train.lr`, `lora.rank`, ...)."""
    paths = []
    for name, info in model.model_fields.items():
        nested = _model_type(info.annotation)
        if nested is not None:
            paths.extend(field_paths(nested, f"{prefix}{name}."))
        else:
            paths.append(f"{prefix}{name}")
    return paths


def _model_type(annotation: Any) -> type[BaseModel] | None:
    import typing

    candidates = typing.get_args(annotation) or (annotation,)
    for candidate in candidates:
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def apply_overrides(section: BaseModel, overrides: dict[str, Any]) -> BaseModel:
    """`section` with dotted-path values replaced, validated again (a trial's or the best configuration)."""
    data = section.model_dump(mode="json")
    for path, value in overrides.items():
        node = data
        *parents, leaf = path.split(".")
        for part in parents:
            if node.get(part) is None:
                node[part] = {}  # an optional sub-section (e.g. lora) that the manifest left to its defaults
            node = node[part]
        node[leaf] = value
    return type(section).model_validate(data)
