"""How this node reaches each peer's podCIDRs: a direct route or VXLAN. Pure: no kernel, no files.

Two backends behind one interface (`OverlayBackend.plan_peer`), chosen per peer:

- `DirectRoutes`: `<podCIDR> via <InternalIP>` (the peer is on this node's L2 segment);
- `Vxlan`: `<podCIDR> via <VTEP address> dev cni-vxlan onlink`, plus a neighbour
  entry (VTEP address -> peer's VTEP MAC) and a forwarding entry (VTEP MAC ->
  peer's InternalIP) on the one VXLAN device of the node. Nothing is learned or
  flooded: every entry is written by the agent, so no multicast is needed and the
  kernel encapsulates with no userspace in the data path.

`--backend auto` uses direct routes for peers whose IPv4 InternalIP lies in the
subnet of this node's own InternalIP, VXLAN for the rest; `routes` and `vxlan`
force one backend for every peer.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Optional, Protocol

from .topology import AgentError, IPAddress, IPNetwork, Node
from .vtep import VTEP_MAC_ANNOTATION, derived_vtep_mac

BACKENDS = ("auto", "routes", "vxlan")
# Outer IPv4 header 20 + UDP 8 + VXLAN 8 + the inner Ethernet header 14 (the inner
# packet's family does not matter: IPv6 pods over an IPv4 underlay cost the same).
VXLAN_OVERHEAD = 50


@dataclass(frozen=True)
class VxlanOptions:
    """Defaults: device `cni-vxlan`, VNI 1, UDP 8472 (the Linux kernel's default VXLAN
    port, which flannel and most Linux overlays use; IANA's is 4789)."""

    name: str = "cni-vxlan"
    vni: int = 1
    port: int = 8472


@dataclass(frozen=True)
class OverlayOptions:
    backend: str = "auto"
    vxlan: VxlanOptions = VxlanOptions()


@dataclass(frozen=True)
class Underlay:
    """The node's own IPv4 InternalIP as the kernel holds it: address/prefix, link, link MTU."""

    address: ipaddress.IPv4Interface
    link: str
    mtu: int


@dataclass(frozen=True)
class PeerRoute:
    dst: IPNetwork
    via: IPAddress
    node: str
    device: Optional[str] = None     # None: the kernel finds the device from `via` (a direct route)
    onlink: bool = False             # VXLAN: `via` is a VTEP address no subnet holds


@dataclass(frozen=True)
class VxlanDevice:
    name: str
    vni: int
    port: int
    local: ipaddress.IPv4Address
    mac: str
    mtu: int


@dataclass(frozen=True)
class VxlanPeer:
    """What the VXLAN device needs to reach one peer: its FDB entry and neighbours."""

    node: str
    mac: str
    remote: ipaddress.IPv4Address
    vteps: tuple[IPAddress, ...]     # one per podCIDR (per family)


@dataclass(frozen=True)
class OverlayPlan:
    routes: tuple[PeerRoute, ...] = ()
    device: Optional[VxlanDevice] = None          # None: no VXLAN device on this node
    vxlan_peers: tuple[VxlanPeer, ...] = ()
    pod_mtu: Optional[int] = None                 # what pods get when a peer is behind VXLAN
    notes: tuple[str, ...] = ()
    backend_of: dict = field(default_factory=dict, compare=False)   # node name -> backend name


# -- VTEP address ---------------------------------------------------------------------
def vtep_address(pod_cidr: IPNetwork) -> IPAddress:
    """The next hop a VXLAN route names for a peer's podCIDR: the podCIDR's network address.
    No interface holds it; it only keys the neighbour entry that gives the peer's VTEP MAC."""
    return pod_cidr.network_address


def own_vtep_mac(node: Node) -> Optional[str]:
    ip = node.internal_ip(4)
    return node.vtep_mac or (derived_vtep_mac(ip) if ip is not None else None)


# -- the backends -----------------------------------------------------------------------
class OverlayBackend(Protocol):
    name: str

    def plan_peer(self, own: Node, peer: Node, cidrs: tuple[IPNetwork, ...]) -> "PeerPlan":
        """Routes (and VXLAN entries) for `cidrs`, the peer's podCIDRs this node may route."""


@dataclass
class PeerPlan:
    routes: list[PeerRoute] = field(default_factory=list)
    vxlan_peer: Optional[VxlanPeer] = None
    notes: list[str] = field(default_factory=list)
    unrouted: list[IPNetwork] = field(default_factory=list)   # podCIDRs this backend cannot reach


class DirectRoutes:
    name = "routes"

    def plan_peer(self, own: Node, peer: Node, cidrs: tuple[IPNetwork, ...]) -> PeerPlan:
        plan = PeerPlan()
        for cidr in cidrs:
            via = peer.internal_ip(cidr.version)
            if via is None:
                plan.notes.append(f"node {peer.name}: no IPv{cidr.version} InternalIP, no route to {cidr}")
                plan.unrouted.append(cidr)
                continue
            plan.routes.append(PeerRoute(cidr, via, peer.name))
        return plan


class Vxlan:
    name = "vxlan"

    def __init__(self, device: str) -> None:
        self.device = device

    def plan_peer(self, own: Node, peer: Node, cidrs: tuple[IPNetwork, ...]) -> PeerPlan:
        plan = PeerPlan()
        remote = peer.internal_ip(4)
        if remote is None:
            plan.notes.append(f"node {peer.name}: no IPv4 InternalIP, no VXLAN tunnel to it")
            return plan
        if peer.vtep_mac is None:
            plan.notes.append(f"node {peer.name}: no VTEP MAC published yet "
                              f"(annotation {VTEP_MAC_ANNOTATION}), no VXLAN tunnel to it")
            return plan
        # One device carries both families: the neighbour entry of each family's VTEP
        # address points at the same MAC, whose FDB entry points at the IPv4 InternalIP.
        vteps = tuple(vtep_address(cidr) for cidr in cidrs)
        plan.routes = [PeerRoute(cidr, vtep_address(cidr), peer.name, self.device, onlink=True) for cidr in cidrs]
        plan.vxlan_peer = VxlanPeer(peer.name, peer.vtep_mac, remote, vteps)
        return plan


def choose_backend(mode: str, underlay: Optional[Underlay], peer: Node,
                   direct: DirectRoutes, vxlan: Optional[Vxlan]) -> OverlayBackend:
    """`auto`: direct routes to a peer on this node's IPv4 subnet, VXLAN to any other."""
    if vxlan is None or mode == "routes":
        return direct
    if mode == "vxlan":
        return vxlan
    peer_ip = peer.internal_ip(4)
    if underlay is None or peer_ip is None or peer_ip in underlay.address.network:
        return direct
    return vxlan


def plan_overlay(nodes: tuple[Node, ...], own: Node, options: OverlayOptions,
                 underlay: Optional[Underlay]) -> OverlayPlan:
    """Routes to every peer's podCIDRs and, unless the backend is `routes`, the VXLAN device.

    In `auto` and `vxlan` the device exists even when no peer is behind VXLAN: a peer
    may still send to this node through it (subnets of different sizes need not agree).
    `underlay` is None when the node's InternalIP is on none of its links: `auto` then
    cannot tell peers apart and routes directly; `vxlan` cannot work at all.
    """
    if options.backend not in BACKENDS:
        raise AgentError(f"unknown backend {options.backend!r} (one of {', '.join(BACKENDS)})")
    notes: list[str] = []
    device = _vxlan_device(own, options, underlay, notes)
    direct = DirectRoutes()
    vxlan = Vxlan(options.vxlan.name) if device is not None else None
    routes: list[PeerRoute] = []
    peers: list[VxlanPeer] = []
    backend_of: dict[str, str] = {}
    for peer in nodes:
        if peer.name == own.name:
            continue
        if not peer.pod_cidrs:
            notes.append(f"node {peer.name}: no podCIDR yet, no route")
            continue
        cidrs = []
        for cidr in peer.pod_cidrs:
            if any(mine.version == cidr.version and mine.overlaps(cidr) for mine in own.pod_cidrs):
                notes.append(f"node {peer.name}: podCIDR {cidr} overlaps this node's, no route")
            else:
                cidrs.append(cidr)
        backend = choose_backend(options.backend, underlay, peer, direct, vxlan)
        plan = backend.plan_peer(own, peer, tuple(cidrs))
        backend_of[peer.name] = backend.name
        if plan.unrouted and vxlan is not None and backend is direct and options.backend == "auto":
            # A dual-stack peer on this segment with an IPv4 InternalIP only: its IPv6 pods
            # are reached through the tunnel, over the IPv4 underlay.
            tunnel = vxlan.plan_peer(own, peer, tuple(plan.unrouted))
            if tunnel.vxlan_peer is not None:
                plan.routes += tunnel.routes
                plan.vxlan_peer = tunnel.vxlan_peer
                plan.notes = [n for n in plan.notes if not any(str(c) in n for c in plan.unrouted)]
                backend_of[peer.name] = f"{direct.name}+{vxlan.name}"
        routes += plan.routes
        notes += plan.notes
        if plan.vxlan_peer is not None:
            peers.append(plan.vxlan_peer)
    routes.sort(key=lambda r: (r.dst.version, r.dst))
    pod_mtu = device.mtu if device is not None and peers else None
    return OverlayPlan(tuple(routes), device, tuple(peers), pod_mtu, tuple(notes), backend_of)


def _vxlan_device(own: Node, options: OverlayOptions, underlay: Optional[Underlay],
                  notes: list[str]) -> Optional[VxlanDevice]:
    if options.backend == "routes":
        return None
    local = own.internal_ip(4)
    problem = None
    if local is None:
        problem = f"node {own.name} has no IPv4 InternalIP to send VXLAN from"
    elif underlay is None:
        problem = f"no interface of this node holds its InternalIP {local}"
    if problem is not None:
        if options.backend == "vxlan":
            raise AgentError(f"--backend vxlan: {problem}")
        notes.append(f"{problem}: direct routes to every node")
        return None
    assert local is not None and underlay is not None
    vx = options.vxlan
    mac = own_vtep_mac(own)
    assert mac is not None
    return VxlanDevice(vx.name, vx.vni, vx.port, local, mac, underlay.mtu - VXLAN_OVERHEAD)
