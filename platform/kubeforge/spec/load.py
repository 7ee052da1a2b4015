"""Reading a manifest from disk and turning pydantic's errors into one line per problem."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from kubeforge.errors import Problem, SpecError
from kubeforge.filesystems import SourceFile, is_uri, list_files
from kubeforge.spec.data import SOURCE_TAGS, FilesSource, ServedTrafficSource
from kubeforge.spec.deployment import ROLLOUT_STRATEGIES, ModelDeployment
from kubeforge.spec.pipeline import DNS1123_LABEL, ModelPipeline, pipeline_model
from kubeforge.stages.data import DATA

_TAGS = set(SOURCE_TAGS)


def load_manifest(path: str | Path, check_files: bool = True, overrides: Sequence[str] = (),
                  base_dir: Path | None = None) -> ModelPipeline:
    """Parse and validate a manifest file; raises `SpecError` listing every problem found.

    With `check_files`, every local source path must match at least one file (relative paths
    are resolved against `base_dir`, by default the manifest's directory, as `kubectl` users expect of
    sibling files);
    object-store URIs are left to the data stage, which lists them with the store's credentials.
    `overrides` are `kubeforge run --set` items, applied before validation (`apply_overrides`).
    """
    path = Path(path)
    pipeline = parse_manifest(apply_overrides(read_document(path), overrides), source=str(path))
    if check_files:
        check_source_files(pipeline, base_dir or path.parent)
    return pipeline


def load_deployment(path: str | Path) -> ModelDeployment:
    """Parse and validate a `ModelDeployment` manifest file (`kubeforge serve`)."""
    path = Path(path)
    return parse_deployment(read_document(path), source=str(path))


def load_any(path: str | Path, check_files: bool = True) -> ModelPipeline | ModelDeployment:
    """Either kind, by the document's `kind` (`kubeforge validate`)."""
    path = Path(path)
    document = read_document(path)
    if isinstance(document, dict) and document.get("kind") == "ModelDeployment":
        return parse_deployment(document, source=str(path))
    pipeline = parse_manifest(document, source=str(path))
    if check_files:
        check_source_files(pipeline, path.parent)
    return pipeline


def apply_overrides(document: Any, overrides: Sequence[str]) -> Any:
    """Set `spec` fields from `path.to.field=value` items, like `helm --set`: the value is read as YAML
    (`0.2`, `true`, `[a, b]`), missing mappings are created, and a number indexes a list
    (`promotion.gates.0.min=0.05`). The result is validated like the file itself."""
    if not overrides:
        return document
    if not isinstance(document, dict) or not isinstance(document.get("spec"), dict):
        raise SpecError([Problem("spec", "--set needs a manifest with a spec mapping")])
    for item in overrides:
        key, eq, raw = item.partition("=")
        if not eq or not key or any(not part for part in key.split(".")):
            raise SpecError([Problem(f"--set {item}", "expected path.to.field=value, e.g. finetune.train.lr=1e-3")])
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise SpecError([Problem(f"--set {item}", "the value is not valid YAML; quote it")]) from None
        *parents, leaf = key.split(".")
        node: Any = document["spec"]
        for depth, part in enumerate([*parents, leaf]):
            where = "spec." + ".".join(key.split(".")[: depth + 1])
            last = depth == len(parents)
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise SpecError([Problem(f"--set {item}", f"{where}: no list item {part} "
                                                              f"(the list has {len(node)})")])
                index = int(part)
                if last:
                    node[index] = value
                else:
                    node = node[index]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    node = node.setdefault(part, {})
            else:
                raise SpecError([Problem(f"--set {item}", f"{where}: its parent is a value, not a mapping or list")])
    return document


def read_document(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError([Problem(str(path), f"cannot read manifest ({exc.strerror})")]) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        reason = getattr(exc, "problem", None) or str(exc)
        raise SpecError([Problem(where, f"not valid YAML ({reason})")]) from None


def parse_manifest(document: Any, source: str = "manifest") -> ModelPipeline:
    return _parse(pipeline_model(), document, source)


def parse_deployment(document: Any, source: str = "manifest") -> ModelDeployment:
    return _parse(ModelDeployment, document, source)


M = TypeVar("M", bound=BaseModel)


def _parse(model: type[M], document: Any, source: str) -> M:
    if not isinstance(document, dict):
        raise SpecError(
            [
                Problem(
                    source,
                    f"must be a mapping with apiVersion, kind, metadata and spec (got {type(document).__name__})",
                )
            ]
        )
    try:
        return model.model_validate(document)
    except ValidationError as exc:
        raise SpecError(format_validation_error(exc, model), source=source) from None


def resolve_source_paths(source: FilesSource | ServedTrafficSource, base_dir: Path) -> list[SourceFile]:
    """Files matched by a `files` or `served-traffic` source, sorted, in the order the data stage reads them."""
    return list_files(source.paths if isinstance(source, FilesSource) else source.patterns(), base_dir)


def check_source_files(pipeline: ModelPipeline, base_dir: Path) -> None:
    problems: list[Problem] = []
    data = DATA.section_of(pipeline.spec)
    for index, source in enumerate(data.sources if data is not None else []):
        if not isinstance(source, FilesSource | ServedTrafficSource):
            continue
        patterns = source.paths if isinstance(source, FilesSource) else source.patterns()
        for j, pattern in enumerate(patterns):
            if is_uri(pattern):
                # Validation stays offline (the operator has no credentials for the store; its form is checked
                # by the model): the data stage reports a URI that matches nothing when it lists the source.
                continue
            if not list_files((pattern,), base_dir):
                problems.append(
                    Problem(
                        f"spec.data.sources[{index}].paths[{j}]",
                        f"no file matches '{pattern}' (looked in {base_dir.resolve()})",
                    )
                )
    if problems:
        raise SpecError(problems)


# --- error formatting -------------------------------------------------------------------------

_CONSTRAINTS = {
    "greater_than": "must be > {gt}",
    "greater_than_equal": "must be >= {ge}",
    "less_than": "must be < {lt}",
    "less_than_equal": "must be <= {le}",
    "too_short": "must have at least {min_length} item(s)",
    "too_long": "must have at most {max_length} item(s)",
    "string_too_short": "must be at least {min_length} character(s) long",
    "string_too_long": "must be at most {max_length} characters long",
    "string_pattern_mismatch": "must match {pattern}",
    "int_parsing": "must be an integer",
    "int_type": "must be an integer",
    "int_from_float": "must be a whole number",
    "float_parsing": "must be a number",
    "float_type": "must be a number",
    "bool_parsing": "must be true or false",
    "bool_type": "must be true or false",
    "string_type": "must be a string",
    "dict_type": "must be a mapping",
    "model_type": "must be a mapping",
    "model_attributes_type": "must be a mapping",
    "list_type": "must be a list",
    "tuple_type": "must be a list",
    "missing": "required field is missing",
}


def format_validation_error(exc: ValidationError, model: type[BaseModel]) -> list[Problem]:
    errors = exc.errors()
    problems = []
    for error in errors:
        loc = _clean_location(error["loc"])
        kind = error["type"]
        ctx = {k: _plain_number(v) for k, v in (error.get("ctx") or {}).items()}
        if kind == "too_short" and any(_inside(other["loc"], error["loc"]) for other in errors):
            continue  # pydantic counts only the valid items; the invalid item has its own error
        if kind == "extra_forbidden":
            message = "unknown field" + _suggestion(model, loc)
        elif kind == "literal_error":
            message = f"must be one of {ctx.get('expected')} (got {error['input']!r})"
        elif kind == "union_tag_invalid":
            message = f"unknown type {ctx.get('tag')!r}; must be one of {ctx.get('expected_tags')}"
        elif kind == "union_tag_not_found":
            message = f"needs a '{ctx.get('discriminator', 'type').strip(chr(39))}' field"
        elif kind == "value_error":
            loc, message = _split_cross_field(loc, str(ctx.get("error", error["msg"])))
        elif kind == "string_pattern_mismatch" and ctx.get("pattern") == DNS1123_LABEL:
            message = (
                "must be a DNS-1123 label: lowercase letters, digits and '-', starting and ending "
                f"with a letter or digit (got {_show(error['input'])})"
            )
        elif kind in _CONSTRAINTS:
            message = _CONSTRAINTS[kind].format(**ctx)
            if kind != "missing":
                message += f" (got {_show(error['input'])})"
        else:
            message = f"{error['msg'][0].lower()}{error['msg'][1:]} (got {_show(error['input'])})"
        problems.append(Problem(_dotted(loc), message))
    return problems


def _inside(loc: tuple[int | str, ...], parent: tuple[int | str, ...]) -> bool:
    return len(loc) > len(parent) and loc[: len(parent)] == parent


def _plain_number(value: Any) -> Any:
    """0.0 -> 0 in messages: the bound of a float field reads as the user wrote it."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _clean_location(loc: Iterable[int | str]) -> list[int | str]:
    cleaned: list[int | str] = []
    for part in loc:
        # Discriminated unions put the tag into the path right after the list index.
        if isinstance(part, str) and part in _TAGS and cleaned and isinstance(cleaned[-1], int):
            continue
        if isinstance(part, str) and part in ROLLOUT_STRATEGIES and cleaned and cleaned[-1] == "rollout":
            continue
        # dict keys validated by a constrained key type show up as '[key]'; keep them readable.
        if isinstance(part, str) and part.endswith("[key]"):
            part = part[: -len("[key]")]
        cleaned.append(part)
    return cleaned


def _split_cross_field(loc: list[int | str], message: str) -> tuple[list[int | str], str]:
    """A model validator that starts its message with a field path (`a.b: ...`, relative to the model it
    validates) reports under that field, not under the model: the user learns which field to change."""
    head, sep, rest = message.partition(": ")
    if sep and re.fullmatch(r"[A-Za-z_][\w.]*", head):
        return [*loc, *head.split(".")], rest
    return loc, message


def _dotted(loc: list[int | str]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _suggestion(model: type[BaseModel], loc: list[int | str]) -> str:
    """'did you mean' for a misspelled field, by walking the model tree to the parent of `loc`."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        fields = getattr(current, "model_fields", None)
        if not fields or part not in fields:
            return ""
        current = _model_of(fields[part].annotation)
        if current is None:
            return ""
    fields = getattr(current, "model_fields", {})
    close = difflib.get_close_matches(str(loc[-1]), list(fields), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside an annotation such as `X | None` or `tuple[X, ...]`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_of(arg)
        if found is not None:
            return found
    return None
