"""The model a fine-tuning run trains, per `spec.finetune.method`, and the models it learns against.

* `full`: every parameter of the base model trains.
* `lora`: low-rank adapters on `lora.target_modules` (peft `LoraConfig`); the base stays frozen.
* `qlora`: the same adapters over a 4-bit (bitsandbytes) copy of the frozen base; CUDA only.
* `prefix`: trained key/value prefixes in every layer (peft `PrefixTuningConfig`).

Objective `distill` trains a student (new, from `distill.student`, or loaded from
`distill.student_path`) against the base model as a frozen teacher. Objective `dpo` needs a reference
model: for the PEFT methods it is the same model with its adapters disabled, for `full` a frozen
copy of the base (built here).

`preflight` finds the configuration errors a user can make (target modules the model lacks, a
student with another tokenizer, qlora without CUDA) without loading any weights, so that the stage
reports them before a worker starts.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubeforge.errors import StageError
from kubeforge.spec.finetune import FinetuneSpec
from kubeforge.stages.pretrain import PretrainResult

if TYPE_CHECKING:
    import torch

    from kubeforge.context import StageOutput

STAGE = "finetune"


@dataclass
class Models:
    """What the training loop needs from the models; only `policy` has trainable parameters."""

    policy: torch.nn.Module
    """The model the optimizer trains: the base (full), a PeftModel, or the distillation student."""
    teacher: torch.nn.Module | None
    """Objective distill: the base model, frozen, in eval mode."""
    reference: torch.nn.Module | None
    """Objective dpo with method full: a frozen copy of the base (PEFT methods disable their adapters instead)."""
    trainable_parameters: int
    total_parameters: int

    @property
    def is_peft(self) -> bool:
        return hasattr(self.policy, "peft_config")


def resolve_base_model(spec: FinetuneSpec, base_dir: Path, pretrain: StageOutput[PretrainResult] | None) -> Path:
    """`spec.base_model` relative to the manifest, else the pretrain stage's model folder."""
    if spec.base_model is not None:
        path = (base_dir / spec.base_model).resolve()
        if not (path / "config.json").is_file():
            raise StageError(
                STAGE, f"spec.finetune.base_model: {path} is not a Hugging Face model folder (no config.json)"
            )
        return path
    if pretrain is None:
        raise StageError(
            STAGE, "spec.finetune.base_model is not set and there is no pretrain stage to take the model from; "
            "set base_model to a Hugging Face model folder or add spec.pretrain"
        )
    return (pretrain.directory / pretrain.result.model_dir).resolve()


def resolve_student_path(spec: FinetuneSpec, base_dir: Path) -> Path | None:
    if spec.distill is None or spec.distill.student_path is None:
        return None
    path = (base_dir / spec.distill.student_path).resolve()
    if not (path / "config.json").is_file():
        raise StageError(
            STAGE, f"spec.finetune.distill.student_path: {path} is not a Hugging Face model folder (no config.json)"
        )
    return path


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """The distinct last names of the model's linear layers: what `target_modules` may name."""
    import torch

    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)})


def check_target_modules(model: torch.nn.Module, target_modules: tuple[str, ...]) -> None:
    available = linear_module_names(model)
    missing = [m for m in target_modules if m not in available]
    if missing:
        raise StageError(
            STAGE,
            f"spec.finetune.lora.target_modules: {', '.join(missing)} "
            f"{'is not a linear layer' if len(missing) == 1 else 'are not linear layers'} of the base model; "
            f"it has {', '.join(available)}",
        )


def check_qlora_device() -> None:
    """4-bit training needs bitsandbytes' CUDA kernels; checked before bitsandbytes is imported (on a
    CPU machine it is usually not installed, and importing it there only warns)."""
    import torch

    if not torch.cuda.is_available():
        raise qlora_without_cuda("this machine")


def qlora_without_cuda(where: str) -> StageError:
    return StageError(
        STAGE,
        "spec.finetune.method: 'qlora' quantizes the base model to 4 bits with bitsandbytes, which needs a CUDA "
        f"GPU and {where} has none; use method 'lora' (the same adapters over the unquantized model)",
    )


def _meta_model(model_dir: Path) -> torch.nn.Module:
    """The model's module tree without weights (no memory, no loading time)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(model_dir))
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def check_student_tokenizer(teacher_dir: Path, student_dir: Path) -> None:
    from transformers import AutoTokenizer

    teacher = AutoTokenizer.from_pretrained(str(teacher_dir)).get_vocab()
    student = AutoTokenizer.from_pretrained(str(student_dir)).get_vocab()
    if teacher != student:
        only_teacher = len(teacher.keys() - student.keys())
        only_student = len(student.keys() - teacher.keys())
        raise StageError(
            STAGE,
            f"spec.finetune.distill.student_path: the student's tokenizer ({len(student)} tokens) differs from the "
            f"teacher's ({len(teacher)} tokens; {only_teacher} only in the teacher's, {only_student} only in the "
            "student's, the rest may map to other ids); distillation compares logits token by token, so both must "
            "use the same tokenizer: use distill.student to train a new student on the teacher's tokenizer",
        )


def preflight(spec: FinetuneSpec, base_model: Path, student_path: Path | None) -> None:
    """The configuration errors that would otherwise surface inside a worker, found on the driver."""
    if spec.method in ("lora", "qlora"):
        check_target_modules(_meta_model(base_model), spec.lora_settings.target_modules)
    if student_path is not None:
        check_student_tokenizer(base_model, student_path)
    if spec.qat is not None and (spec.distill is None or student_path is not None):
        # A new distillation student exists only in the workers, where `qat.prepare` checks it.
        from kubeforge.finetune.qat import check_convertible

        check_convertible(spec.qat, _meta_model(student_path or base_model))


def load_base(spec: FinetuneSpec, base_model: Path, device: torch.device) -> torch.nn.Module:
    """The base model on `device`; for qlora quantized to 4 bits while loading."""
    from transformers import AutoModelForCausalLM

    if spec.method != "qlora":
        model: Any = AutoModelForCausalLM.from_pretrained(str(base_model))
        return model.to(device)
    check_qlora_device()
    import torch
    from transformers import BitsAndBytesConfig

    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise StageError(
            STAGE,
            "spec.finetune.method: 'qlora' needs bitsandbytes; install the gpu extra (pip install 'kubeforge[gpu]')",
        ) from exc
    settings = spec.qlora_settings
    compute_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=settings.quant_type,
        bnb_4bit_use_double_quant=settings.double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
    )
    return AutoModelForCausalLM.from_pretrained(
        str(base_model), quantization_config=quantization, dtype=compute_dtype, device_map={"": device}
    )


def apply_method(spec: FinetuneSpec, model: Any) -> torch.nn.Module:
    """Wrap the base model per method; afterwards exactly the parameters to train require grad."""
    if spec.method == "full":
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        return model
    from peft import LoraConfig, PrefixTuningConfig, TaskType, get_peft_model

    if spec.method == "prefix":
        prefix = spec.prefix_settings
        config: Any = PrefixTuningConfig(
            task_type=TaskType.CAUSAL_LM,
            num_virtual_tokens=prefix.num_virtual_tokens,
            prefix_projection=prefix.projection,
            encoder_hidden_size=model.config.hidden_size,
        )
        return get_peft_model(model, config)
    lora = spec.lora_settings
    check_target_modules(model, lora.target_modules)
    if spec.method == "qlora":
        from peft import prepare_model_for_kbit_training

        # Casts the remaining full-precision layers (norms, lm head) to fp32 for stable training and
        # enables gradient checkpointing, which is what makes 4-bit training fit in the first place.
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    config = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=lora.rank,
        lora_alpha=lora.alpha,  # type: ignore[arg-type]  # peft scales by alpha / r: a float works
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
    )
    return get_peft_model(model, config)


def build_student(spec: FinetuneSpec, teacher: torch.nn.Module, student_path: Path | None) -> torch.nn.Module:
    """A new student on the teacher's vocabulary (from `distill.student`), or the one at `student_path`."""
    from transformers import AutoModelForCausalLM

    from kubeforge.engine.model import build_model
    from kubeforge.spec.pretrain import PretrainSpec, TrainSettings

    assert spec.distill is not None  # the spec requires it with objective distill
    teacher_config: Any = teacher.config
    if student_path is not None:
        student = AutoModelForCausalLM.from_pretrained(str(student_path))
        if student.config.vocab_size != teacher_config.vocab_size:
            raise StageError(
                STAGE,
                f"spec.finetune.distill.student_path: the student's output layer has {student.config.vocab_size} "
                f"tokens and the teacher's {teacher_config.vocab_size}; their logits cannot be compared",
            )
        return student
    assert spec.distill.student is not None
    arch = PretrainSpec(objective="causal", model=spec.distill.student, train=TrainSettings(seed=spec.train.seed))
    eos = teacher_config.eos_token_id
    special = {"pad_id": teacher_config.pad_token_id, "eos_id": eos[0] if isinstance(eos, list) else eos}
    return build_model(arch, teacher_config.vocab_size, special)


def count_trainable(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters. peft's own count knows that a 4-bit parameter packs two weights."""
    counter = getattr(model, "get_nb_trainable_parameters", None)
    if counter is not None:
        trainable, total = counter()
        return int(trainable), int(total)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def build_models(
    spec: FinetuneSpec, base_model: Path, student_path: Path | None, device: torch.device
) -> Models:
    """Load the base model and build the policy (and teacher or reference) for the spec, on `device`."""
    base = load_base(spec, base_model, device)
    teacher = reference = None
    if spec.objective == "distill":
        teacher = freeze(base)
        policy = build_student(spec, teacher, student_path).to(device)
    else:
        if spec.objective == "dpo" and spec.method == "full":
            reference = freeze(copy.deepcopy(base))
        policy = apply_method(spec, base)
    if spec.qat is not None:
        from kubeforge.finetune.qat import prepare

        policy = prepare(policy, spec.qat)
    policy.train()
    trainable, total = count_trainable(policy)
    return Models(policy, teacher, reference, trainable, total)


def save_merged(
    spec: FinetuneSpec, policy: torch.nn.Module, base_model: Path, adapter_dir: Path, target: Path
) -> None:
    """A plain model folder with the adapters folded into the weights (lora and qlora only).

    The merge runs on a fresh CPU copy of the base loaded in its own precision, so the output has
    exactly the base's config. For qlora the adapters were trained against the 4-bit weights: those
    are dequantized and copied into the copy first, so the merged model computes what the trained
    model computed (up to the dequantization's rounding) rather than pairing the adapters with
    weights they never saw.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(base_model))
    if spec.method == "qlora":
        _copy_dequantized(policy, base)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.config.use_cache = True
    merged.save_pretrained(str(target), safe_serialization=True)


def _copy_dequantized(quantized_peft: torch.nn.Module, base: torch.nn.Module) -> None:
    import bitsandbytes as bnb
    import torch
    from peft.utils.integrations import dequantize_bnb_weight

    weights = {}
    for name, module in quantized_peft.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            # peft names a wrapped layer <path>.base_layer under base_model.model.
            plain = name.removeprefix("base_model.model.").removesuffix(".base_layer")
            weights[plain + ".weight"] = dequantize_bnb_weight(module.weight, state=module.weight.quant_state)
    state = base.state_dict()
    with torch.no_grad():
        for key, value in weights.items():
            state[key].copy_(value.to(device=state[key].device, dtype=state[key].dtype))
