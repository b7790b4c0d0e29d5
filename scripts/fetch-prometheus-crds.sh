#!/usr/bin/env bash
# Fetches the Prometheus Operator's ServiceMonitor and PodMonitor CRDs at a pinned version, through the
# Go module proxy (checksum-verified against the Go checksum database), into a cache outside the clone:
#   ${STATEFN_CACHE:-~/.cache/statefn}/prometheus-operator-<version>/
# The e2e chart tests apply them so the API server validates the chart's monitors. Prints the cache directory.
set -euo pipefail
version="v0.77.1"
module="github.com/prometheus-operator/prometheus-operator"
cache="${STATEFN_CACHE:-$HOME/.cache/statefn}/prometheus-operator-${version}"
crds=(monitoring.coreos.com_servicemonitors.yaml monitoring.coreos.com_podmonitors.yaml)
missing=0
for f in "${crds[@]}"; do [ -f "$cache/$f" ] || missing=1; done
if [ "$missing" = 1 ]; then
  echo "fetching ${module}@${version} CRDs (first time only)..." >&2
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
  # The go of scripts/install-go.sh (pinned when PATH has none new enough), as in build-k8s.sh.
  go="$(bash "$(dirname "$0")/install-go.sh" | tail -n1)"
  export PATH="$(dirname "$go"):$PATH" GOTOOLCHAIN=local
  unset GOROOT
  # Outside any module, so no go.mod of ours is read or changed.
  dir="$(cd "$work" && GOFLAGS=-mod=mod go mod download -json "${module}@${version}" \
         | python3 -c 'import json, sys; print(json.load(sys.stdin)["Dir"])')"
  mkdir -p "$cache"
  for f in "${crds[@]}"; do
    cp "$dir/example/prometheus-operator-crd/$f" "$cache/$f.tmp"
    chmod 644 "$cache/$f.tmp"
    mv "$cache/$f.tmp" "$cache/$f"
  done
fi
echo "$cache"
