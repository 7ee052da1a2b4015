"""`run(spec, ctx)`: train a reward model on preference pairs with Ray Train.

The model is the base causal LM's body under a new scalar head (`AutoModelForSequenceClassification`,
`num_labels=1`), trained with LoRA or in full on the pairwise loss -log sigmoid(r_chosen - r_rejected).
The base is `base_model`, else the finetune stage's model, else the pretrain stage's. The workers run
`kubeforge.reward.recipe.RewardRecipe` through `kubeforge.engine.fit`: a rerun in the folder the executor
hands back after an interruption continues from the last checkpoint, and every evaluation's loss,
accuracy and margin on the held-out pairs reach MLflow and Prometheus (stage label `reward`).

Outputs in the stage folder:

* `pairs/`: the pairs' splits (`train.jsonl`, `test.jsonl`, `task.json`), written once, so that a rerun
  trains and scores on the same pairs;
* `model/`: an `AutoModelForSequenceClassification` folder with one label (LoRA merged) and the tokenizer
  with the chat template the prompts were formatted with: what TRL's reward models are and what vLLM
  loads with its pooling runner (score / reward). The executor registers it with role `reward`.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from kubeforge.context import StageContext
from kubeforge.errors import StageError
from kubeforge.reward.config import RewardLoop
from kubeforge.spec.reward import RewardSpec
from kubeforge.stages.data import DATA
from kubeforge.stages.finetune import FINETUNE
from kubeforge.stages.pretrain import PRETRAIN
from kubeforge.stages.reward import EVAL_METRICS, REWARD, RewardResult

STAGE = REWARD.name
PAIRS_SUBDIR = "pairs"


def resolve_base_model(spec: RewardSpec, ctx: StageContext) -> Path:
    """`spec.base_model` relative to the manifest, else the fine-tuned model, else the pretrained one."""
    if spec.base_model is not None:
        path = (ctx.base_dir / spec.base_model).resolve()
        if not path.exists():
            raise StageError(STAGE, f"spec.reward.base_model: {spec.base_model} does not exist (looked for {path})")
        if not (path / "config.json").is_file():
            raise StageError(
                STAGE, f"spec.reward.base_model: {path} is not a Hugging Face model folder (no config.json)"
            )
        return path
    finetune = ctx.input(FINETUNE)
    if finetune is not None:
        if finetune.result.model_dir is None:
            raise StageError(
                STAGE, f"the finetune stage made no merged model (method '{finetune.result.method}'); set "
                "spec.reward.base_model to a Hugging Face model folder",
            )
        return (finetune.directory / finetune.result.model_dir).resolve()
    pretrain = ctx.input(PRETRAIN)
    if pretrain is None:
        raise StageError(
            STAGE, "spec.reward.base_model is not set and there is no finetune or pretrain stage to take the model "
            "from; set base_model to a Hugging Face model folder or add spec.finetune or spec.pretrain",
        )
    return (pretrain.directory / pretrain.result.model_dir).resolve()


def ensure_pairs(spec: RewardSpec, ctx: StageContext) -> Path:
    """`<out_dir>/pairs/` with the pairs' splits, written once (a rerun resumes on the same split)."""
    from kubeforge.formats.splits import write_splits
    from kubeforge.reward.pairs import load_pairs

    pairs_dir = ctx.out_dir / PAIRS_SUBDIR
    if (pairs_dir / "task.json").is_file():
        return pairs_dir
    data = ctx.input(DATA)
    documents = data.directory / data.result.documents if data is not None else None
    splits = load_pairs(spec, ctx.base_dir, documents)
    with tempfile.TemporaryDirectory(dir=ctx.out_dir, prefix=".pairs-") as tmp:
        write_splits(splits, Path(tmp) / PAIRS_SUBDIR)
        shutil.rmtree(pairs_dir, ignore_errors=True)
        (Path(tmp) / PAIRS_SUBDIR).rename(pairs_dir)
    return pairs_dir


def loop_config(spec: RewardSpec, ctx: StageContext) -> tuple[RewardLoop, int]:
    """The recipe's configuration, and how many pairs were dropped while encoding."""
    from transformers import AutoConfig, AutoTokenizer

    from kubeforge.engine.model import check_lora_targets
    from kubeforge.formats.splits import read_split
    from kubeforge.reward.pairs import encode_pairs

    base_model = resolve_base_model(spec, ctx)
    positions = int(AutoConfig.from_pretrained(str(base_model)).max_position_embeddings)
    if spec.max_length > positions:
        raise StageError(
            STAGE, f"spec.reward.max_length: {spec.max_length} exceeds the base model's {positions} positions; "
            "lower max_length",
        )
    if spec.method == "lora":
        check_lora_targets(base_model, spec.lora_settings.target_modules, STAGE, "spec.reward.lora.target_modules")
    pairs_dir = ensure_pairs(spec, ctx)
    tokenizer = AutoTokenizer.from_pretrained(str(base_model))
    train, dropped_train = encode_pairs(read_split(pairs_dir, "train"), tokenizer, spec.max_length)
    test, dropped_test = encode_pairs(read_split(pairs_dir, "test"), tokenizer, spec.max_length)
    if len(train) < spec.train.batch_size or not test:
        raise StageError(
            STAGE, f"{len(train)} training and {len(test)} held-out pairs are usable ({dropped_train + dropped_test} "
            "dropped: the prompt fills max_length or the answers are the same within it); training needs "
            f"train.batch_size ({spec.train.batch_size}) training pairs and one held-out pair; add pairs, raise "
            "spec.reward.max_length or lower spec.reward.train.batch_size",
        )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise StageError(STAGE, f"spec.reward.base_model: the tokenizer of {base_model} has no pad or eos token")
    config = RewardLoop(
        spec=spec, base_model_dir=str(base_model), train_pairs=train, test_pairs=test, pad_id=int(pad_id)
    )
    return config, dropped_train + dropped_test


def run(spec: RewardSpec, ctx: StageContext) -> RewardResult:
    import ray

    from kubeforge.engine.fit import check_resources, fit_with_progress, run_figures
    from kubeforge.reward.recipe import MODEL_SUBDIR, RewardRecipe

    if not ray.is_initialized():
        ray.init()  # the executors start or join Ray; a direct call of the stage gets a local runtime
    check_resources(spec, ray.cluster_resources(), STAGE)
    config, dropped = loop_config(spec, ctx)
    fit, poller = fit_with_progress(RewardRecipe, config, spec, ctx, f"{STAGE}: pairwise ({spec.method})")
    target = ctx.out_dir / MODEL_SUBDIR
    with fit.checkpoint.as_directory() as directory:
        shutil.rmtree(target, ignore_errors=True)  # left by an attempt interrupted while copying
        shutil.copytree(Path(directory) / MODEL_SUBDIR, target)

    final: dict[str, Any] = dict(fit.metrics or {})
    evaluated: dict[str, Any] = {
        **{name: float(final[name]) for name in EVAL_METRICS},
        **{f"initial_{name}": float(final[f"initial_{name}"]) for name in EVAL_METRICS},
        **run_figures(final, poller),
    }
    result = RewardResult(
        model_dir=MODEL_SUBDIR,
        pairs_dir=PAIRS_SUBDIR,
        base_model_dir=config.base_model_dir,
        method=spec.method,
        **evaluated,
        trainable_parameters=int(final["trainable_parameters"]),
        total_parameters=int(final["total_parameters"]),
        num_train_pairs=len(config.train_pairs),
        num_test_pairs=len(config.test_pairs),
        dropped_pairs=dropped,
        workers=spec.resources.workers,
    )
    ctx.tracker.log_metrics(
        {
            **{f"final_{name}": getattr(result, name) for name in EVAL_METRICS},
            "trainable_parameters": result.trainable_parameters,
            "total_parameters": result.total_parameters,
            "dropped_pairs": dropped,
        },
        step=result.final_step,
    )
    for name in (MODEL_SUBDIR, PAIRS_SUBDIR):
        ctx.tracker.log_artifact(ctx.out_dir / name, name)
    return result
