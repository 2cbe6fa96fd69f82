"""The agent converges after the cluster changes under it (no root: pure plans and the fake kernel)."""
from __future__ import annotations

import ipaddress
import json

from cni_bridge.agent.apply import Changes, sync_bridge
from cni_bridge.agent.desired import AgentOptions, conflist, desired_state, written_pod_cidrs
from cni_bridge.agent.diff import diff_addresses
from cni_bridge.agent.topology import parse_topology
from tests.unit.fake_netlink import FakeKernel

I = ipaddress.ip_interface
N = ipaddress.ip_network


def topology(own_cidr: str, cluster: str = "10.244.0.0/16,fd00:10:244::/56"):
    return parse_topology(json.dumps({"clusterCIDR": cluster, "nodes": [
        {"name": "n1", "internalIP": "172.18.0.2", "podCIDR": own_cidr},
        {"name": "n2", "internalIP": "172.18.0.3", "podCIDR": "10.244.2.0/24,fd00:10:244:2::/64"},
    ]}))


# -- defect 1: a changed podCIDR leaves the old gateway on the bridge ----------------------------
def test_desired_state_names_the_bridge_and_one_gateway_per_pod_cidr():
    state = desired_state(topology("10.244.7.0/24,fd00:10:244:7::/64"), "n1", AgentOptions(bridge="br9"))
    assert state.bridge == "br9"
    assert state.gateways == (I("10.244.7.1/24"), I("fd00:10:244:7::1/64"))
    assert state.cluster_cidrs == (N("10.244.0.0/16"), N("fd00:10:244::/56"))


def test_address_diff_removes_only_the_agents_stale_addresses():
    current = [I("10.244.1.1/24"), I("192.168.77.1/24"), I("fe80::1/64"), I("10.244.7.1/16"),
               I("10.245.3.1/24")]
    plan = diff_addresses(current, [I("10.244.7.1/24")], [N("10.244.0.0/16"), N("10.245.3.0/24")])
    # the old gateway, the right IP with the wrong prefix, the previously written podCIDR's
    assert plan.delete == [I("10.244.1.1/24"), I("10.244.7.1/16"), I("10.245.3.1/24")]
    assert plan.add == [I("10.244.7.1/24")]
    assert diff_addresses([I("10.244.7.1/24"), I("192.168.77.1/24")], [I("10.244.7.1/24")],
                          [N("10.244.0.0/16")]) == diff_addresses([], [], [])


def test_written_pod_cidrs_reads_back_the_agents_conflist_and_nothing_else():
    node = topology("10.244.1.0/24,fd00:10:244:1::/64").node("n1")
    content = json.dumps(conflist(node, AgentOptions())).encode()
    assert written_pod_cidrs(content) == (N("10.244.1.0/24"), N("fd00:10:244:1::/64"))
    for junk in (b"", b"{", b"[]", b'{"plugins": 3}', b'{"plugins": [{"type": "cni-bridge"}]}',
                 b'{"plugins": [{"type": "cni-bridge", "ipam": {"ranges": [[{"subnet": "x"}]]}}]}'):
        assert written_pod_cidrs(junk) == ()


def make_bridge(kernel: FakeKernel, *addresses: str) -> None:
    link = kernel.new_link(kernel.host, "cni0", "bridge", up=True)
    link.addresses = [I(a) for a in addresses]


def test_sync_bridge_moves_the_gateway_and_keeps_foreign_addresses():
    kernel = FakeKernel()
    make_bridge(kernel, "10.244.1.1/24", "192.168.77.1/24")
    state = desired_state(topology("10.244.7.0/24"), "n1")
    changes = Changes()
    sync_bridge(state, (N("10.244.1.0/24"),), lambda: kernel.factory(None), changes)
    assert kernel.host.links["cni0"].addresses == [I("192.168.77.1/24"), I("10.244.7.1/24")]
    assert changes.addresses_removed == ["10.244.1.1/24"] and changes.addresses_added == ["10.244.7.1/24"]
    assert "bridge addresses removed: 10.244.1.1/24" in changes.summary() and changes.errors == []

    again = Changes()
    sync_bridge(state, (N("10.244.7.0/24"),), lambda: kernel.factory(None), again)
    assert not again.any and kernel.open_handles() == []


def test_sync_bridge_leaves_a_missing_bridge_to_the_plugin():
    kernel = FakeKernel()
    changes = Changes()
    sync_bridge(desired_state(topology("10.244.7.0/24"), "n1"), (), lambda: kernel.factory(None), changes)
    assert kernel.host.links == {} and not changes.any and changes.errors == []


def test_sync_bridge_reports_a_refused_address_change_and_keeps_going():
    from cni_bridge.protocol.errors import CNIError, Code

    kernel = FakeKernel()
    make_bridge(kernel, "10.244.1.1/24")
    kernel.fail_next("del_address", CNIError(Code.KERNEL_REFUSED, "the kernel refused to remove the address",
                                             "Operation not permitted"))
    changes = Changes()
    sync_bridge(desired_state(topology("10.244.7.0/24"), "n1"), (), lambda: kernel.factory(None), changes)
    assert changes.errors == ["cannot remove 10.244.1.1/24 from cni0: "
                              "the kernel refused to remove the address: Operation not permitted"]
    assert changes.addresses_added == ["10.244.7.1/24"]
