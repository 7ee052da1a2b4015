#!/usr/bin/env bash
# Lays out the one-shot GPU check (benchmarks/gpu_check) in DEST, for a GPU machine with no network
# that receives at most 64 MiB (the checkout's tracked files included): a snapshot of this checkout's
# platform/ and pyproject.toml in DEST/src (the working tree as it is now, uncommitted edits included:
# DEST/src/COMMIT names HEAD, DEST/src/DIRTY lists what differs from it), the harness (run.sh,
# checks/kfcheck.py) and the wheels that machine lacks (Python 3.12, x86-64) in DEST/.whl and
# DEST/.whl-cond. There: `bash DEST/run.sh`.
#
# DEST is a folder the caller names. To send it with the device tool it must sit inside the checkout
# and be ignored by git without touching .gitignore: add it to .git/info/exclude (local, never
# committed), e.g. from the checkout's root
#     echo /gpu/ >> .git/info/exclude && bash benchmarks/gpu_check/prepare.sh gpu
# and name it in the tool's `carry`. Ray's wheel (79 MB) cannot travel, so the checks run the recipes
# on kubeforge.engine.session.LocalSession on CUDA.
#
#   usage: bash benchmarks/gpu_check/prepare.sh DEST
#   KF_NO_WHEELS=1: skip the wheel downloads (a local dry run needs none).
#   PIP_PY: the interpreter whose pip downloads the wheels (default python3; any version: the wheels
#           are chosen for CPython 3.12 on manylinux x86-64 whatever it is).
set -euo pipefail
if [ $# -ne 1 ]; then
  echo "usage: bash $0 DEST" >&2
  exit 2
fi
here=$(cd "$(dirname "$0")" && pwd)
project=$(cd "$here/../.." && pwd)
dest=$1
mkdir -p "$dest"
dest=$(cd "$dest" && pwd)
case "$dest/" in "$project/"|"$here/"*) echo "DEST must not be the checkout's root or inside benchmarks/gpu_check" >&2; exit 2;; esac

mkdir -p "$dest/src" "$dest/checks" "$dest/.whl" "$dest/.whl-cond"
cp "$here/run.sh" "$here/README.md" "$dest/"
cp "$here/checks/kfcheck.py" "$dest/checks/"
rm -rf "$dest/src/platform"
cp -r "$project/platform" "$dest/src/"
cp "$project/pyproject.toml" "$dest/src/"
find "$dest/src" \( -name __pycache__ -o -name '*.egg-info' \) -prune -exec rm -rf {} +
git -C "$project" rev-parse HEAD > "$dest/src/COMMIT"
git -C "$project" status --short -- platform pyproject.toml > "$dest/src/DIRTY"
if [ -s "$dest/src/DIRTY" ]; then
  echo "note: the snapshot holds uncommitted changes to platform/ (listed in $dest/src/DIRTY):"
  sed 's/^/  /' "$dest/src/DIRTY"
fi

dl() {  # dl FOLDER SPEC...
  "${PIP_PY:-python3}" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$1" "${@:2}"
}
if [ "${KF_NO_WHEELS:-0}" != 1 ]; then
  # Always installed there (--no-deps, into /tmp/site): what the image lacks. Versions as the project's
  # pins (pyproject.toml's gpu extra, infra/envs/quantize.txt) and what pydantic 2.14 needs.
  if ! dl "$dest/.whl" bitsandbytes==0.50.2 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
      typing-inspection==0.4.5 llmcompressor==0.14.0.1 compressed-tensors==0.19.0 datasets==5.2.0 dill==0.4.1 \
      multiprocess==0.70.19 loguru==0.7.3; then
    echo "ERROR: a wheel could not be fetched (no index reachable?); see pip's message above" >&2
    exit 1
  fi
  # Installed only where the machine's own cannot serve (run.sh decides).
  if ! dl "$dest/.whl-cond" typing-extensions==4.16.0 peft==0.21.2; then
    echo "ERROR: a conditional wheel could not be fetched; see pip's message above" >&2
    exit 1
  fi
fi

# What travels: this folder plus the checkout's tracked (and untracked, not ignored) files.
dest_bytes=$(du -sb "$dest" | cut -f1)
tree_bytes=$(git -C "$project" ls-files -z --cached --others --exclude-standard \
  | (cd "$project" && xargs -0 stat -c %s 2>/dev/null) | awk '{s += $1} END {print s + 0}')
total=$((dest_bytes + tree_bytes))
awk -v d="$dest" -v a="$dest_bytes" -v t="$tree_bytes" 'BEGIN {
  printf "%s: %.1f MiB; with the working tree (%.1f MiB): %.1f MiB of the 64 MiB that can travel\n",
    d, a / 1048576, t / 1048576, (a + t) / 1048576 }'
if (( total > 64 * 1048576 )); then
  echo "WARNING: over 64 MiB: the device tool will refuse it" >&2
fi
case "$dest/" in
  "$project/"*)
    rel=${dest#"$project/"}
    if ! git -C "$project" check-ignore -q "$rel/run.sh"; then
      echo "WARNING: $rel is not ignored by git: add it to .git/info/exclude (echo /$rel/ >> .git/info/exclude)," \
        "or it travels as untracked files and shows in git status" >&2
    fi
    echo "device tool: carry [\"$rel\"], command: bash $rel/run.sh";;
  *)
    echo "note: $dest is outside the checkout, so the device tool cannot carry it (fine for a local dry run)";;
esac
