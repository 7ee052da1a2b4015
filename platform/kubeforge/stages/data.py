"""The data stage: read, clean, deduplicate, filter, redact, tokenise and pack a corpus."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from kubeforge.filesystems import is_uri
from kubeforge.spec.data import DataSpec
from kubeforge.stages import Stage
from kubeforge.stages.results import StageResult


@dataclass(frozen=True)
class DataResult(StageResult):
    tokenizer_dir: str
    """The trained tokenizer's folder, relative to the stage folder."""
    shards: dict[str, list[str]]
    """Token shards (`(n, seq_len)` int32 .npy files, relative to the stage folder) per split."""
    seq_len: int
    vocab_size: int
    special_tokens: dict[str, int | None]
    """`pad_id`, `eos_id`, `bos_id`, `mask_id`... of the tokenizer."""
    num_sequences: dict[str, int]
    num_tokens: dict[str, int]
    num_documents: dict[str, int]
    dataset_hash: str
    """Content hash of the shards and tokenizer: the dataset's identity in MLflow and in model lineage."""
    documents: str
    """The kept documents with their split (parquet), relative to the stage folder."""
    removed_duplicates: str
    card: str
    funnel: list[dict[str, Any]]
    """Per step: documents and characters in and out, and what it removed."""


def _local_paths(spec: DataSpec) -> Iterator[tuple[str, str]]:
    for i, source in enumerate(spec.sources):
        for j, path in enumerate(getattr(source, "paths", ())):
            if not is_uri(path):
                yield f"sources[{i}].paths[{j}]", path


DATA: Stage[DataSpec, DataResult] = Stage(
    name="data",
    section="data",
    spec_type=DataSpec,
    result_type=DataResult,
    run="kubeforge.data.stage:run",
    required=True,
    local_paths=_local_paths,
    cache_extra="kubeforge.data.sources:source_fingerprint",
)
