"""What one node should hold, computed from the topology. Pure: no kernel, no files.

- the conflist the runtime reads (cni-bridge + cni-ipam for the node's podCIDRs, portmap);
- a route `<podCIDR> via <InternalIP>` per podCIDR of every other node;
- one nat chain per IP family that RETURNs for the cluster CIDR and
  MASQUERADEs the rest, jumped to from POSTROUTING for the node's podCIDRs;
- on the bridge, the gateway of each own podCIDR and no other address of the cluster.
"""
from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass
from typing import Any, Optional, Union

from .topology import AgentError, IPAddress, IPNetwork, Node, Topology

IPInterface = Union[ipaddress.IPv4Interface, ipaddress.IPv6Interface]

CONFLIST_NAME = "10-cni-bridge.conflist"
MASQ_CHAIN = "CNI-BRIDGE-MASQ"
MASQ_COMMENT = "cni-bridge agent: masquerade pod traffic leaving the cluster"
# rtnetlink protocol number that marks the agent's routes (unused by iproute2's rt_protos),
# so routes of nodes that went away can be found and removed.
ROUTE_PROTO = 157
MULTICAST = {4: "224.0.0.0/4", 6: "ff00::/8"}


@dataclass(frozen=True)
class AgentOptions:
    """What the written conflist looks like (everything but the podCIDRs)."""

    network_name: str = "cni-bridge"
    bridge: str = "cni0"
    cni_version: str = "1.0.0"
    ipam_data_dir: str = "/run/cni-ipam-state"   # tmpfs: reservations do not outlive a reboot
    mtu: Optional[int] = None
    daemon_socket: Optional[str] = None
    hairpin: bool = True
    portmap: bool = True


@dataclass(frozen=True)
class PeerRoute:
    dst: IPNetwork
    via: IPAddress
    node: str


@dataclass(frozen=True)
class MasqChain:
    """One family's chain. Rules are iptables argv after `-A <chain>`, as `iptables -S` prints them."""

    family: int
    chain: str
    rules: tuple[tuple[str, ...], ...]
    jumps: tuple[tuple[str, ...], ...]       # argv after `-A POSTROUTING`


@dataclass(frozen=True)
class DesiredState:
    node: str
    conflist: dict
    routes: tuple[PeerRoute, ...]
    masq: tuple[MasqChain, ...]
    forwarding: tuple[int, ...]
    notes: tuple[str, ...] = ()              # things skipped, worth a log line
    bridge: str = AgentOptions.bridge
    gateways: tuple[IPInterface, ...] = ()   # the bridge's addresses, one per own podCIDR
    cluster_cidrs: tuple[IPNetwork, ...] = ()

    def conflist_bytes(self) -> bytes:
        return (json.dumps(self.conflist, indent=2) + "\n").encode()


def desired_state(topology: Topology, node_name: str, options: AgentOptions = AgentOptions()) -> DesiredState:
    node = topology.node(node_name)
    if not node.pod_cidrs:
        raise AgentError(f"node {node_name!r} has no podCIDR yet")
    routes, notes = peer_routes(topology, node)
    families = tuple(sorted({cidr.version for cidr in node.pod_cidrs}))
    return DesiredState(
        node=node.name,
        conflist=conflist(node, options),
        routes=routes,
        masq=masq_chains(topology.cluster_cidrs, node.pod_cidrs),
        forwarding=families,
        notes=notes,
        bridge=options.bridge,
        gateways=gateway_addresses(node.pod_cidrs),
        cluster_cidrs=topology.cluster_cidrs,
    )


def conflist(node: Node, options: AgentOptions) -> dict:
    """cni-bridge as the pods' default gateway, cni-ipam over the node's podCIDRs, then portmap.

    ipMasq is off: the agent's own chain masquerades, and leaves pod-to-pod alone.
    """
    bridge: dict[str, Any] = {
        "type": "cni-bridge",
        "bridge": options.bridge,
        "isGateway": True,
        "isDefaultGateway": True,
        "ipMasq": False,
        "hairpinMode": options.hairpin,
    }
    if options.mtu:
        bridge["mtu"] = options.mtu
    if options.daemon_socket:
        bridge["daemonSocket"] = options.daemon_socket
    bridge["ipam"] = {
        "type": "cni-ipam",
        "ranges": [[{"subnet": str(cidr)}] for cidr in node.pod_cidrs],
        "dataDir": options.ipam_data_dir,
    }
    plugins = [bridge]
    if options.portmap:
        plugins.append({"type": "portmap", "capabilities": {"portMappings": True}})
    return {"cniVersion": options.cni_version, "name": options.network_name, "plugins": plugins}


def gateway_addresses(pod_cidrs: tuple[IPNetwork, ...]) -> tuple[IPInterface, ...]:
    """What the plugin puts on the bridge: cni-ipam's default gateway (the range's first
    address; the conflist sets no `gateway`) with the podCIDR's prefix length."""
    return tuple(ipaddress.ip_interface(f"{cidr[1]}/{cidr.prefixlen}") for cidr in pod_cidrs)


def written_pod_cidrs(content: bytes) -> tuple[IPNetwork, ...]:
    """The podCIDRs of a conflist the agent wrote earlier (its cni-ipam subnets); () for
    anything else. After a podCIDR change they tell which bridge addresses were the agent's."""
    try:
        data = json.loads(content)
        cidrs = []
        for plugin in data["plugins"]:
            if isinstance(plugin, dict) and plugin.get("type") == "cni-bridge":
                for range_set in plugin["ipam"]["ranges"]:
                    cidrs += [ipaddress.ip_network(r["subnet"], strict=False) for r in range_set]
        return tuple(cidrs)
    except (ValueError, TypeError, KeyError, AttributeError):
        return ()


def peer_routes(topology: Topology, own: Node) -> tuple[tuple[PeerRoute, ...], tuple[str, ...]]:
    routes: list[PeerRoute] = []
    notes: list[str] = []
    for node in topology.nodes:
        if node.name == own.name:
            continue
        if not node.pod_cidrs:
            notes.append(f"node {node.name}: no podCIDR yet, no route")
            continue
        for cidr in node.pod_cidrs:
            via = node.internal_ip(cidr.version)
            if via is None:
                notes.append(f"node {node.name}: no IPv{cidr.version} InternalIP, no route to {cidr}")
                continue
            if any(mine.version == cidr.version and mine.overlaps(cidr) for mine in own.pod_cidrs):
                notes.append(f"node {node.name}: podCIDR {cidr} overlaps this node's, no route")
                continue
            routes.append(PeerRoute(cidr, via, node.name))
    routes.sort(key=lambda r: (r.dst.version, r.dst))
    return tuple(routes), tuple(notes)


def masq_chains(cluster_cidrs: tuple[IPNetwork, ...], pod_cidrs: tuple[IPNetwork, ...]) -> tuple[MasqChain, ...]:
    chains = []
    for family in sorted({cidr.version for cidr in pod_cidrs}):
        cluster = [c for c in cluster_cidrs if c.version == family]
        if not cluster:
            continue  # no cluster CIDR of this family: nothing would tell pod-to-pod apart
        rules: list[tuple[str, ...]] = [("-d", str(c), "-j", "RETURN") for c in cluster]
        rules.append(("-d", MULTICAST[family], "-j", "RETURN"))
        rules.append(("-j", "MASQUERADE"))
        jumps = tuple(
            ("-s", str(c), "-m", "comment", "--comment", MASQ_COMMENT, "-j", MASQ_CHAIN)
            for c in pod_cidrs if c.version == family
        )
        chains.append(MasqChain(family, MASQ_CHAIN, tuple(rules), jumps))
    return tuple(chains)
