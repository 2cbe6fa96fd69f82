#!/bin/sh
# Use the iptables backend (nft or legacy) the node already uses, then run the command.
# Rules written through the other backend would be invisible to kube-proxy and vice versa
# (the same idea as kubernetes-sigs/iptables-wrappers).
set -eu
count() { "$1" 2>/dev/null | grep -c '^-' || true; }
legacy=$(count iptables-legacy-save)
nft=$(count iptables-nft-save)
mode=nft
if [ "${legacy:-0}" -gt "${nft:-0}" ]; then
  mode=legacy
fi
for tool in iptables ip6tables; do
  update-alternatives --set "$tool" "/usr/sbin/$tool-$mode" >/dev/null 2>&1 || true
done
exec "$@"
