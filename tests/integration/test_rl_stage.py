"""The rl stage on local Ray over the session's tiny language model, fine-tuned for a few steps on the
built-in task: GRPO with verifiable rewards raises the held-out reward, every step's reward, KL, entropy
and response length reach MLflow and Prometheus, the model it hands on loads as a causal LM, and evaluate
then scores it against the fine-tuned model it started from."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from mlflow.tracking import MlflowClient

from kubeforge.context import StageOutput
from kubeforge.spec.evaluate import EvaluateSpec
from kubeforge.spec.finetune import FinetuneSpec
from kubeforge.spec.rl import RlSpec

pytestmark = pytest.mark.integration

FINETUNE: dict[str, Any] = {
    "method": "full",
    "task": {"builtin": "python-docstrings", "max_examples": 160, "test_fraction": 0.2},
    "max_length": 128,
    "train": {"max_steps": 20, "batch_size": 8, "lr": 3e-3, "warmup_steps": 2},
    "eval": {"every_steps": 20, "max_batches": 2},
    "checkpoint": {"every_steps": 20, "keep": 1},
    "resources": {"workers": 1},
}
RL: dict[str, Any] = {
    "rewards": {"rules": {"parses": 1.0, "short": 0.3}},
    # transformers: the same draws on every machine (the vLLM engine's own test is below).
    "rollout": {"group_size": 8, "max_new_tokens": 32, "temperature": 0.5, "engine": "transformers"},
    "max_prompt_length": 96,
    "train": {"max_steps": 16, "batch_size": 4, "lr": 1e-4, "warmup_steps": 0},
    "eval": {"every_steps": 8, "max_batches": 4},
    "checkpoint": {"every_steps": 8, "keep": 1},
    "resources": {"workers": 1},
}


@pytest.fixture(scope="module")
def policy(tiny_lm) -> StageOutput:
    """The tiny model fine-tuned for a few steps on the built-in task: the policy both tests start from."""
    from kubeforge.finetune.stage import run as run_finetune

    ctx = tiny_lm.context("finetune", FINETUNE, "rl-policy")
    finetune = run_finetune(FinetuneSpec.model_validate(FINETUNE), ctx)
    return StageOutput("finetune", "fixture", ctx.out_dir, finetune, None)


def test_grpo_raises_the_held_out_reward_and_reports_every_step(tiny_lm, policy: StageOutput) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from kubeforge import metrics
    from kubeforge.evaluate.stage import run as run_evaluate
    from kubeforge.rl.stage import run

    finetune = policy.result
    ctx = tiny_lm.context("rl", RL)
    ctx.inputs["finetune"] = policy
    started = time.monotonic()
    result = run(RlSpec.model_validate(RL), ctx)
    print(f"rl: {time.monotonic() - started:.1f}s {json.dumps(result.to_json())}")

    assert result.final_step == 16 and result.algorithm == "grpo" and result.method == "full"
    assert result.reward_gain >= 0.1 and result.reward == pytest.approx(result.initial_reward + result.reward_gain)
    assert set(result.rewards) == {"rule_parses", "rule_short"}
    assert result.perplexity is not None and result.perplexity_increase is not None
    assert result.base_model_dir == str((tiny_lm.root / "rl-policy.partial" / finetune.model_dir).resolve())

    client = MlflowClient(ctx.tracker.tracking_uri)
    for name in ("rollout_reward", "rollout_reward_rule_parses", "kl", "entropy", "rollout_response_length"):
        assert [m.step for m in client.get_metric_history(ctx.tracker.run_id, name)] == list(range(1, 17)), name
    for name in ("reward", "reward_rule_parses", "reward_rule_short", "response_length", "perplexity"):
        assert [m.step for m in client.get_metric_history(ctx.tracker.run_id, name)] == [0, 8, 16], name
    labels = {"pipeline": "tinylm", "stage": "rl"}
    assert metrics.REGISTRY.get_sample_value("kubeforge_train_step_metric", {**labels, "metric": "kl"}) is not None
    assert metrics.REGISTRY.get_sample_value(
        "kubeforge_train_eval_metric", {**labels, "metric": "reward"}
    ) == pytest.approx(result.reward)

    model = AutoModelForCausalLM.from_pretrained(str(ctx.out_dir / result.model_dir)).eval()
    with torch.no_grad():
        assert model(input_ids=torch.tensor([[5, 6, 7]])).logits.shape[:2] == (1, 3)

    # Evaluate takes the aligned model as the candidate and the fine-tuned one it started from as the base.
    section = {"max_examples": 4, "max_new_tokens": 16, "perplexity_batches": 2, "batch_size": 4}
    evaluate_ctx = tiny_lm.context("evaluate", section, "rl-evaluate")
    evaluate_ctx.inputs.update(finetune=ctx.inputs["finetune"], rl=StageOutput("rl", "fixture", ctx.out_dir, result, None))
    evaluation = run_evaluate(EvaluateSpec.model_validate(section), evaluate_ctx)
    assert evaluation.models == {"candidate": str(ctx.out_dir / result.model_dir), "base": result.base_model_dir}
    assert evaluation.candidate["parse_rate"] is not None and evaluation.base is not None


def test_ppo_with_lora_trains_a_value_head_and_hands_on_the_policy_alone(tiny_lm, policy: StageOutput, tmp_path) -> None:
    """In this process (LocalSession): PPO's value head trains beside the adapters, the reference is the
    policy with its adapters off (no second copy), the held-out reward rises, and the saved model is a
    plain causal LM without the value head."""
    from transformers import AutoModelForCausalLM

    from kubeforge.engine.session import LocalSession
    from kubeforge.rl.recipe import MODEL_SUBDIR, RlRecipe
    from kubeforge.rl.stage import loop_config

    section = {**RL, "algorithm": "ppo", "method": "lora", "lora": {"rank": 8, "target_modules": ["q_proj", "v_proj"]},
               "updates_per_rollout": 2, "train": {**RL["train"], "lr": 1e-3}}
    ctx = tiny_lm.context("rl", section, "rl-ppo")
    ctx.inputs["finetune"] = policy
    config, _ = loop_config(RlSpec.model_validate(section), ctx)
    session = LocalSession(keep_checkpoints=tmp_path)
    recipe = RlRecipe(config, session)
    recipe.run()
    print(f"ppo: {session.evaluations[0]} -> {session.evaluations[-1]}")
    assert recipe.reference is None and recipe.trainable_parameters < recipe.total_parameters
    assert session.evaluations[-1]["reward"] >= session.evaluations[0]["reward"] + 0.02, session.evaluations
    model_dir = next(tmp_path.glob("*final*")) / MODEL_SUBDIR
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    assert not any("value_head" in name or "lora" in name for name, _ in model.named_parameters())


def test_vllm_rollouts_follow_the_policy_as_it_trains(tiny_lm, policy: StageOutput) -> None:
    """With `rollout.engine: vllm` (in this process), the engine's weights are the policy's after every step:
    after three large updates of LoRA adapters that change its greedy completion, vLLM's greedy completion is the policy's own, and its
    samples are as likely under the policy as the policy's own samples (stale weights would make them less
    likely)."""
    import torch
    from transformers import AutoModelForCausalLM

    from kubeforge.engine.session import LocalSession
    from kubeforge.rl.grpo import token_logprobs
    from kubeforge.rl.recipe import RlRecipe
    from kubeforge.rl.stage import loop_config

    section = {**RL, "method": "lora", "rollout": {**RL["rollout"], "engine": "vllm", "group_size": 4},
               "train": {**RL["train"], "max_steps": 3, "lr": 5e-2}, "eval": {"every_steps": 3, "max_batches": 1}}
    ctx = tiny_lm.context("rl", section, "rl-vllm")
    ctx.inputs["finetune"] = policy
    config, _ = loop_config(RlSpec.model_validate(section), ctx)
    recipe = RlRecipe(config, LocalSession())
    recipe.run()
    assert recipe.vllm is not None and recipe._synced_step == 3
    prompt = list(config.test_prompts[0]["input_ids"])
    model = recipe._policy().eval()
    with torch.no_grad():
        greedy = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                max_new_tokens=8, do_sample=False)[0, len(prompt):].tolist()
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    # The updates changed the policy: the base model's greedy completion is another one.
    base = AutoModelForCausalLM.from_pretrained(config.base_model_dir).eval()
    with torch.no_grad():
        before = base.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                               max_new_tokens=8, do_sample=False)[0, len(prompt):].tolist()
    assert before != greedy
    [served] = recipe.vllm.llm.generate([TokensPrompt(prompt_token_ids=prompt)],
                                        SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
    assert list(served.outputs[0].token_ids)[: len(greedy)] == greedy

    def mean_logprob(rows: list[list[int]]) -> float:
        total = count = 0.0
        for row in (r for r in rows if r):
            ids = torch.tensor([prompt + row])
            with torch.no_grad():
                logprobs = token_logprobs(model(input_ids=ids).logits / RL["rollout"]["temperature"], ids)
            total += float(logprobs[0, len(prompt) - 1 :].sum())
            count += len(row)
        return total / count

    from_vllm = recipe.vllm.sample(prompt, 32, 5, config.eos_ids)
    recipe.vllm = None
    from_policy = recipe._sample(prompt, 32, 5)
    assert mean_logprob(from_vllm) == pytest.approx(mean_logprob(from_policy), abs=0.15)
