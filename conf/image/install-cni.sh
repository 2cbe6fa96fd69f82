#!/bin/sh
# Install the bundle into the node's CNI bin dir (init container of the DaemonSet).
#
# The library folder goes in under a versioned name and a symlink
# `cni-bridge-lib` is switched to it by rename, then each executable is
# replaced by rename: a runtime exec'ing a plugin meanwhile sees the old or
# the new file, never a half-written one. The previous library folder is kept
# (a plugin started just before the switch may still be loading from it).
set -eu
SRC=${SRC:-/opt/cni-bridge/bin}
DEST=${CNI_BIN_DIR:-/host/opt/cni/bin}
LIB=cni-bridge-lib

hash=$(cat "$SRC/.bundle-hash" 2>/dev/null || echo unversioned)
version="$LIB-$(printf '%.12s' "$hash")"
mkdir -p "$DEST"

if [ ! -d "$DEST/$version" ]; then
  rm -rf "$DEST/$version.tmp"
  cp -a "$SRC/$LIB" "$DEST/$version.tmp"
  mv "$DEST/$version.tmp" "$DEST/$version"
fi
previous=$(readlink "$DEST/$LIB" 2>/dev/null || true)
if [ -d "$DEST/$LIB" ] && [ ! -L "$DEST/$LIB" ]; then
  rm -rf "${DEST:?}/$LIB"        # a plain folder from a manual install
fi
ln -sfn "$version" "$DEST/.$LIB.tmp"
mv -T "$DEST/.$LIB.tmp" "$DEST/$LIB"

# The Python program first: the front end (cni-bridge) runs it when no daemon answers.
cp "$SRC/cni-bridge-python" "$DEST/.cni-bridge-python.tmp"
mv -f "$DEST/.cni-bridge-python.tmp" "$DEST/cni-bridge-python"
ln -f "$DEST/cni-bridge-python" "$DEST/.cni-ipam.tmp"     # one program, two names
mv -f "$DEST/.cni-ipam.tmp" "$DEST/cni-ipam"
cp "$SRC/cni-bridge" "$DEST/.cni-bridge.tmp"
mv -f "$DEST/.cni-bridge.tmp" "$DEST/cni-bridge"

for old in "$DEST/$LIB"-*; do
  name=$(basename "$old")
  [ -d "$old" ] || continue
  [ "$name" = "$version" ] || [ "$name" = "$previous" ] || rm -rf "$old"
done
echo "install-cni: cni-bridge and cni-ipam installed in $DEST ($version)"
