"""The GRPO and PPO loop every Ray Train worker runs, on the shared engine.

The engine's `Recipe` gives it the lifecycle it shares with the other training stages (DDP, gradient
accumulation, schedule, clipping, checkpoints and resuming, progress to the driver). Its own:

* each micro-batch is made when its step comes: `batch_size` prompts, `group_size` completions sampled
  for each by the current policy (vLLM in this process, or `transformers` generate; see
  `kubeforge.rl.sampling`; a prompt's group is one request, so no padding), their rewards
  (`kubeforge.rl.rules`, the reward model), group-relative advantages and the
  reference policy's log-probabilities; for PPO (and for more than one update per rollout) also the
  sampling policy's log-probabilities, and for PPO the value head's estimates, the per-token rewards and
  GAE's advantages and returns. Sampling is seeded by the step's position, so a resumed run draws what
  the interrupted one would have;
* the loss of `kubeforge.rl.grpo` or `kubeforge.rl.ppo`, `updates_per_rollout` optimizer steps per batch;
  the step's mean rollout reward (and per source), KL, entropy and rollout response length go to the
  driver with the step (`_step_extras`: MLflow and Prometheus);
* an evaluation samples one completion per held-out prompt with fixed seeds (the same draws for every
  evaluation, so the rewards before and after compare like with like) and measures perplexity on the
  data stage's test split.

The reference is the starting policy: a frozen copy for `full`, the same model with its adapters off
for `lora`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from kubeforge.engine.batches import Batcher, RankSampler, TokenShards, right_pad, validation_batches
from kubeforge.engine.model import with_lora
from kubeforge.engine.optim import build_optimizer, build_scheduler
from kubeforge.engine.recipe import Batch, Recipe
from kubeforge.engine.steps import all_reduce_sum, evaluate_tokens, unwrap
from kubeforge.rl.config import RlLoop
from kubeforge.rl.grpo import group_advantages, grpo_loss, token_logprobs
from kubeforge.rl.ppo import gae, ppo_loss, token_rewards, whiten
from kubeforge.rl.rules import Completion, rule_rewards
from kubeforge.rl.sampling import VllmSampler, resolve_engine
from kubeforge.spec.pretrain import PretrainSpec
from kubeforge.spec.rl import RlSpec

MODEL_SUBDIR = "model"
_EVAL_SEED = 20_240_601
"""Seeds the held-out samples: every evaluation draws the same random numbers."""
_PERPLEXITY_BATCH = 8


def source_names(spec: RlSpec) -> list[str]:
    """The reward sources an evaluation reports (`reward_<source>`): the rules, then the model."""
    return [f"rule_{name}" for name in sorted(spec.rewards.rules)] + (["model"] if spec.rewards.model else [])


def completion_length(row: Sequence[int], eos_ids: Sequence[int]) -> tuple[int, bool]:
    """Tokens of a generated row up to and including its first end of sequence, and whether it had one."""
    for index, token in enumerate(row):
        if token in eos_ids:
            return index + 1, True
    return len(row), False


def target_mask(prompt_lengths: Sequence[int], lengths: Sequence[int], width: int) -> torch.Tensor:
    """(n, width - 1): which next-token targets are completion tokens (target j predicts token j + 1)."""
    positions = torch.arange(width - 1).unsqueeze(0)
    starts = torch.tensor(prompt_lengths).unsqueeze(1) - 1
    ends = torch.tensor(lengths).unsqueeze(1) - 1
    return (positions >= starts) & (positions < ends)


class ActorCritic(torch.nn.Module):
    """PPO's model: the policy and a value head on its last hidden states, trained together (one DDP
    module, one optimizer, one checkpoint); only the policy is saved at the end."""

    def __init__(self, policy: Any) -> None:
        super().__init__()
        self.policy = policy
        hidden = int(policy.config.hidden_size)
        self.value_head = torch.nn.Linear(hidden, 1)
        torch.nn.init.normal_(self.value_head.weight, std=1 / (hidden + 1) ** 0.5)
        torch.nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and the value of every position."""
        out = self.policy(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        return out.logits, self.value_head(out.hidden_states[-1]).squeeze(-1)


class RlRecipe(Recipe[RlLoop]):
    @property
    def spec(self) -> RlSpec:
        return self.config.spec

    def _setup_model(self) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

        spec, config = self.spec, self.config
        model: Any = AutoModelForCausalLM.from_pretrained(config.base_model_dir)
        self.reference: Any = None
        if spec.method == "lora":
            model = with_lora(model, spec.lora_settings, "CAUSAL_LM")
            self.trainable_only = True
        else:
            # From the folder, not a copy of `model`: a resumed run restores the policy, never the reference.
            reference: Any = AutoModelForCausalLM.from_pretrained(config.base_model_dir)
            self.reference = reference.to(self.device).eval().requires_grad_(False)
        self.reward_model: Any = None
        if config.reward_model_dir is not None:
            scorer: Any = AutoModelForSequenceClassification.from_pretrained(config.reward_model_dir)
            self.reward_model = scorer.to(self.device).eval().requires_grad_(False)
        if spec.train.activation_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if spec.algorithm == "ppo":
            model = ActorCritic(model)
        model.train()
        self.updates_per_step = spec.updates_per_rollout
        self.trainable_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.total_parameters = sum(p.numel() for p in model.parameters())
        return self.session.prepare_model(model, "ddp")

    def _setup_optimizer(self) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        # The schedule counts optimizer steps: updates_per_rollout of them per step.
        train, updates = self.spec.train, self.spec.updates_per_rollout
        optimizer = build_optimizer(self.model, train)
        return optimizer, build_scheduler(optimizer, train.model_copy(update={
            "max_steps": train.max_steps * updates, "warmup_steps": train.warmup_steps * updates,
        }))

    def _policy(self) -> Any:
        """The causal LM being trained (under DDP and, for PPO, beside its value head)."""
        model: Any = unwrap(self.model)
        return model.policy if isinstance(model, ActorCritic) else model

    def _setup_data(self) -> None:
        from transformers import AutoTokenizer

        spec, config = self.spec, self.config
        self.tokenizer = AutoTokenizer.from_pretrained(config.base_model_dir)
        self.sampler = RankSampler(len(config.train_prompts), self.rank, self.world_size, spec.train.seed)
        limit = spec.train.batch_size * spec.eval.max_batches
        self.test_prompts = list(enumerate(config.test_prompts))[self.rank :: self.world_size][:limit]
        self.perplexity_batches: list[Any] = []
        if config.perplexity_shards:
            shards = TokenShards(config.perplexity_shards)
            self.perplexity_batches = validation_batches(
                shards, self.rank, self.world_size, _PERPLEXITY_BATCH, spec.eval.max_batches
            )
            self.batcher = Batcher(PretrainSpec(), config.vocab_size, config.special_tokens)
        self.step_stats: dict[str, list[float]] = {}
        self.vllm: VllmSampler | None = None
        if resolve_engine(spec.rollout) == "vllm":
            self.vllm = VllmSampler(config.base_model_dir, spec.max_prompt_length + spec.rollout.max_new_tokens,
                                    self.bf16, spec.rollout)
        self._synced_step: int | None = None

    # --- rollouts ---------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _seeded(self, seed: int) -> Iterator[None]:
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            yield

    def _policy_weights(self) -> list[tuple[str, torch.Tensor]]:
        """The policy's weights under their checkpoint names, LoRA merged (what vLLM's loader reads)."""
        policy = self._policy()
        if self.spec.method != "lora":
            return [(name, tensor.detach()) for name, tensor in policy.state_dict().items()]
        policy.merge_adapter()
        try:  # copies: unmerging changes the base weights in place
            return [
                (name.removeprefix("base_model.model.").replace(".base_layer", ""), tensor.detach().clone())
                for name, tensor in policy.state_dict().items() if "lora_" not in name
            ]
        finally:
            policy.unmerge_adapter()

    def _sample(self, prompt_ids: list[int], count: int, seed: int) -> list[list[int]]:
        """`count` completions of one prompt by the current policy, each cut after its end of sequence."""
        if self.vllm is not None:
            if self._synced_step != self.step:  # the policy has changed since vLLM last got its weights
                self.vllm.load(self._policy_weights())
                self._synced_step = self.step
            rows = self.vllm.sample(prompt_ids, count, seed, self.config.eos_ids)
            return [row[: completion_length(row, self.config.eos_ids)[0]] for row in rows]
        spec, policy = self.spec.rollout, self._policy()
        policy.eval()
        input_ids = torch.tensor([prompt_ids] * count, dtype=torch.long, device=self.device)
        with torch.no_grad(), self._seeded(seed), torch.autocast(
            device_type=self.device.type, dtype=torch.bfloat16, enabled=self.bf16
        ):
            generated = policy.generate(
                input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=True,
                temperature=spec.temperature, top_p=spec.top_p, top_k=0, max_new_tokens=spec.max_new_tokens,
                eos_token_id=self.config.eos_ids, pad_token_id=self.config.pad_id, use_cache=True,
            )
        policy.train()
        rows = generated[:, len(prompt_ids) :].tolist()
        return [row[: completion_length(row, self.config.eos_ids)[0]] for row in rows]

    def _score(
        self, prompts: Sequence[Mapping[str, Any]], completions: Sequence[Sequence[int]]
    ) -> dict[str, list[float]]:
        """Every source's reward of each completion (`rule_<name>` unweighted, `model`) and their weighted
        sum (`total`); `prompts[i]` is completion i's prompt."""
        rewards = self.spec.rewards
        eos = self.config.eos_ids
        parsed = [
            Completion(prompt["record"], str(self.tokenizer.decode(list(row), skip_special_tokens=True)), len(row),
                       completion_length(row, eos)[1])
            for prompt, row in zip(prompts, completions, strict=True)
        ]
        scores = {f"rule_{name}": values for name, values in rule_rewards(
            parsed, sorted(rewards.rules), self.spec.rollout.max_new_tokens, rewards.doctest_timeout_s
        ).items()}
        total = [0.0] * len(parsed)
        for name, weight in rewards.rules.items():
            total = [t + weight * v for t, v in zip(total, scores[f"rule_{name}"], strict=True)]
        if self.reward_model is not None and rewards.model is not None:
            # The reward stage scores prompt and answer without an end of sequence.
            rows = [list(p["input_ids"]) + [t for t in row if t not in eos]
                    for p, row in zip(prompts, completions, strict=True)]
            input_ids, attention_mask = right_pad(rows, self.config.pad_id, self.device)
            with torch.no_grad():
                model_scores = self.reward_model(input_ids=input_ids, attention_mask=attention_mask).logits.squeeze(-1)
            scores["model"] = [float(v) for v in model_scores.float()]
            total = [t + rewards.model.weight * v for t, v in zip(total, scores["model"], strict=True)]
        scores["total"] = total
        return scores

    def _rollout(self, prompts: Sequence[Mapping[str, Any]], seed: int) -> Batch:
        group = self.spec.rollout.group_size
        completions: list[list[int]] = []
        for k, prompt in enumerate(prompts):
            completions.extend(self._sample(list(prompt["input_ids"]), group, seed * 1009 + k))
        owners = [prompt for prompt in prompts for _ in range(group)]
        scores = self._score(owners, completions)
        rows = [list(p["input_ids"]) + c for p, c in zip(owners, completions, strict=True)]
        input_ids, attention_mask = right_pad(rows, self.config.pad_id, self.device)
        prompt_lengths = [len(p["input_ids"]) for p in owners]
        mask = target_mask(prompt_lengths, [len(r) for r in rows], input_ids.shape[1]).to(self.device)
        batch: dict[str, Any] = {
            "input_ids": input_ids, "attention_mask": attention_mask, "target_mask": mask,
            "tokens": int(attention_mask.sum()),
        }
        with torch.no_grad(), torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            batch["reference_logprobs"] = token_logprobs(self._reference_logits(input_ids, attention_mask), input_ids)
            if self.spec.algorithm == "ppo" or self.spec.updates_per_rollout > 1:
                # The sampling policy's log-probabilities (and values): what later updates' ratios start from.
                logits, values = self._forward(self.model, input_ids, attention_mask)
                batch["old_logprobs"] = token_logprobs(logits, input_ids)
        total = torch.tensor(scores["total"], device=self.device)
        if self.spec.algorithm == "ppo":
            assert values is not None  # the model is an ActorCritic
            ppo = self.spec.ppo_settings
            rewards = token_rewards(total, batch["old_logprobs"], batch["reference_logprobs"], mask, self.spec.kl_coef)
            advantages, batch["returns"] = gae(rewards.cpu(), values[:, :-1].float().cpu(), mask.cpu(), ppo.gamma,
                                               ppo.lam)
            batch["returns"] = batch["returns"].to(self.device)
            batch["advantages"] = whiten(advantages, mask.cpu()).to(self.device)
        else:
            batch["advantages"] = group_advantages(total, group)
        # `rollout_` keeps them apart from the evaluations' metrics of the same names in MLflow.
        for name, values_ in scores.items():
            key = "rollout_reward" if name == "total" else f"rollout_reward_{name}"
            self.step_stats.setdefault(key, []).extend(values_)
        self.step_stats.setdefault("rollout_response_length", []).extend(len(c) for c in completions)
        return batch

    def _forward(
        self, model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits, and values where the model has a value head (PPO)."""
        out = model(input_ids=input_ids, attention_mask=attention_mask)
        if isinstance(out, tuple):
            return out[0], out[1]
        return out.logits, None

    def _reference_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.reference is not None:
            return self.reference(input_ids=input_ids, attention_mask=attention_mask).logits
        policy = self._policy()
        with policy.disable_adapter():
            return policy(input_ids=input_ids, attention_mask=attention_mask).logits

    # --- the engine's hooks -----------------------------------------------------------------------

    def _micro_batches(self, step: int) -> list[Batch]:
        accum, size = self.spec.train.grad_accum_steps, self.spec.train.batch_size
        batches = []
        for a in range(accum):
            index = step * accum + a
            prompts = [self.config.train_prompts[i] for i in self.sampler.batch(index, size)]
            batches.append(self._rollout(prompts, seed=(self.spec.train.seed * 100_003 + index) * 64 + self.rank))
        return batches

    def _loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        spec = self.spec
        logits, values = self._forward(model, batch["input_ids"], batch["attention_mask"])
        mask = batch["target_mask"]
        if values is not None:
            ppo = spec.ppo_settings
            terms = ppo_loss(
                logits, values[:, :-1], batch["input_ids"], mask, batch["old_logprobs"], batch["advantages"],
                batch["returns"], spec.clip_range, ppo.value_coef,
            )
            # k1 on the sampled tokens, as PPO's reward penalises it.
            maskf = mask.to(torch.float32)
            kl = float(((batch["old_logprobs"] - batch["reference_logprobs"]) * maskf).sum() / maskf.sum().clamp(min=1))
            loss = terms.loss
            stats = {"kl": kl, "entropy": terms.entropy, "value_loss": terms.value_loss, "clipped": terms.clipped}
        else:
            grpo = grpo_loss(
                logits, batch["input_ids"], mask, batch["advantages"], batch["reference_logprobs"], spec.kl_coef,
                batch.get("old_logprobs"), spec.clip_range,
            )
            loss, stats = grpo.loss, {"kl": grpo.kl, "entropy": grpo.entropy}
        for name, value in stats.items():
            self.step_stats.setdefault(name, []).append(value)
        return loss

    def _step_extras(self, tokens_per_second: float) -> dict[str, float]:
        extras = {name: sum(values) / len(values) for name, values in self.step_stats.items() if values}
        self.step_stats = {}
        return extras

    def _tokens(self, micro_batches: Sequence[Batch]) -> int:
        return sum(int(b["tokens"]) for b in micro_batches)

    def _evaluate(self) -> dict[str, float]:
        """Mean reward and length of one sampled completion per held-out prompt, and the perplexity on the
        data stage's test split, over every worker's share."""
        names = ["total", *source_names(self.spec)]
        prompts = [prompt for _, prompt in self.test_prompts]
        completions = [self._sample(list(p["input_ids"]), 1, _EVAL_SEED + index)[0] for index, p in self.test_prompts]
        scores = self._score(prompts, completions) if prompts else {name: [] for name in names}
        sums = [float(sum(scores[name])) for name in names] + [float(sum(len(c) for c in completions)), len(prompts)]
        *totals, length, count = all_reduce_sum(sums, self.device)
        evaluation = {("reward" if name == "total" else f"reward_{name}"): value / count
                      for name, value in zip(names, totals, strict=True)}
        evaluation["response_length"] = length / count
        if self.config.perplexity_shards:  # every rank, even one without batches: the mean is a collective
            _, evaluation["perplexity"] = evaluate_tokens(
                self._policy(), self.perplexity_batches, self.batcher, self.device, self.bf16, _EVAL_SEED
            )
        return evaluation

    def _final_extras(self) -> dict[str, Any]:
        return {"trainable_parameters": self.trainable_parameters, "total_parameters": self.total_parameters}

    def _save_outputs(self, directory: Path) -> None:
        """`model/`: a plain causal LM folder (LoRA merged) with the tokenizer and its chat template."""
        from kubeforge.formats.chat import chat_template_of

        model = self._policy()  # without PPO's value head
        if self.spec.method == "lora":
            model = model.merge_and_unload()  # the final checkpoint's state is saved: the last use of the model
        model.config.use_cache = True
        target = directory / MODEL_SUBDIR
        model.save_pretrained(str(target), safe_serialization=True)
        self.tokenizer.chat_template = chat_template_of(self.tokenizer)
        self.tokenizer.save_pretrained(str(target))
