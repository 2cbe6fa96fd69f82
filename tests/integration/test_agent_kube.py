"""`cni-bridge agent` in Kubernetes mode, with the official client, against a stand-in API server.

The agent and tests/support/fake_kube_api.py both run inside a scratch netns
(the agent talks to 127.0.0.1 there); the test changes the cluster by
rewriting the fake server's state file and watches the agent follow: conflist
once the own node gets a podCIDR, routes for nodes that come, move and go.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.netns import VENV_BIN

FAKE_API = Path(__file__).resolve().parents[1] / "support" / "fake_kube_api.py"


@pytest.fixture
def kube_node(make_netns, tmp_path):
    pytest.importorskip("kubernetes", reason="Kubernetes mode needs the kubernetes client (pip install '.[agent]')")
    ns = make_netns("ka")
    ns.exec("ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p")
    ns.exec("ip", "addr", "add", "10.251.0.1/24", "dev", "eth0")
    for dev in ("eth0", "eth0p"):
        ns.exec("ip", "link", "set", dev, "up")
    state = tmp_path / "cluster.json"
    procs: list[subprocess.Popen] = []
    version = [0]

    def set_nodes(*nodes: tuple) -> None:
        """(name, internalIP, podCIDR[, annotations])"""
        version[0] += 1
        tmp = state.with_suffix(".tmp")
        tmp.write_text(json.dumps({"resourceVersion": version[0], "nodes": [
            {"name": n[0], "internalIP": n[1], "podCIDR": n[2], "annotations": n[3] if len(n) > 3 else {}}
            for n in nodes]}))
        os.rename(tmp, state)

    def start(*argv: str, stdout=subprocess.PIPE) -> subprocess.Popen:
        proc = subprocess.Popen(["ip", "netns", "exec", ns.name, *argv], stdout=stdout,
                                stderr=subprocess.PIPE, text=True,
                                env={k: v for k, v in os.environ.items() if not k.startswith(("CNI_", "KUBE"))})
        procs.append(proc)
        return proc

    class Node:
        netns = ns
        conf = tmp_path / "net.d" / "10-cni-bridge.conflist"

        @staticmethod
        def routes() -> str:
            return ns.exec("ip", "-4", "route", "show", "proto", "157").stdout

        @staticmethod
        def run_agent() -> subprocess.Popen:
            api = start(sys.executable, str(FAKE_API), str(state))
            line = api.stdout.readline().split()
            Node.api = f"http://127.0.0.1:{line[1]}"
            assert line[:1] == ["ready"], api.stderr.read()
            kubeconfig = tmp_path / "kubeconfig"
            kubeconfig.write_text(json.dumps({
                "apiVersion": "v1", "kind": "Config", "current-context": "fake",
                "clusters": [{"name": "fake", "cluster": {"server": f"http://127.0.0.1:{line[1]}"}}],
                "users": [{"name": "fake", "user": {"token": "not-checked"}}],
                "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
            }))
            return start(str(VENV_BIN / "cni-bridge"), "agent", "--node", "n1", "--cluster-cidr", "10.244.0.0/16",
                         "--kubeconfig", str(kubeconfig), "--conf-dir", str(tmp_path / "net.d"),
                         "--ipam-data-dir", str(tmp_path / "ipam"), "--bridge", "kbr0", "--resync", "3",
                         stdout=subprocess.DEVNULL)

    Node.set_nodes = staticmethod(set_nodes)
    yield Node
    for proc in procs:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream:
                stream.close()


def eventually(check, what: str, agent: subprocess.Popen, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if agent.poll() is not None:
            pytest.fail(f"the agent exited ({agent.returncode}) waiting for {what}: {agent.stderr.read()}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_agent_follows_node_objects(kube_node):
    kube_node.set_nodes(("n1", "10.251.0.1", None), ("n2", "10.251.0.2", "10.244.2.0/24"))
    agent = kube_node.run_agent()
    time.sleep(1.5)
    assert not kube_node.conf.exists(), "no conflist before the node has a podCIDR"

    kube_node.set_nodes(("n1", "10.251.0.1", "10.244.1.0/24"), ("n2", "10.251.0.2", "10.244.2.0/24"))
    eventually(kube_node.conf.exists, "the conflist", agent)
    ranges = json.loads(kube_node.conf.read_text())["plugins"][0]["ipam"]["ranges"]
    assert ranges == [[{"subnet": "10.244.1.0/24"}]]
    eventually(lambda: "10.244.2.0/24 via 10.251.0.2" in kube_node.routes(), "the route to n2", agent)
    # The chain is written after the routes in the same pass: wait for the pass to finish.
    eventually(lambda: "-A POSTROUTING -s 10.244.1.0/24" in (nat := kube_node.netns.exec("iptables", "-t", "nat",
                                                                                          "-S").stdout)
               and "-A CNI-BRIDGE-MASQ -j MASQUERADE" in nat, "the masquerade chain", agent)

    kube_node.set_nodes(("n1", "10.251.0.1", "10.244.1.0/24"), ("n2", "10.251.0.2", "10.244.2.0/24"),
                        ("n3", "10.251.0.3", "10.244.3.0/24"))
    eventually(lambda: "10.244.3.0/24 via 10.251.0.3" in kube_node.routes(), "a route to the new node", agent)

    kube_node.set_nodes(("n1", "10.251.0.1", "10.244.1.0/24"), ("n3", "10.251.0.4", "10.244.3.0/24"))
    eventually(lambda: "10.244.3.0/24 via 10.251.0.4" in kube_node.routes()
               and "10.244.2.0/24" not in kube_node.routes(), "n2's route gone and n3's moved", agent)

    # Someone flushes the agent's nat chain: the periodic resync (3 s here) puts it back.
    kube_node.netns.exec("iptables", "-t", "nat", "-F", "CNI-BRIDGE-MASQ")
    eventually(lambda: "-A CNI-BRIDGE-MASQ -j MASQUERADE" in kube_node.netns.exec("iptables", "-t", "nat",
                                                                                   "-S").stdout,
               "the masquerade chain restored by the resync", agent)
    assert agent.poll() is None


def test_agent_publishes_its_vtep_mac_and_tunnels_to_peers_that_published(kube_node):
    """n2 shares n1's subnet (direct route); n3 is elsewhere and has published its MAC; n4 is
    elsewhere and has not (no tunnel yet, until it does)."""
    n3_mac = {"cni-bridge.dev/vtep-mac": "0e:cb:0a:fc:00:03"}
    kube_node.set_nodes(("n1", "10.251.0.1", "10.244.1.0/24"), ("n2", "10.251.0.2", "10.244.2.0/24"),
                        ("n3", "10.252.0.3", "10.244.3.0/24", n3_mac), ("n4", "10.252.0.4", "10.244.4.0/24"))
    agent = kube_node.run_agent()

    def own_annotation():
        # The fake API listens on 127.0.0.1 inside the node's namespace.
        fetch = "import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1]).read().decode())"
        listing = kube_node.netns.exec(sys.executable, "-c", fetch, f"{kube_node.api}/api/v1/nodes").stdout
        n1 = next(item for item in json.loads(listing)["items"] if item["metadata"]["name"] == "n1")
        return n1["metadata"]["annotations"].get("cni-bridge.dev/vtep-mac")

    eventually(lambda: own_annotation() == "0e:cb:0a:fb:00:01", "the agent's own VTEP MAC on its Node", agent)
    eventually(lambda: "10.244.3.0/24 via 10.244.3.0 dev cni-vxlan" in kube_node.routes(), "the tunnel to n3", agent)
    link = kube_node.netns.exec("ip", "-d", "link", "show", "cni-vxlan").stdout
    assert "0e:cb:0a:fb:00:01" in link and "vxlan id 1 local 10.251.0.1" in link
    fdb = kube_node.netns.exec("bridge", "fdb", "show", "dev", "cni-vxlan").stdout
    assert "0e:cb:0a:fc:00:03 dst 10.252.0.3 self permanent" in fdb and "10.252.0.4" not in fdb
    assert "10.244.2.0/24 via 10.251.0.2 dev eth0" in kube_node.routes()
    assert "10.244.4.0/24" not in kube_node.routes()
    # n4's agent publishes its MAC: the watch brings it, and n1 opens the tunnel.
    kube_node.set_nodes(("n1", "10.251.0.1", "10.244.1.0/24"), ("n2", "10.251.0.2", "10.244.2.0/24"),
                        ("n3", "10.252.0.3", "10.244.3.0/24", n3_mac),
                        ("n4", "10.252.0.4", "10.244.4.0/24", {"cni-bridge.dev/vtep-mac": "0e:cb:0a:fc:00:04"}))
    eventually(lambda: "10.244.4.0/24 via 10.244.4.0 dev cni-vxlan" in kube_node.routes(), "the tunnel to n4", agent)
    assert "0e:cb:0a:fc:00:04 dst 10.252.0.4" in kube_node.netns.exec("bridge", "fdb", "show", "dev",
                                                                      "cni-vxlan").stdout
