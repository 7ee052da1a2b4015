#!/usr/bin/env bash
# Copies the Grafana dashboards and Prometheus alert rules into the kubeforge chart: Helm reads
# files only from inside a chart, and infra/ stays their one source. Run it after editing either;
# tests/unit/test_helm_charts.py fails while a copy differs from its source.
set -euo pipefail
cd "$(dirname "$0")/.."

chart_files=charts/kubeforge/files
dashboards_src=infra/grafana/dashboards
rules_src=infra/prometheus/rules/kubeforge-alerts.yml

mkdir -p "$chart_files/dashboards" "$chart_files/rules"

# Copies of dashboards that no longer exist in infra/ go, so the chart never ships a stale one.
for copy in "$chart_files"/dashboards/*.json; do
  [ -e "$copy" ] || continue
  if [ ! -f "$dashboards_src/$(basename "$copy")" ]; then
    rm -- "$copy"
    echo "sync-files.sh: removed $copy (no longer in $dashboards_src)"
  fi
done

if compgen -G "$dashboards_src/*.json" >/dev/null; then
  for src in "$dashboards_src"/*.json; do
    cp -- "$src" "$chart_files/dashboards/"
    echo "sync-files.sh: $src -> $chart_files/dashboards/"
  done
else
  echo "sync-files.sh: no dashboards in $dashboards_src yet; the chart ships none" >&2
fi

if [ -f "$rules_src" ]; then
  cp -- "$rules_src" "$chart_files/rules/"
  echo "sync-files.sh: $rules_src -> $chart_files/rules/"
else
  rm -f -- "$chart_files/rules/$(basename "$rules_src")"
  echo "sync-files.sh: no $rules_src yet; monitoring.prometheusRule.enabled will fail until it exists" >&2
fi
