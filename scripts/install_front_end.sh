#!/bin/sh
# Install cni-bridge into a CNI bin dir with the static front end in front:
#
#   scripts/install_front_end.sh [DEST]      (default /opt/cni/bin)
#
# DEST/cni-bridge-python  -> the Python cni-bridge (PYTHON_PLUGIN, default .venv/bin/cni-bridge)
# DEST/cni-ipam           -> the Python cni-ipam beside it
# DEST/cni-bridge         the static front end (built by scripts/build_shim.sh)
#
# The Python program goes in first and each file is replaced by rename, so a
# runtime exec'ing cni-bridge meanwhile finds a complete old or new install.
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
dest=${1:-/opt/cni/bin}
python_plugin=${PYTHON_PLUGIN:-$root/.venv/bin/cni-bridge}
python_ipam=${PYTHON_IPAM:-$(dirname "$python_plugin")/cni-ipam}

for exe in "$python_plugin" "$python_ipam"; do
    [ -x "$exe" ] || { echo "install: $exe is missing; run ./scripts/setup.sh first" >&2; exit 1; }
done
sh "$root/scripts/build_shim.sh" "$root/dist/shim/cni-bridge" >/dev/null
mkdir -p "$dest"
ln -sfn "$python_plugin" "$dest/.cni-bridge-python.tmp"
mv -Tf "$dest/.cni-bridge-python.tmp" "$dest/cni-bridge-python"
ln -sfn "$python_ipam" "$dest/.cni-ipam.tmp"
mv -Tf "$dest/.cni-ipam.tmp" "$dest/cni-ipam"
cp "$root/dist/shim/cni-bridge" "$dest/.cni-bridge.tmp"
chmod 0755 "$dest/.cni-bridge.tmp"
mv -Tf "$dest/.cni-bridge.tmp" "$dest/cni-bridge"
echo "installed cni-bridge (static front end), cni-bridge-python and cni-ipam in $dest"
