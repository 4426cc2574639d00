#!/usr/bin/env bash
# `make deploy-check`: promtool checks the Prometheus config and the alert rules, then runs the rules' unit tests
# (deploy/prometheus/alerts_test.yml). promtool comes from Debian's `prometheus` package: only the promtool binary
# is unpacked into .tools/ (no Prometheus server is installed or started).
set -euo pipefail
cd "$(dirname "$0")/.."
promtool=$(command -v promtool || echo "$PWD/.tools/promtool/usr/bin/promtool")
if [ ! -x "$promtool" ]; then
  download=$(mktemp -d)
  trap 'rm -rf "$download"' EXIT
  (cd "$download" && { apt-get download prometheus 2>/dev/null || { apt-get update -qq && apt-get download prometheus; }; })
  mkdir -p .tools/promtool
  dpkg-deb --fsys-tarfile "$download"/prometheus_*.deb | tar -x -C .tools/promtool ./usr/bin/promtool
fi
"$promtool" check config deploy/prometheus/prometheus.yml
"$promtool" check rules deploy/prometheus/alerts.yml
(cd deploy/prometheus && "$promtool" test rules alerts_test.yml)
