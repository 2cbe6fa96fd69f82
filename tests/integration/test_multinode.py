"""Three nodes on one underlay, each with the agent and the plugins, as kubelet would run them.

Everything is a scratch network namespace: an underlay netns holding a bridge,
three "node" namespaces plugged into it (each runs `cni-bridge agent` in
topology mode and the plugins with the conflist the agent wrote, the way
kubelet/containerd run them in a node's host namespace), one pod per node,
and an "outside" namespace on the underlay whose address is not a node's.
"""
from __future__ import annotations

import ipaddress
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.netns import VENV_BIN, CniHost, Netns, make_cni_path, unique
from tests.support.peers import PEER_ECHO_CLIENT, PEER_ECHO_SERVER, agent_env
from tests.support.reliability import is_ip

CLUSTER_CIDR = "10.244.0.0/16"
UNDERLAY = "10.250.0.0/24"
OUTSIDE_IP = "10.250.0.100"
NETWORK = "cni-bridge"          # the agent's default network name
PORT = 8080
AGENT = VENV_BIN / "cni-bridge"


@dataclass
class Node:
    name: str
    ns: Netns
    ip: str
    pod_cidr: str
    conf_dir: Path
    data_dir: Path
    bridge: str
    host: CniHost

    def agent(self, topology: Path, *extra: str) -> subprocess.CompletedProcess:
        argv = [str(AGENT), "agent", "--node", self.name, "--topology", str(topology), "--once",
                "--conf-dir", str(self.conf_dir), "--ipam-data-dir", str(self.data_dir),
                "--bridge", self.bridge, *extra]
        return self.ns.exec(*argv, check=False, env=agent_env())

    def conflist(self) -> dict:
        return json.loads((self.conf_dir / "10-cni-bridge.conflist").read_text())

    def snapshot(self) -> tuple:
        """What the agent manages, byte for byte: the file (and its inode), routes, nat rules."""
        path = self.conf_dir / "10-cni-bridge.conflist"
        stat = path.stat()
        return (path.read_bytes(), stat.st_ino, stat.st_mtime_ns,
                self.ns.exec("ip", "-4", "route", "show", "table", "all").stdout,
                # IPv6 link-local routes come and go on their own (address configuration); only ours count.
                self.ns.exec("ip", "-6", "route", "show", "proto", "157").stdout,
                self.ns.exec("iptables", "-w", "-t", "nat", "-S").stdout,
                self.ns.exec("sysctl", "-n", "net.ipv4.ip_forward").stdout)


@dataclass
class Pod:
    node: Node
    ns: Netns
    container_id: str
    result: dict = field(default_factory=dict)

    @property
    def ip(self) -> str:
        return self.result["ips"][0]["address"].split("/")[0]


@dataclass
class Cluster:
    underlay: Netns
    outside: Netns
    nodes: list[Node]
    topology: Path
    pods: list[Pod] = field(default_factory=list)
    servers: list[subprocess.Popen] = field(default_factory=list)


def _plug(underlay: Netns, bridge: str, ns: Netns, address: str) -> None:
    """A veth from the underlay bridge to eth0 in `ns`, holding `address`."""
    port = unique("u")
    underlay.exec("ip", "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns.name)
    underlay.exec("ip", "link", "set", port, "master", bridge, "up")
    ns.exec("ip", "addr", "add", f"{address}/24", "dev", "eth0")
    ns.exec("ip", "link", "set", "eth0", "up")


def _run_conflist(pod: Pod, verb: str) -> None:
    """Run the node's conflist like libcni: name and cniVersion injected, prevResult chained,
    DEL in reverse order with the ADD result as prevResult."""
    conflist = pod.node.conflist()
    plugins = conflist["plugins"] if verb == "ADD" else list(reversed(conflist["plugins"]))
    prev = pod.result or None
    for plugin in plugins:
        conf = dict(plugin, name=conflist["name"], cniVersion=conflist["cniVersion"])
        if prev:
            conf["prevResult"] = prev
        res = pod.node.host.run(plugin["type"], verb, conf, container_id=pod.container_id, netns=pod.ns.path)
        assert res.rc == 0, f"{plugin['type']} {verb} on {pod.node.name}: {res.stdout} {res.stderr}"
        if verb == "ADD":
            prev = res.json
    if verb == "ADD":
        pod.result = prev


def _serve(cluster: Cluster, ns: Netns) -> None:
    proc = subprocess.Popen(["ip", "netns", "exec", ns.name, sys.executable, "-c", PEER_ECHO_SERVER, str(PORT)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    cluster.servers.append(proc)
    assert proc.stdout.readline().strip() == "ready", proc.stderr.read()


def _connect(ns: Netns, address: str) -> str:
    proc = ns.exec(sys.executable, "-c", PEER_ECHO_CLIENT, address, str(PORT), check=False, timeout=15)
    assert proc.returncode == 0, f"no TCP connection from {ns.name} to {address}: {proc.stderr}"
    return proc.stdout.strip()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if shutil.which("iptables") is None:
        pytest.skip("the agent's masquerade needs iptables")
    tmp = tmp_path_factory.mktemp("multinode")
    made: list[Netns] = []
    cluster = None
    try:
        underlay = Netns("ul")
        made.append(underlay)
        ubr = unique("ub")
        underlay.exec("ip", "link", "add", ubr, "type", "bridge")
        underlay.exec("ip", "link", "set", ubr, "up")
        outside = Netns("out")
        made.append(outside)
        _plug(underlay, ubr, outside, OUTSIDE_IP)
        nodes = []
        for i in (1, 2, 3):
            ns = Netns("nd")
            made.append(ns)
            ip = f"10.250.0.{10 + i}"
            _plug(underlay, ubr, ns, ip)
            base = tmp / f"node{i}"
            nodes.append(Node(name=f"node-{i}", ns=ns, ip=ip, pod_cidr=f"10.244.{i}.0/24",
                              conf_dir=base / "net.d", data_dir=base / "ipam", bridge=unique("cb"),
                              host=CniHost(ns, make_cni_path(base / "bin"), base / "ipam")))
        topology = tmp / "topology.json"
        topology.write_text(json.dumps({
            "clusterCIDR": CLUSTER_CIDR,
            "nodes": [{"name": n.name, "internalIP": n.ip, "podCIDR": n.pod_cidr} for n in nodes],
        }))
        cluster = Cluster(underlay, outside, nodes, topology)
        for node in nodes:
            extra = () if (node.host.cni_path / "portmap").exists() else ("--no-portmap",)
            res = node.agent(topology, *extra)
            assert res.returncode == 0, res.stderr
            assert "conflist written" in res.stdout
        for node in nodes:
            pod = Pod(node, Netns("pod"), unique("c"))
            made.append(pod.ns)
            cluster.pods.append(pod)
            _run_conflist(pod, "ADD")
            _serve(cluster, pod.ns)
        _serve(cluster, outside)
        yield cluster
    finally:
        if cluster is not None:
            for proc in cluster.servers:
                proc.kill()
                proc.wait()
                for stream in (proc.stdout, proc.stderr):
                    stream.close()
        for ns in reversed(made):
            ns.delete()


def test_agent_wrote_conflist_routes_and_masquerade(cluster):
    for node in cluster.nodes:
        bridge = node.conflist()["plugins"][0]
        assert bridge["ipam"]["ranges"] == [[{"subnet": node.pod_cidr}]]
        assert bridge["ipMasq"] is False and bridge["isDefaultGateway"] is True
        routes = node.ns.exec("ip", "-4", "route", "show", "proto", "157").stdout
        for other in cluster.nodes:
            if other is not node:
                assert f"{other.pod_cidr} via {other.ip} dev eth0" in routes
        assert node.pod_cidr not in routes
        rules = node.ns.exec("iptables", "-t", "nat", "-S").stdout
        assert f"-A POSTROUTING -s {node.pod_cidr} " in rules
        assert f"-A CNI-BRIDGE-MASQ -d {CLUSTER_CIDR} -j RETURN" in rules
    for pod in cluster.pods:
        assert ipaddress.ip_address(pod.ip) in ipaddress.ip_network(pod.node.pod_cidr)


def test_pod_to_pod_across_nodes_keeps_the_pod_source_address(cluster):
    for src in cluster.pods:
        for dst in cluster.pods:
            if src is not dst:
                seen = _connect(src.ns, dst.ip)
                assert seen == src.ip, f"{dst.ip} saw {seen} for a connection from {src.ip} (NAT?)"


def test_pod_to_outside_is_masqueraded_to_the_node_address(cluster):
    for pod in cluster.pods:
        assert _connect(pod.ns, OUTSIDE_IP) == pod.node.ip


def test_second_agent_run_changes_nothing(cluster):
    for node in cluster.nodes:
        before = node.snapshot()
        extra = () if "portmap" in json.dumps(node.conflist()) else ("--no-portmap",)
        res = node.agent(cluster.topology, *extra)
        assert res.returncode == 0, res.stderr
        assert res.stdout.strip() == f"{node.name}: nothing to change"
        assert node.snapshot() == before


def test_agent_follows_topology_changes(cluster, tmp_path):
    node1, _, node3 = cluster.nodes
    extra = () if "portmap" in json.dumps(node1.conflist()) else ("--no-portmap",)
    original = json.loads(cluster.topology.read_text())

    def run_with(nodes) -> str:
        changed = tmp_path / "changed.json"
        changed.write_text(json.dumps({**original, "nodes": nodes}))
        res = node1.agent(changed, *extra)
        assert res.returncode == 0, res.stderr
        return node1.ns.exec("ip", "-4", "route", "show", "proto", "157").stdout

    moved = [dict(n, internalIP="10.250.0.99") if n["name"] == node3.name else n for n in original["nodes"]]
    assert f"{node3.pod_cidr} via 10.250.0.99 dev eth0" in run_with(moved)
    gone = [n for n in original["nodes"] if n["name"] != node3.name]
    routes = run_with(gone)
    assert node3.pod_cidr not in routes and cluster.nodes[1].pod_cidr in routes
    res = node1.agent(cluster.topology, *extra)           # back to the real cluster
    assert res.returncode == 0 and "routes set" in res.stdout
    assert _connect(cluster.pods[0].ns, cluster.pods[2].ip) == cluster.pods[0].ip


def test_del_everywhere_leaves_nothing_behind(cluster):
    for pod in cluster.pods:
        _run_conflist(pod, "DEL")
    for pod in cluster.pods:
        node = pod.node
        assert "eth0" not in pod.ns.links()
        host_veths = [name for name in node.ns.links() if name.startswith("veth")]
        assert host_veths == [], host_veths
        net_dir = node.data_dir / NETWORK
        reserved = [p.name for p in net_dir.iterdir() if is_ip(p.name)] if net_dir.is_dir() else []
        assert reserved == []
        leftovers = [r for r in node.ns.exec("iptables", "-t", "nat", "-S").stdout.splitlines()
                     if "CNI-DN-" in r or pod.container_id in r]
        assert leftovers == []
