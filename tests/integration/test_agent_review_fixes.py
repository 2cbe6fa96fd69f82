"""The agent converges after the cluster changes under it, on a scratch namespace "node".

One node netns (eth0 on a veth whose far end stays in the same netns), the
agent in topology mode, and the plugins run with the conflist it wrote, as
kubelet would; a pod netns so the bridge and its gateway are the plugin's own.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.netns import VENV_BIN, CniHost, Netns, make_cni_path, unique

AGENT = VENV_BIN / "cni-bridge"
CLUSTER_CIDR = "10.244.0.0/16"


def _clean_env() -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith("CNI_")}


@dataclass
class AgentNode:
    ns: Netns
    host: CniHost
    conf_dir: Path
    data_dir: Path
    topology: Path
    bridge: str

    def argv(self, *extra: str) -> list[str]:
        return [str(AGENT), "agent", "--node", "n1", "--topology", str(self.topology),
                "--conf-dir", str(self.conf_dir), "--ipam-data-dir", str(self.data_dir),
                "--bridge", self.bridge, "--no-portmap", *extra]

    def agent_once(self) -> subprocess.CompletedProcess:
        return self.ns.exec(*self.argv("--once"), check=False, env=_clean_env())

    def write_topology(self, own_cidr: str, cluster: str = CLUSTER_CIDR,
                       peers=(("n2", "10.251.0.2", "10.244.2.0/24"),)) -> None:
        nodes = [{"name": "n1", "internalIP": "10.251.0.1", "podCIDR": own_cidr}]
        nodes += [{"name": n, "internalIP": ip, "podCIDR": cidr} for n, ip, cidr in peers]
        self.topology.write_text(json.dumps({"clusterCIDR": cluster, "nodes": nodes}))

    def conflist(self) -> dict:
        return json.loads((self.conf_dir / "10-cni-bridge.conflist").read_text())

    def bridge_addresses(self, family: str = "-4") -> list[str]:
        out = self.ns.exec("ip", "-o", family, "addr", "show", "dev", self.bridge).stdout
        return sorted(line.split()[3] for line in out.splitlines() if " scope link " not in line)

    def add_pod(self, pod: Netns) -> dict:
        plugin = self.conflist()["plugins"][0]
        conf = dict(plugin, name=self.conflist()["name"], cniVersion=self.conflist()["cniVersion"])
        res = self.host.run("cni-bridge", "ADD", conf, container_id=unique("c"), netns=pod.path)
        assert res.rc == 0, res.stdout + res.stderr
        return res.json

    def snapshot(self) -> tuple:
        path = self.conf_dir / "10-cni-bridge.conflist"
        return (path.read_bytes(), path.stat().st_ino,
                self.ns.exec("ip", "-4", "route", "show", "table", "all").stdout,
                self.ns.exec("ip", "addr", "show", "dev", self.bridge).stdout,
                self.ns.exec("iptables", "-w", "-t", "nat", "-S").stdout)


@pytest.fixture
def agent_node(make_netns, tmp_path) -> AgentNode:
    if shutil.which("iptables") is None:
        pytest.skip("the agent's masquerade needs iptables")
    ns = make_netns("an")
    ns.exec("ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p")
    ns.exec("ip", "addr", "add", "10.251.0.1/24", "dev", "eth0")
    for dev in ("eth0", "eth0p"):
        ns.exec("ip", "link", "set", dev, "up")
    host = CniHost(ns, make_cni_path(tmp_path / "bin"), tmp_path / "ipam")
    return AgentNode(ns, host, tmp_path / "net.d", tmp_path / "ipam", tmp_path / "topology.json", unique("ab"))


def test_changed_pod_cidr_moves_the_bridge_gateway(agent_node, make_netns):
    node = agent_node
    node.write_topology("10.244.1.0/24")
    res = node.agent_once()
    assert res.returncode == 0, res.stderr
    node.add_pod(make_netns("ap"))                    # the plugin makes the bridge with 10.244.1.1/24
    assert node.bridge_addresses() == ["10.244.1.1/24"]
    node.ns.exec("ip", "addr", "add", "192.168.77.1/24", "dev", node.bridge)   # not the agent's

    node.write_topology("10.244.7.0/24")
    res = node.agent_once()
    assert res.returncode == 0, res.stderr
    assert node.bridge_addresses() == ["10.244.7.1/24", "192.168.77.1/24"]
    assert node.conflist()["plugins"][0]["ipam"]["ranges"] == [[{"subnet": "10.244.7.0/24"}]]
    routes = node.ns.exec("ip", "-4", "route", "show").stdout
    assert "10.244.1.0/24" not in routes
    assert "10.244.2.0/24 via 10.251.0.2 dev eth0 proto 157" in routes
    assert f"10.244.7.0/24 dev {node.bridge} proto kernel" in routes
    nat = node.ns.exec("iptables", "-t", "nat", "-S").stdout
    assert "-s 10.244.7.0/24" in nat and "10.244.1.0/24" not in nat

    # A pod added now gets the new range and finds its gateway where it was put.
    result = node.add_pod(make_netns("ap"))
    assert result["ips"][0]["address"].startswith("10.244.7.")
    assert node.bridge_addresses() == ["10.244.7.1/24", "192.168.77.1/24"]

    before = node.snapshot()
    res = node.agent_once()
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "n1: nothing to change"
    assert node.snapshot() == before


def test_previously_written_pod_cidr_outside_the_new_cluster_cidr_is_removed_too(agent_node, make_netns):
    node = agent_node
    node.write_topology("10.244.1.0/24")
    assert node.agent_once().returncode == 0
    node.add_pod(make_netns("ap"))
    node.ns.exec("ip", "addr", "add", "10.99.0.1/24", "dev", node.bridge)      # neither cluster nor podCIDR

    # The whole cluster moves: the old gateway is outside the new cluster CIDR, but the agent wrote it.
    node.write_topology("10.245.3.0/24", cluster="10.245.0.0/16", peers=(("n2", "10.251.0.2", "10.245.2.0/24"),))
    res = node.agent_once()
    assert res.returncode == 0, res.stderr
    assert node.bridge_addresses() == ["10.245.3.1/24", "10.99.0.1/24"]
