"""Review fixes (plugin side) on real namespaces and through the real executables."""
from __future__ import annotations

import json
import shlex
import time

import pytest

from cni_bridge.plan import masq_chain_name
from tests.integration.cnitest import (
    OUR_CHAIN_PREFIX, addr_of, addresses, assert_cni_error, assert_nothing_left, bridge_conf, link,
    links, our_chains, our_masq_rules, ping, reserved_ips, sysfs, veths, with_prev,
)
from tests.support.netns import unique

DEEP = b"[" * 100000


# -- stdin nested deeper than the recursion limit: code 6, no traceback ---------------------
@pytest.mark.parametrize("plugin, env", [
    ("cni-ipam", {}),
    # How the static front end (packaging/shim) runs the Python program when no daemon answers.
    ("cni-bridge", {"CNI_BRIDGE_FRONT_END": "unavailable"}),
    ("cni-bridge", {}),   # the Python front end peeks at stdin before the runner does
], ids=["cni-ipam", "cni-bridge-after-front-end", "cni-bridge"])
@pytest.mark.parametrize("command", ["ADD", "DEL"])
def test_deeply_nested_stdin_is_code_6_without_traceback(cni, pod, plugin, env, command):
    before = set(links(cni.ns))
    res = cni.run_bytes(plugin, DEEP, {"CNI_COMMAND": command, "CNI_CONTAINERID": "c1",
                                       "CNI_NETNS": pod.path, "CNI_IFNAME": "eth0", **env})
    err = assert_cni_error(res, 6)
    assert "nested too deeply" in err["details"]
    assert "Traceback" not in res.stderr and "RecursionError" not in res.stderr
    assert_nothing_left(cni, before)


@pytest.mark.parametrize("plugin", ["cni-ipam", "cni-bridge"])
def test_version_with_deeply_nested_stdin(cni, plugin):
    res = cni.run_bytes(plugin, DEEP, {"CNI_COMMAND": "VERSION"})
    assert res.rc == 0, res
    assert "1.1.0" in json.loads(res.stdout)["supportedVersions"]


# -- CHECK sees a missing masquerade jump in each IP family ---------------------------------
def _delete_postrouting_jumps(ns, tool: str) -> int:
    """Delete every POSTROUTING jump of ours from one family's nat table; how many went."""
    gone = 0
    for line in ns.exec(tool, "-w", "5", "-t", "nat", "-S", "POSTROUTING").stdout.splitlines():
        args = shlex.split(line)
        if args[:2] == ["-A", "POSTROUTING"] and args[-1].startswith(OUR_CHAIN_PREFIX):
            ns.exec(tool, "-w", "5", "-t", "nat", "-D", "POSTROUTING", *args[2:])
            gone += 1
    return gone


@pytest.mark.parametrize("tool, family", [("iptables", 4), ("ip6tables", 6)])
def test_check_fails_when_one_familys_masquerade_jump_is_gone(cni, pod, tool, family):
    conf = bridge_conf(cni, "10.77.0.0/24", "fd77::/64", version="1.1.0", isGateway=True, ipMasq=True)
    result = cni.add(conf, "c1", pod)
    assert cni.check(conf, result, "c1", pod).rc == 0
    assert _delete_postrouting_jumps(cni.ns, tool) == 1
    err = cni.fails(107, "cni-bridge", "CHECK", with_prev(conf, result), "masquerade",
                    container_id="c1", netns=pod.path)
    assert addr_of(result, family) in err["msg"], err
    cni.delete(conf, "c1", pod.path)
    assert_nothing_left(cni)


# -- masquerade comments stay within iptables' 255 characters --------------------------------
# CNI_CONTAINERID has no length limit. 230 characters make the earlier comment 262 long;
# much longer IDs do not fit cni-ipam's owners/<cid>:<ifname> file name (NAME_MAX).
LONG_CID = "c" * 229


def _comments(ns) -> list[str]:
    found = []
    for line in our_masq_rules(ns):
        args = shlex.split(line)
        if "--comment" in args:
            found.append(args[args.index("--comment") + 1])
    return found


def test_long_container_id_masquerade_rules_are_found_by_check_gc_and_del(cni, make_netns):
    conf = bridge_conf(cni, "10.77.0.0/24", "fd77::/64", version="1.1.0", isGateway=True, ipMasq=True)
    live, stale = LONG_CID + "1", LONG_CID + "2"
    pods = {cid: make_netns("p") for cid in (live, stale)}
    results = {cid: cni.add(conf, cid, p) for cid, p in pods.items()}
    comments = _comments(cni.ns)
    assert comments and all(len(c) <= 255 for c in comments), comments
    assert all(c.endswith(" if=eth0") for c in comments), comments   # not cut by iptables
    assert len({c for c in comments}) == 2                              # the two attachments differ
    for cid, p in pods.items():
        assert cni.check(conf, results[cid], cid, p).rc == 0

    cni.ok("cni-bridge", "GC", {**conf, "cni.dev/valid-attachments": [{"containerID": live, "ifname": "eth0"}]})
    assert len(our_chains(cni.ns)) == 2   # live's chain, one per family
    rules = "\n".join(our_masq_rules(cni.ns))
    assert addr_of(results[live], 4) in rules and addr_of(results[stale], 4) not in rules
    assert cni.check(conf, results[live], live, pods[live]).rc == 0
    cni.delete(conf, stale, pods[stale].path)
    cni.delete(conf, live, pods[live].path)
    assert_nothing_left(cni)


def _install_legacy_rules(ns, network: str, cid: str, ip: str) -> None:
    """Rules as the earlier release wrote them: the comment held the whole container ID,
    and iptables cut it at 255 characters (the ifname, even part of the ID, was lost)."""
    chain = masq_chain_name(network, cid, "eth0")
    comment = f'"cni-bridge net={network} id={cid} if=eth0"'
    script = "\n".join(["*nat", f":{chain} - [0:0]",
                        f"-A {chain} -d 10.77.0.0/24 -m comment --comment {comment} -j ACCEPT",
                        f"-A {chain} ! -d 224.0.0.0/4 -m comment --comment {comment} -j MASQUERADE",
                        f"-A POSTROUTING -s {ip}/32 -m comment --comment {comment} -j {chain}",
                        "COMMIT", ""])
    ns.exec("iptables-restore", "-w", "5", "--noflush", input=script)


@pytest.mark.parametrize("cid_length", [64, 224, 230, 300])
def test_gc_removes_stale_rules_of_the_earlier_comment_format(cni, cid_length):
    """Upgrade path: rules left by the earlier release (whole ID in the comment, cut by
    iptables when too long) are still told apart by GC, kept when live, removed when stale."""
    conf = bridge_conf(cni, version="1.1.0", ipMasq=True)
    live, stale = "l" * cid_length, "s" * cid_length
    _install_legacy_rules(cni.ns, conf["name"], live, "10.77.0.5")
    _install_legacy_rules(cni.ns, conf["name"], stale, "10.77.0.6")
    _install_legacy_rules(cni.ns, "othernet", stale, "10.77.0.7")   # another network's: not ours to GC
    assert len(our_chains(cni.ns)) == 3
    cni.ok("cni-bridge", "GC", {**conf, "cni.dev/valid-attachments": [{"containerID": live, "ifname": "eth0"}]})
    assert our_chains(cni.ns) == sorted([masq_chain_name(conf["name"], live, "eth0"),
                                         masq_chain_name("othernet", stale, "eth0")])
    if cid_length <= len(LONG_CID) + 1:   # longer IDs exceed cni-ipam's owners/ file name limit
        cni.delete(conf, live)
        assert our_chains(cni.ns) == [masq_chain_name("othernet", stale, "eth0")]


# -- overlapping subnets on one bridge: no pod gets an address the bridge holds -------------
def test_add_refuses_an_address_the_bridge_holds_and_leaves_nothing(cni, make_netns):
    bridge = unique("br")
    # Network A puts its gateway 10.77.1.1 on the bridge; network B, same subnet on the same
    # bridge with its gateway elsewhere, hands out 10.77.1.1 first.
    conf_a = bridge_conf(cni, "10.77.1.0/24", bridge=bridge, isGateway=True)
    conf_b = {**bridge_conf(cni, bridge=bridge, ipMasq=True), "name": "netb"}
    conf_b["ipam"]["ranges"] = [[{"subnet": "10.77.1.0/24", "gateway": "10.77.1.254"}]]
    pa, pb = make_netns("p"), make_netns("p")
    cni.add(conf_a, "a1", pa)
    bridge_before = addresses(cni.ns, bridge)
    veths_before, links_before = veths(cni.ns), set(links(cni.ns))
    assert bridge_before == ["10.77.1.1/24"]

    err = cni.fails(104, "cni-bridge", "ADD", conf_b, "10.77.1.1", bridge,
                    container_id="b1", netns=pb.path)
    assert link(pb, "eth0") is None
    assert reserved_ips(cni, "netb") == set()
    assert veths(cni.ns) == veths_before and set(links(cni.ns)) == links_before
    assert our_masq_rules(cni.ns) == []
    assert addresses(cni.ns, bridge) == bridge_before, err
    assert ping(pa, "10.77.1.1").returncode == 0   # A's pods still reach their gateway

    # The runtime's retry gets the next address (IPAM's round-robin moved on).
    result_b = cni.add(conf_b, "b1", pb)
    assert addr_of(result_b) != "10.77.1.1"
    cni.delete(conf_b, "b1", pb.path)
    cni.delete(conf_a, "a1", pa.path)
    assert reserved_ips(cni, "netb") == set()


# -- accept_ra=0 on the bridge, arp_notify=1 on the pod interface ---------------------------
def test_add_disables_router_advertisements_on_the_bridge_and_sets_arp_notify(cni, pod, make_netns):
    bridge = unique("br")
    # A bridge made by someone else keeps the kernel's accept_ra=1 until an ADD ensures it.
    cni.ns.exec("ip", "link", "add", bridge, "type", "bridge")
    assert sysfs(cni.ns, f"/proc/sys/net/ipv6/conf/{bridge}/accept_ra") == "1"
    conf = bridge_conf(cni, "10.77.0.0/24", "fd77::/64", bridge=bridge, isGateway=True)
    cni.add(conf, "c1", pod)
    assert sysfs(cni.ns, f"/proc/sys/net/ipv6/conf/{bridge}/accept_ra") == "0"
    assert sysfs(pod, "/proc/sys/net/ipv4/conf/eth0/arp_notify") == "1"
    # For the pod's interface only (not the namespace's defaults), whatever its name.
    assert sysfs(pod, "/proc/sys/net/ipv4/conf/lo/arp_notify") == "0"
    assert sysfs(pod, "/proc/sys/net/ipv4/conf/default/arp_notify") == "0"
    other = make_netns("p")
    cni.add(bridge_conf(cni, "10.78.0.0/24", isGateway=True), "c2", other, ifname="net1")
    assert sysfs(other, "/proc/sys/net/ipv4/conf/net1/arp_notify") == "1"


def test_bridge_created_by_add_has_accept_ra_0_even_without_ipv6_ranges(cni, pod):
    conf = bridge_conf(cni, "10.77.0.0/24")
    cni.add(conf, "c1", pod)
    assert sysfs(cni.ns, f"/proc/sys/net/ipv6/conf/{conf['bridge']}/accept_ra") == "0"


def _neighbour_mac(ns, ip: str) -> str:
    entries = json.loads(ns.exec("ip", "-j", "neigh", "show", ip).stdout or "[]")
    return entries[0].get("lladdr", "") if entries else ""


def test_reused_address_is_announced_to_neighbours_at_once(cni, make_netns):
    """A neighbour that cached a reused IP with the old pod's MAC learns the new MAC from the
    new pod's gratuitous ARP at once, instead of after its entry goes stale (~10 s)."""
    conf = bridge_conf(cni, "10.77.0.0/24", isGateway=True)
    client, old, new = make_netns("p"), make_netns("p"), make_netns("p")
    cni.add(conf, "client", client)
    reused = addr_of(cni.add(conf, "old", old))
    assert ping(client, reused).returncode == 0
    old_mac = link(old, "eth0")["address"]
    assert _neighbour_mac(client, reused) == old_mac
    cni.delete(conf, "old", old.path)

    cni.add(conf, "new", new, cni_args=f"IP={reused}")
    new_mac = link(new, "eth0")["address"]
    assert new_mac != old_mac
    deadline = time.monotonic() + 2
    while _neighbour_mac(client, reused) != new_mac and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _neighbour_mac(client, reused) == new_mac
