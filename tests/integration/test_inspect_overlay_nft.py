"""`cni-bridge inspect` on the two features that landed after it: the agent's VXLAN overlay
peers and the nftables masquerade backend. Real namespaces, as test_overlay and test_inspect."""
from __future__ import annotations

import json
import os
import shutil

import pytest

from cni_bridge.masq.nftables import chain_name, pods_set
from cni_bridge.plan import masq_chain_name
from tests.integration.test_inspect import NET, Node as InspectNode, checks
from tests.integration.test_overlay import VXLAN, Node, build_cluster
from tests.support.netns import VENV_BIN

# node-1 and node-2 share subnet A (a direct route), node-3 is behind the router (VXLAN).
LAYOUT = [("node-1", "A", 11), ("node-2", "A", 12), ("node-3", "B", 13)]
ENV = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/bin")}


@pytest.fixture
def overlay_cluster(make_netns, tmp_path):
    """A router with two subnets and three nodes, converged by `cni-bridge agent --backend auto`."""
    return build_cluster(make_netns, tmp_path, LAYOUT)


def _inspect(node: Node, tmp_path, *args: str):
    proc = node.ns.exec(str(VENV_BIN / "cni-bridge"), "inspect", "--conf-dir", str(node.conf_dir),
                        "--bin-dir", str(node.host.cni_path), "--daemon-socket", str(tmp_path / "none.sock"),
                        *args, check=False, env=ENV)
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    return proc


def _vtep_mac(node: Node) -> str:
    return json.loads(node.ns.exec("ip", "-j", "link", "show", VXLAN).stdout)[0]["address"]


def test_overlay_peers_direct_and_vxlan_and_a_missing_fdb_entry(overlay_cluster, tmp_path):
    one, two, three = overlay_cluster.nodes
    three_mac = _vtep_mac(three)

    view = json.loads(_inspect(one, tmp_path, "--json").stdout)
    device = view["overlay"]["device"]
    assert (device["name"], device["vni"], device["port"], device["local"], device["up"]) == \
        (VXLAN, 1, 8472, one.ip, True)
    assert device["mtu"] == json.loads(one.ns.exec("ip", "-j", "link", "show", VXLAN).stdout)[0]["mtu"]
    peers = {p["podCIDR"]: p for p in view["overlay"]["peers"]}
    assert set(peers) == {*two.pod_cidrs, *three.pod_cidrs}
    direct = peers[two.pod_cidrs[0]]
    assert (direct["way"], direct["via"], direct["device"], direct["complete"]) == ("route", two.ip, "eth0", True)
    for cidr in three.pod_cidrs:
        tunnel = peers[cidr]
        assert (tunnel["way"], tunnel["device"], tunnel["vtepMac"], tunnel["underlay"]) == \
            ("vxlan", VXLAN, three_mac, three.ip)
        assert (tunnel["route"], tunnel["neighbour"], tunnel["fdb"], tunnel["complete"]) == (True, True, True, True)
    assert not [c for c in view["checks"] if c["name"] == "overlay peer" and c["verdict"] != "ok"]
    table = _inspect(one, tmp_path).stdout
    assert f"VXLAN   {VXLAN} up  VNI 1  UDP 8472  local {one.ip}" in table
    assert table.count("complete") >= len(peers) and "INCOMPLETE" not in table
    picture = _inspect(one, tmp_path, "--dot").stdout
    assert picture.count('label="tunnel"') == 3 and picture.count('label="route"') == 1

    one.ns.exec("bridge", "fdb", "del", three_mac, "dev", VXLAN, "dst", three.ip)
    proc = _inspect(one, tmp_path, "--json", "--strict")
    view = json.loads(proc.stdout)
    peers = {p["podCIDR"]: p for p in view["overlay"]["peers"]}
    for cidr in three.pod_cidrs:
        assert (peers[cidr]["fdb"], peers[cidr]["neighbour"], peers[cidr]["complete"]) == (False, True, False)
    assert peers[two.pod_cidrs[0]]["complete"]
    warned = {c["subject"]: c["detail"] for c in view["checks"] if c["name"] == "overlay peer"
              and c["verdict"] == "warn"}
    assert set(warned) == set(three.pod_cidrs) and "no FDB entry" in warned[three.pod_cidrs[0]]
    assert proc.returncode == 1      # --strict: a warning fails
    assert "INCOMPLETE: no FDB entry" in _inspect(one, tmp_path).stdout
    assert "no FDB entry" in _inspect(one, tmp_path, "--dot").stdout


nft_only = pytest.mark.skipif(shutil.which("nft") is None, reason="needs nft (Debian nftables)")


@pytest.fixture
def nft_node(cni_host, tmp_path) -> InspectNode:
    node = InspectNode(cni_host, tmp_path)
    node.plugin["ipMasqBackend"] = "nftables"
    node.write_conflist("10-insp.conflist", {"cniVersion": "1.0.0", "name": NET, "plugins": [node.plugin]})
    return node


@nft_only
def test_nftables_masquerade_is_shown_and_its_leaks_found(nft_node, cni_host, make_netns):
    nft_node.add("keep", make_netns("p"))
    nft_node.add("norsv", make_netns("p"))
    rc, view = nft_node.view()
    assert rc == 0, checks(view, "fail")
    (network,) = view["networks"]
    assert network["masqBackend"] == "nftables"
    assert {(a["containerID"], a["masquerade"], a["masqBackend"]) for a in network["attachments"]} == \
        {("keep", True, "nftables"), ("norsv", True, "nftables")}
    tools = [c for c in view["checks"] if c["name"] == "masquerade tools"]
    assert [(c["verdict"], c["subject"]) for c in tools] == [("ok", NET)] and "nftables" in tools[0]["detail"]
    assert "on (nftables), 2 of 2 with rules" in nft_node.inspect().stdout

    # The reservation released behind the plugin's back, and an element nobody's ADD made.
    res = cni_host.netns.exec(str(cni_host.cni_path / "cni-ipam"), "release", "--data-dir",
                              str(cni_host.data_dir), "--network", NET, "--container-id", "norsv", check=False)
    assert res.returncode == 0, res.stderr
    cni_host.netns.exec("nft", f'add element inet cni_bridge {pods_set(NET, 4)} {{ 10.93.0.250 comment "stray" }}')
    rc, view = nft_node.view()
    assert rc == 1
    leaks = {(c["subject"], c["detail"]) for c in view["checks"] if c["name"] == "leak:masq-rule"}
    assert {subject for subject, _ in leaks} == {f"{NET} {masq_chain_name(NET, 'norsv', 'eth0')}", f"{NET} stray"}
    assert all("nftables set elements" in detail for _, detail in leaks)
    assert [a["containerID"] for a in view["networks"][0]["attachments"]] == ["keep"]

    # The chain without its masquerade rules: the elements masquerade nothing.
    cni_host.netns.exec("nft", f"flush chain inet cni_bridge {chain_name(NET)}")
    rc, view = nft_node.view()
    assert rc == 1 and ("masquerade rule", NET) in checks(view, "fail")
    assert [(a["containerID"], a["masquerade"]) for a in view["networks"][0]["attachments"]] == [("keep", False)]
