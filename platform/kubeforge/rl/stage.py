"""`run(spec, ctx)`: optimise the fine-tuned policy against rewards with GRPO in Ray Train workers.

The policy starts from `base_model`, else the finetune stage's merged model, and samples completions for
the fine-tuning task's training prompts; the task's test split is held out for the evaluations. Rewards
are the rules of `spec.rl.rewards.rules` and the reward stage's model (or `rewards.model.path`), which must
share the policy's tokenizer. The workers run `kubeforge.rl.recipe.RlRecipe` through `kubeforge.engine.fit`:
checkpoints and resuming as in fine-tuning, every step's reward, KL, entropy and response length and every
evaluation to MLflow and Prometheus (stage label `rl`).

Output in the stage folder: `model/`, a causal LM folder with the tokenizer and its chat template. The
executor registers it with role `aligned`; being the pipeline's latest model, it is what evaluate scores
(against the fine-tuned model it started from), quantize quantizes and promote promotes.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

from kubeforge.context import StageContext
from kubeforge.errors import StageError
from kubeforge.rl.config import RlLoop
from kubeforge.spec.rl import CODE_RULES, RlSpec
from kubeforge.stages.data import DATA
from kubeforge.stages.finetune import FINETUNE
from kubeforge.stages.reward import REWARD
from kubeforge.stages.rl import RL, RlResult

STAGE = RL.name


def _model_folder(path_text: str, ctx: StageContext, field: str) -> Path:
    path = (ctx.base_dir / path_text).resolve()
    if not (path / "config.json").is_file():
        raise StageError(STAGE, f"{field}: {path} is not a Hugging Face model folder (no config.json)")
    return path


def resolve_policy(spec: RlSpec, ctx: StageContext) -> Path:
    """`spec.base_model`, else the finetune stage's merged model."""
    if spec.base_model is not None:
        return _model_folder(spec.base_model, ctx, "spec.rl.base_model")
    finetune = ctx.require(FINETUNE, "needs the fine-tuned policy and its task's prompts (spec.finetune)")
    if finetune.result.model_dir is None:
        raise StageError(
            STAGE, f"the finetune stage made no merged model (method '{finetune.result.method}'); set "
            "spec.rl.base_model to a Hugging Face model folder",
        )
    return (finetune.directory / finetune.result.model_dir).resolve()


def resolve_reward_model(spec: RlSpec, ctx: StageContext) -> Path | None:
    source = spec.rewards.model
    if source is None:
        return None
    if source.path is not None:
        return _model_folder(source.path, ctx, "spec.rl.rewards.model.path")
    reward = ctx.input(REWARD)
    if reward is None:
        raise StageError(STAGE, "spec.rl.rewards.model: no path is set and the pipeline has no reward stage; set "
                                "rewards.model.path to a reward model folder or add spec.reward")
    return (reward.directory / reward.result.model_dir).resolve()


def check_same_tokenizer(policy: Any, reward: Any, reward_dir: Path) -> None:
    """The reward model scores the policy's token ids as they are: its vocabulary must be the policy's."""
    mine, theirs = policy.get_vocab(), reward.get_vocab()
    differing = sum(1 for token, index in mine.items() if theirs.get(token) != index) + len(set(theirs) - set(mine))
    if differing:
        raise StageError(
            STAGE, f"spec.rl.rewards.model: the reward model's tokenizer ({reward_dir}) differs from the policy's "
            f"({differing} of {len(mine)} tokens); train the reward model on the policy's base model "
            "(spec.reward.base_model) or name one that shares its tokenizer",
        )


def _check_confinement(spec: RlSpec, ctx: StageContext) -> None:
    from kubeforge.sandbox import isolation, unconfined_refusal

    confinement = isolation()
    ctx.reporter.log(f"{STAGE}: doctest rewards run in a subprocess; {confinement}")
    field = "spec.rl.rewards.allow_unconfined_doctests"
    refusal = unconfined_refusal(confinement, spec.rewards.allow_unconfined_doctests, field)
    if refusal is not None:
        raise StageError(STAGE, refusal)


def _encode_prompts(
    records: list[dict[str, Any]], tokenizer: Any, limit: int
) -> tuple[list[dict[str, Any]], int]:
    from kubeforge.formats.chat import prompt_text

    kept = []
    for record in records:
        # The chat-formatted prompt already carries whatever special tokens the template puts there.
        ids = tokenizer(prompt_text(record, tokenizer), add_special_tokens=False)["input_ids"]
        if len(ids) <= limit:
            kept.append({"input_ids": ids, "record": record})
    return kept, len(records) - len(kept)


def _perplexity_inputs(ctx: StageContext, tokenizer: Any) -> dict[str, Any]:
    """The data stage's test (else validation) shards, when its tokenizer is the policy's."""
    from transformers import AutoTokenizer

    data = ctx.input(DATA)
    if data is None:
        return {}
    if dict(AutoTokenizer.from_pretrained(str(data.directory / data.result.tokenizer_dir)).get_vocab()) != dict(
        tokenizer.get_vocab()
    ):
        ctx.reporter.log(f"{STAGE}: the policy's tokenizer is not the data stage's; no perplexity")
        return {}
    for split in ("test", "validation"):
        shards = [str(data.directory / p) for p in data.result.shards.get(split, [])]
        if shards:
            return {"perplexity_shards": shards, "special_tokens": data.result.special_tokens,
                    "vocab_size": data.result.vocab_size}
    return {}


def loop_config(spec: RlSpec, ctx: StageContext) -> tuple[RlLoop, int]:
    """The recipe's configuration, and how many prompts were left out for their length."""
    from transformers import AutoConfig, AutoTokenizer

    from kubeforge.engine.model import check_lora_targets
    from kubeforge.formats.splits import read_split

    policy = resolve_policy(spec, ctx)
    positions = int(AutoConfig.from_pretrained(str(policy)).max_position_embeddings)
    if spec.max_prompt_length + spec.rollout.max_new_tokens > positions:
        raise StageError(
            STAGE, f"spec.rl.max_prompt_length: {spec.max_prompt_length} plus rollout.max_new_tokens "
            f"({spec.rollout.max_new_tokens}) exceeds the policy's {positions} positions; lower one of them",
        )
    if spec.method == "lora":
        check_lora_targets(policy, spec.lora_settings.target_modules, STAGE, "spec.rl.lora.target_modules")
    finetune = ctx.require(FINETUNE, "needs the fine-tuning task's prompts (spec.finetune)")
    task_dir = finetune.directory / finetune.result.task_dir
    train_records, test_records = read_split(task_dir, "train"), read_split(task_dir, "test")
    code_rules = sorted(set(spec.rewards.rules) & set(CODE_RULES))
    if code_rules and not all("entry_point" in r for r in train_records + test_records):
        raise StageError(
            STAGE, f"spec.rl.rewards.rules: {', '.join(code_rules)} check generated functions, and the fine-tuning "
            "task's records name none; use the built-in task (spec.finetune.task.builtin: python-docstrings) or "
            "only the rule 'short' and a reward model",
        )
    tokenizer = AutoTokenizer.from_pretrained(str(policy))
    reward_dir = resolve_reward_model(spec, ctx)
    if reward_dir is not None:
        check_same_tokenizer(tokenizer, AutoTokenizer.from_pretrained(str(reward_dir)), reward_dir)
    train, dropped_train = _encode_prompts(train_records, tokenizer, spec.max_prompt_length)
    test, dropped_test = _encode_prompts(test_records, tokenizer, spec.max_prompt_length)
    if len(train) < spec.train.batch_size or not test:
        raise StageError(
            STAGE, f"{len(train)} training and {len(test)} held-out prompts fit max_prompt_length "
            f"({spec.max_prompt_length}); training needs train.batch_size ({spec.train.batch_size}) training "
            "prompts and one held-out prompt; raise spec.rl.max_prompt_length or "
            "spec.finetune.task.test_fraction, or lower spec.rl.train.batch_size",
        )
    eos_ids = [int(t) for t in {tokenizer.eos_token_id} if t is not None]
    if not eos_ids:
        raise StageError(STAGE, f"spec.rl.base_model: the tokenizer of {policy} has no end-of-sequence token")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    config = RlLoop(
        spec=spec, base_model_dir=str(policy), reward_model_dir=str(reward_dir) if reward_dir else None,
        train_prompts=train, test_prompts=test, pad_id=int(pad_id), eos_ids=eos_ids,
        **_perplexity_inputs(ctx, tokenizer),
    )
    return config, dropped_train + dropped_test


def run(spec: RlSpec, ctx: StageContext) -> RlResult:
    import ray

    from kubeforge.engine.fit import check_resources, fit_with_progress, run_figures
    from kubeforge.rl.recipe import MODEL_SUBDIR, RlRecipe, source_names

    if not ray.is_initialized():
        ray.init()  # the executors start or join Ray; a direct call of the stage gets a local runtime
    check_resources(spec, ray.cluster_resources(), STAGE)
    config, dropped = loop_config(spec, ctx)
    if "doctests" in spec.rewards.rules:
        _check_confinement(spec, ctx)
    fit, poller = fit_with_progress(RlRecipe, config, spec, ctx, f"{STAGE}: {spec.algorithm} ({spec.method})")
    target = ctx.out_dir / MODEL_SUBDIR
    with fit.checkpoint.as_directory() as directory:
        shutil.rmtree(target, ignore_errors=True)  # left by an attempt interrupted while copying
        shutil.copytree(Path(directory) / MODEL_SUBDIR, target)

    final: dict[str, Any] = dict(fit.metrics or {})
    perplexity, initial_perplexity = final.get("perplexity", math.nan), final.get("initial_perplexity", math.nan)
    measured = math.isfinite(perplexity) and math.isfinite(initial_perplexity)
    result = RlResult(
        model_dir=MODEL_SUBDIR,
        base_model_dir=config.base_model_dir,
        algorithm=spec.algorithm,
        method=spec.method,
        reward=float(final["reward"]),
        initial_reward=float(final["initial_reward"]),
        reward_gain=float(final["reward"]) - float(final["initial_reward"]),
        rewards={name: float(final[f"reward_{name}"]) for name in source_names(spec)},
        initial_rewards={name: float(final[f"initial_reward_{name}"]) for name in source_names(spec)},
        response_length=float(final["response_length"]),
        perplexity=float(perplexity) if measured else None,
        initial_perplexity=float(initial_perplexity) if measured else None,
        perplexity_increase=float(perplexity) / float(initial_perplexity) - 1 if measured else None,
        **run_figures(final, poller),
        trainable_parameters=int(final["trainable_parameters"]),
        total_parameters=int(final["total_parameters"]),
        num_train_prompts=len(config.train_prompts),
        num_test_prompts=len(config.test_prompts),
        dropped_prompts=dropped,
        workers=spec.resources.workers,
    )
    ctx.tracker.log_metrics(
        {name: value for name, value in (
            ("final_reward", result.reward), ("reward_gain", result.reward_gain),
            ("perplexity_increase", result.perplexity_increase), ("dropped_prompts", dropped),
        ) if value is not None},
        step=result.final_step,
    )
    ctx.tracker.log_artifact(target, MODEL_SUBDIR)
    return result
