#!/usr/bin/env bash
# Prepare a fresh Debian machine (as root) for the demo and the tests:
# Debian packages that are missing, then a venv with the project installed.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(iproute2 iptables nftables busybox-static containernetworking-plugins)
if [ "${WITH_RUNTIMES:-0}" = 1 ]; then
  PACKAGES+=(golang-go golang-github-appc-cni-dev podman runc)
fi

missing=()
for pkg in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  # (grep drops pip's noise about find-links folders this machine's pip config names)
  "$VENV/bin/pip" install -q --disable-pip-version-check -e ".[test]" 2>&1 | { grep -v "^WARNING: Location" || true; }
  touch "$stamp"
fi
