#!/usr/bin/env bash
# A kind cluster that runs cni-bridge as its CNI (docs/kind.md).
#
#   scripts/kind.sh up      create the cluster (kind-config.yaml), build the image from
#                           dist/cni-bin (make bundle), kind-load it, apply the DaemonSet,
#                           wait for the nodes to be Ready, run the smoke test
#   scripts/kind.sh smoke   only the smoke test, on a running cluster
#   scripts/kind.sh down    delete the cluster and the smoke test's outside container
#
# Needs docker (a running engine), kind and kubectl. Environment:
#   KIND_CLUSTER (cni-bridge)  IMAGE (cni-bridge:dev)
#   AGNHOST (registry.k8s.io/e2e-test-images/agnhost:2.47), used by the smoke test
set -euo pipefail
cd "$(dirname "$0")/.."

CLUSTER=${KIND_CLUSTER:-cni-bridge}
IMAGE=${IMAGE:-cni-bridge:dev}
AGNHOST=${AGNHOST:-registry.k8s.io/e2e-test-images/agnhost:2.47}
CONTEXT="kind-$CLUSTER"
OUTSIDE="$CLUSTER-outside"
KUBECTL=(kubectl --context "$CONTEXT")

say() { echo "kind.sh: $*"; }
die() { echo "kind.sh: $*" >&2; exit 1; }

need_tools() {
  local missing=()
  for tool in docker kind kubectl; do
    command -v "$tool" >/dev/null || missing+=("$tool is not installed")
  done
  if command -v docker >/dev/null && ! docker info >/dev/null 2>&1; then
    missing+=("no Docker engine answers (docker info failed)")
  fi
  if [ "${#missing[@]}" -gt 0 ]; then
    die "cannot run: $(printf '%s; ' "${missing[@]}")see docs/kind.md"
  fi
}

up() {
  need_tools
  ./scripts/bundle.sh            # no-op when dist/cni-bin is up to date
  if kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
    say "cluster $CLUSTER exists, reusing it"
  else
    kind create cluster --name "$CLUSTER" --config kind-config.yaml
  fi
  say "building $IMAGE"
  docker build -f conf/Dockerfile -t "$IMAGE" .
  kind load docker-image "$IMAGE" --name "$CLUSTER"
  "${KUBECTL[@]}" apply -f conf/cni-bridge-daemonset.yaml
  # A new image under the same tag: make running pods pick it up.
  "${KUBECTL[@]}" -n kube-system rollout restart daemonset/cni-bridge >/dev/null
  "${KUBECTL[@]}" -n kube-system rollout status daemonset/cni-bridge --timeout=300s
  "${KUBECTL[@]}" wait --for=condition=Ready nodes --all --timeout=300s
  smoke
}

smoke() {
  need_tools
  docker image inspect "$AGNHOST" >/dev/null 2>&1 || docker pull "$AGNHOST"
  kind load docker-image "$AGNHOST" --name "$CLUSTER"
  local workers
  mapfile -t workers < <("${KUBECTL[@]}" get nodes -l '!node-role.kubernetes.io/control-plane' \
                           -o jsonpath='{range .items[*]}{.metadata.name}{"\n"}{end}')
  [ "${#workers[@]}" -ge 2 ] || die "the smoke test needs two worker nodes, found ${#workers[@]}"

  "${KUBECTL[@]}" delete pod cni-smoke-server cni-smoke-client --ignore-not-found --wait=true >/dev/null
  for spec in "cni-smoke-server ${workers[0]} netexec --http-port=8080" "cni-smoke-client ${workers[1]} pause"; do
    read -r name node args <<<"$spec"
    "${KUBECTL[@]}" apply -f - <<EOF
apiVersion: v1
kind: Pod
metadata:
  name: $name
  labels: {app: cni-smoke}
spec:
  nodeName: $node
  containers:
    - name: agnhost
      image: $AGNHOST
      imagePullPolicy: IfNotPresent
      args: [${args// /, }]
EOF
  done
  "${KUBECTL[@]}" wait --for=condition=Ready pod -l app=cni-smoke --timeout=180s

  local server_ip client_ip client_node_ip seen
  server_ip=$("${KUBECTL[@]}" get pod cni-smoke-server -o jsonpath='{.status.podIP}')
  client_ip=$("${KUBECTL[@]}" get pod cni-smoke-client -o jsonpath='{.status.podIP}')
  client_node_ip=$("${KUBECTL[@]}" get pod cni-smoke-client -o jsonpath='{.status.hostIP}')
  seen=$("${KUBECTL[@]}" exec cni-smoke-client -- curl -sS --max-time 10 "http://$server_ip:8080/clientip")
  [ "${seen%:*}" = "$client_ip" ] || die "pod-to-pod: server saw ${seen%:*}, expected the client pod $client_ip"
  say "pod-to-pod ok: $client_ip (${workers[1]}) -> $server_ip (${workers[0]}), source kept"

  # "Outside": a container on kind's docker network that is not a node.
  docker rm -f "$OUTSIDE" >/dev/null 2>&1 || true
  docker run -d --rm --name "$OUTSIDE" --network kind "$AGNHOST" netexec --http-port=8080 >/dev/null
  local outside_ip
  outside_ip=$(docker inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "$OUTSIDE")
  seen=""
  for _ in $(seq 1 20); do
    seen=$("${KUBECTL[@]}" exec cni-smoke-client -- curl -sS --max-time 5 "http://$outside_ip:8080/clientip" 2>/dev/null) && break
    sleep 1
  done
  docker rm -f "$OUTSIDE" >/dev/null 2>&1 || true
  [ "${seen%:*}" = "$client_node_ip" ] || die "pod-to-outside: outside saw '${seen%:*}', expected the node $client_node_ip"
  say "pod-to-outside ok: $client_ip -> $outside_ip seen as node $client_node_ip (masquerade)"

  "${KUBECTL[@]}" delete pod cni-smoke-server cni-smoke-client --wait=false >/dev/null
  say "smoke test passed"
}

down() {
  command -v kind >/dev/null || die "kind is not installed"
  docker rm -f "$OUTSIDE" >/dev/null 2>&1 || true
  kind delete cluster --name "$CLUSTER"
}

case "${1:-}" in
  up) up ;;
  smoke) smoke ;;
  down) down ;;
  *) echo "usage: $0 up|smoke|down" >&2; exit 2 ;;
esac
