"""`run(spec, ctx)`: score the candidate model against its base and the registered champion.

* **candidate**: the rl stage's aligned model when the pipeline has one, else the fine-tuning stage's
  model (`kubeforge.engine.model.load_for_inference`), else the pretraining stage's model;
* **base**: the model the candidate started from (`base_model_dir` of the rl or fine-tuning result: for
  an aligned model, the fine-tuned one), with `spec.compare_base`;
* **champion**: the version behind the alias `champion` of the registered MLflow model
  `spec.champion` (the pipeline's name by default). Its `source` is downloaded with
  `mlflow.artifacts.download_artifacts` (a `runs:/`, `models:/`, `file://` or remote artifact URI, or a
  local folder) into the stage folder (and removed once scored). It must hold a Hugging Face model
  folder (`config.json` and weights; the tokenizer in the same folder or in another one under the
  source), which is what the pretraining and fine-tuning stages log. A quantized champion is scored
  through the version it was quantized from (its `kubeforge.parent_version` tag), because the
  candidate here is unquantized too. No registered model or no alias means no champion: logged,
  not an error.

Every model is loaded, scored and released in turn (one in memory at a time):

* perplexity over the first `perplexity_batches` batches of the data stage's `test` shards
  (`validation` when the test split is empty), token-weighted with padding ignored, by the same
  `Batcher` and `evaluate_tokens` the pretraining stage reports its validation perplexity with. Only for a
  model whose tokenizer maps every token of the data stage's tokenizer to the same id; another
  tokenizer makes the shards meaningless to it, so it is compared on generation only;
* generation metrics on the first `max_examples` records of the fine-tuning task's test split, with
  greedy decoding (see `kubeforge.evaluate.generation`), plus parse and doctest pass rates for the
  built-in `python-docstrings` task (see `kubeforge.sandbox`). Without a fine-tuning stage
  there is no task and so perplexity only;
* with `spec.harness`, lm-evaluation-harness tasks on local files (see `kubeforge.evaluate.harness`), run
  on the model already loaded, reported as `harness_<task>_<metric>` next to the metrics above.
"""

from __future__ import annotations

import gc
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kubeforge.context import StageContext, StageOutput
from kubeforge.errors import StageError
from kubeforge.evaluate.compare import METRICS, comparison_rows, write_plots, write_table
from kubeforge.evaluate.generation import generate_texts, parse_rate, text_metrics
from kubeforge.evaluate.harness import Prepared, loaded_model, prepare, run_tasks
from kubeforge.evaluate.sources import ModelSource, champion_source, finetune_sources, hf_loader, rl_sources
from kubeforge.formats.functions import body_parses, function_header
from kubeforge.sandbox import DoctestCase, Isolation, isolation, run_doctests, unconfined_refusal
from kubeforge.spec.evaluate import EvaluateSpec
from kubeforge.spec.pretrain import PretrainSpec
from kubeforge.stages.data import DATA, DataResult
from kubeforge.stages.evaluate import EVALUATE, EvaluateResult
from kubeforge.stages.finetune import FINETUNE, FinetuneResult
from kubeforge.stages.pretrain import PRETRAIN
from kubeforge.stages.promote import PROMOTE
from kubeforge.stages.rl import RL

STAGE = EVALUATE.name
_EVAL_SEED = 1234  # MLM masks of the perplexity batches: the same targets for every model


@dataclass
class Task:
    kind: str
    """instruction | preference"""
    name: str
    records: list[dict[str, Any]]

    @property
    def is_code(self) -> bool:
        """The built-in python-docstrings task: the answers are function bodies that can be run."""
        return bool(self.records) and all("entry_point" in r for r in self.records)


def _check_confinement(spec: EvaluateSpec, confinement: Isolation, log: Callable[[str], None]) -> None:
    log(f"{STAGE}: doctests run in a subprocess; {confinement}")
    refusal = unconfined_refusal(confinement, spec.allow_unconfined_doctests, "spec.evaluate.allow_unconfined_doctests")
    if refusal is not None:
        raise StageError(STAGE, refusal)


def _task(ctx: StageContext, finetune: StageOutput[FinetuneResult] | None, spec: EvaluateSpec) -> Task | None:
    if finetune is None:
        return None
    from kubeforge.formats.splits import read_split

    result = finetune.result
    task_dir = finetune.directory / result.task_dir
    records = read_split(task_dir, "test")
    section = FINETUNE.section_of(ctx.pipeline.spec)
    if not records:
        fraction = f" (now {section.task.test_fraction})" if section is not None else ""
        raise StageError(
            STAGE,
            f"the fine-tuning task's test split ({task_dir / 'test.jsonl'}) is empty; raise "
            f"spec.finetune.task.test_fraction{fraction} so that some examples are held out",
        )
    kind = "preference" if result.objective == "dpo" else "instruction"
    name = "unknown"
    if section is not None:
        name = section.task.builtin or section.task.path or name
    return Task(kind, str(name), records[: spec.max_examples])


# ---------------------------------------------------------------------------------------------
# scoring


def _reference(record: dict[str, Any]) -> str:
    return str(record["chosen"] if "chosen" in record else record["output"])


def _shares_vocabulary(model: Any, tokenizer: Any, data_vocab: dict[str, int]) -> bool:
    """Every token of the data stage's tokenizer has the same id here, and the model has room for it."""
    vocab = tokenizer.get_vocab()
    if any(vocab.get(token) != index for token, index in data_vocab.items()):
        return False
    return int(model.get_input_embeddings().num_embeddings) >= max(data_vocab.values()) + 1


def _perplexity_batches(
    data: StageOutput[DataResult], spec: EvaluateSpec, log: Callable[[str], None]
) -> tuple[list[Any], str]:
    from kubeforge.engine.batches import TokenShards, validation_batches

    shards_by_split = data.result.shards
    for split in ("test", "validation"):
        files = [data.directory / p for p in shards_by_split.get(split, [])]
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise StageError(STAGE, f"the data stage's {split} shard {missing[0]} does not exist; rerun the data stage")
        shards = TokenShards(files)
        if len(shards):
            if split != "test":
                log(f"{STAGE}: the data stage's test split is empty; perplexity is measured on '{split}'")
            return validation_batches(shards, 0, 1, spec.batch_size, spec.perplexity_batches), split
    log(f"{STAGE}: the data stage has no test or validation sequences; no perplexity")
    return [], ""


@dataclass
class Scored:
    metrics: dict[str, float | None]
    prompts: list[str]
    generations: list[str]
    parses: list[bool]
    doctest_passed: list[bool | None]


def _score(
    source: ModelSource,
    spec: EvaluateSpec,
    ctx: StageContext,
    *,
    device: str,
    objective: str,
    batches: list[Any],
    data: StageOutput[DataResult],
    data_vocab: dict[str, int],
    task: Task | None,
    reference_passes: list[bool | None],
    harness: Prepared | None = None,
) -> Scored:
    import torch

    from kubeforge.engine.batches import Batcher
    from kubeforge.engine.steps import evaluate_tokens

    log = ctx.reporter.log
    model, tokenizer = source.load()
    model.to(device)
    model.eval()
    metrics: dict[str, float | None] = dict.fromkeys(METRICS)
    metrics["loss"] = None
    scored = Scored(metrics, [], [], [], [])
    examples = len(task.records) if task is not None and objective == "causal" else 0
    with ctx.reporter.task(f"{STAGE}: {source.name}", total=len(batches) + examples) as bar:
        if batches and _shares_vocabulary(model, tokenizer, data_vocab):
            pretrain = PRETRAIN.section_of(ctx.pipeline.spec)
            # The pretraining spec carries the MLM masking settings; without one the defaults serve.
            if pretrain is not None and pretrain.objective == objective:
                batcher_spec = pretrain
            else:
                batcher_spec = PretrainSpec.model_validate({"objective": objective})
            batcher = Batcher(batcher_spec, data.result.vocab_size, dict(data.result.special_tokens))
            loss, perplexity = evaluate_tokens(model, batches, batcher, torch.device(device), False, _EVAL_SEED)
            model.eval()  # `evaluate_tokens` leaves the model in training mode for the training loop
            metrics["loss"], metrics["perplexity"] = loss, perplexity
        elif batches:
            log(f"{STAGE}: {source.name} ({source.location}) has another tokenizer than the data stage; "
                "it is compared on generation only")
        bar.update(len(batches))
        if examples and task is not None:
            from kubeforge.formats.chat import prompt_text

            scored.prompts = [prompt_text(record, tokenizer) for record in task.records]
            max_new, max_prompt = _generation_budget(model, spec.max_new_tokens, source.name, log)
            done = [len(batches)]

            def advance(count: int) -> None:
                done[0] += count
                bar.update(done[0])

            scored.generations = generate_texts(
                model, tokenizer, scored.prompts, max_new_tokens=max_new, batch_size=spec.batch_size, device=device,
                max_prompt_tokens=max_prompt, on_batch=advance,
            )
            metrics.update(text_metrics(scored.generations, [_reference(r) for r in task.records]))
            if task.is_code:
                headers = [function_header(r) for r in task.records]
                metrics["parse_rate"] = parse_rate(headers, scored.generations)
                scored.parses = [body_parses(h, g) for h, g in zip(headers, scored.generations, strict=True)]
                scored.doctest_passed, metrics["doctest_pass_rate"] = _doctest_pass(
                    task, scored.generations, reference_passes, spec
                )
    if harness is not None:
        log(f"{STAGE}: {source.name}: lm-evaluation-harness tasks {', '.join(t.name for t in harness.tasks)}")
        metrics.update(run_tasks(loaded_model(model, tokenizer, spec.batch_size), harness, log=log))
    del model
    gc.collect()
    return scored


def _generation_budget(
    model: Any, max_new_tokens: int, name: str, log: Callable[[str], None]
) -> tuple[int, int | None]:
    """(new tokens, prompt tokens) that fit the model's context: prompt plus answer must fit it."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if not limit:
        return max_new_tokens, None
    limit = int(limit)
    if max_new_tokens > limit // 2:
        log(f"{STAGE}: {name} has a context of {limit} tokens; generating at most {limit // 2} new tokens "
            f"instead of spec.evaluate.max_new_tokens={max_new_tokens}")
        max_new_tokens = limit // 2
    return max_new_tokens, limit - max_new_tokens


def _reference_doctests(task: Task | None, spec: EvaluateSpec) -> list[bool | None]:
    """Per record: does its reference function pass its own doctests (None: it has none to run)?

    Only those that do count towards `doctest_pass_rate`: a reference that fails in this sandbox (it
    needs files, the network, a method's class context) says nothing about the generated one.
    """
    if task is None or not task.is_code:
        return []
    eligible = [i for i, r in enumerate(task.records) if r.get("has_doctests")]
    cases = [DoctestCase.of_record(r, function_header(r) + _reference(r)) for r in (task.records[i] for i in eligible)]
    outcomes = run_doctests(cases, spec.doctest_timeout_s)
    passes: list[bool | None] = [None] * len(task.records)
    for index, outcome in zip(eligible, outcomes, strict=True):
        passes[index] = outcome.passed
    return passes


def _doctest_pass(
    task: Task, generations: list[str], reference_passes: list[bool | None], spec: EvaluateSpec
) -> tuple[list[bool | None], float | None]:
    eligible = [i for i, passed in enumerate(reference_passes) if passed]
    results: list[bool | None] = [None] * len(task.records)
    if not eligible:
        return results, None
    cases = [DoctestCase.of_record(r, function_header(r) + generations[i]) for i, r in
             ((i, task.records[i]) for i in eligible)]
    outcomes = run_doctests(cases, spec.doctest_timeout_s)
    for index, outcome in zip(eligible, outcomes, strict=True):
        results[index] = outcome.passed
    return results, sum(o.passed for o in outcomes) / len(outcomes)


# ---------------------------------------------------------------------------------------------
# the stage


def _data_vocabulary(data: StageOutput[DataResult]) -> dict[str, int]:
    from transformers import AutoTokenizer

    tokenizer_dir = data.directory / data.result.tokenizer_dir
    if not tokenizer_dir.is_dir():
        raise StageError(STAGE, f"the data stage's tokenizer {tokenizer_dir} does not exist; rerun the data stage")
    return dict(AutoTokenizer.from_pretrained(str(tokenizer_dir)).get_vocab())


def _device(spec: EvaluateSpec) -> str:
    if not spec.use_gpu:
        return "cpu"
    import torch

    if not torch.cuda.is_available():
        raise StageError(STAGE, "spec.evaluate.use_gpu: no CUDA device is visible; set use_gpu: false")
    return "cuda"


def run(spec: EvaluateSpec, ctx: StageContext) -> EvaluateResult:
    from kubeforge import metrics as prometheus

    data = ctx.require(DATA, "needs the output of the data stage (spec.data)")
    finetune = ctx.input(FINETUNE)
    pretrain = ctx.input(PRETRAIN)
    device = _device(spec)

    rl = ctx.input(RL)
    sources: list[ModelSource]
    if rl is not None:
        objective = "causal"
        sources = rl_sources(spec, rl)
    elif finetune is not None:
        objective = "causal"
        sources = finetune_sources(spec, finetune)
    elif pretrain is not None:
        objective = pretrain.result.objective
        model_dir = pretrain.directory / pretrain.result.model_dir
        if not model_dir.is_dir():
            raise StageError(STAGE, f"the pretrain stage's model folder {model_dir} does not exist; rerun pretrain")
        sources = [ModelSource("candidate", str(model_dir), hf_loader(model_dir, objective))]
    else:
        raise StageError(STAGE, "needs a model to score: the output of the pretrain or finetune stage")
    champion = champion_source(spec, ctx, objective)
    champion_version = champion_scored = None
    if champion is not None:
        sources.append(champion[0])
        champion_version, champion_scored = champion[1], champion[2]

    task = _task(ctx, finetune, spec)
    if task is not None and objective != "causal":
        ctx.reporter.log(f"{STAGE}: a {objective} model does not generate; generation metrics are skipped")
    batches, split = _perplexity_batches(data, spec, ctx.reporter.log)
    data_vocab = _data_vocabulary(data)
    if task is not None and task.is_code:
        _check_confinement(spec, isolation(), ctx.reporter.log)
    reference_passes = _reference_doctests(task, spec)
    harness: Prepared | None = None
    if spec.harness is not None:
        if objective != "causal":
            raise StageError(STAGE, f"spec.evaluate.harness: lm-evaluation-harness scores causal language models; "
                                    f"this pipeline's model is a {objective} one")
        promotion = PROMOTE.section_of(ctx.pipeline.spec)
        harness = prepare(spec.harness, ctx.out_dir / "harness", ctx.base_dir,
                          list(promotion.gates) if promotion is not None else [])

    ctx.tracker.log_params({
        **spec.model_dump(mode="json"),
        "task": task.name if task else None,
        "perplexity_split": split or None,
        "models": {s.name: s.location for s in sources},
    })
    scores: dict[str, dict[str, float | None]] = {}
    candidate: Scored | None = None
    for source in sources:
        scored = _score(
            source, spec, ctx, device=device, objective=objective, batches=batches, data=data,
            data_vocab=data_vocab, task=task, reference_passes=reference_passes, harness=harness,
        )
        scores[source.name] = scored.metrics
        if source.name == "candidate":
            candidate = scored
        if source.name == "champion":
            # Only scored here: the stage's output need not carry a copy of another model.
            shutil.rmtree(ctx.out_dir / "champion", ignore_errors=True)
        shown = ", ".join(f"{k}={v:.4g}" for k, v in scored.metrics.items() if v is not None)
        ctx.reporter.log(f"{STAGE}: {source.name}: {shown or 'no metrics'}")

    out = ctx.out_dir
    rows = comparison_rows(scores)
    write_table(rows, out / "comparison.csv", out / "comparison.md")
    plots = write_plots(scores, out / "plots")
    samples_path = out / "samples.jsonl"
    with samples_path.open("w", encoding="utf-8") as handle:
        if task is not None and candidate is not None and candidate.generations:
            for i, record in enumerate(task.records):
                sample: dict[str, Any] = {
                    "id": record.get("id"), "prompt": candidate.prompts[i], "reference": _reference(record),
                    "generation": candidate.generations[i],
                    "exact_match": candidate.generations[i].strip() == _reference(record).strip(),
                }
                if task.is_code:
                    sample["parses"] = candidate.parses[i]
                    sample["reference_passes_doctests"] = reference_passes[i]
                    sample["doctests_pass"] = candidate.doctest_passed[i]
                handle.write(json.dumps(sample) + "\n")

    for path in (out / "comparison.csv", out / "comparison.md", samples_path):
        ctx.tracker.log_artifact(path)
    if plots:
        ctx.tracker.log_artifact(out / "plots", "plots")
    logged: dict[str, float] = {}
    for model, values in scores.items():
        for metric, value in values.items():
            if value is not None:
                logged[f"eval.{model}.{metric}"] = value
                if model == "candidate":
                    logged[f"eval.{metric}"] = value
                prometheus.EVAL_METRIC.labels(ctx.pipeline_name, model, metric).set(value)
    ctx.tracker.log_metrics(logged)
    ctx.tracker.set_tags({
        "kubeforge.evaluate.champion_version": champion_version or "none",
        "kubeforge.evaluate.task": task.name if task else "none",
    })

    result = EvaluateResult(
        candidate=scores["candidate"],
        base=scores.get("base"),
        champion=scores.get("champion"),
        champion_version=champion_version,
        champion_scored_version=champion_scored,
        models={s.name: s.location for s in sources},
        comparison="comparison.csv",
        comparison_md="comparison.md",
        plots=[str(p.relative_to(out)) for p in plots],
        samples="samples.jsonl",
        task={"kind": task.kind, "name": task.name} if task else None,
        num_examples=len(task.records) if task else 0,
        perplexity_split=split or None,
        doctest_isolation=str(isolation()) if task is not None and task.is_code else None,
        harness=harness.summary() if harness is not None else None,
    )
    ctx.tracker.log_dict(result.to_json(), "evaluation.json")
    return result
