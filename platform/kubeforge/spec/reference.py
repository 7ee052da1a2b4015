"""The manifest reference (docs/manifest.md), generated from the models so it cannot drift.

python -m kubeforge.spec.reference > docs/manifest.md
"""

from __future__ import annotations

import json
import types
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from kubeforge.spec.deployment import ModelDeployment
from kubeforge.spec.pipeline import pipeline_model


def render() -> str:
    lines = [
        "# Manifest reference",
        "",
        "Generated from `kubeforge.spec` by `python -m kubeforge.spec.reference > docs/manifest.md`;",
        "a test fails when this file and the models disagree. Unknown fields are errors.",
    ]
    for model in (pipeline_model(), ModelDeployment):
        lines += ["", f"## {model.__name__}", "", "| field | type | default | meaning |", "|---|---|---|---|"]
        _rows(model, "", lines)
    return "\n".join(lines) + "\n"


def _rows(model: type[BaseModel], prefix: str, lines: list[str]) -> None:
    for name, info in model.model_fields.items():
        path = f"{prefix}{name}"
        annotation = info.annotation
        default = "required" if info.is_required() else _show_default(info.default, info.default_factory)
        doc = (info.description or "").replace("\n", " ").replace("|", "\\|")
        lines.append(f"| `{path}` | {_type_name(annotation)} | {default} | {doc} |")
        for sub, suffix in _submodels(annotation):
            _rows(sub, f"{path}{suffix}.", lines)


def _submodels(annotation: Any) -> list[tuple[type[BaseModel], str]]:
    """Nested models to document below a field; list items get `[]`, union members `(type)`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [(annotation, "")]
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (tuple, list):
        return [(m, "[]" + s) for m, s in _submodels(args[0])]
    if origin in (Union, types.UnionType):
        # `Annotated[A | B, Field(discriminator=...)] | None` nests a union inside the optional one.
        flat = []
        for arg in args:
            inner = get_args(arg)[0] if hasattr(arg, "__metadata__") else arg
            flat += list(get_args(inner)) if get_origin(inner) in (Union, types.UnionType) else [inner]
        members = [a for a in flat if isinstance(a, type) and issubclass(a, BaseModel)]
        if len(members) > 1:
            return [(m, f"({_tag(m)})") for m in members]
        return [(m, "") for m in members]
    if args and hasattr(annotation, "__metadata__"):
        return _submodels(args[0])
    return []


def _tag(model: type[BaseModel]) -> str:
    for discriminator in ("type", "strategy"):
        field = model.model_fields.get(discriminator)
        if field is not None and get_origin(field.annotation) is Literal:
            return str(get_args(field.annotation)[0])
    return model.__name__


def _type_name(annotation: Any) -> str:
    if hasattr(annotation, "__metadata__"):
        return _type_name(get_args(annotation)[0])
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin in (tuple, list):
        return f"list of {_type_name(args[0])}"
    if origin is dict:
        return f"map {_type_name(args[0])} → {_type_name(args[1])}"
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


def _show_default(default: Any, factory: Any) -> str:
    if factory is not None:
        default = factory()
    if default is PydanticUndefined:
        return "required"
    if isinstance(default, BaseModel):
        return "see below"
    if isinstance(default, tuple) and default and isinstance(default[0], BaseModel):
        return f"`{json.dumps([d.model_dump(mode='json', exclude_defaults=True) for d in default])}`"
    return f"`{json.dumps(default, default=str)}`"


if __name__ == "__main__":
    print(render(), end="")
