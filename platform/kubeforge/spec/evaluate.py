"""`spec.evaluate`: score the pipeline's model against its base and the registered champion."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from kubeforge.spec.base import StrictModel

PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]


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
