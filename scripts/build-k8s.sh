#!/usr/bin/env bash
# Builds kube-apiserver, kube-controller-manager, kube-scheduler and kubectl from the pinned
# k8s.io/kubernetes Go module (e2e/k8sbin/go.mod), and helm, into a cache outside the clone:
#   ${STATEFN_CACHE:-~/.cache/statefn}/k8s-v<version>/
# Later runs reuse the cache. Prints the cache directory.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
k8s_version="$(awk '$1 == "require" && $2 == "k8s.io/kubernetes" {print $3; exit}' "$here/e2e/k8sbin/go.mod")"
helm_version="v3.19.0"
cache="${STATEFN_CACHE:-$HOME/.cache/statefn}/k8s-${k8s_version}"
mkdir -p "$cache"
minor="$(echo "$k8s_version" | cut -d. -f2)"
ldflags="-s -w -X k8s.io/component-base/version.gitVersion=${k8s_version} -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=${minor} -X k8s.io/component-base/version.gitTreeState=clean"
# Not whatever `go` is on PATH: a fresh machine has none, Debian's is too old. GOTOOLCHAIN=local: never
# switch to (download) another toolchain behind our back; GOROOT unset: the go found must use its own.
go="$(bash "$here/scripts/install-go.sh" | tail -n1)"
export PATH="$(dirname "$go"):$PATH" GOTOOLCHAIN=local
unset GOROOT
cd "$here/e2e/k8sbin"
[ -f go.sum ] || go mod tidy >&2
for cmd in kube-apiserver kube-controller-manager kube-scheduler kubectl; do
  if [ ! -x "$cache/$cmd" ]; then
    echo "building $cmd ${k8s_version} (first time only)..." >&2
    CGO_ENABLED=0 go build -trimpath -ldflags "$ldflags" -o "$cache/$cmd.tmp" "k8s.io/kubernetes/cmd/$cmd"
    mv "$cache/$cmd.tmp" "$cache/$cmd"
  fi
done
if [ ! -x "$cache/helm" ]; then
  echo "building helm ${helm_version} (first time only)..." >&2
  GOBIN="$cache" CGO_ENABLED=0 go install "helm.sh/helm/v3/cmd/helm@${helm_version}"
fi
echo "$cache"
