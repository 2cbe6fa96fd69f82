"""cni-bridge as the CNI of a three-node kind cluster (kind-config.yaml, conf/cni-bridge-daemonset.yaml).

`scripts/kind.sh up` creates the cluster (or reuses it), builds and loads the
image and applies the DaemonSet; pytest-docker starts the "outside" server
(tests/e2e/docker-compose.yml) on kind's docker network. The cluster is
deleted at the end unless KIND_KEEP=1.

Skipped (see conftest.py) when there is no Docker engine, kind or kubectl,
which is the case on the machines this project is developed on.
"""
from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CLUSTER = os.environ.get("KIND_CLUSTER", "cni-bridge")
CONTEXT = f"kind-{CLUSTER}"
AGNHOST = os.environ.get("AGNHOST", "registry.k8s.io/e2e-test-images/agnhost:2.47")
ROUTE_PROTO = "157"


def sh(*argv: str, timeout: float = 120, check: bool = True, stdin: str | None = None) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, input=stdin)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stdout}{proc.stderr}")
    return proc.stdout


def kubectl(*argv: str, **kw) -> str:
    return sh("kubectl", "--context", CONTEXT, *argv, **kw)


@pytest.fixture(scope="session")
def cluster():
    env = {**os.environ, "KIND_CLUSTER": CLUSTER}
    proc = subprocess.run([str(REPO / "scripts" / "kind.sh"), "up"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, f"scripts/kind.sh up failed:\n{proc.stdout[-4000:]}{proc.stderr[-4000:]}"
    yield CLUSTER
    if os.environ.get("KIND_KEEP") != "1":
        subprocess.run([str(REPO / "scripts" / "kind.sh"), "down"], cwd=REPO, env=env, timeout=600)


@pytest.fixture(scope="session")
def nodes(cluster) -> list[dict]:
    return json.loads(kubectl("get", "nodes", "-o", "json"))["items"]


@pytest.fixture(scope="session")
def outside(cluster, docker_services) -> str:
    """The IP of the outside server (pytest-docker, on kind's network)."""
    cid = sh("docker", "compose", "-p", "cni-bridge-e2e", "-f", str(Path(__file__).parent / "docker-compose.yml"),
             "ps", "-q", "outside").strip()
    ip = sh("docker", "inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}", cid).strip()
    assert ip, "the outside container has no address on the kind network"
    return ip


def internal_ip(node: dict) -> str:
    return next(a["address"] for a in node["status"]["addresses"] if a["type"] == "InternalIP")


def workers(nodes: list[dict]) -> list[dict]:
    return [n for n in nodes if "node-role.kubernetes.io/control-plane" not in n["metadata"].get("labels", {})]


@pytest.fixture(scope="session")
def pods(cluster, nodes):
    """A server pod on one worker and a client pod on another (agnhost)."""
    w = workers(nodes)
    assert len(w) >= 2, "kind-config.yaml has two workers"
    tag = uuid.uuid4().hex[:6]
    made = {}
    for role, node, args in (("server", w[0], ["netexec", "--http-port=8080"]), ("client", w[1], ["pause"])):
        name = f"e2e-{role}-{tag}"
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {"e2e": tag}},
               "spec": {"nodeName": node["metadata"]["name"],
                        "containers": [{"name": "agnhost", "image": AGNHOST, "imagePullPolicy": "IfNotPresent",
                                        "args": args}]}}
        kubectl("apply", "-f", "-", stdin=json.dumps(pod))
        made[role] = name
    kubectl("wait", "--for=condition=Ready", "pod", "-l", f"e2e={tag}", "--timeout=180s", timeout=200)
    info = {role: json.loads(kubectl("get", "pod", name, "-o", "json")) for role, name in made.items()}
    yield info
    kubectl("delete", "pod", "-l", f"e2e={tag}", "--wait=false", check=False)


def curl(pod: dict, url: str) -> str:
    return kubectl("exec", pod["metadata"]["name"], "--", "curl", "-sS", "--max-time", "10", url).strip()


def test_plugins_installed_on_every_node(nodes):
    for node in nodes:
        name = node["metadata"]["name"]
        for exe in ("cni-bridge", "cni-ipam"):
            out = sh("docker", "exec", "-e", "CNI_COMMAND=VERSION", name, f"/opt/cni/bin/{exe}")
            assert "supportedVersions" in out, f"{exe} on {name}: {out}"


def test_every_node_has_a_conflist_for_its_pod_cidr(nodes):
    for node in nodes:
        name = node["metadata"]["name"]
        conf = json.loads(sh("docker", "exec", name, "cat", "/etc/cni/net.d/10-cni-bridge.conflist"))
        bridge = conf["plugins"][0]
        assert bridge["type"] == "cni-bridge" and bridge["ipam"]["type"] == "cni-ipam"
        assert bridge["ipam"]["ranges"] == [[{"subnet": node["spec"]["podCIDR"]}]]


def test_routes_to_the_other_nodes_pod_cidrs(nodes):
    for node in nodes:
        routes = sh("docker", "exec", node["metadata"]["name"], "ip", "route", "show", "proto", ROUTE_PROTO)
        for other in nodes:
            if other is not node:
                assert f"{other['spec']['podCIDR']} via {internal_ip(other)}" in routes, routes


def test_pod_to_pod_across_nodes_keeps_the_source(pods):
    seen = curl(pods["client"], f"http://{pods['server']['status']['podIP']}:8080/clientip")
    assert seen.rsplit(":", 1)[0] == pods["client"]["status"]["podIP"]


def test_pod_to_outside_is_masqueraded(pods, outside):
    deadline = time.monotonic() + 30
    while True:
        try:
            seen = curl(pods["client"], f"http://{outside}:8080/clientip")
            break
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)
    assert seen.rsplit(":", 1)[0] == pods["client"]["status"]["hostIP"]
