"""The agent's topology parsing and Kubernetes Node conversion (pure, no root)."""
from __future__ import annotations

import ipaddress
import json
from types import SimpleNamespace as NS

import pytest

from cni_bridge.agent.topology import AgentError, check_topology, node_from_kubernetes, parse_topology

NET = ipaddress.ip_network
IP = ipaddress.ip_address


def topo(**overrides) -> str:
    data = {
        "clusterCIDR": "10.244.0.0/16",
        "nodes": [
            {"name": "n1", "internalIP": "172.18.0.2", "podCIDR": "10.244.0.0/24"},
            {"name": "n2", "internalIP": "172.18.0.3", "podCIDR": "10.244.1.0/24"},
        ],
    }
    data.update(overrides)
    return json.dumps(data)


def test_parses_nodes_and_cluster_cidr():
    t = parse_topology(topo())
    assert t.cluster_cidrs == (NET("10.244.0.0/16"),)
    assert [n.name for n in t.nodes] == ["n1", "n2"]
    assert t.node("n2").internal_ips == (IP("172.18.0.3"),)
    assert t.node("n2").pod_cidrs == (NET("10.244.1.0/24"),)


def test_dual_stack_values_as_lists_or_commas():
    t = parse_topology(json.dumps({
        "clusterCIDR": "10.244.0.0/16,fd00:10:244::/56",
        "nodes": [{"name": "n1", "internalIPs": ["172.18.0.2", "fc00:f853::2"],
                   "podCIDRs": ["10.244.0.0/24", "fd00:10:244::/64"]}],
    }))
    node = t.node("n1")
    assert node.internal_ip(6) == IP("fc00:f853::2")
    assert [c.version for c in node.pod_cidrs] == [4, 6]
    assert len(t.cluster_cidrs) == 2


def test_missing_node_names_the_known_ones():
    with pytest.raises(AgentError, match=r"node 'n9' is not in the topology \(nodes: n1, n2\)"):
        parse_topology(topo()).node("n9")


@pytest.mark.parametrize("text, message", [
    ("{not json", "not valid JSON"),
    ("[]", "must hold a JSON object"),
    (json.dumps({"nodes": []}), "clusterCIDR is missing"),
    (topo(clusterCIDR="10.244.0.0/33"), "clusterCIDR: '10.244.0.0/33' is not a CIDR"),
    (topo(clusterCIDR="10.244.0.1/16"), "is not a CIDR"),
    (topo(clusterCIDR=""), "clusterCIDR is empty"),
    (topo(clusterCIDR=16), "must be a string or a list of strings"),
    (topo(nodes=[]), "nodes must be a non-empty list"),
    (topo(nodes="n1"), "nodes must be a non-empty list"),
    (topo(nodes=[5]), r"nodes\[0\] must be an object"),
    (topo(nodes=[{"internalIP": "1.2.3.4", "podCIDR": "10.244.0.0/24"}]), r"nodes\[0\].name"),
    (topo(nodes=[{"name": "a", "podCIDR": "10.244.0.0/24"}]), "node 'a': internalIP is missing"),
    (topo(nodes=[{"name": "a", "internalIP": "1.2.3.4"}]), "node 'a': podCIDR is missing"),
    (topo(nodes=[{"name": "a", "internalIP": "1.2.3.999", "podCIDR": "10.244.0.0/24"}]),
     "'1.2.3.999' is not an IP address"),
])
def test_malformed_files_give_clear_errors(text, message):
    with pytest.raises(AgentError, match=message):
        parse_topology(text, "topo.json")


def test_inconsistent_topologies_are_refused():
    dup = [{"name": "a", "internalIP": "1.1.1.1", "podCIDR": "10.244.0.0/24"},
           {"name": "a", "internalIP": "1.1.1.2", "podCIDR": "10.244.1.0/24"}]
    with pytest.raises(AgentError, match="listed twice"):
        parse_topology(topo(nodes=dup))
    overlap = [{"name": "a", "internalIP": "1.1.1.1", "podCIDR": "10.244.0.0/23"},
               {"name": "b", "internalIP": "1.1.1.2", "podCIDR": "10.244.1.0/24"}]
    with pytest.raises(AgentError, match="overlaps 10.244.0.0/23 of node 'a'"):
        parse_topology(topo(nodes=overlap))
    outside = [{"name": "a", "internalIP": "1.1.1.1", "podCIDR": "10.99.0.0/24"}]
    with pytest.raises(AgentError, match="not inside the cluster CIDR"):
        parse_topology(topo(nodes=outside))


def k8s_node(name, pod_cidrs=None, pod_cidr=None, addresses=()):
    return NS(metadata=NS(name=name), spec=NS(pod_cidrs=pod_cidrs, pod_cidr=pod_cidr),
              status=NS(addresses=[NS(type=t, address=a) for t, a in addresses]))


def test_node_from_kubernetes_reads_pod_cidrs_and_internal_ips():
    node, warnings = node_from_kubernetes(k8s_node(
        "kind-worker", pod_cidrs=["10.244.1.0/24"],
        addresses=[("InternalIP", "172.18.0.3"), ("Hostname", "kind-worker")]))
    assert warnings == []
    assert node.pod_cidrs == (NET("10.244.1.0/24"),)
    assert node.internal_ips == (IP("172.18.0.3"),)


def test_node_from_kubernetes_falls_back_to_pod_cidr_and_tolerates_gaps():
    node, _ = node_from_kubernetes(k8s_node("a", pod_cidr="10.244.2.0/24"))
    assert node.pod_cidrs == (NET("10.244.2.0/24"),) and node.internal_ips == ()
    node, _ = node_from_kubernetes(k8s_node("b"))
    assert node.pod_cidrs == ()
    node, warnings = node_from_kubernetes(k8s_node("c", pod_cidrs=["bogus"], addresses=[("InternalIP", "x")]))
    assert node.pod_cidrs == () and node.internal_ips == () and len(warnings) == 2
    assert node_from_kubernetes(NS(metadata=NS(name=""), spec=None, status=None))[0] is None


def test_check_topology_is_empty_for_a_good_cluster():
    assert check_topology(parse_topology(topo())) == []
