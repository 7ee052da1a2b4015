"""The reward stage's pieces: the pairwise loss, which side is which, the held-out split, and bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from pydantic import ValidationError

from kubeforge.errors import StageError
from kubeforge.formats.chat import prompt_text
from kubeforge.reward.losses import pairwise_terms
from kubeforge.reward.pairs import encode_pair, load_pairs, read_pairs_jsonl, split_pairs
from kubeforge.reward.recipe import collate, rewards
from kubeforge.spec.reward import RewardSpec

pytestmark = pytest.mark.unit


def test_the_pairwise_loss_is_bradley_terry_on_chosen_minus_rejected() -> None:
    chosen = torch.tensor([2.0, 0.0, 0.5], requires_grad=True)
    rejected = torch.tensor([0.0, 1.0, 0.5])
    terms = pairwise_terms(chosen, rejected)
    expected = [math.log1p(math.exp(-2.0)), math.log1p(math.exp(1.0)), math.log(2.0)]
    assert terms.losses.tolist() == pytest.approx(expected)
    assert terms.margins.tolist() == [2.0, -1.0, 0.0]
    assert terms.correct.tolist() == [1.0, 0.0, 0.0]  # a tie is not a right ranking
    # Minimising the loss raises the chosen reward.
    terms.loss.backward()
    assert chosen.grad is not None and bool((chosen.grad < 0).all())


def test_chosen_sides_come_first_and_get_their_own_rewards() -> None:
    pairs = [{"chosen_input_ids": [5, 6, 7], "rejected_input_ids": [5, 6]},
             {"chosen_input_ids": [9], "rejected_input_ids": [8, 8, 8, 3]}]
    batch = collate(pairs, pad_id=0, device=torch.device("cpu"))
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0], [9, 0, 0, 0], [5, 6, 0, 0], [8, 8, 8, 3]]
    assert batch["attention_mask"].sum(dim=1).tolist() == [3, 1, 2, 4]
    assert batch["pairs"] == 2 and batch["tokens"] == 10

    def last_token(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
        # A stand-in reward model: the reward is the row's last real token.
        last = attention_mask.sum(dim=1) - 1
        return SimpleNamespace(logits=input_ids.gather(1, last[:, None]).float())

    chosen, rejected = rewards(last_token, batch)  # type: ignore[arg-type]
    assert chosen.tolist() == [7.0, 9.0] and rejected.tolist() == [6.0, 3.0]


def _pair(prompt: str, chosen: str, rejected: str = "no", pair_id: str | None = None) -> dict[str, str]:
    return {"id": pair_id or f"{prompt}/{chosen}", "prompt": prompt, "chosen": chosen, "rejected": rejected}


def test_the_split_keeps_every_prompt_on_one_side_and_drops_duplicates() -> None:
    records = [_pair(f"question {i}", f"answer {j}") for i in range(40) for j in range(2)]
    records.append(dict(records[0], id="copy"))  # same content, other id
    keys = [f"{r['prompt']}\x00{r['chosen']}" for r in records]
    train, test = split_pairs(records, keys, test_fraction=0.25)
    assert len(train) + len(test) == 80 and train and test
    train_prompts, test_prompts = {r["prompt"] for r in train}, {r["prompt"] for r in test}
    assert not train_prompts & test_prompts
    assert not {r["id"] for r in train} & {r["id"] for r in test}
    # The held-out share follows test_fraction (a hash per prompt, not a seed).
    assert 0.1 < len(test) / 80 < 0.45
    assert split_pairs(records, keys, 0.25) == (train, test)


def _spec(**pairs: Any) -> RewardSpec:
    return RewardSpec.model_validate({"pairs": pairs})


def test_pairs_from_a_jsonl_file_are_split_with_nothing_in_both(tmp_path: Path) -> None:
    lines = [json.dumps(_pair(f"q{i}", f"a{i}", f"b{i}")) for i in range(30)]
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    splits = load_pairs(_spec(path="pairs.jsonl", test_fraction=0.3), tmp_path, None)
    assert splits.kind == "preference" and splits.train and splits.test
    assert len(splits.train) + len(splits.test) == 30
    assert not {r["prompt"] for r in splits.train} & {r["prompt"] for r in splits.test}
    capped = load_pairs(_spec(path="pairs.jsonl", test_fraction=0.3, max_pairs=5), tmp_path, None)
    assert len(capped.train) == 5 and capped.test == splits.test


def test_a_reward_section_needs_a_preference_source() -> None:
    with pytest.raises(ValidationError, match="pairs"):
        RewardSpec.model_validate({})
    with pytest.raises(ValidationError, match="exactly one of builtin and path"):
        _spec()
    with pytest.raises(ValidationError, match="exactly one of builtin and path"):
        _spec(builtin="python-docstrings", path="pairs.jsonl")
    with pytest.raises(ValidationError, match="lora: only used with method lora"):
        RewardSpec.model_validate({"pairs": {"path": "p.jsonl"}, "method": "full", "lora": {"rank": 4}})


@pytest.mark.parametrize(("record", "message"), [
    ({"prompt": "p", "chosen": "a"}, r"pairs.jsonl:2: field 'rejected' is missing"),
    ({"chosen": "a", "rejected": "b"}, r"pairs.jsonl:2: field 'prompt' is missing"),
    ({"prompt": "p", "chosen": 1, "rejected": "b"}, r"pairs.jsonl:2: field 'chosen' must be a string"),
    ({"prompt": "p", "chosen": "a", "rejected": "a"}, r"pairs.jsonl:2: fields 'chosen' and 'rejected' are identical"),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "score": 1}, r"pairs.jsonl:2: unknown field 'score'"),
])
def test_a_bad_pair_fails_naming_the_file_line_and_field(tmp_path: Path, record: dict, message: str) -> None:
    (tmp_path / "pairs.jsonl").write_text(json.dumps(_pair("p", "a", "b")) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(StageError, match=r"spec\.reward\.pairs\.path: " + message) as caught:
        read_pairs_jsonl("pairs.jsonl", tmp_path)
    assert "\n" not in str(caught.value)


def test_a_missing_pairs_file_or_corpus_is_named(tmp_path: Path) -> None:
    with pytest.raises(StageError, match=r"spec\.reward\.pairs\.path: nowhere.jsonl does not exist"):
        load_pairs(_spec(path="nowhere.jsonl"), tmp_path, None)
    with pytest.raises(StageError, match=r"spec\.reward\.pairs\.builtin: .* add spec\.data"):
        load_pairs(_spec(builtin="python-docstrings"), tmp_path, None)


def test_a_base_model_folder_that_does_not_exist_is_named(tmp_path: Path) -> None:
    from kubeforge.reward.stage import resolve_base_model

    ctx: Any = SimpleNamespace(base_dir=tmp_path, input=lambda stage: None)
    spec = RewardSpec.model_validate({"pairs": {"path": "p.jsonl"}, "base_model": "models/missing"})
    with pytest.raises(StageError, match=r"spec\.reward\.base_model: models/missing does not exist"):
        resolve_base_model(spec, ctx)
    (tmp_path / "models" / "missing").mkdir(parents=True)
    with pytest.raises(StageError, match=r"spec\.reward\.base_model: .* \(no config\.json\)"):
        resolve_base_model(spec, ctx)
    no_base = RewardSpec.model_validate({"pairs": {"path": "p.jsonl"}})
    with pytest.raises(StageError, match=r"spec\.reward\.base_model is not set and there is no finetune or pretrain"):
        resolve_base_model(no_base, ctx)


def test_pairs_are_prompt_then_answer_without_eos_and_useless_cuts_are_dropped(chat_tokenizer: Any) -> None:
    record = _pair('Write the body.\n\ndef one():\n    """One."""\n', "    return 1\n", "    return\n")
    prompt_ids = chat_tokenizer(prompt_text(record, chat_tokenizer), add_special_tokens=False)["input_ids"]
    pair = encode_pair(record, chat_tokenizer, max_length=512)
    assert pair is not None
    chosen, rejected = pair["chosen_input_ids"], pair["rejected_input_ids"]
    assert chosen[: len(prompt_ids)] == prompt_ids == rejected[: len(prompt_ids)]
    assert chat_tokenizer.decode(chosen[len(prompt_ids):]) == record["chosen"]
    assert chosen[-1] != chat_tokenizer.eos_token_id
    # Cut where both answers still agree, the pair says nothing; a prompt that fills max_length neither.
    common = next(i for i, (a, b) in enumerate(zip(chosen, rejected, strict=False)) if a != b)
    assert encode_pair(record, chat_tokenizer, max_length=common) is None
    assert encode_pair(record, chat_tokenizer, max_length=common + 1) is not None
    assert encode_pair(record, chat_tokenizer, max_length=len(prompt_ids)) is None


def test_the_reward_model_is_registered_beside_the_pipelines_model_not_as_it() -> None:
    from kubeforge import stages
    from kubeforge.stages.reward import REWARD

    assert REWARD.model_role == "reward" and REWARD in stages.all_stages()
    assert REWARD not in stages.model_stages()  # never what quantize and promote take
    assert REWARD in stages.scored_stages() and "accuracy" in REWARD.metric_names()
