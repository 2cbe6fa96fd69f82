"""The nftables masquerade backend on real namespaces: ADD, DEL, GC, CHECK, STATUS, and
attachments that the iptables backend made (upgrades, a network switched to nftables)."""
from __future__ import annotations

import json
import os
import shutil

import pytest

from cni_bridge.masq.nftables import chain_name, nets_set, pods_set
from cni_bridge.plan import masq_chain_name
from tests.support.netns import unique
from tests.support.reliability import (bridge_conf, cni_error, faulty, gc_conf, ipam_cli, leftovers, masq_chains,
                                       masq_elements, no_traceback, wait_until)

NET = "nftnet"

pytestmark = pytest.mark.skipif(shutil.which("nft") is None, reason="needs nft (Debian nftables)")


def _conf(cni_host, bridge=None, backend="nftables", network=NET, subnet="10.97.0.0/24"):
    conf = bridge_conf(cni_host.data_dir, bridge or unique("br"), network=network, subnet=subnet)
    if backend:
        conf["ipMasqBackend"] = backend
    return conf


def _add(cni_host, conf, cid, pod):
    res = cni_host.run("cni-bridge", "ADD", conf, container_id=cid, netns=pod.path)
    no_traceback(res)
    assert res.rc == 0, res.stdout + res.stderr
    return json.loads(res.stdout)


def _pod_ip(result) -> str:
    return result["ips"][0]["address"].split("/")[0]


def test_add_puts_one_element_in_the_network_set_and_del_removes_it(cni_host, make_netns):
    conf = _conf(cni_host)
    pods = [make_netns("p") for _ in range(2)]
    results = [_add(cni_host, conf, f"c{i}", pod) for i, pod in enumerate(pods)]

    assert masq_chains(cni_host.netns) == []            # no iptables chain for nftables attachments
    assert masq_elements(cni_host.netns) == sorted(
        f"{pods_set(NET, 4)} {_pod_ip(r)} {masq_chain_name(NET, f'c{i}', 'eth0')}" for i, r in enumerate(results))
    table = cni_host.netns.exec("nft", "list", "table", "inet", "cni_bridge").stdout
    # One masquerade rule per IP family for the whole network, matching the sets.
    assert table.count("masquerade") == 2 and f"saddr @{pods_set(NET, 4)}" in table
    assert "10.97.0.0/24" in cni_host.netns.exec("nft", "list", "set", "inet", "cni_bridge", nets_set(NET, 4)).stdout

    res = cni_host.run("cni-bridge", "DEL", conf, container_id="c0", netns=pods[0].path)
    assert res.rc == 0, res.stdout
    assert [e.split()[1] for e in masq_elements(cni_host.netns)] == [_pod_ip(results[1])]
    assert cni_host.run("cni-bridge", "DEL", conf, container_id="c0", netns=pods[0].path).rc == 0   # again: fine
    assert cni_host.run("cni-bridge", "DEL", conf, container_id="c1", netns=pods[1].path).rc == 0
    assert leftovers(cni_host, NET) == {}


def test_pod_traffic_leaving_the_subnet_is_masqueraded(cni_host, make_netns):
    """The rule really matches: the kernel counts the pod's packet in the masquerade rule."""
    conf = _conf(cni_host)
    pod = make_netns("p")
    _add(cni_host, conf, "c1", pod)
    chain = chain_name(NET)
    cni_host.netns.exec("nft", "insert", "rule", "inet", "cni_bridge", chain, "counter")   # counts all, first
    cni_host.netns.exec("ip", "link", "add", "out0", "type", "veth", "peer", "name", "out1")
    cni_host.netns.exec("ip", "addr", "add", "192.0.2.1/24", "dev", "out0")
    cni_host.netns.exec("ip", "link", "set", "out0", "up")
    cni_host.netns.exec("ip", "link", "set", "out1", "up")
    cni_host.netns.exec("sysctl", "-qw", "net.ipv4.ip_forward=1")
    pod.exec("ip", "route", "add", "192.0.2.0/24", "via", "10.97.0.1")
    pod.exec("ping", "-c", "1", "-W", "1", "192.0.2.99", check=False)    # nobody answers; NAT happens anyway
    listed = cni_host.netns.exec("nft", "list", "chain", "inet", "cni_bridge", chain).stdout
    assert "counter packets 0 " not in listed, listed


def test_del_without_the_pod_addresses_finds_the_elements_by_their_key(cni_host, make_netns):
    conf = _conf(cni_host)
    pod = make_netns("p")
    _add(cni_host, conf, "c1", pod)
    path = pod.path
    pod.delete()                                          # netns gone: DEL cannot read the addresses
    res = cni_host.run("cni-bridge", "DEL", conf, container_id="c1", netns=path)
    assert res.rc == 0, res.stdout
    assert masq_elements(cni_host.netns) == []
    pod2 = make_netns("p")
    _add(cni_host, conf, "c2", pod2)
    assert cni_host.run("cni-bridge", "DEL", conf, container_id="c2", netns="").rc == 0   # no netns at all
    assert wait_until(lambda: leftovers(cni_host, NET) == {}), leftovers(cni_host, NET)


def test_add_killed_after_the_element_is_added_then_del_leaves_nothing(cni_host, make_netns):
    conf = _conf(cni_host)
    pod = make_netns("p")
    res = cni_host.run("cni-bridge", "ADD", conf, container_id="c1", netns=pod.path, env=faulty("add.masq-set"))
    assert res.rc != 0
    assert len(masq_elements(cni_host.netns)) == 1
    assert cni_host.run("cni-bridge", "DEL", conf, container_id="c1", netns=pod.path).rc == 0
    assert wait_until(lambda: leftovers(cni_host, NET) == {}), leftovers(cni_host, NET)


def test_add_that_nft_refuses_fails_with_106_and_leaves_nothing(cni_host, make_netns):
    """Someone made our table's set with another type: the element cannot be added, ADD
    fails with the firewall error and rolls back the veth and the reservation."""
    conf = _conf(cni_host)
    netns = cni_host.netns
    netns.exec("nft", "add", "table", "inet", "cni_bridge")
    netns.exec("nft", "add", "set", "inet", "cni_bridge", pods_set(NET, 4), "{ type ipv6_addr; }")
    pod = make_netns("p")
    error = cni_error(cni_host.run("cni-bridge", "ADD", conf, container_id="c1", netns=pod.path))
    assert error["code"] == 106 and "nft" in error["msg"], error
    assert wait_until(lambda: leftovers(cni_host, NET) == {}), leftovers(cni_host, NET)
    assert "eth0" not in pod.links()


def test_an_address_left_by_a_lost_attachment_is_taken_over(cni_host, make_netns):
    """A stale element for the address (its DEL never came, the address was freed by hand)
    gets the new attachment's key, so the new attachment's DEL and CHECK find it."""
    conf = _conf(cni_host)
    conf["ipam"]["ranges"] = [[{"subnet": "10.97.0.0/24", "rangeStart": "10.97.0.2", "rangeEnd": "10.97.0.2"}]]
    pod = make_netns("p")
    ip = _pod_ip(_add(cni_host, conf, "c1", pod))
    assert cni_host.run("cni-bridge", "DEL", conf, container_id="c1", netns=pod.path).rc == 0
    cni_host.netns.exec("nft", "add", "element", "inet", "cni_bridge", pods_set(NET, 4),
                        f'{{ {ip} comment "{masq_chain_name(NET, "lost", "eth0")}" }}')
    result = _add(cni_host, conf, "c2", pod)
    assert _pod_ip(result) == ip
    assert masq_elements(cni_host.netns) == [f"{pods_set(NET, 4)} {ip} {masq_chain_name(NET, 'c2', 'eth0')}"]


def test_check_sees_a_removed_element_and_a_removed_rule(cni_host, make_netns):
    conf = _conf(cni_host)
    pod = make_netns("p")
    result = _add(cni_host, conf, "c1", pod)
    checked = {**conf, "prevResult": result}
    assert cni_host.run("cni-bridge", "CHECK", checked, container_id="c1", netns=pod.path).rc == 0

    cni_host.netns.exec("nft", "delete", "element", "inet", "cni_bridge", pods_set(NET, 4), f"{{ {_pod_ip(result)} }}")
    error = cni_error(cni_host.run("cni-bridge", "CHECK", checked, container_id="c1", netns=pod.path))
    assert error["code"] == 107 and "masquerade" in error["msg"]

    assert cni_host.run("cni-bridge", "DEL", conf, container_id="c1", netns=pod.path).rc == 0
    result = _add(cni_host, conf, "c1", pod)
    cni_host.netns.exec("nft", "flush", "chain", "inet", "cni_bridge", chain_name(NET))
    checked = {**conf, "prevResult": result}
    error = cni_error(cni_host.run("cni-bridge", "CHECK", checked, container_id="c1", netns=pod.path))
    assert error["code"] == 107 and "masquerade" in error["msg"]
    # The next ADD of the network restores the rule.
    _add(cni_host, conf, "c2", make_netns("p"))
    assert cni_host.run("cni-bridge", "CHECK", checked, container_id="c1", netns=pod.path).rc == 0


def test_gc_removes_elements_of_attachments_no_longer_valid(cni_host, make_netns):
    bridge = unique("br")
    conf = _conf(cni_host, bridge)
    other = _conf(cni_host, bridge, network="othernet", subnet="10.96.0.0/24")
    pods = {cid: make_netns("p") for cid in ("keep", "gone1", "gone2")}
    for cid, pod in pods.items():
        _add(cni_host, conf, cid, pod)
    other_pod = make_netns("p")
    _add(cni_host, other, "gone1", other_pod)             # same container ID, another network
    for cid in ("gone1", "gone2"):
        pods[cid].delete()

    res = cni_host.run("cni-bridge", "GC", gc_conf(conf, [("keep", "eth0")]))
    no_traceback(res)
    assert res.rc == 0, res.stdout
    keys = [element.split()[2] for element in masq_elements(cni_host.netns)]
    assert sorted(keys) == sorted([masq_chain_name(NET, "keep", "eth0"), masq_chain_name("othernet", "gone1", "eth0")])


def test_status_reports_nft_missing(cni_host, tmp_path):
    """PATH without nft (iptables is still there): STATUS for an nftables network says so."""
    bin_dir = tmp_path / "path-without-nft"
    bin_dir.mkdir()
    for tool in ("iptables", "iptables-restore", "ip6tables", "ip6tables-restore", "ip"):
        if shutil.which(tool):
            os.symlink(shutil.which(tool), bin_dir / tool)
    conf = {**_conf(cni_host), "cniVersion": "1.1.0"}
    env = {"PATH": str(bin_dir)}
    error = cni_error(cni_host.run("cni-bridge", "STATUS", conf, env=env))
    assert error["code"] == 50 and "nft" in error["msg"]
    assert cni_host.run("cni-bridge", "STATUS", {**conf, "ipMasqBackend": "iptables"}, env=env).rc == 0


# -- attachments the other backend made ------------------------------------------------------------

def test_upgrade_from_iptables_chains_del_gc_and_check(cni_host, make_netns):
    """Attachments made before the switch (iptables chains) stay valid for CHECK and are
    removed by DEL and GC once the network says nftables; new ones get set elements."""
    bridge = unique("br")
    old = _conf(cni_host, bridge, backend="iptables")
    new = _conf(cni_host, bridge, backend="nftables")
    pods = {cid: make_netns("p") for cid in ("old1", "old2", "old3", "new1")}
    results = {cid: _add(cni_host, old, cid, pods[cid]) for cid in ("old1", "old2", "old3")}
    results["new1"] = _add(cni_host, new, "new1", pods["new1"])
    assert len(masq_chains(cni_host.netns)) == 3 and len(masq_elements(cni_host.netns)) == 1

    checked = {**new, "prevResult": results["old1"]}
    assert cni_host.run("cni-bridge", "CHECK", checked, container_id="old1", netns=pods["old1"].path).rc == 0

    assert cni_host.run("cni-bridge", "DEL", new, container_id="old1", netns=pods["old1"].path).rc == 0
    assert masq_chain_name(NET, "old1", "eth0") not in masq_chains(cni_host.netns)
    assert len(masq_chains(cni_host.netns)) == 2

    pods["old2"].delete()
    res = cni_host.run("cni-bridge", "GC", gc_conf(new, [("old3", "eth0"), ("new1", "eth0")]))
    assert res.rc == 0, res.stdout
    assert masq_chains(cni_host.netns) == [masq_chain_name(NET, "old3", "eth0")]

    for cid in ("old3", "new1"):
        assert cni_host.run("cni-bridge", "DEL", new, container_id=cid, netns=pods[cid].path).rc == 0
    assert wait_until(lambda: leftovers(cni_host, NET) == {}), leftovers(cni_host, NET)


def test_a_network_switched_back_to_iptables_still_removes_nftables_elements(cni_host, make_netns):
    bridge = unique("br")
    nft_conf = _conf(cni_host, bridge, backend="nftables")
    ipt_conf = _conf(cni_host, bridge, backend="iptables")
    pods = [make_netns("p") for _ in range(2)]
    result = _add(cni_host, nft_conf, "c0", pods[0])
    _add(cni_host, nft_conf, "c1", pods[1])

    checked = {**ipt_conf, "prevResult": result}
    assert cni_host.run("cni-bridge", "CHECK", checked, container_id="c0", netns=pods[0].path).rc == 0
    assert cni_host.run("cni-bridge", "DEL", ipt_conf, container_id="c0", netns=pods[0].path).rc == 0
    assert len(masq_elements(cni_host.netns)) == 1
    res = cni_host.run("cni-bridge", "GC", gc_conf(ipt_conf, []))
    assert res.rc == 0, res.stdout
    assert masq_elements(cni_host.netns) == []


def test_cni_ipam_check_reports_masquerade_rules_of_either_backend_without_a_reservation(cni_host, make_netns):
    """`cni-ipam check --masquerade`: rules left after their reservation was released by
    hand (an nftables element and an iptables chain) are findings, naming the backend."""
    bridge = unique("br")
    nft_conf, ipt_conf = _conf(cni_host, bridge, "nftables"), _conf(cni_host, bridge, "iptables")
    pods = {cid: make_netns("p") for cid in ("live", "lost-nft", "lost-ipt")}
    _add(cni_host, nft_conf, "live", pods["live"])
    _add(cni_host, nft_conf, "lost-nft", pods["lost-nft"])
    _add(cni_host, ipt_conf, "lost-ipt", pods["lost-ipt"])
    data = str(cni_host.data_dir)
    assert ipam_cli(cni_host, "check", "--data-dir", data, "--masquerade").rc == 0
    for cid in ("lost-nft", "lost-ipt"):
        assert ipam_cli(cni_host, "release", "--data-dir", data, "--network", NET, "--container-id", cid).rc == 0

    res = ipam_cli(cni_host, "check", "--data-dir", data, "--masquerade", "--json")
    assert res.rc == 1, res.stdout + res.stderr
    findings = sorted((f["kind"], f["detail"].split()[0], f["detail"].split()[3]) for f in json.loads(res.stdout))
    assert findings == [("masq-leak", "iptables", masq_chain_name(NET, "lost-ipt", "eth0")),
                        ("masq-leak", "nftables", masq_chain_name(NET, "lost-nft", "eth0"))]
    assert ipam_cli(cni_host, "check", "--data-dir", data).rc == 0     # not asked for: not looked at
