"""Nodes in different subnets behind a router that knows nothing of pods: the VXLAN overlay.

Everything is a scratch network namespace. A router namespace holds one bridge
per underlay subnet and routes only between those subnets (no route to any pod
CIDR). Four "node" namespaces hang off it:

    subnet A 10.253.1.0/24: node-1, node-2    (share an L2 segment: direct routes in `auto`)
    subnet B 10.253.2.0/24: node-3
    subnet C 10.253.3.0/24: node-4

node-1, node-3 and node-4 are the three nodes in three subnets; node-2 makes
the mixed case. podCIDRs are dual-stack over the IPv4-only underlay. Every
node runs `cni-bridge agent` (topology mode) and the conflist it wrote, with
one dual-stack pod each. Each test first converges every node to the backend
it is about, so tests do not depend on each other's order. Each node is its
own namespace, so the default device name and UDP port are used everywhere.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from tests.support.netns import VENV_BIN, CniHost, Netns, make_cni_path, unique
from tests.support.peers import PEER_ECHO_CLIENT, PEER_ECHO_SERVER, agent_env

CLUSTER_CIDRS = "10.244.0.0/16,fd00:10:244::/56"
SUBNETS = {"A": "10.253.1", "B": "10.253.2", "C": "10.253.3"}
LAYOUT = [("node-1", "A", 11), ("node-2", "A", 12), ("node-3", "B", 13), ("node-4", "C", 14)]
PORT = 8080
AGENT = VENV_BIN / "cni-bridge"
VXLAN = "cni-vxlan"


@dataclass
class Node:
    name: str
    subnet: str
    ip: str
    pod_cidrs: tuple[str, str]
    ns: Netns
    conf_dir: Path
    data_dir: Path
    bridge: str
    host: CniHost

    def agent(self, topology: Path, *extra: str) -> subprocess.CompletedProcess:
        return self.ns.exec(*self.agent_argv(topology, *extra), check=False, env=agent_env())

    def agent_argv(self, topology: Path, *extra: str) -> list[str]:
        portmap = () if (self.host.cni_path / "portmap").exists() else ("--no-portmap",)
        return [str(AGENT), "agent", "--node", self.name, "--topology", str(topology), "--once",
                "--conf-dir", str(self.conf_dir), "--ipam-data-dir", str(self.data_dir),
                "--bridge", self.bridge, *portmap, *extra]

    def conflist(self) -> dict:
        return json.loads((self.conf_dir / "10-cni-bridge.conflist").read_text())

    def routes(self, family: str = "-4") -> str:
        return self.ns.exec("ip", family, "route", "show", "proto", "157").stdout

    def fdb(self) -> str:
        return self.ns.exec("bridge", "fdb", "show", "dev", VXLAN, check=False).stdout

    def neighbours(self) -> str:
        return "".join(self.ns.exec("ip", family, "neigh", "show", "dev", VXLAN, check=False).stdout
                       for family in ("-4", "-6"))

    def vxlan_index(self) -> int | None:
        out = self.ns.exec("ip", "-o", "link", "show", VXLAN, check=False).stdout
        return int(out.split(":")[0]) if out else None


@dataclass
class Pod:
    node: Node
    ns: Netns
    container_id: str
    result: dict = field(default_factory=dict)

    def ip(self, family: int) -> str:
        for entry in self.result["ips"]:
            address = entry["address"].split("/")[0]
            if (":" in address) == (family == 6):
                return address
        raise AssertionError(f"pod on {self.node.name} has no IPv{family} address: {self.result}")


@dataclass
class Cluster:
    router: Netns
    nodes: list[Node]
    topology: Path
    pods: list[Pod] = field(default_factory=list)
    servers: list[subprocess.Popen] = field(default_factory=list)

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    def pod(self, name: str) -> Pod:
        return next(p for p in self.pods if p.node.name == name)

    def topology_dict(self) -> dict:
        return {"clusterCIDR": CLUSTER_CIDRS,
                "nodes": [{"name": n.name, "internalIP": n.ip, "podCIDR": ",".join(n.pod_cidrs)} for n in self.nodes]}


def _run_conflist(pod: Pod, verb: str) -> None:
    """Run the node's conflist like libcni (name and cniVersion injected, prevResult chained)."""
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


def _connect(src: Pod, address: str) -> subprocess.CompletedProcess:
    return src.ns.exec(sys.executable, "-c", PEER_ECHO_CLIENT, address, str(PORT), check=False, timeout=15)


def _converge(cluster: Cluster, backend: str, topology: Path | None = None) -> None:
    """Every node's agent with `backend` and the real topology; all must succeed."""
    if topology is None:
        cluster.topology.write_text(json.dumps(cluster.topology_dict()))
    for node in cluster.nodes:
        res = node.agent(topology or cluster.topology, "--backend", backend)
        assert res.returncode == 0, f"{node.name}: {res.stdout} {res.stderr}"


def _all_pairs_keep_the_pod_source(cluster: Cluster, names: list[str]) -> None:
    failures = []
    for family in (4, 6):
        for src in names:
            for dst in names:
                if src == dst:
                    continue
                client, server = cluster.pod(src), cluster.pod(dst)
                proc = _connect(client, server.ip(family))
                if proc.returncode != 0:
                    failures.append(f"IPv{family} {src} -> {dst}: no connection ({proc.stderr.strip()[-120:]})")
                elif proc.stdout.strip() != client.ip(family):
                    failures.append(f"IPv{family} {src} -> {dst}: server saw {proc.stdout.strip()}, "
                                    f"not {client.ip(family)} (NAT?)")
    assert failures == []


def build_cluster(new_netns: Callable[[str], Netns], tmp: Path, layout: list) -> Cluster:
    """A router joining the layout's subnets and one node namespace per entry, converged by
    `cni-bridge agent --backend auto`; `new_netns(prefix)` makes (and registers) a namespace."""
    router = new_netns("rt")
    router.exec("sysctl", "-qw", "net.ipv4.ip_forward=1")
    segments = {}
    for key in sorted({key for _, key, _ in layout}):
        segments[key] = unique("sg")
        router.exec("ip", "link", "add", segments[key], "type", "bridge")
        router.exec("ip", "addr", "add", f"{SUBNETS[key]}.1/24", "dev", segments[key])
        router.exec("ip", "link", "set", segments[key], "up")
    nodes = []
    for name, key, host_part in layout:
        ns = new_netns("nd")
        ip = f"{SUBNETS[key]}.{host_part}"
        port = unique("u")
        router.exec("ip", "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns.name)
        router.exec("ip", "link", "set", port, "master", segments[key], "up")
        ns.exec("ip", "addr", "add", f"{ip}/24", "dev", "eth0")
        ns.exec("ip", "link", "set", "eth0", "up")
        ns.exec("ip", "route", "add", "default", "via", f"{SUBNETS[key]}.1")
        index = name.split("-")[1]
        base = tmp / name
        nodes.append(Node(name, key, ip, (f"10.244.{index}.0/24", f"fd00:10:244:{index}::/64"), ns,
                          base / "net.d", base / "ipam", unique("cb"),
                          CniHost(ns, make_cni_path(base / "bin"), base / "ipam")))
    cluster = Cluster(router, nodes, tmp / "topology.json")
    _converge(cluster, "auto")
    return cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("overlay")
    made: list[Netns] = []
    cluster = None
    try:
        def new_netns(prefix: str) -> Netns:
            made.append(Netns(prefix))
            return made[-1]

        cluster = build_cluster(new_netns, tmp, LAYOUT)
        nodes = cluster.nodes
        for node in nodes:
            pod = Pod(node, Netns("pod"), unique("c"))
            made.append(pod.ns)
            cluster.pods.append(pod)
            _run_conflist(pod, "ADD")
            proc = subprocess.Popen(["ip", "netns", "exec", pod.ns.name, sys.executable, "-c", PEER_ECHO_SERVER, str(PORT)],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            cluster.servers.append(proc)
            assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        yield cluster
    finally:
        if cluster is not None:
            for pod in cluster.pods:
                try:
                    _run_conflist(pod, "DEL")
                except AssertionError:
                    pass   # the namespaces go anyway; the DEL test below checks DEL itself
            for proc in cluster.servers:
                proc.kill()
                proc.wait()
                for stream in (proc.stdout, proc.stderr):
                    stream.close()
        for ns in reversed(made):
            ns.delete()


# -- auto ---------------------------------------------------------------------------------
def test_auto_routes_directly_within_a_subnet_and_by_vxlan_across(cluster):
    _converge(cluster, "auto")
    n1, n2, n3, n4 = cluster.nodes
    routes = n1.routes()
    assert f"{n2.pod_cidrs[0]} via {n2.ip} dev eth0" in routes
    assert f"{n3.pod_cidrs[0]} via 10.244.3.0 dev {VXLAN} onlink" in routes
    assert f"{n4.pod_cidrs[0]} via 10.244.4.0 dev {VXLAN} onlink" in routes
    assert f"{n3.pod_cidrs[1]} via fd00:10:244:3:: dev {VXLAN}" in n1.routes("-6")
    # node-2 has no IPv6 InternalIP: its IPv6 pods are reached through the tunnel.
    assert f"{n2.pod_cidrs[1]} via fd00:10:244:2:: dev {VXLAN}" in n1.routes("-6")
    assert "10.244.2.0 lladdr" not in n1.neighbours()
    # One forwarding entry per peer behind VXLAN (MAC derived from its address), nothing to flood.
    fdb = n1.fdb()
    assert f"0e:cb:0a:fd:02:0d dst {n3.ip} self permanent" in fdb
    assert f"0e:cb:0a:fd:03:0e dst {n4.ip} self permanent" in fdb
    assert f"0e:cb:0a:fd:01:0c dst {n2.ip} self permanent" in fdb
    assert len(fdb.splitlines()) == 3 and "00:00:00:00:00:00" not in fdb
    neighbours = n1.neighbours()
    assert "10.244.3.0 lladdr 0e:cb:0a:fd:02:0d PERMANENT" in neighbours
    assert "fd00:10:244:3:: lladdr 0e:cb:0a:fd:02:0d PERMANENT" in neighbours
    link = n1.ns.exec("ip", "-d", "link", "show", VXLAN).stdout
    assert "vxlan id 1 local 10.253.1.11" in link and "dstport 8472" in link and "nolearning" in link
    assert "0e:cb:0a:fd:01:0b" in link and "mtu 1450" in link
    # Underlay MTU 1500 minus 50: the pods get what fits in the tunnel.
    for node in cluster.nodes:
        assert node.conflist()["plugins"][0]["mtu"] == 1450
    assert "mtu 1450" in cluster.pod("node-1").ns.exec("ip", "link", "show", "eth0").stdout


def test_auto_carries_pod_to_pod_tcp_across_every_pair_with_the_pod_source(cluster):
    _converge(cluster, "auto")
    _all_pairs_keep_the_pod_source(cluster, [n.name for n in cluster.nodes])


def test_a_1400_byte_ping_with_df_set_crosses_the_tunnel(cluster):
    _converge(cluster, "auto")
    src = cluster.pod("node-1")
    for dst in ("node-3", "node-4"):
        for family in (4, 6):
            proc = src.ns.exec("ping", f"-{family}", "-M", "do", "-s", "1400", "-c", "1", "-W", "3",
                               cluster.pod(dst).ip(family), check=False)
            assert proc.returncode == 0, f"IPv{family} to {dst}: {proc.stdout} {proc.stderr}"
            assert "1 received" in proc.stdout


# -- forced backends ------------------------------------------------------------------------
def test_vxlan_backend_carries_every_pair_even_within_a_subnet(cluster):
    _converge(cluster, "vxlan")
    n1, n2 = cluster.nodes[:2]
    assert f"{n2.pod_cidrs[0]} via 10.244.2.0 dev {VXLAN} onlink" in n1.routes()
    assert f"dst {n2.ip} self permanent" in n1.fdb()
    _all_pairs_keep_the_pod_source(cluster, [n.name for n in cluster.nodes])


def test_routes_backend_cannot_cross_the_router(cluster):
    """Without the overlay the router drops pod traffic: proof that the tunnel carries it."""
    _converge(cluster, "auto")
    n1 = cluster.node("node-1")
    res = n1.agent(cluster.topology, "--backend", "routes")
    assert res.returncode == 1
    assert "cannot set route 10.244.3.0/24 via 10.253.2.13" in res.stderr
    assert n1.vxlan_index() is None, "the routes backend keeps no VXLAN device"
    assert "dev eth0" in n1.routes() and VXLAN not in n1.routes()
    src = cluster.pod("node-1")
    assert _connect(src, cluster.pod("node-3").ip(4)).returncode != 0
    assert _connect(src, cluster.pod("node-2").ip(4)).stdout.strip() == src.ip(4)   # same subnet: fine
    # Back to auto: the device, its entries and the routes come back, and traffic with them.
    res = n1.agent(cluster.topology, "--backend", "auto")
    assert res.returncode == 0 and f"{VXLAN} created" in res.stdout
    assert _connect(src, cluster.pod("node-3").ip(4)).stdout.strip() == src.ip(4)


# -- convergence ----------------------------------------------------------------------------
def test_second_run_changes_nothing(cluster):
    _converge(cluster, "auto")
    for node in cluster.nodes:
        before = (node.vxlan_index(), node.fdb(), node.neighbours(), node.routes(), node.routes("-6"))
        res = node.agent(cluster.topology)
        assert res.returncode == 0, res.stderr
        assert res.stdout.strip() == f"{node.name}: nothing to change"
        assert (node.vxlan_index(), node.fdb(), node.neighbours(), node.routes(), node.routes("-6")) == before


def test_node_removal_and_address_change_converge(cluster, tmp_path):
    _converge(cluster, "auto")
    n1, n2, n3, n4 = cluster.nodes
    others = [n1, n2, n3]
    without_n4 = tmp_path / "without-n4.json"
    data = cluster.topology_dict()
    data["nodes"] = [n for n in data["nodes"] if n["name"] != n4.name]
    without_n4.write_text(json.dumps(data))
    for node in others:
        assert node.agent(without_n4).returncode == 0
        assert n4.ip not in node.fdb() and "10.244.4.0" not in node.neighbours()
        assert "10.244.4.0/24" not in node.routes() and "fd00:10:244:4::" not in node.routes("-6")
    assert _connect(cluster.pod("node-1"), cluster.pod("node-4").ip(4)).returncode != 0
    # node-4 comes back (a node added): every peer tunnels to it again.
    _converge(cluster, "auto")
    for node in others:
        assert f"0e:cb:0a:fd:03:0e dst {n4.ip} self permanent" in node.fdb()
        assert f"10.244.4.0/24 via 10.244.4.0 dev {VXLAN} onlink" in node.routes()
    _all_pairs_keep_the_pod_source(cluster, ["node-1", "node-4"])
    # node-3 moves to another address in its subnet: its MAC (derived) and tunnel endpoint move too.
    old_ip = n3.ip
    n3.ns.exec("ip", "addr", "del", f"{old_ip}/24", "dev", "eth0")
    n3.ip = f"{SUBNETS['B']}.23"
    try:
        n3.ns.exec("ip", "addr", "add", f"{n3.ip}/24", "dev", "eth0")
        n3.ns.exec("ip", "route", "replace", "default", "via", f"{SUBNETS['B']}.1")
        _converge(cluster, "auto")
        for node in (n1, n2, n4):
            fdb = node.fdb()
            assert f"0e:cb:0a:fd:02:17 dst {n3.ip}" in fdb and old_ip not in fdb
            assert "10.244.3.0 lladdr 0e:cb:0a:fd:02:17" in node.neighbours()
        assert "local 10.253.2.23" in n3.ns.exec("ip", "-d", "link", "show", VXLAN).stdout
        _all_pairs_keep_the_pod_source(cluster, ["node-1", "node-3", "node-4"])
    finally:
        n3.ns.exec("ip", "addr", "flush", "dev", "eth0")
        n3.ip = old_ip
        n3.ns.exec("ip", "addr", "add", f"{old_ip}/24", "dev", "eth0")
        n3.ns.exec("ip", "route", "replace", "default", "via", f"{SUBNETS['B']}.1")
        _converge(cluster, "auto")


def test_a_restarted_agent_adopts_what_it_made_and_drops_what_went_stale(cluster, tmp_path):
    """A long-running agent is killed; the next one finds the device and entries the first
    made (same link, same entries) and removes those of a node that left meanwhile."""
    _converge(cluster, "auto")
    n1, n4 = cluster.node("node-1"), cluster.node("node-4")
    live = tmp_path / "live.json"
    live.write_text(json.dumps(cluster.topology_dict()))
    index, fdb = n1.vxlan_index(), n1.fdb()

    def start() -> subprocess.Popen:
        argv = [a for a in n1.agent_argv(live) if a != "--once"] + ["--resync", "0.2"]
        return subprocess.Popen(["ip", "netns", "exec", n1.ns.name, *argv], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, env=agent_env())

    first = start()
    try:
        data = cluster.topology_dict()
        data["nodes"] = [n for n in data["nodes"] if n["name"] != n4.name]
        time.sleep(0.5)
        first.send_signal(signal.SIGKILL)
        first.wait()
        live.write_text(json.dumps(data))
        second = start()
        try:
            deadline = time.monotonic() + 15
            while n4.ip in n1.fdb():
                assert second.poll() is None, second.stderr.read()
                assert time.monotonic() < deadline, "the restarted agent never removed node-4's entries"
                time.sleep(0.1)
            assert n1.vxlan_index() == index, "the device was made again instead of adopted"
            assert n1.fdb() == "".join(line + "\n" for line in fdb.splitlines() if n4.ip not in line)
        finally:
            second.terminate()
            second.wait(timeout=10)
            second.stderr.close()
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
        first.stderr.close()


def test_a_changed_vni_makes_the_device_again_and_only_matching_vnis_talk(cluster):
    _converge(cluster, "auto")
    n1 = cluster.node("node-1")
    src, dst = cluster.pod("node-1"), cluster.pod("node-3")
    index = n1.vxlan_index()
    res = n1.agent(cluster.topology, "--vxlan-vni", "2")
    assert res.returncode == 0, res.stderr
    assert f"{VXLAN} made again (VNI 2, UDP 8472" in res.stdout
    assert "vxlan id 2 " in n1.ns.exec("ip", "-d", "link", "show", VXLAN).stdout
    assert n1.vxlan_index() != index
    assert f"{cluster.node('node-3').pod_cidrs[0]} via 10.244.3.0 dev {VXLAN}" in n1.routes()
    assert _connect(src, dst.ip(4)).returncode != 0, "node-3 (VNI 1) must drop VNI 2 frames"
    res = n1.agent(cluster.topology)
    assert res.returncode == 0 and f"{VXLAN} made again (VNI 1" in res.stdout
    assert _connect(src, dst.ip(4)).stdout.strip() == src.ip(4)
