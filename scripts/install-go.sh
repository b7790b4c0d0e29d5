#!/usr/bin/env bash
# Prints the path of a `go` new enough for e2e/k8sbin/go.mod: the one on PATH if it is, else a pinned
# toolchain fetched once from the Go module proxy into a cache outside the clone:
#   ${STATEFN_CACHE:-~/.cache/statefn}/go-<version>/bin/go
# Debian's golang-go is too old and cannot switch toolchains itself, so `make test` must not rely on it.
# Needs only bash, coreutils and python3 (curl is used when present).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
# The newest 1.24 patch release (security fixes) with both linux/amd64 and linux/arm64 on the proxy.
# To bump: update the version and both sha256s (sha256sum of the module zips).
version="1.24.13"
declare -A sha256=(
  [amd64]=d2b048367a3d1a748b87f756fa06df12ce3b419e1d5f2a3612acb8950d615f9f  # sumdb h1:5sgfUhn9QCgVl4UYj32GrIYFHI3bi2UX55tNfupXwxc=
  [arm64]=50c7b3e59fa87479d8edf3e9ad81daa477c050fb580f2661cb3b8adaf70af86c  # sumdb h1:l0oOtQpOBay3IDfyGSF3ZLivy3x5c1byllrr/QfyDeM=
)

# $1 >= $2, in Go's dotted versions (both without the "go" prefix).
version_ge() { [ "$(printf '%s\n%s\n' "$1" "$2" | sort -V | head -n1)" = "$2" ]; }

gomod="$here/e2e/k8sbin/go.mod"
need="$(awk '$1 == "go" {print $2; exit}' "$gomod")"
tc="$(awk '$1 == "toolchain" {sub(/^go/, "", $2); print $2; exit}' "$gomod")"
if [ -n "$tc" ] && ! version_ge "$need" "$tc"; then need="$tc"; fi
if ! version_ge "$version" "$need"; then
  echo "install-go.sh pins go${version} but $gomod needs go${need}: bump the pin" >&2
  exit 1
fi

# GOTOOLCHAIN=local: report the binary's own version, never one it would switch to.
if sys_go="$(command -v go)"; then
  have="$(GOTOOLCHAIN=local "$sys_go" version 2>/dev/null | awk '{sub(/^go/, "", $3); print $3}')" || have=""
  if [ -n "$have" ] && version_ge "$have" "$need"; then
    echo "$sys_go"
    exit 0
  fi
  echo "go on PATH ($sys_go, ${have:-unknown version}) is older than go${need}; using go${version}" >&2
fi

[ "$(uname -s)" = Linux ] || { echo "install-go.sh: only Linux is supported, not $(uname -s)" >&2; exit 1; }
case "$(uname -m)" in
  x86_64|amd64) arch=amd64 ;;
  aarch64|arm64) arch=arm64 ;;
  *) echo "install-go.sh: only linux-amd64 and linux-arm64 are supported, not $(uname -m)" >&2; exit 1 ;;
esac

cache="${STATEFN_CACHE:-$HOME/.cache/statefn}"
dest="$cache/go-${version}"
# A GOROOT left in the environment would point our go at another standard library.
go_ok() { [ -x "$1/bin/go" ] && [[ "$(env -u GOROOT GOTOOLCHAIN=local "$1/bin/go" version 2>/dev/null)" == *"go${version} "* ]]; }
if go_ok "$dest"; then
  echo "$dest/bin/go"
  exit 0
fi

mod="v0.0.1-go${version}.linux-${arch}"
url="https://proxy.golang.org/golang.org/toolchain/@v/${mod}.zip"
mkdir -p "$cache"
# Same filesystem as $dest, so the final rename is atomic; a crash leaves only this to clean up.
tmp="$(mktemp -d "$cache/.go-${version}.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
echo "downloading go${version} (${arch}) from the Go module proxy (first time only)..." >&2
if command -v curl >/dev/null; then
  curl -fsSL --retry 3 -o "$tmp/go.zip" "$url"
else
  python3 -c 'import sys, urllib.request; urllib.request.urlretrieve(sys.argv[1], sys.argv[2])' "$url" "$tmp/go.zip"
fi
echo "${sha256[$arch]}  $tmp/go.zip" | sha256sum -c --quiet - >&2 \
  || { echo "install-go.sh: sha256 mismatch for $url" >&2; exit 1; }

# Python, not unzip (absent on a fresh Debian); zipfile drops the exec bits, so restore them.
python3 - "$tmp/go.zip" "$tmp/go" "golang.org/toolchain@${mod}/" <<'EOF'
import os, shutil, sys, zipfile
src, dst, prefix = sys.argv[1:]
with zipfile.ZipFile(src) as z:
    for info in z.infolist():
        if not info.filename.startswith(prefix) or info.is_dir():
            continue
        rel = info.filename[len(prefix):]
        if rel.startswith("/") or ".." in rel.split("/"):
            sys.exit(f"unsafe path in zip: {info.filename}")
        path = os.path.join(dst, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with z.open(info) as f, open(path, "wb") as out:
            shutil.copyfileobj(f, out)
        os.chmod(path, 0o755 if (info.external_attr >> 16) & 0o111 else 0o644)
EOF
go_ok "$tmp/go" || { echo "install-go.sh: the unpacked go does not run or is not go${version}" >&2; exit 1; }
if ! mv -T "$tmp/go" "$dest" 2>/dev/null; then
  # A concurrent run got there first (keep its copy), or a broken copy is in the way (replace it).
  go_ok "$dest" || { rm -rf "$dest"; mv -T "$tmp/go" "$dest"; }
fi
echo "$(env -u GOROOT GOTOOLCHAIN=local "$dest/bin/go" version) at $dest/bin/go" >&2
echo "$dest/bin/go"
