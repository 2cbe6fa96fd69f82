"""The agent converges after the cluster changes under it, on a scratch namespace "node".

One node netns (eth0 on a veth whose far end stays in the same netns), the
agent in topology mode, and the plugins run with the conflist it wrote, as
kubelet would; a pod netns so the bridge and its gateway are the plugin's own.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.netns import VENV_BIN, CniHost, Netns, make_cni_path, unique
from tests.support.peers import agent_env

AGENT = VENV_BIN / "cni-bridge"
CLUSTER_CIDR = "10.244.0.0/16"


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
        return self.ns.exec(*self.argv("--once"), check=False, env=agent_env())

    def write_topology(self, own_cidr: str, cluster: str = CLUSTER_CIDR,
                       peers=(("n2", "10.251.0.2", "10.244.2.0/24"),)) -> None:
        nodes = [{"name": "n1", "internalIP": "10.251.0.1", "podCIDR": own_cidr}]
        nodes += [{"name": n, "internalIP": ip, "podCIDR": cidr} for n, ip, cidr in peers]
        self.topology.write_text(json.dumps({"clusterCIDR": cluster, "nodes": nodes}))

    def start_agent(self, resync: float) -> subprocess.Popen:
        """The agent's resync loop (no --once); the caller stops it with stop_agent."""
        return subprocess.Popen(["ip", "netns", "exec", self.ns.name, *self.argv("--resync", str(resync))],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=agent_env())

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

    def snapshot_without_bridge(self) -> tuple:
        """conflist, routes and nat rules (the agent's, before any pod made the bridge)."""
        path = self.conf_dir / "10-cni-bridge.conflist"
        return (path.read_bytes(), path.stat().st_ino,
                self.ns.exec("ip", "-4", "route", "show", "table", "all").stdout,
                self.ns.exec("iptables", "-w", "-t", "nat", "-S").stdout)

    def snapshot(self) -> tuple:
        path = self.conf_dir / "10-cni-bridge.conflist"
        return (path.read_bytes(), path.stat().st_ino,
                self.ns.exec("ip", "-4", "route", "show", "table", "all").stdout,
                self.ns.exec("ip", "addr", "show", "dev", self.bridge).stdout,
                self.ns.exec("iptables", "-w", "-t", "nat", "-S").stdout)


def stop_agent(proc: subprocess.Popen) -> str:
    """Stop it (if it still runs) and return its stderr."""
    if proc.poll() is None:
        proc.terminate()
    try:
        _, err = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return err


def eventually(check, what: str, proc: subprocess.Popen, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if proc.poll() is not None:
            pytest.fail(f"the agent exited ({proc.returncode}) waiting for {what}: {stop_agent(proc)}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.1)


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


def test_resync_loop_keeps_the_node_as_it_is_while_the_file_is_half_written(agent_node):
    node = agent_node
    node.write_topology("10.244.1.0/24")
    proc = node.start_agent(resync=0.2)
    try:
        routes = lambda: node.ns.exec("ip", "-4", "route", "show", "proto", "157").stdout  # noqa: E731
        eventually(lambda: "10.244.2.0/24 via 10.251.0.2" in routes(), "the first pass", proc)
        before = node.snapshot_without_bridge()

        full = node.topology.read_text()
        for half in ("", full[:len(full) // 2]):       # `cat > file` and an editor caught mid-write
            node.topology.write_text(half)
            time.sleep(1.0)                             # several resyncs
            assert proc.poll() is None, f"the agent exited ({proc.returncode}): {stop_agent(proc)}"
            assert node.snapshot_without_bridge() == before

        node.write_topology("10.244.1.0/24", peers=(("n2", "10.251.0.9", "10.244.2.0/24"),))
        eventually(lambda: "10.244.2.0/24 via 10.251.0.9" in routes(), "the repaired file followed", proc)
    finally:
        err = stop_agent(proc)
    assert "is empty" in err and "is not valid JSON" in err and "Traceback" not in err


def test_once_with_a_half_written_file_fails_before_changing_anything(agent_node):
    node = agent_node
    node.topology.write_text('{"clusterCIDR": "10.244.0.0/16", "nodes": [{"na')
    res = node.agent_once()
    assert res.returncode == 1
    assert res.stderr.startswith(f"cni-bridge agent: error: {node.topology} is not valid JSON")
    assert "Traceback" not in res.stderr and not node.conf_dir.exists()


# An API server that refuses everything, as one without the agent's RBAC does.
FORBIDDING_API = """
import json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *args): pass
    def do_GET(self):
        body = json.dumps({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Forbidden",
                           "code": 403, "message": "nodes is forbidden: cannot list resource nodes"}).encode()
        self.send_response(403)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
s = ThreadingHTTPServer(("127.0.0.1", 0), H)
print("ready", s.server_address[1], flush=True)
s.serve_forever()
"""


def test_kubernetes_once_reports_a_refused_list_in_one_line(make_netns, tmp_path):
    pytest.importorskip("kubernetes", reason="Kubernetes mode needs the kubernetes client (pip install '.[agent]')")
    ns = make_netns("kf")
    api = subprocess.Popen(["ip", "netns", "exec", ns.name, str(VENV_BIN / "python"), "-c", FORBIDDING_API],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = api.stdout.readline().split()
        assert line[:1] == ["ready"], api.stderr.read()
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "f",
            "clusters": [{"name": "f", "cluster": {"server": f"http://127.0.0.1:{line[1]}"}}],
            "users": [{"name": "f", "user": {"token": "not-checked"}}],
            "contexts": [{"name": "f", "context": {"cluster": "f", "user": "f"}}],
        }))
        res = ns.exec(str(AGENT), "agent", "--node", "n1", "--cluster-cidr", CLUSTER_CIDR, "--once",
                      "--kubeconfig", str(kubeconfig), "--conf-dir", str(tmp_path / "net.d"),
                      check=False, env={k: v for k, v in agent_env().items() if not k.startswith("KUBE")})
    finally:
        api.kill()
        api.communicate()
    assert res.returncode == 1
    assert res.stderr == ("cni-bridge agent: error: cannot list Nodes from the Kubernetes API: "
                          "HTTP 403 Forbidden: nodes is forbidden: cannot list resource nodes\n")
    assert not (tmp_path / "net.d").exists()
