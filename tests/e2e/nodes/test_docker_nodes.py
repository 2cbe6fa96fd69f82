"""Nodes as Docker containers, shaped like kind's, with the bundle and the agent in each.

docker-compose.yml: node-1..3 on one docker network (kind's shape), node-4 on a
second network behind a router container. In every node, as the DaemonSet
would: the bundle installed into the node's own /opt/cni/bin by
conf/image/install-cni.sh, `cni-bridge daemon`, and `cni-bridge agent` in
topology mode (resync every second); pods are network namespaces made inside
the node, attached by exec'ing /opt/cni/bin/cni-bridge with the conflist the
agent wrote. The nodes have no Python. Traffic tools in the pods: socat (the
server answers with the peer address it saw) and iputils ping.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import pytest

from tests.e2e.nodes.engine import PrivateDocker

NODES = {"node-1": ("172.31.1.11", "kindnet"), "node-2": ("172.31.1.12", "kindnet"),
         "node-3": ("172.31.1.13", "kindnet"), "node-4": ("172.31.2.14", "farnet")}
OTHER_SUBNET = {"kindnet": ("172.31.2.0/24", "172.31.1.254"), "farnet": ("172.31.1.0/24", "172.31.2.254")}
CLUSTER_CIDR = "10.244.0.0/16"
PORT = 8080
SOCKET = "/run/cni-bridge/daemon.sock"


@dataclass
class NodeContainer:
    engine: PrivateDocker
    name: str
    container: str
    ip: str
    network: str
    pods: dict = field(default_factory=dict)     # pod name -> its IPv4 address

    @property
    def pod_cidr(self) -> str:
        return f"10.244.{self.name.split('-')[1]}.0/24"

    def exec(self, *argv: str, stdin: str | None = None, env: dict | None = None, check: bool = True,
             detach: bool = False, timeout: float = 60):
        flags = ["-d"] if detach else (["-i"] if stdin is not None else [])
        for key, value in (env or {}).items():
            flags += ["-e", f"{key}={value}"]
        proc = self.engine.docker("exec", *flags, self.container, *argv, check=False, input=stdin, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{self.name}: {' '.join(argv)}: {proc.stdout} {proc.stderr}")
        return proc

    def boot(self) -> None:
        """What the node's boot and the DaemonSet do: underlay route, bundle, daemon, agent."""
        subnet, router = OTHER_SUBNET[self.network]
        self.exec("ip", "route", "replace", subnet, "via", router)
        self.exec("sh", "/opt/cni-bridge/install-cni.sh", env={"SRC": "/opt/cni-bridge/bin", "CNI_BIN_DIR": "/opt/cni/bin"})
        self.exec("mkdir", "-p", "/run/cni-bridge")
        self.exec("sh", "-c", f"exec /opt/cni/bin/cni-bridge daemon --socket {SOCKET} >/run/daemon.log 2>&1",
                  detach=True)
        self.start_agent()

    def start_agent(self, *extra: str) -> None:
        argv = " ".join(self.agent_argv("--resync", "1", *extra))
        self.exec("sh", "-c", f"echo $$ >/run/agent.pid; exec {argv} >>/run/agent.log 2>&1", detach=True)

    def stop_agent(self) -> None:
        self.exec("sh", "-c", 'kill "$(cat /run/agent.pid)"')

    def agent_argv(self, *extra: str) -> list[str]:
        return ["/opt/cni/bin/cni-bridge", "agent", "--node", self.name, "--topology", "/cluster/topology.json",
                "--conf-dir", "/etc/cni/net.d", "--ipam-data-dir", "/run/cni-ipam-state",
                "--daemon-socket", SOCKET, "--no-portmap", *extra]

    def conflist(self) -> dict | None:
        proc = self.exec("cat", "/etc/cni/net.d/10-cni-bridge.conflist", check=False)
        return json.loads(proc.stdout) if proc.returncode == 0 else None

    def add_pod(self, pod: str) -> str:
        self.exec("ip", "netns", "add", pod)
        conflist = self.conflist()
        conf = dict(conflist["plugins"][0], name=conflist["name"], cniVersion=conflist["cniVersion"])
        proc = self.exec("/opt/cni/bin/cni-bridge", stdin=json.dumps(conf), env={
            "CNI_COMMAND": "ADD", "CNI_CONTAINERID": pod, "CNI_NETNS": f"/run/netns/{pod}",
            "CNI_IFNAME": "eth0", "CNI_PATH": "/opt/cni/bin"})
        address = json.loads(proc.stdout)["ips"][0]["address"].split("/")[0]
        self.pods[pod] = address
        self.exec("ip", "netns", "exec", pod, "socat", f"TCP-LISTEN:{PORT},fork,reuseaddr",
                  "SYSTEM:echo $SOCAT_PEERADDR", detach=True)
        return address

    def connect(self, pod: str, address: str):
        return self.exec("ip", "netns", "exec", pod, "socat", "-T3", "-",
                         f"TCP:{address}:{PORT},connect-timeout=3", stdin="", check=False, timeout=30)


def eventually(check, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def nodes(docker_services, private_docker, docker_compose_project_name, cluster_dir) -> dict[str, NodeContainer]:
    (cluster_dir / "topology.json").write_text(json.dumps({"clusterCIDR": CLUSTER_CIDR, "nodes": [
        {"name": name, "internalIP": ip, "podCIDR": f"10.244.{name.split('-')[1]}.0/24"}
        for name, (ip, _) in NODES.items()]}))
    found = {}
    for name, (ip, network) in NODES.items():
        container = private_docker.docker("ps", "-q", "--filter", f"label=com.docker.compose.project="
                                          f"{docker_compose_project_name}", "--filter",
                                          f"label=com.docker.compose.service={name}").stdout.strip()
        assert container, f"no container for {name}"
        found[name] = NodeContainer(private_docker, name, container, ip, network)
    for node in found.values():
        node.boot()
    for node in found.values():
        eventually(lambda: node.conflist() is not None, f"the conflist on {node.name}")
        eventually(lambda: all(peer.pod_cidr in node.exec("ip", "route", "show", "proto", "157").stdout
                               for peer in found.values() if peer is not node),
                   f"routes to every peer on {node.name}")
    for node in found.values():
        node.add_pod("pod-a")
    return found


def test_each_node_runs_the_bundle_from_its_own_cni_bin_without_python(nodes):
    for node in nodes.values():
        assert node.exec("sh", "-c", "command -v python3 python", check=False).returncode != 0
        listing = node.exec("ls", "/opt/cni/bin").stdout.split()
        assert {"cni-bridge", "cni-bridge-python", "cni-ipam", "cni-bridge-lib"} <= set(listing)
        assert node.exec("test", "-S", SOCKET, check=False).returncode == 0, "the daemon's socket"
        # /proc/sys is read-only here: the plugin could not set it, the node's default did.
        assert node.exec("cat", "/proc/sys/net/ipv6/conf/cni0/accept_ra").stdout.strip() == "0"


def test_kind_shape_routes_directly_and_the_far_node_by_vxlan(nodes):
    n1 = nodes["node-1"]
    routes = n1.exec("ip", "route", "show", "proto", "157").stdout
    assert "10.244.2.0/24 via 172.31.1.12 dev eth0" in routes
    assert "10.244.3.0/24 via 172.31.1.13 dev eth0" in routes
    assert "10.244.4.0/24 via 10.244.4.0 dev cni-vxlan onlink" in routes
    assert "dst 172.31.2.14 self permanent" in n1.exec("bridge", "fdb", "show", "dev", "cni-vxlan").stdout
    assert nodes["node-4"].conflist()["plugins"][0]["mtu"] == 1450


def test_pod_to_pod_across_every_pair_keeps_the_pod_source(nodes):
    failures = []
    for src in nodes.values():
        for dst in nodes.values():
            if src is dst:
                continue
            proc = src.connect("pod-a", dst.pods["pod-a"])
            if proc.stdout.strip() != src.pods["pod-a"]:
                failures.append(f"{src.name} -> {dst.name}: {proc.stdout.strip()!r} {proc.stderr.strip()[-200:]}")
    assert failures == []


def test_a_1400_byte_ping_with_df_set_crosses_the_router(nodes):
    proc = nodes["node-1"].exec("ip", "netns", "exec", "pod-a", "ping", "-M", "do", "-s", "1400", "-c", "1",
                                "-W", "3", nodes["node-4"].pods["pod-a"], check=False)
    assert proc.returncode == 0 and "1 received" in proc.stdout, proc.stdout + proc.stderr


def test_routes_backend_cannot_reach_the_far_node(nodes):
    n1, n4 = nodes["node-1"], nodes["node-4"]
    n1.stop_agent()
    try:
        proc = n1.exec(*n1.agent_argv("--once", "--backend", "routes"), check=False)
        assert proc.returncode == 1 and "cannot set route 10.244.4.0/24 via 172.31.2.14" in proc.stderr
        assert n1.connect("pod-a", n4.pods["pod-a"]).stdout.strip() == ""
    finally:
        n1.start_agent()
    eventually(lambda: n1.connect("pod-a", n4.pods["pod-a"]).stdout.strip() == n1.pods["pod-a"],
               "node-1's agent back on auto, and the tunnel with it")


def test_vxlan_backend_tunnels_even_inside_kinds_network(nodes):
    n1, n2 = nodes["node-1"], nodes["node-2"]
    for node in (n1, n2):
        node.stop_agent()
    try:
        for node in (n1, n2):
            proc = node.exec(*node.agent_argv("--once", "--backend", "vxlan"), check=False)
            assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "10.244.2.0/24 via 10.244.2.0 dev cni-vxlan onlink" in n1.exec("ip", "route", "show",
                                                                                "proto", "157").stdout
        assert n1.connect("pod-a", n2.pods["pod-a"]).stdout.strip() == n1.pods["pod-a"]
        assert n2.connect("pod-a", n1.pods["pod-a"]).stdout.strip() == n2.pods["pod-a"]
    finally:
        for node in (n1, n2):
            node.start_agent()
    eventually(lambda: "10.244.2.0/24 via 172.31.1.12 dev eth0" in n1.exec("ip", "route", "show", "proto",
                                                                           "157").stdout,
               "node-1's agent back on auto: a direct route to node-2")


def test_a_restarted_node_starts_clean_and_peers_converge(nodes, private_docker):
    n3, n1, n4 = nodes["node-3"], nodes["node-1"], nodes["node-4"]
    first = n3.pods["pod-a"]
    private_docker.docker("restart", "--time", "2", n3.container)
    # /run is a tmpfs: the reservations and pod namespaces of before are gone, as after a reboot.
    assert n3.exec("ls", "/run").stdout.split() == []
    n3.boot()
    eventually(lambda: "cni-vxlan" in n3.exec("ip", "-d", "link", "show", "cni-vxlan", check=False).stdout,
               "node-3's agent making its VXLAN device again")
    again = n3.add_pod("pod-b")
    assert again == first, "the restarted node hands out its first address again"
    for peer in (n1, n4):
        eventually(lambda: peer.connect("pod-a", again).stdout.strip() == peer.pods["pod-a"],
                   f"{peer.name} reaching the restarted node's new pod")
        assert n3.connect("pod-b", peer.pods["pod-a"]).stdout.strip() == again
