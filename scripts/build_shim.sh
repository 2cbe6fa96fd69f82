#!/bin/sh
# Build the static cni-bridge front end (packaging/shim/main.go) with Debian's
# golang-go: standard library only, GOPATH mode, nothing downloaded.
#
# Usage: scripts/build_shim.sh [OUTPUT]     (default dist/shim/cni-bridge)
# Rebuilds only when main.go is newer than OUTPUT (FORCE=1 to force).
# SHIM_LDFLAGS adds linker flags (tests shorten the answer timeout with -X).
#
# The front end runs `cni-bridge-python` from its own folder when no daemon
# answers; install it as cni-bridge with that name beside it (see README).
set -eu

root=$(cd "$(dirname "$0")/.." && pwd)
src="$root/packaging/shim"
out=${1:-"$root/dist/shim/cni-bridge"}
case "$out" in
    /*) ;;
    *) out="$(pwd)/$out" ;;
esac

if [ "${FORCE:-0}" != 1 ] && [ -x "$out" ] && [ ! "$src/main.go" -nt "$out" ]; then
    echo "front end is up to date: $out"
    exit 0
fi

if ! command -v go >/dev/null 2>&1; then
    echo "installing golang-go" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y golang-go >&2 || { apt-get update >&2; apt-get install -y golang-go >&2; }
fi

mkdir -p "$(dirname "$out")"
# HOME may be unset in CI, so give go a writable build cache of its own.
: "${GOCACHE:=$root/build/gocache}"
mkdir -p "$GOCACHE"
export GOCACHE

cd "$src"
tmp="$out.tmp.$$"
GO111MODULE=off GOPATH=/nonexistent GOFLAGS= CGO_ENABLED=0 \
    go build -trimpath -ldflags "-s -w ${SHIM_LDFLAGS:-}" -o "$tmp" .
mv -f "$tmp" "$out"     # a runtime exec'ing the old file meanwhile never sees a half-written one
echo "built $out"
