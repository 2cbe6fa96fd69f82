"""`cni-bridge inspect` on real namespaces: what it shows, each finding, exit status, JSON, dot.

The plugins and inspect run in the scratch host netns with a conf dir, bin dir,
IPAM store and libcni cache under tmp_path, so nothing here reads the
machine's own /etc/cni, /opt/cni/bin or /var/lib/cni.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from cni_bridge.plan import host_veth_name, masq_chain_name
from ipam.filestore import FileStore, current_boot_id
from ipam.store import Reservation
from tests.support.netns import VENV_BIN, unique
from tests.support.reliability import wait_until

NET = "insp"
SUBNET = "10.93.0.0/24"
POOL_SIZE = 253          # .1 is the gateway, .255 the broadcast address

TOP_KEYS = {"schemaVersion", "hostname", "confDir", "binDir", "files", "networks", "uplink", "peers",
            "overlay", "clusterMasquerade", "daemon", "checks", "summary"}
NETWORK_KEYS = {"name", "file", "cniVersion", "plugins", "bridge", "ipamType", "dataDir", "isGateway",
                "ipMasq", "masqBackend", "pools", "attachments", "strayVeths"}
BRIDGE_KEYS = {"name", "exists", "up", "mtu", "mac", "addresses", "ports"}
ATTACHMENT_KEYS = {"containerID", "ifname", "ips", "netns", "netnsExists", "hostVeth", "hostVethExists",
                   "hostVethMac", "mac", "podName", "podNamespace", "masquerade", "masqBackend", "boot"}
POOL_KEYS = {"network", "setIndex", "subnet", "rangeStart", "rangeEnd", "gateway", "size", "used",
             "reclaimable", "free"}
OVERLAY_KEYS = {"device", "peers"}
VXLAN_KEYS = {"name", "vni", "port", "local", "mac", "mtu", "up", "learning"}
OVERLAY_PEER_KEYS = {"podCIDR", "way", "via", "device", "vtepMac", "underlay", "route", "neighbour", "fdb",
                     "complete"}
CHECK_KEYS = {"name", "verdict", "detail", "subject"}
FILE_KEYS = {"path", "network", "cniVersion", "plugins", "valid", "error"}
PORT_KEYS = {"name", "kind", "mac", "up"}
DAEMON_KEYS = {"socket", "exists", "reachable", "pid", "workers", "workerPids", "uptimeSeconds",
               "metricsAddress", "error"}


class Node:
    """A conf dir holding one cni-bridge conflist, and helpers to run pods and inspect."""

    def __init__(self, cni_host, tmp_path: Path) -> None:
        self.host, self.tmp = cni_host, tmp_path
        self.conf_dir, self.cache_dir = tmp_path / "net.d", tmp_path / "cache"
        self.conf_dir.mkdir()
        (self.cache_dir / "results").mkdir(parents=True)
        self.bridge = unique("bi")
        self.plugin = {"type": "cni-bridge", "bridge": self.bridge, "isGateway": True, "ipMasq": True,
                       "daemonSocket": "",
                       "ipam": {"type": "cni-ipam", "dataDir": str(cni_host.data_dir),
                                "ranges": [[{"subnet": SUBNET}]], "routes": [{"dst": "0.0.0.0/0"}]}}
        self.write_conflist("10-insp.conflist", {"cniVersion": "1.0.0", "name": NET,
                                                 "plugins": [self.plugin, {"type": "portmap",
                                                                           "capabilities": {"portMappings": True}}]})

    def write_conflist(self, name: str, body: dict | str) -> Path:
        path = self.conf_dir / name
        path.write_text(body if isinstance(body, str) else json.dumps(body))
        return path

    def config(self) -> dict:
        return {**self.plugin, "cniVersion": "1.0.0", "name": NET}

    def add(self, cid: str, pod, pod_name: str = "", namespace: str = "default") -> dict:
        res = self.host.run("cni-bridge", "ADD", self.config(), container_id=cid, netns=pod.path)
        assert res.rc == 0, res.stdout + res.stderr
        if pod_name:   # what libcni caches for the runtime after an ADD (containerd passes these CNI_ARGS)
            cached = {"kind": "cniCacheV1", "containerId": cid, "ifName": "eth0", "networkName": NET,
                      "cniArgs": [["IgnoreUnknown", "1"], ["K8S_POD_NAMESPACE", namespace],
                                  ["K8S_POD_NAME", pod_name]], "result": json.loads(res.stdout)}
            (self.cache_dir / "results" / f"{NET}-{cid}-eth0").write_text(json.dumps(cached))
        return json.loads(res.stdout)

    def inspect(self, *args: str) -> subprocess.CompletedProcess:
        proc = self.host.netns.exec(str(VENV_BIN / "cni-bridge"), "inspect", "--conf-dir", str(self.conf_dir),
                                    "--bin-dir", str(self.host.cni_path), "--cache-dir", str(self.cache_dir),
                                    "--daemon-socket", str(self.tmp / "no-daemon.sock"), *args,
                                    check=False, env={"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/bin")})
        assert "Traceback" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
        return proc

    def view(self, *args: str) -> tuple[int, dict]:
        proc = self.inspect("--json", *args)
        return proc.returncode, json.loads(proc.stdout)


@pytest.fixture
def node(cni_host, tmp_path) -> Node:
    return Node(cni_host, tmp_path)


def checks(view: dict, verdict: str) -> list[tuple[str, str]]:
    return [(c["name"], c["subject"]) for c in view["checks"] if c["verdict"] == verdict]


def test_healthy_node(node, make_netns):
    pods = [make_netns("p"), make_netns("p")]
    results = [node.add("web-1", pods[0], "web-1", "shop"), node.add("db-1", pods[1])]

    rc, view = node.view()
    assert rc == 0, checks(view, "fail")
    assert checks(view, "fail") == []
    (network,) = view["networks"]
    assert network["name"] == NET and network["plugins"] == ["cni-bridge", "portmap"]
    bridge = network["bridge"]
    assert bridge["exists"] and bridge["up"] and "10.93.0.1/24" in bridge["addresses"]
    assert sorted(p["name"] for p in bridge["ports"]) == sorted(a["hostVeth"] for a in network["attachments"])

    by_cid = {a["containerID"]: a for a in network["attachments"]}
    assert set(by_cid) == {"web-1", "db-1"}
    for cid, pod, result in (("web-1", pods[0], results[0]), ("db-1", pods[1], results[1])):
        a = by_cid[cid]
        assert a["ips"] == [result["ips"][0]["address"].split("/")[0]]
        assert (a["netns"], a["netnsExists"]) == (pod.path, True)
        assert a["hostVeth"] == result["interfaces"][1]["name"] and a["hostVethExists"]
        assert a["hostVethMac"] == result["interfaces"][1]["mac"]
        assert a["mac"] == result["interfaces"][2]["mac"]
        assert a["masquerade"] is True and a["boot"] == "current"
    assert (by_cid["web-1"]["podName"], by_cid["web-1"]["podNamespace"]) == ("web-1", "shop")
    assert by_cid["db-1"]["podName"] == ""

    (pool,) = network["pools"]
    assert (pool["subnet"], pool["used"], pool["free"], pool["size"]) == (SUBNET, 2, POOL_SIZE - 2, POOL_SIZE)
    names = {c["name"] for c in view["checks"] if c["verdict"] == "ok"}
    assert {"net.ipv4.ip_forward", "masquerade tools", "conflist", "plugin in bin dir", "bridge", "ipam pool",
            "leaks"} <= names

    table = node.inspect()
    assert table.returncode == 0
    assert f"NETWORK {NET}" in table.stdout and "shop/web-1" in table.stdout
    assert f"pool    {SUBNET}" in table.stdout and "used 2  free 251 of 253" in table.stdout


def test_json_schema_is_stable(node, make_netns):
    node.add("c1", make_netns("p"), "one")
    _, view = node.view()
    assert set(view) == TOP_KEYS and view["schemaVersion"] == 1
    network = view["networks"][0]
    assert set(network) == NETWORK_KEYS and set(network["bridge"]) == BRIDGE_KEYS
    assert set(network["attachments"][0]) == ATTACHMENT_KEYS and set(network["pools"][0]) == POOL_KEYS
    assert all(set(c) == CHECK_KEYS for c in view["checks"]) and set(view["daemon"]) == DAEMON_KEYS
    assert set(view["files"][0]) == FILE_KEYS and set(network["bridge"]["ports"][0]) == PORT_KEYS
    assert set(view["summary"]) == {"ok", "warn", "fail", "skip"}
    assert view["overlay"] == {"device": None, "peers": []}     # no agent on this node
    assert {c["verdict"] for c in view["checks"]} <= {"ok", "warn", "fail", "skip"}


def test_leaks_are_reported(node, cni_host, make_netns):
    live, dead, masq_only = make_netns("p"), make_netns("p"), make_netns("p")
    node.add("live", live)
    node.add("dead", dead)
    node.add("norsv", masq_only)
    dead.delete()                   # a deleted netns: no DEL came, the reservation stays
    dead_veth = host_veth_name("dead", "eth0")
    assert wait_until(lambda: dead_veth not in cni_host.netns.links())   # the kernel removes it a moment later
    # A reservation no pod ever had (its netns path never existed).
    store = FileStore(str(cni_host.data_dir), NET)
    with store.locked():
        store.put(Reservation(__import__("ipaddress").ip_address("10.93.0.200"), "ghost", "eth0",
                              current_boot_id(), 1.0, netns="/var/run/netns/ghost-never-made"))
        store.set_owned(("ghost", "eth0"), [__import__("ipaddress").ip_address("10.93.0.200")])
    # The address released behind the plugin's back: masquerade rules and a host veth without one.
    res = cni_host.netns.exec(str(cni_host.cni_path / "cni-ipam"), "release", "--data-dir", str(cni_host.data_dir),
                              "--network", NET, "--container-id", "norsv", check=False)
    assert res.returncode == 0, res.stderr
    # A veth made by hand on the bridge, named as cni-bridge names them.
    stray = "veth" + hashlib.sha256(b"stray").hexdigest()[:11]
    cni_host.netns.exec("ip", "link", "add", stray, "type", "veth", "peer", "name", unique("pe"))
    cni_host.netns.exec("ip", "link", "set", stray, "master", node.bridge)

    rc, view = node.view()
    assert rc == 1
    failed = checks(view, "fail")
    dead_ip = next(a["ips"][0] for a in view["networks"][0]["attachments"] if a["containerID"] == "dead")
    assert ("leak:netns-gone", f"{NET} {dead_ip} dead/eth0") in failed
    assert ("leak:netns-gone", f"{NET} 10.93.0.200 ghost/eth0") in failed
    assert ("leak:no-host-veth", f"{NET} {dead_ip} dead/eth0") in failed
    assert ("leak:masq-rule", f"{NET} {masq_chain_name(NET, 'norsv', 'eth0')}") in failed
    norsv_veth = host_veth_name("norsv", "eth0")
    assert {("leak:stray-veth", f"{NET} {stray}"), ("leak:stray-veth", f"{NET} {norsv_veth}")} <= set(failed)
    assert not any(subject.endswith("live/eth0") for _, subject in failed)
    dead_view = next(a for a in view["networks"][0]["attachments"] if a["containerID"] == "dead")
    assert dead_view["netnsExists"] is False and dead_view["hostVethExists"] is False

    # The same leak findings as `cni-ipam check`, not a second opinion.
    ipam_check = cni_host.netns.exec(str(cni_host.cni_path / "cni-ipam"), "check", "--data-dir",
                                     str(cni_host.data_dir), "--host-veths", "--json", check=False)
    expected = {(f"leak:{f['kind']}", " ".join(filter(None, (NET, f["ip"], f"{f['containerID']}/{f['ifname']}"))))
                for f in json.loads(ipam_check.stdout)}
    ipam_kinds = {(n, s) for n, s in failed + checks(view, "warn")
                  if n.startswith("leak:") and n not in ("leak:masq-rule", "leak:stray-veth")}
    assert ipam_kinds == expected

    table = node.inspect()
    assert table.returncode == 1
    assert "FAIL     leak:netns-gone" in table.stdout and "(gone)" in table.stdout


def test_broken_conflist_and_missing_plugin(node, cni_host):
    broken = dict(node.plugin, mtu="1500", bridge=unique("bx"))
    node.write_conflist("20-typo.conflist", {"cniVersion": "1.0.0", "name": "typo", "plugins": [broken]})
    node.write_conflist("30-missing.conflist", {"cniVersion": "1.0.0", "name": "other", "plugins": [
        {**node.plugin, "bridge": unique("by"), "ipam": {**node.plugin["ipam"], "ranges": [[{"subnet": "10.94.0.0/24"}]]}},
        {"type": "no-such-plugin"}]})
    node.write_conflist("40-not-json.conflist", "{\"cniVersion\": ")

    rc, view = node.view()
    assert rc == 1
    by_path = {Path(f["path"]).name: f for f in view["files"]}
    assert by_path["10-insp.conflist"]["valid"] and by_path["30-missing.conflist"]["valid"]
    assert not by_path["20-typo.conflist"]["valid"]
    assert "mtu" in by_path["20-typo.conflist"]["error"] and "integer" in by_path["20-typo.conflist"]["error"]
    assert not by_path["40-not-json.conflist"]["valid"] and "not JSON" in by_path["40-not-json.conflist"]["error"]
    failed = checks(view, "fail")
    assert ("conflist", str(node.conf_dir / "20-typo.conflist")) in failed
    assert ("conflist", str(node.conf_dir / "40-not-json.conflist")) in failed
    missing = [c for c in view["checks"] if c["name"] == "plugin in bin dir" and c["verdict"] == "fail"]
    assert [Path(c["detail"].split()[0]).name for c in missing] == ["no-such-plugin"]
    # The in-process IPAM (cni-ipam under cni-bridge) needs no executable; portmap is there.
    assert ("plugin in bin dir", str(node.conf_dir / "10-insp.conflist")) in checks(view, "ok")


def test_the_validation_is_adds(node, cni_host, make_netns):
    """A conflist inspect calls invalid is one ADD refuses with the same message."""
    broken = dict(node.plugin, hairpinMode=True, promiscMode=True)
    node.write_conflist("20-both.conflist", {"cniVersion": "1.0.0", "name": "both", "plugins": [broken]})
    _, view = node.view()
    error = next(f["error"] for f in view["files"] if f["network"] == "both")
    res = cni_host.run("cni-bridge", "ADD", {**broken, "cniVersion": "1.0.0", "name": "both"},
                       container_id="x", netns=make_netns("p").path)
    answer = json.loads(res.stdout)
    assert res.rc == 1 and answer["code"] == 7
    assert answer["details"] in error and "hairpinMode and promiscMode" in error


def test_forwarding_off(node, cni_host, make_netns):
    node.add("c1", make_netns("p"))
    assert node.view()[0] == 0
    cni_host.netns.exec("sysctl", "-qw", "net.ipv4.ip_forward=0")
    rc, view = node.view()
    assert rc == 1 and checks(view, "fail") == [("net.ipv4.ip_forward", "")]


def test_exhausted_pool_fails(node, cni_host, make_netns):
    node.plugin["ipam"]["ranges"] = [[{"subnet": "10.95.0.0/29", "rangeStart": "10.95.0.2",
                                       "rangeEnd": "10.95.0.3"}]]
    node.write_conflist("10-insp.conflist", {"cniVersion": "1.0.0", "name": NET, "plugins": [node.plugin]})
    node.add("a", make_netns("p"))
    rc, view = node.view()
    assert rc == 0 and any(c["name"] == "ipam pool" and c["verdict"] == "ok" for c in view["checks"])
    node.add("b", make_netns("p"))
    rc, view = node.view()
    assert rc == 1 and ("ipam pool", NET) in checks(view, "fail")


def test_dot_renders_with_graphviz(node, make_netns, tmp_path):
    if shutil.which("dot") is None:
        pytest.fail("graphviz's dot is missing: scripts/setup.sh installs it")
    node.add("web-1", make_netns("p"), "web-1", "shop")
    dead = make_netns("p")
    node.add("gone", dead)
    dead.delete()
    proc = node.inspect("--dot")
    assert proc.returncode == 1 and proc.stdout.startswith("digraph")
    svg = subprocess.run(["dot", "-Tsvg"], input=proc.stdout, capture_output=True, text=True)
    assert svg.returncode == 0 and svg.stderr == "", svg.stderr
    assert "shop/web&#45;1" in svg.stdout and f"bridge {node.bridge}" in svg.stdout
    assert "netns gone: leaked" in svg.stdout


def test_inspect_changes_nothing(node, cni_host, make_netns):
    node.add("a", make_netns("p"))
    gone = make_netns("p")
    node.add("b", gone)
    gone.delete()
    # The kernel removes the veth of a deleted netns a moment later, on its own.
    assert wait_until(lambda: len([n for n in cni_host.netns.links() if n.startswith("veth")]) == 1)

    def state() -> tuple:
        files = sorted((str(p), p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else b"")
                       for p in Path(cni_host.data_dir).rglob("*"))
        # What could be changed; not carrier or timers, which the kernel moves on its own.
        links = sorted((link["ifname"], link.get("address"), link["mtu"], link.get("master"),
                        sorted(set(link["flags"]) - {"LOWER_UP", "NO-CARRIER", "M-DOWN"}))
                       for link in json.loads(cni_host.netns.exec("ip", "-j", "link", "show").stdout))
        addrs = sorted((a["ifname"], [(i["local"], i["prefixlen"]) for i in a["addr_info"]])
                       for a in json.loads(cni_host.netns.exec("ip", "-j", "addr", "show").stdout))
        return files, links, addrs, cni_host.netns.nat_rules(), cni_host.netns.exec("ip", "route").stdout

    before = state()
    for args in ((), ("--json",), ("--dot",)):
        assert node.inspect(*args).returncode == 1
    after = state()
    for what, old, new in zip(("store", "links", "addresses", "nat rules", "routes"), before, after):
        assert new == old, what


def test_no_conf_dir_is_a_failed_check_not_a_crash(node, tmp_path):
    proc = node.host.netns.exec(str(VENV_BIN / "cni-bridge"), "inspect", "--conf-dir", str(tmp_path / "none"),
                                "--json", "--daemon-socket", str(tmp_path / "none.sock"), check=False)
    view = json.loads(proc.stdout)
    assert proc.returncode == 1 and view["networks"] == []
    assert ("conflist", "") in checks(view, "fail")


def test_a_node_the_agent_set_up(make_netns, tmp_path):
    """Peers, uplink and cluster masquerade as `cni-bridge agent` leaves them, and its conflist's pods."""
    if shutil.which("iptables") is None:
        pytest.skip("the agent's masquerade needs iptables")
    from tests.support.netns import CniHost, make_cni_path

    ns = make_netns("an")
    ns.exec("ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p")
    ns.exec("ip", "addr", "add", "10.251.0.1/24", "dev", "eth0")
    for dev in ("eth0", "eth0p"):
        ns.exec("ip", "link", "set", dev, "up")
    ns.exec("ip", "route", "add", "default", "via", "10.251.0.254", "dev", "eth0")
    topology, conf_dir, bridge = tmp_path / "topology.json", tmp_path / "net.d", unique("ba")
    topology.write_text(json.dumps({"clusterCIDR": "10.244.0.0/16", "nodes": [
        {"name": "n1", "internalIP": "10.251.0.1", "podCIDR": "10.244.1.0/24"},
        {"name": "n2", "internalIP": "10.251.0.2", "podCIDR": "10.244.2.0/24"}]}))
    env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/bin")}
    agent = ns.exec(str(VENV_BIN / "cni-bridge"), "agent", "--node", "n1", "--topology", str(topology), "--once",
                    "--conf-dir", str(conf_dir), "--ipam-data-dir", str(tmp_path / "ipam"), "--bridge", bridge,
                    "--no-portmap", check=False, env=env)
    assert agent.returncode == 0, agent.stderr
    host = CniHost(ns, make_cni_path(tmp_path / "bin"), tmp_path / "ipam")
    written = json.loads((conf_dir / "10-cni-bridge.conflist").read_text())
    conf = dict(written["plugins"][0], name=written["name"], cniVersion=written["cniVersion"])
    assert host.run("cni-bridge", "ADD", conf, container_id="p1", netns=make_netns("p").path).rc == 0

    argv = [str(VENV_BIN / "cni-bridge"), "inspect", "--conf-dir", str(conf_dir), "--bin-dir", str(host.cni_path),
            "--daemon-socket", str(tmp_path / "none.sock")]
    proc = ns.exec(*argv, "--json", check=False, env=env)
    view = json.loads(proc.stdout)
    assert proc.returncode == 0, checks(view, "fail")
    assert view["uplink"] == "eth0" and view["clusterMasquerade"] == ["IPv4"]
    assert view["peers"] == [{"dst": "10.244.2.0/24", "via": "10.251.0.2", "device": "eth0", "source": "agent"}]
    assert set(view["overlay"]) == OVERLAY_KEYS and set(view["overlay"]["device"]) == VXLAN_KEYS
    (peer,) = view["overlay"]["peers"]     # auto: the peer shares the subnet, a direct route
    assert set(peer) == OVERLAY_PEER_KEYS
    assert (peer["podCIDR"], peer["way"], peer["via"], peer["complete"]) == ("10.244.2.0/24", "route", "10.251.0.2",
                                                                            True)
    (network,) = view["networks"]
    assert network["bridge"]["name"] == bridge and [a["containerID"] for a in network["attachments"]] == ["p1"]
    assert network["pools"][0]["subnet"] == "10.244.1.0/24" and network["pools"][0]["used"] == 1
    picture = ns.exec(*argv, "--dot", check=False, env=env).stdout
    assert "10.244.2.0/24" in picture and "uplink eth0" in picture
