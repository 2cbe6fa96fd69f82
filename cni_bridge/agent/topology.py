"""The cluster as the agent sees it: nodes with their addresses and podCIDRs.

Two sources produce the same `Topology`: a JSON file (topology mode) and
Kubernetes Node objects (Kubernetes mode). Pure: no files, no network.
"""
from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Union

from .vtep import VTEP_MAC_ANNOTATION, derived_vtep_mac, parse_vtep_mac

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


class AgentError(Exception):
    """A failure the user can act on; the CLI prints it without a traceback."""


@dataclass(frozen=True)
class Node:
    name: str
    internal_ips: tuple[IPAddress, ...]
    pod_cidrs: tuple[IPNetwork, ...]
    # The MAC of the node's VXLAN device: topology mode derives it from the IPv4
    # InternalIP unless the file gives one; Kubernetes mode reads the node's annotation.
    vtep_mac: Optional[str] = None

    def internal_ip(self, family: int) -> Optional[IPAddress]:
        return next((ip for ip in self.internal_ips if ip.version == family), None)


@dataclass(frozen=True)
class Topology:
    cluster_cidrs: tuple[IPNetwork, ...]
    nodes: tuple[Node, ...]

    def node(self, name: str) -> Node:
        for node in self.nodes:
            if node.name == name:
                return node
        known = ", ".join(sorted(n.name for n in self.nodes)) or "none"
        raise AgentError(f"node {name!r} is not in the topology (nodes: {known})")


# -- parsing helpers -------------------------------------------------------------
def _split(value: Any, where: str) -> list[str]:
    """A string (comma-separated allowed, like kube's dual-stack flags) or a list of strings."""
    if isinstance(value, str):
        items = [part.strip() for part in value.split(",")]
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        items = [v.strip() for v in value]
    else:
        raise AgentError(f"{where} must be a string or a list of strings, not {json.dumps(value)}")
    items = [item for item in items if item]
    if not items:
        raise AgentError(f"{where} is empty")
    return items


def parse_cidrs(value: Any, where: str) -> tuple[IPNetwork, ...]:
    cidrs = []
    for item in _split(value, where):
        try:
            cidrs.append(ipaddress.ip_network(item, strict=True))
        except ValueError as exc:
            raise AgentError(f"{where}: {item!r} is not a CIDR like 10.244.1.0/24 ({exc})") from None
    return tuple(cidrs)


def parse_ips(value: Any, where: str) -> tuple[IPAddress, ...]:
    ips = []
    for item in _split(value, where):
        try:
            ips.append(ipaddress.ip_address(item))
        except ValueError:
            raise AgentError(f"{where}: {item!r} is not an IP address") from None
    return tuple(ips)


def _first_key(entry: dict, *keys: str) -> Any:
    for key in keys:
        if key in entry:
            return entry[key]
    return None


# -- the topology file ---------------------------------------------------------------
def parse_topology(text: str, source: str = "topology") -> Topology:
    """JSON {"clusterCIDR": ..., "nodes": [{"name", "internalIP", "podCIDR"}, ...]}.

    `clusterCIDR`, `internalIP` and `podCIDR` also accept comma-separated or
    list values (dual stack); `podCIDRs` / `internalIPs` are accepted spellings.
    A node may give `vtepMAC`; otherwise it is derived from its IPv4 internalIP.
    """
    if not text.strip():
        # What a reader sees between `cat > file` truncating and writing: say so, not "line 1 column 1".
        raise AgentError(f"{source} is empty")
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise AgentError(f"{source} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise AgentError(f"{source} must hold a JSON object with clusterCIDR and nodes")
    cluster = _first_key(data, "clusterCIDR", "clusterCIDRs")
    if cluster is None:
        raise AgentError(f"{source}: clusterCIDR is missing")
    cluster_cidrs = parse_cidrs(cluster, f"{source}: clusterCIDR")
    entries = data.get("nodes")
    if not isinstance(entries, list) or not entries:
        raise AgentError(f"{source}: nodes must be a non-empty list")
    nodes = []
    for index, entry in enumerate(entries):
        where = f"{source}: nodes[{index}]"
        if not isinstance(entry, dict):
            raise AgentError(f"{where} must be an object with name, internalIP and podCIDR")
        name = entry.get("name")
        if not isinstance(name, str) or not name.strip():
            raise AgentError(f"{where}.name must be a non-empty string")
        where = f"{source}: node {name!r}"
        ips = _first_key(entry, "internalIP", "internalIPs")
        if ips is None:
            raise AgentError(f"{where}: internalIP is missing")
        cidrs = _first_key(entry, "podCIDR", "podCIDRs")
        if cidrs is None:
            raise AgentError(f"{where}: podCIDR is missing")
        addresses = parse_ips(ips, f"{where}: internalIP")
        ipv4 = next((ip for ip in addresses if ip.version == 4), None)
        mac = derived_vtep_mac(ipv4) if ipv4 is not None else None
        if "vtepMAC" in entry:
            try:
                mac = parse_vtep_mac(entry["vtepMAC"])
            except ValueError as exc:
                raise AgentError(f"{where}: vtepMAC: {exc}") from None
        nodes.append(Node(name, addresses, parse_cidrs(cidrs, f"{where}: podCIDR"), mac))
    topology = Topology(cluster_cidrs, tuple(nodes))
    problems = check_topology(topology)
    if problems:
        raise AgentError(f"{source}: " + "; ".join(problems))
    return topology


def check_topology(topology: Topology) -> list[str]:
    """Consistency problems: duplicate names, overlapping podCIDRs, podCIDRs outside the cluster."""
    problems = []
    seen: dict[str, Node] = {}
    for node in topology.nodes:
        if node.name in seen:
            problems.append(f"node {node.name!r} is listed twice")
        seen[node.name] = node
    owners: list[tuple[IPNetwork, str]] = []
    for node in topology.nodes:
        for cidr in node.pod_cidrs:
            if not any(cidr.version == c.version and cidr.subnet_of(c) for c in topology.cluster_cidrs):
                problems.append(f"podCIDR {cidr} of node {node.name!r} is not inside the cluster CIDR "
                                f"({', '.join(map(str, topology.cluster_cidrs))})")
            for other, owner in owners:
                if other.version == cidr.version and other.overlaps(cidr):
                    problems.append(f"podCIDR {cidr} of node {node.name!r} overlaps {other} of node {owner!r}")
            owners.append((cidr, node.name))
    macs: dict[str, str] = {}
    for node in topology.nodes:
        if node.vtep_mac is not None:
            if node.vtep_mac in macs:
                problems.append(f"node {node.name!r} has the VTEP MAC {node.vtep_mac} of node {macs[node.vtep_mac]!r}")
            macs.setdefault(node.vtep_mac, node.name)
    return problems


# -- Kubernetes Node objects ---------------------------------------------------------
def node_from_kubernetes(obj: Any) -> tuple[Optional[Node], list[str]]:
    """A V1Node (attribute access, as the official client returns) to a Node.

    Returns (node, warnings); node is None when the object is unusable. A node
    without a podCIDR yet is returned with empty pod_cidrs.
    """
    warnings: list[str] = []
    name = getattr(getattr(obj, "metadata", None), "name", None)
    if not name:
        return None, ["a Node object without a name"]
    spec = getattr(obj, "spec", None)
    raw_cidrs: Iterable[str] = list(getattr(spec, "pod_cidrs", None) or [])
    if not raw_cidrs and getattr(spec, "pod_cidr", None):
        raw_cidrs = [spec.pod_cidr]
    cidrs = []
    for raw in raw_cidrs:
        try:
            cidrs.append(ipaddress.ip_network(raw, strict=False))
        except ValueError:
            warnings.append(f"node {name}: ignoring podCIDR {raw!r} (not a CIDR)")
    ips = []
    for address in list(getattr(getattr(obj, "status", None), "addresses", None) or []):
        if getattr(address, "type", None) != "InternalIP":
            continue
        try:
            ips.append(ipaddress.ip_address(address.address))
        except ValueError:
            warnings.append(f"node {name}: ignoring InternalIP {address.address!r} (not an IP address)")
    mac = None
    annotations = getattr(getattr(obj, "metadata", None), "annotations", None) or {}
    if VTEP_MAC_ANNOTATION in annotations:
        try:
            mac = parse_vtep_mac(annotations[VTEP_MAC_ANNOTATION])
        except ValueError as exc:
            warnings.append(f"node {name}: ignoring annotation {VTEP_MAC_ANNOTATION}: {exc}")
    return Node(name, tuple(ips), tuple(cidrs), mac), warnings
