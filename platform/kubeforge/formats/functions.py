"""The built-in task `python-docstrings`: functions with a docstring, cut out of the corpus's Python files.

Shared by the fine-tuning stage (instruction and preference records) and the reward stage (preference
pairs), which must not import each other. Each function becomes one example: the prompt is its
decorators, `def` line(s) and docstring, the answer its body. The records carry `entry_point`,
`qualname`, `module` and `has_doctests` so that the evaluate stage can import the module and run the
function's doctests on a generated body.
"""

from __future__ import annotations

import ast
import keyword
import random
import sysconfig
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from kubeforge.errors import StageError
from kubeforge.formats.corrupt import corrupt_body
from kubeforge.formats.task_split import normalise

INSTRUCTION = "Write the body of this Python function."
MAX_FUNCTION_LINES = 60
"""Longer functions are left out of the built-in task: they rarely fit `max_length` and would be cut."""


@dataclass(frozen=True)
class CorpusFunction:
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
        rng = random.Random(f"{seed}\x00{normalise(self.source)}")
        return {"id": self.id, "prompt": f"{INSTRUCTION}\n\n{self.header}", "chosen": self.body,
                "rejected": corrupt_body(self.header, self.body, rng), **self._metadata()}


def corpus_functions(documents: Path, stage: str) -> list[CorpusFunction]:
    """Every usable function of the data stage's Python documents (its parquet file `documents`), ids made
    unique across the corpus. Errors are raised as `stage`'s."""
    import pyarrow.parquet as pq

    if not documents.exists():
        raise StageError(
            stage, f"task 'python-docstrings' needs the data stage's documents, and {documents} does not exist"
        )
    table = pq.read_table(documents, columns=["id", "source", "text"]).to_pydict()
    functions: list[CorpusFunction] = []
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
            functions.append(replace(function, id=function_id))
    if not functions:
        raise StageError(
            stage,
            "task 'python-docstrings' found no function with a docstring and a body in the data stage's "
            "documents; it needs Python sources (a python-stdlib source or .py files) in spec.data.sources",
        )
    return functions


def module_name(doc_id: str, source: str) -> str | None:
    """The importable module of a standard-library file (`stdlib/json/decoder.py` -> `json.decoder`).

    None for files outside the standard library, `__main__` scripts (importing them runs them), and paths
    that are no dotted module name or lie in a folder without `__init__.py`.
    """
    # The python-stdlib source's root (`kubeforge.spec.data.stdlib_dir`; formats import nothing of the spec).
    root = Path(sysconfig.get_paths()["stdlib"])
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


def extract_functions(text: str, doc_id: str, module: str | None = None) -> list[CorpusFunction]:
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
    found: list[CorpusFunction] = []
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
            found.append(CorpusFunction(f"{doc_id}::{qualname}", qualname, module, header, body, ">>>" in docstring))
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


def _parse(source: str) -> ast.Module | None:
    try:
        return ast.parse(source)
    except (SyntaxError, ValueError):  # ValueError: source with NUL bytes
        return None


def parses(source: str) -> bool:
    return _parse(source) is not None


def body_parses(header: str, body: str) -> bool:
    """A generated body counts only when it adds a statement to the function: the header alone (signature
    and docstring) already parses, so an empty, blank or comment-only generation would otherwise score as
    valid Python (and a policy rewarded for parsing learns to write comments)."""
    tree = _parse(header + body)
    if tree is None:
        return False
    function = next((n for n in tree.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)), None)
    if function is None:  # a header that is not a function: the body must at least say something
        return bool(body.strip())
    statements = function.body
    if statements and isinstance(statements[0], ast.Expr) and isinstance(statements[0].value, ast.Constant) \
            and isinstance(statements[0].value.value, str):
        statements = statements[1:]  # the docstring is the header's
    return bool(statements)


def function_header(record: Mapping[str, Any]) -> str:
    """Signature and docstring a generated body continues: `input`, or a preference record's prompt
    after the instruction (the built-in task's prompt is the instruction, a blank line, the header)."""
    if record.get("input"):
        return str(record["input"])
    return str(record.get("prompt", "")).split("\n\n", 1)[-1]
