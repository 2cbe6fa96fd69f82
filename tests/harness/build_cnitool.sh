#!/bin/sh
# Build the test-harness cnitool (tests/harness/cnitool/main.go) against the
# Debian-packaged libcni in GOPATH mode. Nothing is downloaded.
#
# Usage: tests/harness/build_cnitool.sh [OUTPUT]
#   OUTPUT defaults to build/cnitool (relative to the repository root).
#   A relative OUTPUT is taken relative to the current directory.
# Rebuilds only when main.go is newer than OUTPUT (set FORCE=1 to force).
set -eu

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
src="$here/cnitool"
gopath=/usr/share/gocode
libcni_src="$gopath/src/github.com/containernetworking/cni/libcni"

out=${1:-"$root/build/cnitool"}
case "$out" in
    /*) ;;
    *) out="$(pwd)/$out" ;;
esac

if [ "${FORCE:-0}" != 1 ] && [ -x "$out" ] && [ ! "$src/main.go" -nt "$out" ]; then
    echo "cnitool is up to date: $out"
    exit 0
fi

if ! command -v go >/dev/null 2>&1 || [ ! -d "$libcni_src" ]; then
    echo "installing golang-go and golang-github-appc-cni-dev" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y golang-go golang-github-appc-cni-dev >&2 || {
        apt-get update >&2
        apt-get install -y golang-go golang-github-appc-cni-dev >&2
    }
fi

mkdir -p "$(dirname "$out")"
# HOME may be unset in CI, so give go a writable build cache of its own.
: "${GOCACHE:=$root/build/gocache}"
mkdir -p "$GOCACHE"
export GOCACHE

cd "$src"
GO111MODULE=off GOPATH="$gopath" GOFLAGS= CGO_ENABLED=0 go build -o "$out" .
echo "built $out"
