#!/usr/bin/env bash
# Installs etcd (server and etcdctl) from Debian's packages, pinned to the version given.
# Not etcd 3.5.0-3.5.2: those lose data consistency on crash (etcd-io/etcd#13766).
set -euo pipefail
want="${1:?etcd version}"
# Capture first: `etcd --version | grep -q` dies of SIGPIPE under pipefail.
have="$(etcd --version 2>/dev/null || true)"
if [[ "${have}" == *"etcd Version: ${want}"* ]]; then
  exit 0
fi
sudo=""
[ "$(id -u)" = 0 ] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
pkgver="$(apt-cache madison etcd-server | awk -v v="${want}" '$3 ~ "^"v {print $3; exit}')"
if [ -z "${pkgver}" ]; then
  echo "etcd-server ${want} is not available from apt (apt-cache madison etcd-server)" >&2
  exit 1
fi
$sudo apt-get install -y -qq "etcd-server=${pkgver}" "etcd-client=${pkgver}" >/dev/null
have="$(etcd --version)"
echo "${have%%$'\n'*}"
