"""The agent's desired state and its diffs against the kernel (pure, no root)."""
from __future__ import annotations

import ipaddress
import json

import pytest

from cni_bridge.agent.desired import (
    MASQ_CHAIN, MASQ_COMMENT, ROUTE_PROTO, AgentOptions, PeerRoute, desired_state, masq_chains,
)
from cni_bridge.agent.diff import (
    NatState, RouteState, diff_routes, masq_restore_script, masq_teardown_script, parse_nat_rules,
)
from cni_bridge.agent.topology import AgentError, Node, Topology, parse_topology
from cni_bridge.config import BridgeConf
from cni_bridge.confbase import load

NET = ipaddress.ip_network
IP = ipaddress.ip_address

TOPOLOGY = parse_topology(json.dumps({
    "clusterCIDR": "10.244.0.0/16",
    "nodes": [
        {"name": "n1", "internalIP": "172.18.0.2", "podCIDR": "10.244.0.0/24"},
        {"name": "n2", "internalIP": "172.18.0.3", "podCIDR": "10.244.1.0/24"},
        {"name": "n3", "internalIP": "172.18.0.4", "podCIDR": "10.244.2.0/24"},
    ],
}))


def test_conflist_serves_own_pod_cidr_with_bridge_as_default_gateway():
    state = desired_state(TOPOLOGY, "n2", AgentOptions(ipam_data_dir="/run/x", bridge="kbr0"))
    conf = state.conflist
    assert conf["cniVersion"] == "1.0.0" and conf["name"] == "cni-bridge"
    bridge, portmap = conf["plugins"]
    assert bridge["type"] == "cni-bridge" and bridge["bridge"] == "kbr0"
    assert bridge["isDefaultGateway"] is True and bridge["ipMasq"] is False
    assert bridge["ipam"] == {"type": "cni-ipam", "ranges": [[{"subnet": "10.244.1.0/24"}]], "dataDir": "/run/x"}
    assert portmap == {"type": "portmap", "capabilities": {"portMappings": True}}
    # The plugin itself accepts it (as libcni would hand it over: name and cniVersion injected).
    parsed = load(BridgeConf, {**bridge, "name": conf["name"], "cniVersion": conf["cniVersion"]})
    assert parsed.is_gateway and not parsed.ip_masq


def test_conflist_bytes_are_stable_json():
    a = desired_state(TOPOLOGY, "n1").conflist_bytes()
    assert a == desired_state(TOPOLOGY, "n1").conflist_bytes()
    assert json.loads(a)["plugins"][0]["ipam"]["ranges"] == [[{"subnet": "10.244.0.0/24"}]]


def test_conflist_options():
    conf = desired_state(TOPOLOGY, "n1", AgentOptions(mtu=1450, daemon_socket="/run/cni-bridge/daemon.sock",
                                                      portmap=False, cni_version="1.1.0")).conflist
    assert conf["cniVersion"] == "1.1.0" and len(conf["plugins"]) == 1
    assert conf["plugins"][0]["mtu"] == 1450
    assert conf["plugins"][0]["daemonSocket"] == "/run/cni-bridge/daemon.sock"


def test_routes_to_every_other_node():
    state = desired_state(TOPOLOGY, "n1")
    assert state.routes == (
        PeerRoute(NET("10.244.1.0/24"), IP("172.18.0.3"), "n2"),
        PeerRoute(NET("10.244.2.0/24"), IP("172.18.0.4"), "n3"),
    )
    assert state.forwarding == (4,)


def test_nodes_without_pod_cidr_or_address_get_no_route():
    topology = Topology((NET("10.244.0.0/16"),), (
        Node("n1", (IP("172.18.0.2"),), (NET("10.244.0.0/24"),)),
        Node("new", (IP("172.18.0.9"),), ()),
        Node("v6only", (IP("fc00::9"),), (NET("10.244.5.0/24"),)),
    ))
    state = desired_state(topology, "n1")
    assert state.routes == ()
    assert any("new: no podCIDR" in n for n in state.notes)
    assert any("no IPv4 InternalIP" in n for n in state.notes)


def test_own_node_without_pod_cidr_is_an_error():
    topology = Topology((NET("10.244.0.0/16"),), (Node("n1", (IP("172.18.0.2"),), ()),))
    with pytest.raises(AgentError, match="has no podCIDR"):
        desired_state(topology, "n1")
    with pytest.raises(AgentError, match="not in the topology"):
        desired_state(topology, "n2")


def test_masquerade_returns_for_cluster_and_masquerades_the_rest():
    (chain,) = desired_state(TOPOLOGY, "n3").masq
    assert chain.family == 4 and chain.chain == MASQ_CHAIN
    assert chain.rules == (
        ("-d", "10.244.0.0/16", "-j", "RETURN"),
        ("-d", "224.0.0.0/4", "-j", "RETURN"),
        ("-j", "MASQUERADE"),
    )
    assert chain.jumps == (("-s", "10.244.2.0/24", "-m", "comment", "--comment", MASQ_COMMENT, "-j", MASQ_CHAIN),)


def test_dual_stack_masquerade_has_one_chain_per_family():
    chains = masq_chains((NET("10.244.0.0/16"), NET("fd00:10:244::/56")),
                         (NET("10.244.1.0/24"), NET("fd00:10:244:1::/64")))
    assert [c.family for c in chains] == [4, 6]
    assert chains[1].rules[0] == ("-d", "fd00:10:244::/56", "-j", "RETURN")
    assert chains[1].rules[1] == ("-d", "ff00::/8", "-j", "RETURN")


# -- diffs -----------------------------------------------------------------------------
def test_route_diff_replaces_wrong_and_missing_and_deletes_only_ours():
    desired = desired_state(TOPOLOGY, "n1").routes
    current = [
        RouteState(NET("10.244.1.0/24"), IP("172.18.0.3"), ROUTE_PROTO),   # right
        RouteState(NET("10.244.7.0/24"), IP("172.18.0.8"), ROUTE_PROTO),   # node gone
        RouteState(NET("0.0.0.0/0"), IP("172.18.0.1"), 4),                 # not ours
        RouteState(NET("10.244.0.0/24"), None, 2),                         # own bridge, kernel
    ]
    plan = diff_routes(current, desired, ROUTE_PROTO)
    assert [r.dst for r in plan.replace] == [NET("10.244.2.0/24")]
    assert [r.dst for r in plan.delete] == [NET("10.244.7.0/24")]
    moved = [RouteState(NET("10.244.1.0/24"), IP("172.18.0.99"), ROUTE_PROTO),
             RouteState(NET("10.244.2.0/24"), IP("172.18.0.4"), 3)]   # right gateway, someone else's
    assert [r.dst for r in diff_routes(moved, desired, ROUTE_PROTO).replace] == [r.dst for r in desired]


def test_route_diff_is_empty_when_converged():
    desired = desired_state(TOPOLOGY, "n1").routes
    current = [RouteState(r.dst, r.via, ROUTE_PROTO) for r in desired]
    assert diff_routes(current, desired, ROUTE_PROTO).empty


IPTABLES_S = f"""\
-P PREROUTING ACCEPT
-P POSTROUTING ACCEPT
-N KUBE-POSTROUTING
-N {MASQ_CHAIN}
-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING
-A POSTROUTING -s 10.244.2.0/24 -m comment --comment "{MASQ_COMMENT}" -j {MASQ_CHAIN}
-A {MASQ_CHAIN} -d 10.244.0.0/16 -j RETURN
-A {MASQ_CHAIN} -d 224.0.0.0/4 -j RETURN
-A {MASQ_CHAIN} -j MASQUERADE
""".splitlines()


def test_parse_nat_rules_reads_chain_and_jumps():
    state = parse_nat_rules(IPTABLES_S, MASQ_CHAIN)
    assert state.chain_exists
    assert state.rules[-1] == ("-j", "MASQUERADE")
    assert state.jumps == (("-s", "10.244.2.0/24", "-m", "comment", "--comment", MASQ_COMMENT, "-j", MASQ_CHAIN),)


def test_masq_script_is_none_when_converged():
    (chain,) = desired_state(TOPOLOGY, "n3").masq
    assert masq_restore_script(parse_nat_rules(IPTABLES_S, MASQ_CHAIN), chain) is None


def test_masq_script_creates_from_scratch():
    (chain,) = desired_state(TOPOLOGY, "n3").masq
    script = masq_restore_script(NatState(False, (), ()), chain)
    assert script.splitlines() == [
        "*nat",
        f":{MASQ_CHAIN} - [0:0]",
        f"-A {MASQ_CHAIN} -d 10.244.0.0/16 -j RETURN",
        f"-A {MASQ_CHAIN} -d 224.0.0.0/4 -j RETURN",
        f"-A {MASQ_CHAIN} -j MASQUERADE",
        f'-A POSTROUTING -s 10.244.2.0/24 -m comment --comment "{MASQ_COMMENT}" -j {MASQ_CHAIN}',
        "COMMIT",
    ]


def test_masq_script_moves_the_jump_when_the_pod_cidr_changes():
    (chain,) = desired_state(TOPOLOGY, "n1").masq       # n1 owns 10.244.0.0/24; rules hold n3's
    lines = masq_restore_script(parse_nat_rules(IPTABLES_S, MASQ_CHAIN), chain).splitlines()
    assert f'-D POSTROUTING -s 10.244.2.0/24 -m comment --comment "{MASQ_COMMENT}" -j {MASQ_CHAIN}' in lines
    assert f'-A POSTROUTING -s 10.244.0.0/24 -m comment --comment "{MASQ_COMMENT}" -j {MASQ_CHAIN}' in lines
    assert not any("KUBE-POSTROUTING" in line for line in lines)


def test_masq_script_drops_duplicate_jumps():
    doubled = IPTABLES_S + [IPTABLES_S[5]]
    (chain,) = desired_state(TOPOLOGY, "n3").masq
    lines = masq_restore_script(parse_nat_rules(doubled, MASQ_CHAIN), chain).splitlines()
    assert sum(line.startswith("-D POSTROUTING") for line in lines) == 1
    assert not any(line.startswith("-A POSTROUTING") for line in lines)


def test_masq_teardown_removes_chain_and_jumps():
    lines = masq_teardown_script(parse_nat_rules(IPTABLES_S, MASQ_CHAIN), MASQ_CHAIN).splitlines()
    assert lines[-2:] == [f"-X {MASQ_CHAIN}", "COMMIT"]
    assert any(line.startswith("-D POSTROUTING -s 10.244.2.0/24") for line in lines)
    assert masq_teardown_script(NatState(False, (), ()), MASQ_CHAIN) is None
