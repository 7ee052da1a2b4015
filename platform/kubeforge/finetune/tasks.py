"""The fine-tuning task: examples from a JSONL file or built from the corpus, split and tokenised.

The record kinds and the files the splits are written to are in `kubeforge.formats.splits`, the chat
template the prompts are rendered with in `kubeforge.formats.chat`.

Splits: identical examples are dropped first, then each example goes to `test` when a hash of its
normalised *prompt* falls below `test_fraction`. The hash is not seeded, so an example's split never
changes between runs or seeds, and two examples with the same prompt (a property getter and setter with
the same docstring, two answers to one question) always land on the same side: nothing the model is
tested on was a training prompt.

Tokenisation: the prompt is the chat template rendered with the generation prompt, tokenised on its own,
and the response is tokenised on its own and followed by eos. That is exactly what the model sees when
it is served: the server tokenises the rendered prompt and the model continues it.
"""

from __future__ import annotations

import ast
import hashlib
import io
import itertools
import json
import keyword
import random
import tokenize
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from kubeforge.errors import StageError
from kubeforge.formats.chat import prompt_text, user_message
from kubeforge.formats.splits import TaskSplits

if TYPE_CHECKING:
    import numpy as np

    from kubeforge.context import StageOutput
    from kubeforge.spec.finetune import FinetuneSpec

STAGE = "finetune"

IGNORE_INDEX = -100
"""Label of tokens that carry no loss (the prompt): PyTorch's cross-entropy default `ignore_index`."""

INSTRUCTION = "Write the body of this Python function."
MAX_FUNCTION_LINES = 60
"""Longer functions are left out of the built-in task: they rarely fit `max_length` and would be cut."""

_FIELDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # kind: (required, optional)
    "instruction": (("instruction", "output"), ("id", "input")),
    "preference": (("prompt", "chosen", "rejected"), ("id",)),
}


# ---------------------------------------------------------------------------------------------
# loading


def load_task(spec: FinetuneSpec, base_dir: Path, data: StageOutput) -> TaskSplits:
    """Read or build the task's examples and split them into train and test."""
    kind: Literal["instruction", "preference"] = "preference" if spec.objective == "dpo" else "instruction"
    task = spec.task
    if task.path is not None:
        records = _read_jsonl_task(task.path, base_dir, kind)
        keys = [(_normalise(_content(r, kind)), _normalise(user_message(r))) for r in records]
    else:
        functions = _corpus_functions(data)
        if kind == "instruction":
            records = [f.instruction_record() for f in functions]
        else:
            records = [f.preference_record(task.seed) for f in functions]
        keys = [(_normalise(f.source), _normalise(user_message(r))) for f, r in zip(functions, records, strict=True)]
    unique: list[dict[str, Any]] = []
    split_keys: list[str] = []
    seen: set[str] = set()
    for record, (content_key, prompt_key) in zip(records, keys, strict=True):
        if content_key in seen:
            continue
        seen.add(content_key)
        unique.append(record)
        split_keys.append(prompt_key)
    train, test = _split(unique, split_keys, task.test_fraction)
    if not train or not test:
        side = "training" if not train else "test"
        raise StageError(
            STAGE,
            f"the task has {len(unique)} distinct example(s), which leaves the {side} split empty; "
            f"add examples to spec.finetune.task or change spec.finetune.task.test_fraction",
        )
    capped = 0
    if task.max_examples is not None and len(train) > task.max_examples:
        keep = sorted(random.Random(task.seed).sample(range(len(train)), task.max_examples))
        capped = len(train) - len(keep)
        train = [train[i] for i in keep]
    stats = {
        "examples": len(records), "duplicates": len(records) - len(unique), "capped": capped,
        "train": len(train), "test": len(test),
    }
    return TaskSplits(kind, train, test, stats)


def _split_position(key: str) -> float:
    """A uniform number in [0, 1) fixed by the example's normalised prompt (not seeded, on purpose)."""
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _split(
    records: list[dict[str, Any]], keys: list[str], test_fraction: float
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Train and test by hash position. A tiny task whose hashes leave one side empty gets the example
    (and every example sharing its prompt) whose position lies closest to the other side, as the data
    stage does for its splits: a handful of hand-written examples still yields a test set."""
    positions = [_split_position(k) for k in keys]
    is_test = [u < test_fraction for u in positions]
    distinct = sorted(set(zip(positions, keys, strict=True)))
    if len(distinct) >= 2 and not any(is_test):
        moved = distinct[0][0]
        is_test = [u == moved for u in positions]
    elif len(distinct) >= 2 and all(is_test):
        moved = distinct[-1][0]
        is_test = [u != moved for u in positions]
    train = [r for r, t in zip(records, is_test, strict=True) if not t]
    test = [r for r, t in zip(records, is_test, strict=True) if t]
    return train, test


def _normalise(text: str) -> str:
    """Text with trailing whitespace and blank lines gone: formatting-only copies count as duplicates."""
    return "\n".join(line.rstrip() for line in text.split("\n") if line.strip())


def _content(record: dict[str, Any], kind: str) -> str:
    fields = ("instruction", "input", "output") if kind == "instruction" else ("prompt", "chosen", "rejected")
    return "\x00".join(str(record.get(name, "")) for name in fields)


def _read_jsonl_task(path_text: str, base_dir: Path, kind: str) -> list[dict[str, Any]]:
    """Validated records of a user's JSONL task; every error names the file (as written) and the line."""
    path = Path(path_text)
    if not path.is_absolute():
        path = base_dir / path
    if not path.is_file():
        raise StageError(STAGE, f"spec.finetune.task.path: {path_text} does not exist (looked for {path})")
    required, optional = _FIELDS[kind]
    allowed = required + optional
    records: list[dict[str, Any]] = []
    ids: dict[str, int] = {}
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            where = f"{path_text}:{number}"
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                raise StageError(STAGE, f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(value, dict):
                raise StageError(STAGE, f"{where}: a record must be a JSON object, got {type(value).__name__}")
            for name in value:
                if name not in allowed:
                    raise StageError(
                        STAGE, f"{where}: unknown field '{name}' (a {kind} record has {', '.join(allowed)})"
                    )
            for name in allowed:
                if name not in value:
                    if name in required:
                        raise StageError(STAGE, f"{where}: field '{name}' is missing")
                    continue
                if not isinstance(value[name], str):
                    raise StageError(
                        STAGE, f"{where}: field '{name}' must be a string, got {type(value[name]).__name__}"
                    )
            for name in required:
                if not value[name].strip():
                    raise StageError(STAGE, f"{where}: '{name}' is empty")
            if kind == "preference" and value["chosen"] == value["rejected"]:
                raise StageError(STAGE, f"{where}: 'chosen' and 'rejected' are identical")
            record_id = value.get("id", f"{path.name}:{number}")
            if record_id in ids:
                raise StageError(STAGE, f"{where}: id '{record_id}' already used on line {ids[record_id]}")
            ids[record_id] = number
            record = {"id": record_id, **{name: value[name] for name in required}}
            if kind == "instruction":
                record["input"] = value.get("input", "")
                record = {name: record[name] for name in ("id", "instruction", "input", "output")}
            records.append(record)
    if not records:
        raise StageError(STAGE, f"{path_text}: the file holds no records")
    return records


# ---------------------------------------------------------------------------------------------
# the built-in task: functions of the corpus


@dataclass(frozen=True)
class _Function:
    id: str
    qualname: str
    module: str | None
    header: str
    """Decorators, `def` line(s) and docstring, dedented to column 0, ending with a newline."""
    body: str
    """The rest of the function; `header + body` is the whole function and parses."""
    has_doctests: bool

    @property
    def source(self) -> str:
        return self.header + self.body

    def _metadata(self) -> dict[str, Any]:
        return {
            "entry_point": self.qualname.rsplit(".", 1)[-1], "qualname": self.qualname,
            "module": self.module, "has_doctests": self.has_doctests,
        }

    def instruction_record(self) -> dict[str, Any]:
        return {"id": self.id, "instruction": INSTRUCTION, "input": self.header, "output": self.body,
                **self._metadata()}

    def preference_record(self, seed: int) -> dict[str, Any]:
        rng = random.Random(f"{seed}\x00{_normalise(self.source)}")
        return {"id": self.id, "prompt": f"{INSTRUCTION}\n\n{self.header}", "chosen": self.body,
                "rejected": corrupt_body(self.header, self.body, rng), **self._metadata()}


def _corpus_functions(data: StageOutput) -> list[_Function]:
    import pyarrow.parquet as pq

    documents = data.directory / str(data.result.get("documents", "documents.parquet"))
    if not documents.is_file():
        raise StageError(
            STAGE, f"task 'python-docstrings' needs the data stage's documents, and {documents} does not exist"
        )
    table = pq.read_table(documents, columns=["id", "source", "text"]).to_pydict()
    functions: list[_Function] = []
    used_ids: set[str] = set()
    for doc_id, source, text in zip(table["id"], table["source"], table["text"], strict=True):
        if not (str(doc_id).endswith(".py") or str(source).endswith(".py")):
            continue
        module = module_name(str(doc_id), str(source))
        for function in extract_functions(str(text), str(doc_id), module):
            function_id = function.id
            count = 2
            while function_id in used_ids:  # a property's getter and setter share a qualname
                function_id = f"{function.id}#{count}"
                count += 1
            used_ids.add(function_id)
            functions.append(
                _Function(function_id, function.qualname, module, function.header, function.body, function.has_doctests)
            )
    if not functions:
        raise StageError(
            STAGE,
            "task 'python-docstrings' found no function with a docstring and a body in the data stage's "
            "documents; it needs Python sources (a python-stdlib source or .py files) in spec.data.sources",
        )
    return functions


def module_name(doc_id: str, source: str) -> str | None:
    """The importable module of a standard-library file (`stdlib/json/decoder.py` -> `json.decoder`).

    None for files outside the standard library, `__main__` scripts (importing them runs them), and paths
    that are no dotted module name or lie in a folder without `__init__.py`.
    """
    from kubeforge.data.sources import stdlib_dir

    root = stdlib_dir()
    if doc_id.startswith("stdlib/"):
        relative = doc_id.removeprefix("stdlib/")
    else:
        try:
            relative = Path(source).relative_to(root).as_posix()
        except ValueError:
            return None
    parts = relative.removesuffix(".py").split("/")
    if parts[-1] == "__init__":
        parts = parts[:-1]
    if not parts or parts[-1] == "__main__":
        return None
    if not all(p.isidentifier() and not keyword.iskeyword(p) for p in parts):
        return None
    for depth in range(1, len(relative.split("/"))):
        folder = root.joinpath(*relative.split("/")[:depth])
        # Checked only where this interpreter has the folder: the corpus may come from another machine.
        if folder.is_dir() and not (folder / "__init__.py").is_file():
            return None
    return ".".join(parts)


def extract_functions(text: str, doc_id: str, module: str | None = None) -> list[_Function]:
    """Top-level functions and methods of top-level classes that have a docstring and a body.

    Skipped: files that do not parse, bodies that are only the docstring (or `pass` / `...` after it),
    a first statement on the docstring's line, and functions longer than MAX_FUNCTION_LINES lines.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return []
    lines = text.split("\n")
    found: list[_Function] = []
    candidates: list[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]] = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            candidates.append((node.name, node))
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef):
                    candidates.append((f"{node.name}.{item.name}", item))
    for qualname, node in candidates:
        cut = _cut_function(node, lines)
        if cut is not None:
            header, body = cut
            docstring = ast.get_docstring(node, clean=False) or ""
            found.append(_Function(f"{doc_id}::{qualname}", qualname, module, header, body, ">>>" in docstring))
    return found


def _cut_function(node: ast.FunctionDef | ast.AsyncFunctionDef, lines: list[str]) -> tuple[str, str] | None:
    """(header, body) of a function at column 0, or None when the function is not a usable example."""
    if ast.get_docstring(node, clean=False) is None or len(node.body) < 2:
        return None
    rest = node.body[1:]
    if all(isinstance(s, ast.Pass) or (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant)) for s in rest):
        return None  # a stub: nothing to learn
    docstring = node.body[0]
    assert docstring.end_lineno is not None and node.end_lineno is not None
    if rest[0].lineno <= docstring.end_lineno:
        return None
    start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
    if node.end_lineno - start + 1 > MAX_FUNCTION_LINES:
        return None
    first = lines[start - 1]
    indent = first[: len(first) - len(first.lstrip())]
    # Lines that do not start with the indentation can only be string contents: they are left alone.
    dedented = [line.removeprefix(indent) for line in lines[start - 1 : node.end_lineno]]
    split = docstring.end_lineno - start + 1
    header = "\n".join(dedented[:split]) + "\n"
    body = "\n".join(dedented[split:]) + "\n"
    try:
        parsed = ast.parse(header + body)
    except (SyntaxError, ValueError):
        return None
    if len(parsed.body) != 1 or not isinstance(parsed.body[0], ast.FunctionDef | ast.AsyncFunctionDef):
        return None
    return header, body


# ---------------------------------------------------------------------------------------------
# rejected answers for DPO

_SWAPS = {
    "==": "!=", "!=": "==", "<": ">=", ">=": "<", ">": "<=", "<=": ">",
    "+": "-", "-": "+", "+=": "-=", "-=": "+=",
    "and": "or", "or": "and", "True": "False", "False": "True", "is": "is not", "in": "not in",
}


def corrupt_body(header: str, body: str, rng: random.Random) -> str:
    """A wrong copy of `body` that still reads like code: one comparison, operator, boolean or integer
    literal changed, one `return` stripped of its value, one statement dropped or two adjacent ones
    swapped. The edit is chosen by `rng` among those that keep the function parseable; a body with no
    such place (a lone `raise`) becomes `pass` (never equal to the body: stub bodies are not extracted)."""
    source = header + body
    body_start = len(header)
    edits = _candidate_edits(source, body_start) + _statement_edits(source, header.count("\n"))
    rng.shuffle(edits)
    for start, end, replacement in edits:
        changed = source[:start] + replacement + source[end:]
        if changed == source or not changed[body_start:].strip():
            continue
        try:
            ast.parse(changed)
        except (SyntaxError, ValueError):
            continue
        return changed[body_start:]
    first = next((line for line in body.split("\n") if line.strip()), "    pass")
    indent = first[: len(first) - len(first.lstrip())] or "    "
    return f"{indent}pass\n"


def _candidate_edits(source: str, body_start: int) -> list[tuple[int, int, str]]:
    """(start, end, replacement) character spans of `source`, all inside the body."""
    line_starts = [0]
    for line in source.split("\n")[:-1]:
        line_starts.append(line_starts[-1] + len(line) + 1)

    def offset(position: tuple[int, int]) -> int:
        return line_starts[position[0] - 1] + position[1]

    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    except (tokenize.TokenError, SyntaxError):
        return []
    edits: list[tuple[int, int, str]] = []
    for index, token in enumerate(tokens):
        start, end = offset(token.start), offset(token.end)
        if start < body_start:
            continue
        if token.type in (tokenize.OP, tokenize.NAME) and token.string in _SWAPS:
            following = tokens[index + 1].string if index + 1 < len(tokens) else ""
            if token.string == "is" and following == "not":
                continue  # `is not` -> `is not not` would not parse; `not in` fails the parse check below
            edits.append((start, end, _SWAPS[token.string]))
        elif token.type == tokenize.NUMBER and token.string.isdigit():
            edits.append((start, end, str(int(token.string) + 1)))
        elif token.type == tokenize.NAME and token.string == "return":
            value_end = _statement_value_end(tokens, index + 1)
            if value_end is not None:
                edits.append((end, offset(value_end), ""))
    return edits


def _statement_edits(source: str, header_lines: int) -> list[tuple[int, int, str]]:
    """Dropping one statement, or swapping two adjacent ones, of a block of the body: whole lines only,
    and only statements that have their lines to themselves."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    lines = source.split("\n")
    line_starts = [0]
    for line in lines:
        line_starts.append(line_starts[-1] + len(line) + 1)
    edits: list[tuple[int, int, str]] = []
    for node in ast.walk(tree):
        for name in ("body", "orelse", "finalbody"):
            block = getattr(node, name, None)
            if not isinstance(block, list) or len(block) < 2 or not isinstance(block[0], ast.stmt):
                continue
            alone: list[ast.stmt] = []
            for index, statement in enumerate(block):
                assert statement.end_lineno is not None
                before = block[index - 1].end_lineno if index > 0 else None
                after = block[index + 1].lineno if index + 1 < len(block) else None
                if (
                    statement.lineno > header_lines
                    and (before is None or before < statement.lineno)
                    and (after is None or after > statement.end_lineno)
                ):
                    alone.append(statement)
                    edits.append((line_starts[statement.lineno - 1], line_starts[statement.end_lineno], ""))
            for first, second in itertools.pairwise(alone):
                if first.lineno == first.end_lineno and second.lineno == second.end_lineno == first.lineno + 1:
                    a, b = lines[first.lineno - 1], lines[second.lineno - 1]
                    if a.strip() != b.strip():
                        start, end = line_starts[first.lineno - 1], line_starts[second.lineno]
                        edits.append((start, end, f"{b}\n{a}\n"))
    return edits


def _statement_value_end(tokens: Sequence[tokenize.TokenInfo], first: int) -> tuple[int, int] | None:
    """End of the expression that starts at `tokens[first]` and runs to the end of its statement."""
    depth = 0
    last: tuple[int, int] | None = None
    for token in tokens[first:]:
        if token.type in (tokenize.NEWLINE, tokenize.ENDMARKER) or (depth == 0 and token.string == ";"):
            break
        if token.type in (tokenize.COMMENT, tokenize.NL):
            continue
        if token.string in "([{" and token.type == tokenize.OP:
            depth += 1
        elif token.string in ")]}" and token.type == tokenize.OP:
            depth -= 1
        last = token.end
    return last


# ---------------------------------------------------------------------------------------------
# tokenisation


def _token_ids(tokenizer: Any, text: str) -> list[int]:
    return [int(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"]]


def _eos_id(tokenizer: Any) -> int:
    if tokenizer.eos_token_id is None:
        raise StageError(STAGE, "the tokenizer has no eos token; fine-tuning needs one to end the answers")
    return int(tokenizer.eos_token_id)


def _with_response(
    prompt_ids: list[int], response: str, tokenizer: Any, max_length: int
) -> tuple[list[int], list[int]]:
    """Prompt tokens (label -100) then response tokens and eos (labelled), cut to `max_length`.

    The cut falls on the response, so the prompt the model learns to answer is intact; a cut response
    loses its eos too (the model must not learn to stop mid-answer). A prompt that leaves no room for a
    single response token gives an example without labels, which `encode_many` drops.
    """
    if len(prompt_ids) >= max_length:
        kept = prompt_ids[:max_length]
        return kept, [IGNORE_INDEX] * len(kept)
    response_ids = [*_token_ids(tokenizer, response), _eos_id(tokenizer)][: max_length - len(prompt_ids)]
    return prompt_ids + response_ids, [IGNORE_INDEX] * len(prompt_ids) + response_ids


def encode_sft(record: dict[str, Any], tokenizer: Any, max_length: int) -> tuple[list[int], list[int]]:
    """input_ids and labels of an instruction record (labels are not shifted: the model shifts them)."""
    prompt_ids = _token_ids(tokenizer, prompt_text(record, tokenizer))
    return _with_response(prompt_ids, str(record["output"]), tokenizer, max_length)


def encode_dpo(record: dict[str, Any], tokenizer: Any, max_length: int) -> dict[str, list[int]]:
    """Both sides of a preference record, sharing the prompt (masked -100 as in `encode_sft`)."""
    prompt_ids = _token_ids(tokenizer, prompt_text(record, tokenizer))
    chosen_ids, chosen_labels = _with_response(prompt_ids, str(record["chosen"]), tokenizer, max_length)
    rejected_ids, rejected_labels = _with_response(prompt_ids, str(record["rejected"]), tokenizer, max_length)
    return {
        "chosen_input_ids": chosen_ids, "chosen_labels": chosen_labels,
        "rejected_input_ids": rejected_ids, "rejected_labels": rejected_labels,
    }


def _has_labels(labels: list[int]) -> bool:
    return any(label != IGNORE_INDEX for label in labels)


def encode_many(
    records: Iterable[dict[str, Any]], tokenizer: Any, max_length: int, kind: Literal["instruction", "preference"]
) -> tuple[list[dict[str, list[int]]], int]:
    """Encoded examples and how many were dropped because their prompt alone fills `max_length`.

    Instruction records become `{"input_ids", "labels"}`, preference records `encode_dpo`'s dict; a pair
    is dropped when either side has no label token.
    """
    encoded: list[dict[str, list[int]]] = []
    dropped = 0
    for record in records:
        if kind == "instruction":
            input_ids, labels = encode_sft(record, tokenizer, max_length)
            example = {"input_ids": input_ids, "labels": labels}
            usable = _has_labels(labels)
        else:
            example = encode_dpo(record, tokenizer, max_length)
            usable = _has_labels(example["chosen_labels"]) and _has_labels(example["rejected_labels"])
        if usable:
            encoded.append(example)
        else:
            dropped += 1
    return encoded, dropped


# ---------------------------------------------------------------------------------------------
# replay of the pretraining corpus


def replay_rows(data: StageOutput, count: int, seed: int) -> np.ndarray:
    """`count` packed rows of the data stage's train shards (int64, (count, seq_len)).

    Drawn without replacement while the shards have enough rows; beyond that every row is used once more
    (in a new random order) before any is used a third time. Only the chosen rows are read from disk.
    """
    import numpy as np

    seq_len = int(data.result["seq_len"])
    shards = [data.directory / p for p in data.result.get("shards", {}).get("train", [])]
    missing = [str(path) for path in shards if not path.is_file()]
    if missing:
        raise StageError(STAGE, f"replay: the data stage's shard {missing[0]} does not exist; rerun the data stage")
    arrays = [np.load(path, mmap_mode="r") for path in shards]
    sizes = np.array([len(a) for a in arrays], dtype=np.int64)
    total = int(sizes.sum())
    if count <= 0:
        return np.empty((0, seq_len), dtype=np.int64)
    if total == 0:
        raise StageError(
            STAGE, "replay needs the data stage's train shards and they hold no rows; set replay_fraction: 0"
        )
    rng = np.random.default_rng(seed)
    rounds = -(-count // total)
    picks = np.concatenate([rng.permutation(total) for _ in range(rounds)])[:count]
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    rows = np.empty((count, seq_len), dtype=np.int64)
    shard_of = np.searchsorted(bounds, picks, side="right") - 1
    for shard in np.unique(shard_of):
        where = np.flatnonzero(shard_of == shard)
        local = picks[where] - bounds[shard]
        order = np.argsort(local)  # sorted reads from the memory map
        rows[where[order]] = np.asarray(arrays[shard][local[order]], dtype=np.int64)
    return rows
