#!/usr/bin/env bash
# Runs Debian's Prometheus in the foreground on 127.0.0.1:${PROMETHEUS_PORT:-9090} with
# infra/prometheus/prometheus.yml (kubeforge run, kubeforge serve and its rollout controller on this
# machine, plus the alert rules), keeping its data in .kubeforge/prometheus. `make install` installs it.
set -euo pipefail
cd "$(dirname "$0")/../.."
command -v prometheus >/dev/null || { echo "prometheus.sh: prometheus is not installed; run make install" >&2; exit 1; }
exec prometheus --config.file=infra/prometheus/prometheus.yml \
  --storage.tsdb.path="${KUBEFORGE_WORKDIR:-.kubeforge}/prometheus" \
  --web.listen-address="127.0.0.1:${PROMETHEUS_PORT:-9090}"
