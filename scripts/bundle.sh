#!/usr/bin/env bash
# Build the self-contained plugin folder for nodes without Python (kind nodes):
#
#   scripts/bundle.sh [OUT]        # default OUT = dist/cni-bin
#
# OUT/cni-bridge         the static front end (packaging/shim): hands each call to
#                        the node daemon, or runs cni-bridge-python when none answers
# OUT/cni-bridge-python  PyInstaller one-folder executable (bootloader + frozen app)
# OUT/cni-ipam           a hard link to cni-bridge-python; the name picks the plugin
# OUT/cni-bridge-lib/    libpython, extension modules and pure-Python archives
#
# It needs only glibc on the target (the same or a newer glibc than the build
# machine's; kind's node image and this machine are both Debian 12).
# The build is skipped when OUT already holds a bundle of the same sources
# (hash in OUT/.bundle-hash); FORCE=1 rebuilds anyway.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${1:-dist/cni-bin}
VENV=${VENV:-.venv}
PY="$VENV/bin/python"
WORK=${BUNDLE_WORK:-build/bundle}

if [ ! -x "$PY" ]; then
  echo "bundle: $PY missing; run ./scripts/setup.sh first" >&2
  exit 1
fi

# One build at a time per work folder (`make bundle` and the tests share it).
mkdir -p "$WORK"
exec 9>"$WORK/.lock"
flock 9

# Build tools and the agent's Kubernetes client (frozen into the bundle).
if ! "$PY" -c "import PyInstaller, kubernetes" 2>/dev/null; then
  echo "bundle: installing the bundle and agent extras into $VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check -e ".[agent,bundle]"
fi

# Everything that ends up in the bundle: our sources, the build recipe, the
# installed distributions (pip freeze) and the interpreter.
source_hash() {
  {
    find cni_bridge ipam packaging \( -name '*.py' -o -name '*.spec' -o -name '*.go' \) -print0 | LC_ALL=C sort -z | xargs -0 sha256sum
    sha256sum scripts/bundle.sh scripts/build_shim.sh pyproject.toml
    "$PY" -m pip freeze --disable-pip-version-check 2>/dev/null | grep -v '^-e ' | LC_ALL=C sort
    "$PY" -c 'import sys; print(sys.version)'
  } | sha256sum | cut -d' ' -f1
}
HASH=$(source_hash)
if [ "${FORCE:-0}" != 1 ] && [ -f "$OUT/.bundle-hash" ] && [ "$(cat "$OUT/.bundle-hash")" = "$HASH" ] \
   && [ -x "$OUT/cni-bridge" ] && [ -x "$OUT/cni-bridge-python" ] && [ -x "$OUT/cni-ipam" ]; then
  echo "bundle: $OUT is up to date"
  exit 0
fi

echo "bundle: building $OUT (PyInstaller, one folder)"
"$PY" -m PyInstaller --noconfirm --log-level WARN \
  --workpath "$WORK/work" --distpath "$WORK/dist" packaging/cni-bin.spec

# Assemble next to OUT, then swap it in, so OUT is never half written.
STAGE="$OUT.tmp.$$"
rm -rf "$STAGE"
mkdir -p "$(dirname "$OUT")"
cp -a "$WORK/dist/cni-bridge" "$STAGE"
mv "$STAGE/cni-bridge" "$STAGE/cni-bridge-python"
ln "$STAGE/cni-bridge-python" "$STAGE/cni-ipam"
FORCE=1 sh scripts/build_shim.sh "$STAGE/cni-bridge"
echo "$HASH" > "$STAGE/.bundle-hash"
rm -rf "$OUT"
mv "$STAGE" "$OUT"

# A bundle that cannot answer VERSION is not a bundle.
for exe in cni-bridge cni-bridge-python cni-ipam; do
  if ! CNI_COMMAND=VERSION "$OUT/$exe" </dev/null | grep -q supportedVersions; then
    echo "bundle: $OUT/$exe does not answer VERSION" >&2
    exit 1
  fi
done
echo "bundle: $OUT ready ($(du -sh "$OUT" | cut -f1))"
