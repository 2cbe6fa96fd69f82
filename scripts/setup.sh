#!/usr/bin/env bash
# Prepare a fresh Debian machine (as root) for the demo and the tests:
# Debian packages that are missing, then a venv with the project installed.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(iproute2 iptables nftables busybox-static containernetworking-plugins graphviz)
# The overlay tests: a ping that can set DF (-M do); `make bench`: pod-to-pod throughput.
PACKAGES+=(iputils-ping iperf3)
if [ "${WITH_RUNTIMES:-0}" = 1 ]; then
  PACKAGES+=(golang-go golang-github-appc-cni-dev podman runc containerd)
  # Nodes as Docker containers (tests/e2e/nodes): a private dockerd, compose, the node image's rootfs.
  PACKAGES+=(docker.io docker-compose debootstrap)
fi

missing=()
for pkg in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # Packages such as docker.io start their service on install; the tests start private
  # instances instead, so no service is started here (policy-rc.d 101 = "not allowed").
  guard=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    guard=/usr/sbin/policy-rc.d
    printf '#!/bin/sh\nexit 101\n' > "$guard" && chmod 755 "$guard"
  fi
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null || { [ -z "$guard" ] || rm -f "$guard"; exit 1; }
  [ -z "$guard" ] || rm -f "$guard"
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
if [ "${WITH_RUNTIMES:-0}" = 1 ]; then
  # The CRI client of the containerd tests (tests/harness/cri), compiled with grpcio-tools.
  "$VENV/bin/python" -m tests.harness.cri.proto >/dev/null
fi
