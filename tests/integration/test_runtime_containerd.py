"""Kubelet's path: containerd's CRI runs the plugins (tests/harness/cri).

One private containerd per variant of the plugins, run inside a scratch "host" netns
that has an uplink to a scratch "outside" netns (the world beyond the node). The tests
talk CRI to it as kubelet does: RunPodSandbox / PodSandboxStatus / StopPodSandbox /
RemovePodSandbox, and Status for NetworkReady. Variants:

- `cni-bridge`: the Python executables as `pip install .` gives them, no daemon;
- `cni-bridge+daemon`: as `make install` lays them out (the static front end as
  cni-bridge, the Python program beside it) with `cni-bridge daemon` running;
- `bundle`: the PyInstaller bundle (`make bundle`), no daemon (the front end's fallback);
- `reference`: Debian's reference `bridge` + `host-local`, same containerd, same cases.

Our variants get their conflist from the node agent (topology mode, dual-stack podCIDRs);
the reference gets the equivalent conflist written here (with its own ipMasq, as it has
no agent). A logging wrapper in front of the chained `portmap` records what containerd
sent (CNI_ARGS, verbs) without touching the plugin under test.
"""
from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import grpc
import pytest

from tests.harness.cri.client import CriClient, PodSpec, SandboxStatus
from tests.harness.cri.containerd import SANDBOX_IMAGE, Containerd, containerd_unavailable_reason
from tests.harness.cri.layouts import LAYOUTS, Daemon, make_bin_dir, python_program, start_daemon
from tests.harness.cri.pause_image import build_pause_image
from tests.support.netns import REFERENCE_DIR, Netns, unique
from tests.support.runtime import (
    _CLIENT,
    _SERVER,
    SpyCall,
    install_spy,
    per_attachment_nat,
    reservations,
    spy_calls,
    veths,
)

CLUSTER = ("10.133.0.0/16", "fd00:133::/32")
POD_CIDRS = (ipaddress.ip_network("10.133.1.0/24"), ipaddress.ip_network("fd00:133:1::/64"))
NODE_IP, OUTSIDE_IP = "10.134.0.1", "10.134.0.2"     # the uplink between host and outside
ONE_ADDRESS = "10.133.1.77"                          # the range of the one-address network
WAIT = 60.0                                          # bound on waiting, never asserted

# cni-ipam words an exhausted range as host-local does, so one message serves both.
EXHAUSTED = "no IP addresses available in range set"


def wait_until(predicate, what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what}")
        time.sleep(0.05)


# ------------------------------------------------------------------------- the node
@dataclass
class Node:
    variant: str
    host: Netns
    outside: Netns
    containerd: Containerd
    cri: CriClient
    bin_dir: Path
    data_dir: Path
    conf_dir: Path
    network: str
    bridge: str
    spy_log: Path
    ready_before: tuple
    ready_after: tuple
    daemon: Optional[Daemon] = None
    servers: list = field(default_factory=list)

    @property
    def ours(self) -> bool:
        return self.variant != "reference"

    def host_run(self, *argv: str) -> subprocess.CompletedProcess:
        return self.host.exec(*argv)

    def run_pod(self, pod: PodSpec) -> str:
        return self.cri.run_pod_sandbox(pod, cgroup_parent=self.containerd.cgroup_parent)

    def calls(self, sandbox_id: str = "") -> list[SpyCall]:
        return [c for c in spy_calls(self.spy_log) if not sandbox_id or c.env.get("CNI_CONTAINERID") == sandbox_id]

    def loaded_network(self) -> str:
        """The network containerd's CRI plugin has loaded from the conf dir ('' if none)."""
        config = json.loads(self.cri.status_info().get("cniconfig", "{}"))
        names = [n["Config"]["Name"] for n in config.get("Networks") or [] if n.get("IFName") != "lo"]
        return names[0] if names else ""

    def use_conflist(self, conf: Optional[dict]) -> None:
        """Put `conf` in front of the node's conflist (None: take it away again) and wait
        until containerd has loaded the change, as it watches the conf dir."""
        path = self.conf_dir / "05-test.conflist"
        if conf is None:
            path.unlink(missing_ok=True)
            wanted = self.network
        else:
            tmp = self.conf_dir / ".05-test.tmp"
            tmp.write_text(json.dumps(conf))
            os.replace(tmp, path)
            wanted = conf["name"]
            self.containerd.networks.add(wanted)
        wait_until(lambda: self.loaded_network() == wanted, f"containerd to load network {wanted}")

    def one_address_conflist(self) -> dict:
        """The node's network, shrunk to one IPv4 address (same bridge and dataDir)."""
        main = {"type": "cni-bridge", "bridge": self.bridge, "isGateway": True, "isDefaultGateway": True,
                "ipam": {"type": "cni-ipam", "dataDir": str(self.data_dir), "ranges": [[{
                    "subnet": str(POD_CIDRS[0]), "rangeStart": ONE_ADDRESS, "rangeEnd": ONE_ADDRESS}]]}}
        if not self.ours:
            main.update(type="bridge", ipam={**main["ipam"], "type": "host-local"})
        if self.daemon is not None:
            main["daemonSocket"] = str(self.daemon.socket)
        return {"cniVersion": "1.0.0", "name": f"{self.network}-one",
                "plugins": [main, {"type": "portmap", "capabilities": {"portMappings": True}}]}

    # ----------------------------------------------------------------- inspection
    def eth0_addresses(self, status: SandboxStatus) -> list[str]:
        out = subprocess.run(["nsenter", f"--net={status.netns}", "ip", "-j", "addr", "show", "dev", "eth0"],
                             capture_output=True, text=True, check=True).stdout
        return [a["local"] for link in json.loads(out) for a in link["addr_info"] if a.get("scope") == "global"]

    def reserved(self, network: Optional[str] = None) -> dict[str, str]:
        """IP -> the reservation file's text, for every address reserved on disk."""
        return {ip: path.read_text(errors="replace")
                for ip, path in reservations(self.data_dir, network or self.network).items()}

    def leftovers(self, *sandbox_ids: str, network: Optional[str] = None) -> list[str]:
        """What the sandboxes' networking left in the host netns and on disk."""
        found = [f"veth {v}" for v in veths(self.host_run)]
        found += [f"reservation {ip}" for ip, text in self.reserved(network).items()
                  if not sandbox_ids or any(s in text for s in sandbox_ids)]
        for sid in sandbox_ids or ("",):
            found += [f"nat {line}" for line in per_attachment_nat(self.host_run, sid)]
        return found

    # -------------------------------------------------------------------- traffic
    def serve(self, netns_path: str, port: int, token: str) -> subprocess.Popen:
        proc = subprocess.Popen(["nsenter", f"--net={netns_path}", sys.executable, "-c", _SERVER, token,
                                 str(port), "::"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.servers.append(proc)
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        return proc

    @staticmethod
    def connect(netns_path: str, address: str, port: int) -> str:
        """From inside netns_path: what the server at address:port said, as "<token> from
        <peer address>" ('' when nothing answered)."""
        proc = subprocess.run(["nsenter", f"--net={netns_path}", sys.executable, "-c", _CLIENT, address, str(port),
                               "3"], capture_output=True, text=True, timeout=30)
        if proc.returncode != 0:
            return ""
        token, _, peer = proc.stdout.strip().partition(" from ")
        peer_ip = ipaddress.ip_address(peer)   # the server listens on "::": IPv4 peers come v4-mapped
        return f"{token} from {getattr(peer_ip, 'ipv4_mapped', None) or peer_ip}"

    def stop_servers(self) -> None:
        for proc in self.servers:
            if proc.poll() is None:
                proc.kill()
            proc.communicate(timeout=10)
        self.servers.clear()


# ------------------------------------------------------------------ building a node
@pytest.fixture(scope="session")
def pause_tar(tmp_path_factory) -> Path:
    return build_pause_image(tmp_path_factory.mktemp("pause") / "pause.tar", SANDBOX_IMAGE)


def _write_network(variant: str, host: Netns, bin_dir: Path, base: Path, conf_dir: Path, network: str,
                   bridge: str, daemon: Optional[Daemon]) -> None:
    """Ours: the node agent writes the conflist (topology mode). Reference: written here."""
    data_dir = base / "ipam"
    if variant == "reference":
        conf = {"cniVersion": "1.0.0", "name": network, "plugins": [
            {"type": "bridge", "bridge": bridge, "isGateway": True, "isDefaultGateway": True, "ipMasq": True,
             "hairpinMode": True, "ipam": {"type": "host-local", "dataDir": str(data_dir),
                                           "ranges": [[{"subnet": str(c)}] for c in POD_CIDRS]}},
            {"type": "portmap", "capabilities": {"portMappings": True}}]}
        (conf_dir / "10-reference.conflist").write_text(json.dumps(conf))
        return
    topology = base / "topology.json"
    topology.write_text(json.dumps({"clusterCIDR": ",".join(CLUSTER), "nodes": [
        {"name": "node1", "internalIP": NODE_IP, "podCIDR": ",".join(map(str, POD_CIDRS))}]}))
    argv = [str(python_program(bin_dir)), "agent", "--node", "node1", "--topology", str(topology), "--once",
            "--conf-dir", str(conf_dir), "--ipam-data-dir", str(data_dir), "--bridge", bridge,
            "--network-name", network]
    if daemon is not None:
        argv += ["--daemon-socket", str(daemon.socket)]
    proc = host.exec(*argv, check=False, env={"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")})
    assert proc.returncode == 0, f"the agent failed:\n{proc.stdout}{proc.stderr}"


def _uplink(host: Netns, outside: Netns) -> None:
    """host:uplink (the node's address) <-> outside:eth0, an address beyond the pod subnet."""
    host.exec("ip", "link", "add", "uplink0", "type", "veth", "peer", "name", "eth0", "netns", outside.name)
    host.exec("ip", "addr", "add", f"{NODE_IP}/24", "dev", "uplink0")
    host.exec("ip", "link", "set", "uplink0", "up")
    outside.exec("ip", "addr", "add", f"{OUTSIDE_IP}/24", "dev", "eth0")
    outside.exec("ip", "link", "set", "eth0", "up")


@pytest.fixture(scope="module", params=LAYOUTS)
def node(request, pause_tar):
    reason = containerd_unavailable_reason()
    if reason:
        pytest.skip(reason)
    variant = request.param
    if variant == "reference" and not (REFERENCE_DIR / "bridge").exists():
        pytest.skip("the reference plugins are missing (apt-get install containernetworking-plugins)")
    base = Path(tempfile.mkdtemp(prefix="cri-", dir="/tmp"))   # short: unix socket paths under it
    namespaces: list[Netns] = []
    daemon: Optional[Daemon] = None
    containerd: Optional[Containerd] = None
    cri: Optional[CriClient] = None
    problems: list[str] = []
    try:
        host, outside = Netns("crih"), Netns("crio")
        namespaces += [outside, host]
        _uplink(host, outside)
        bin_dir = make_bin_dir(variant, base / "bin")
        spy_log = base / "portmap.calls"
        install_spy(bin_dir, "portmap", spy_log)
        if variant == "cni-bridge+daemon":
            daemon = start_daemon(host.path, python_program(bin_dir), base)
        conf_dir = base / "net.d"
        containerd = Containerd(base / "containerd", bin_dir, conf_dir, host.name)
        network, bridge = unique("crin"), unique("crib")
        containerd.networks.add(network)
        containerd.start()
        cri = CriClient(str(containerd.socket))
        containerd.import_image(pause_tar)
        ready_before = cri.conditions()["NetworkReady"]
        _write_network(variant, host, bin_dir, base, conf_dir, network, bridge, daemon)
        wait_until(cri.network_ready, "NetworkReady once the conflist is written")
        node = Node(variant, host, outside, containerd, cri, bin_dir, base / "ipam", conf_dir, network, bridge,
                    spy_log, ready_before, cri.conditions()["NetworkReady"], daemon)
        yield node
        node.stop_servers()
    finally:
        if containerd is not None:
            problems += containerd.cleanup(cri)
        if cri is not None:
            cri.close()
        if daemon is not None:
            daemon.stop()
        for ns in namespaces:
            ns.delete()
        shutil.rmtree(base, ignore_errors=True)
    assert not problems, f"containerd clean-up left: {problems}"


@pytest.fixture
def pods(node):
    """Sandboxes a test runs; any still there at the end are stopped and removed."""
    made: list[str] = []
    yield made
    node.stop_servers()
    for sid in made:
        for call in (node.cri.stop_pod_sandbox, node.cri.remove_pod_sandbox):
            try:
                call(sid)
            except grpc.RpcError:
                pass


def kubelet_pod(name: str, **kw) -> PodSpec:
    """A pod as kubelet names it: namespace, pod name and a UID."""
    return PodSpec(name=f"{name}-{unique('')}", namespace=f"ns-{name}", uid=str(uuid.uuid4()), **kw)


# ---------------------------------------------------------------------------- tests
def test_network_ready_follows_the_conflist(node):
    """kubelet keeps a node NotReady until the runtime reports NetworkReady: false while the
    conf dir is empty, true once the agent (or, for the reference, we) wrote the conflist."""
    ready, reason, _ = node.ready_before
    assert (ready, reason) == (False, "NetworkPluginNotReady")
    assert node.ready_after[0] is True
    assert node.loaded_network() == node.network


def test_pods_get_their_eth0_address_reserved_and_distinct(node, pods):
    specs = [kubelet_pod(f"web{i}") for i in range(3)]
    for spec in specs:
        pods.append(node.run_pod(spec))
    statuses = [node.cri.pod_sandbox_status(sid) for sid in pods]
    reserved = node.reserved()
    for spec, sid, status in zip(specs, pods, statuses):
        assert status.state == "SANDBOX_READY"
        ipv4, ipv6 = ipaddress.ip_address(status.ip), [ipaddress.ip_address(a) for a in status.additional_ips]
        assert ipv4 in POD_CIDRS[0] and len(ipv6) == 1 and ipv6[0] in POD_CIDRS[1], (status.ip, ipv6)
        assert sorted(node.eth0_addresses(status)) == sorted([status.ip, *status.additional_ips])
        for address in (status.ip, *status.additional_ips):
            assert sid in reserved.get(address, ""), f"{address} is not reserved for {sid}"
        adds = [c for c in node.calls(sid) if c.command == "ADD"]
        assert len(adds) == 1, [c.command for c in node.calls(sid)]
        args = dict(kv.split("=", 1) for kv in adds[0].env["CNI_ARGS"].split(";"))
        assert args == {"IgnoreUnknown": "1", "K8S_POD_NAMESPACE": spec.namespace, "K8S_POD_NAME": spec.name,
                        "K8S_POD_INFRA_CONTAINER_ID": sid, "K8S_POD_UID": spec.uid}
        if node.daemon is not None:
            assert node.daemon.served("ADD", sid) == 1, "the ADD did not go through the daemon"
    addresses = [a for s in statuses for a in (s.ip, *s.additional_ips)]
    assert len(set(addresses)) == len(addresses) == 6
    listed = {sid: state for sid, _, state in node.cri.list_pod_sandbox()}
    assert all(listed.get(sid) == "SANDBOX_READY" for sid in pods)


def test_pod_to_pod_keeps_the_source_address(node, pods):
    server_pod, client_pod = (node.run_pod(kubelet_pod(n)) for n in ("srv", "cli"))
    pods += [server_pod, client_pod]
    server, client = (node.cri.pod_sandbox_status(s) for s in (server_pod, client_pod))
    node.serve(server.netns, 8080, "pod-to-pod")
    for address, source in ((server.ip, client.ip), (server.additional_ips[0], client.additional_ips[0])):
        assert node.connect(client.netns, address, 8080) == f"pod-to-pod from {source}"


def test_outside_the_pod_subnet_sees_the_node_address(node, pods):
    """Masquerade: by the agent's cluster chain for ours, by the plugin's ipMasq for the reference."""
    sid = node.run_pod(kubelet_pod("egress"))
    pods.append(sid)
    status = node.cri.pod_sandbox_status(sid)
    node.serve(node.outside.path, 9090, "outside")
    assert node.connect(status.netns, OUTSIDE_IP, 9090) == f"outside from {NODE_IP}"


def test_host_port_reaches_a_listener_in_the_pod_until_stop(node, pods):
    sid = node.run_pod(kubelet_pod("web", port_mappings=(("tcp", 8080, 18080),)))
    pods.append(sid)
    status = node.cri.pod_sandbox_status(sid)
    add = next(c for c in node.calls(sid) if c.command == "ADD")
    # containerd 1.6 (go-cni) spells the keys as its Go struct fields, not in CONVENTIONS.md's
    # camelCase; the reference portmap reads both (Go's JSON decoding ignores case).
    assert add.stdin["runtimeConfig"]["portMappings"] == [
        {"HostPort": 18080, "ContainerPort": 8080, "Protocol": "tcp", "HostIP": ""}]
    node.serve(status.netns, 8080, "host-port")
    # From another namespace, to the node's address and host port: DNAT to the pod.
    assert node.connect(node.outside.path, NODE_IP, 18080).startswith("host-port from ")
    assert any("CNI-DN-" in rule for rule in per_attachment_nat(node.host_run, sid))
    node.cri.stop_pod_sandbox(sid)
    assert per_attachment_nat(node.host_run, sid) == []
    assert node.connect(node.outside.path, NODE_IP, 18080) == ""


def test_stop_twice_remove_twice_cleans_up_and_the_address_is_reused(node, pods):
    """With one address in the range, the next sandbox gets it only if the first gave it back."""
    node.use_conflist(node.one_address_conflist())
    try:
        first = node.run_pod(kubelet_pod("once"))
        pods.append(first)
        assert node.cri.pod_sandbox_status(first).ip == ONE_ADDRESS
        dels = []
        for call in (node.cri.stop_pod_sandbox, node.cri.stop_pod_sandbox,
                     node.cri.remove_pod_sandbox, node.cri.remove_pod_sandbox):
            call(first)
            dels.append(sum(c.command == "DEL" for c in node.calls(first)))
        # containerd 1.6 tears the network down at every Stop and once more at the first
        # Remove; the second Remove finds no sandbox. Every DEL after the first must succeed.
        assert dels == [1, 2, 3, 3], dels
        assert all(c.rc == 0 for c in node.calls(first)), "a DEL failed"
        assert node.leftovers(first, network=f"{node.network}-one") == []
        assert first not in [sid for sid, _, _ in node.cri.list_pod_sandbox()]
        second = node.run_pod(kubelet_pod("again"))
        pods.append(second)
        assert node.cri.pod_sandbox_status(second).ip == ONE_ADDRESS
        node.cri.stop_pod_sandbox(second)
        node.cri.remove_pod_sandbox(second)
    finally:
        node.use_conflist(None)


def test_a_failing_plugin_error_reaches_the_grpc_error_and_nothing_is_left(node, pods):
    """The range is exhausted: RunPodSandbox fails with the plugin's message, and the failed
    sandbox leaves no veth, reservation, rule or sandbox behind."""
    node.use_conflist(node.one_address_conflist())
    try:
        holder = node.run_pod(kubelet_pod("holder"))
        pods.append(holder)
        veths_before, nat_before = veths(node.host_run), per_attachment_nat(node.host_run)
        with pytest.raises(grpc.RpcError) as failed:
            node.run_pod(kubelet_pod("starved"))
        message = failed.value.details()
        assert EXHAUSTED in message, message
        assert veths(node.host_run) == veths_before
        assert list(node.reserved(f"{node.network}-one")) == [ONE_ADDRESS]
        assert per_attachment_nat(node.host_run) == nat_before
        assert [name for _, name, _ in node.cri.list_pod_sandbox() if name.startswith("starved")] == []
        node.cri.stop_pod_sandbox(holder)
        node.cri.remove_pod_sandbox(holder)
    finally:
        node.use_conflist(None)


def test_sandboxes_survive_a_containerd_restart_and_clean_up_after(node, pods):
    for name in ("keep1", "keep2"):
        pods.append(node.run_pod(kubelet_pod(name)))
    before = [node.cri.pod_sandbox_status(sid) for sid in pods]
    node.containerd.restart()
    after = [node.cri.pod_sandbox_status(sid) for sid in pods]
    for old, new in zip(before, after):
        assert new.state == "SANDBOX_READY"
        assert (new.ip, new.additional_ips) == (old.ip, old.additional_ips)
        assert sorted(node.eth0_addresses(new)) == sorted([old.ip, *old.additional_ips])
    for sid in pods:
        node.cri.stop_pod_sandbox(sid)
        node.cri.remove_pod_sandbox(sid)
    assert node.leftovers(*pods) == []
    assert node.leftovers() == [], "something of an earlier sandbox is left"
