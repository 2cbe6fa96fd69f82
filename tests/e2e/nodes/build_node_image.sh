#!/bin/sh
# The root filesystem of a test "node" (tests/e2e/nodes), as a tar for `docker import`:
# Debian 12 minbase from Debian's own packages (no image registry is needed), plus what a
# kind node has for networking and what the tests use inside pods. No Python: the plugins
# must run from the bundle alone.
#
#   build_node_image.sh OUT.tar [MIRROR]
set -eu
OUT=$1
MIRROR=${2:-http://deb.debian.org/debian}
PACKAGES=iproute2,iptables,iputils-ping,socat,procps,kmod
work=$(mktemp -d "${TMPDIR:-/tmp}/cni-node-rootfs.XXXXXX")
trap 'rm -rf "$work"' EXIT
debootstrap --variant=minbase --include="$PACKAGES" bookworm "$work/rootfs" "$MIRROR" >"$work/log" 2>&1 || {
  tail -n 30 "$work/log" >&2
  exit 1
}
# Caches and docs are dead weight: the vfs storage driver copies the whole rootfs per container.
rm -rf "$work/rootfs/var/cache/apt/archives/"*.deb "$work/rootfs/usr/share/doc" "$work/rootfs/usr/share/man" \
       "$work/rootfs/usr/share/locale" "$work/rootfs/var/lib/apt/lists/"*
tar -C "$work/rootfs" -cf "$OUT.tmp" .
mv "$OUT.tmp" "$OUT"
