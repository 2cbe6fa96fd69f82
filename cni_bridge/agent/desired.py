"""What one node should hold, computed from the topology. Pure: no kernel, no files.

- the conflist the runtime reads (cni-bridge + cni-ipam for the node's podCIDRs, portmap);
- a route per podCIDR of every other node, direct (`via <InternalIP>`) or through the
  VXLAN device (see overlay.py), and the VXLAN device's forwarding and neighbour entries;
- one nat chain per IP family that RETURNs for the cluster CIDR and
  MASQUERADEs the rest, jumped to from POSTROUTING for the node's podCIDRs;
- on the bridge, the gateway of each own podCIDR and no other address of the cluster.
"""
from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass
from typing import Any, Optional, Union

from .overlay import OverlayOptions, PeerRoute, Underlay, VxlanDevice, VxlanPeer, plan_overlay
from .topology import AgentError, IPNetwork, Node, Topology

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
    vxlan: Optional[VxlanDevice] = None      # None: the node must hold no VXLAN device of that name
    vxlan_name: str = OverlayOptions().vxlan.name
    vxlan_peers: tuple[VxlanPeer, ...] = ()

    def conflist_bytes(self) -> bytes:
        return (json.dumps(self.conflist, indent=2) + "\n").encode()


def desired_state(topology: Topology, node_name: str, options: AgentOptions = AgentOptions(),
                  overlay: OverlayOptions = OverlayOptions(), underlay: Optional[Underlay] = None) -> DesiredState:
    """`underlay` is what the kernel says about the node's InternalIP (read by the caller)."""
    node = topology.node(node_name)
    if not node.pod_cidrs:
        raise AgentError(f"node {node_name!r} has no podCIDR yet")
    plan = plan_overlay(topology.nodes, node, overlay, underlay)
    families = tuple(sorted({cidr.version for cidr in node.pod_cidrs}))
    return DesiredState(
        node=node.name,
        conflist=conflist(node, options, plan.pod_mtu),
        routes=plan.routes,
        masq=masq_chains(topology.cluster_cidrs, node.pod_cidrs),
        forwarding=families,
        notes=plan.notes,
        bridge=options.bridge,
        gateways=gateway_addresses(node.pod_cidrs),
        cluster_cidrs=topology.cluster_cidrs,
        vxlan=plan.device,
        vxlan_name=overlay.vxlan.name,
        vxlan_peers=plan.vxlan_peers,
    )


def conflist(node: Node, options: AgentOptions, overlay_mtu: Optional[int] = None) -> dict:
    """cni-bridge as the pods' default gateway, cni-ipam over the node's podCIDRs, then portmap.

    ipMasq is off: the agent's own chain masquerades, and leaves pod-to-pod alone.
    `overlay_mtu` (underlay MTU minus the VXLAN overhead) applies when some peer is
    behind VXLAN, so full-size packets with DF set fit in the tunnel; --mtu wins.
    """
    bridge: dict[str, Any] = {
        "type": "cni-bridge",
        "bridge": options.bridge,
        "isGateway": True,
        "isDefaultGateway": True,
        "ipMasq": False,
        "hairpinMode": options.hairpin,
    }
    mtu = options.mtu or overlay_mtu
    if mtu:
        bridge["mtu"] = mtu
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
