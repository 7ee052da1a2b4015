"""Layering rules of ARCHITECTURE.md, checked on the import statements themselves."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
CORE = REPO / "platform" / "kubeforge"
HEAVY = {
    "torch", "ray", "vllm", "transformers", "tokenizers", "mlflow", "pandas", "matplotlib", "pyarrow", "numpy",
    "peft", "optuna", "sacrebleu", "rouge_score",
}
# Modules on the path of `kubeforge --help` and `kubeforge validate`.
LIGHT_MODULES = [
    "kubeforge.cli",
    "kubeforge.spec",
    "kubeforge.errors",
    "kubeforge.workdir",
    "kubeforge.data",
    "kubeforge.pretrain",
    "kubeforge.pretrain.config",
    "kubeforge.finetune.config",
    "kubeforge.engine",
    "kubeforge.engine.config",
    "kubeforge.stages",
    "kubeforge.spec.pipeline",
    "kubeforge.spec.load",
    "kubeforge.promote",
    "kubeforge.context",
    "kubeforge.tune",
    "kubeforge.finetune",
    "kubeforge.evaluate",
    "kubeforge.formats",
    "kubeforge.formats.chat",
    "kubeforge.formats.splits",
]


def top_level_imports(path: Path, module_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    nodes = tree.body if module_level_only else list(ast.walk(tree))
    names: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_core_library_imports_neither_operators_nor_jobs_nor_kubernetes() -> None:
    offenders = {}
    for path in CORE.rglob("*.py"):
        bad = top_level_imports(path, module_level_only=False) & {
            "kubeforge_operator",
            "operators",
            "jobs",
            "kopf",
            "kubernetes",
        }
        if bad:
            offenders[str(path.relative_to(REPO))] = sorted(bad)
    assert offenders == {}


def test_the_layering_check_catches_a_forbidden_import(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    from kubeforge_operator import handlers\n")
    assert "kubeforge_operator" in top_level_imports(sample, module_level_only=False)


def kubeforge_imports(path: Path) -> set[str]:
    """The `kubeforge.*` modules a file imports, anywhere in it (lazy imports included)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return {name for name in names if name == "kubeforge" or name.startswith("kubeforge.")}


def test_shared_formats_import_only_errors() -> None:
    """Fine-tuning, evaluation and serving all read `kubeforge.formats`, so it sits below every stage package."""
    offenders = {}
    for path in (CORE / "formats").rglob("*.py"):
        bad = {m for m in kubeforge_imports(path) if m != "kubeforge.errors" and not m.startswith("kubeforge.formats")}
        if bad:
            offenders[str(path.relative_to(REPO))] = sorted(bad)
    assert offenders == {}


def test_evaluate_serve_and_quantize_do_not_import_the_finetune_package() -> None:
    """They read what fine-tuning wrote through `kubeforge.formats`; stage packages do not import each other."""
    offenders = {}
    for package in ("evaluate", "serve", "quantize"):
        for path in (CORE / package).rglob("*.py"):
            bad = {m for m in kubeforge_imports(path) if m == "kubeforge.finetune" or m.startswith("kubeforge.finetune.")}
            if bad:
                offenders[str(path.relative_to(REPO))] = sorted(bad)
    assert offenders == {}


def test_cli_and_spec_do_not_import_heavy_libraries() -> None:
    code = (
        "import sys\n"
        f"import {', '.join(LIGHT_MODULES)}\n"
        f"heavy = sorted(m for m in {sorted(HEAVY)!r} if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


# What the operator image leaves out (infra/envs/operator.txt: kubeforge installed --no-deps).
NOT_IN_OPERATOR_IMAGE = {"torch", "ray", "vllm", "transformers", "tokenizers", "peft", "optuna", "pandas", "pyarrow"}


def test_the_operator_imports_nothing_its_image_leaves_out() -> None:
    """The operator and the kubeforge modules it calls at run time (registry, rollout, serve config)."""
    modules = ["kubeforge_operator.__main__", "kubeforge_operator.deployment", "kubeforge_operator.pipeline",
               "kubeforge.registry.client", "kubeforge.rollout.controller", "kubeforge.rollout.stats",
               "kubeforge.serve.cluster"]
    code = (
        "import sys\n"
        f"import {', '.join(modules)}\n"
        f"print(','.join(sorted(m for m in {sorted(NOT_IN_OPERATOR_IMAGE)!r} if m in sys.modules)))\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'operators'}:{REPO / 'platform'}"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert result.stdout.strip() == ""
