"""A fine-tuning stage's model output, loaded for generation or scoring.

The fine-tuning stage writes `merged/` or `adapter/` and names them in its result (`model_dir`,
`adapter_dir`, `base_model_dir`); the evaluate stage loads them through this, outside the fine-tuning
package it must not import.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kubeforge.errors import StageError


def load_for_inference(stage_dir: Path, result: dict[str, Any], device: str = "cpu") -> tuple[Any, Any]:
    """(model, tokenizer) of a finished fine-tuning stage, in eval mode on `device`.

    The merged model when there is one (a plain `transformers` model); otherwise (prefix tuning) the
    base model with the adapter on top through `PeftModel.from_pretrained`. The tokenizer comes with
    the output and carries the chat template the model was trained with.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model: Any
    if result.get("model_dir"):
        folder = stage_dir / result["model_dir"]
        model = AutoModelForCausalLM.from_pretrained(str(folder))
    elif result.get("adapter_dir"):
        from peft import PeftModel

        folder = stage_dir / result["adapter_dir"]
        base = AutoModelForCausalLM.from_pretrained(str(result["base_model_dir"]))
        model = PeftModel.from_pretrained(base, str(folder))
    else:
        raise StageError("finetune", f"the fine-tuning output in {stage_dir} has neither model_dir nor adapter_dir")
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model.to(device)
    model.eval()
    return model, tokenizer
