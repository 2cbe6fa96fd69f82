"""From (what the kernel holds, what it should hold) to the changes to make. Pure.

All diffs return nothing to do when the two agree, which is what makes a
second agent pass change nothing at all.
"""
from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional, Sequence

from .desired import IPInterface, MasqChain
from .overlay import PeerRoute, VxlanDevice, VxlanPeer
from .topology import IPAddress, IPNetwork


@dataclass(frozen=True)
class RouteState:
    """A main-table route as read from the kernel."""

    dst: object       # IPNetwork
    gw: object        # Optional[IPAddress]
    proto: int
    oif: int = 0      # the outgoing link's index


@dataclass
class RoutePlan:
    replace: list[PeerRoute] = field(default_factory=list)   # missing or wrong
    delete: list[RouteState] = field(default_factory=list)   # ours, no longer wanted
    unchanged: list[PeerRoute] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.replace and not self.delete


def diff_routes(current: Iterable[RouteState], desired: Sequence[PeerRoute], proto: int,
                link_index: Mapping[str, int] = {}) -> RoutePlan:
    """`link_index` maps device names of desired routes to link indexes: a VXLAN route
    must leave through the device as it is now (a recreated device has a new index)."""
    current = list(current)
    plan = RoutePlan()
    wanted = {route.dst: route for route in desired}
    for route in desired:
        present = [r for r in current if r.dst == route.dst]
        oif = link_index.get(route.device) if route.device else None
        if any(r.gw == route.via and r.proto == proto and (oif is None or r.oif == oif) for r in present):
            plan.unchanged.append(route)
        else:
            plan.replace.append(route)
    for route in current:
        if route.proto == proto and route.dst not in wanted:
            plan.delete.append(route)
    return plan


# -- the VXLAN device and its entries ----------------------------------------------------------
@dataclass(frozen=True)
class VxlanState:
    """A link of the device's name as read from the kernel."""

    index: int
    kind: str
    vni: Optional[int] = None
    port: Optional[int] = None
    local: Optional[IPAddress] = None
    learning: bool = False
    mac: str = ""
    mtu: int = 0
    up: bool = False


@dataclass
class DevicePlan:
    delete: bool = False          # a device of ours that must go (or be made again)
    create: bool = False
    mtu: Optional[int] = None     # set on the existing device
    mac: Optional[str] = None
    up: bool = False

    @property
    def empty(self) -> bool:
        return not (self.delete or self.create or self.mtu or self.mac or self.up)


class DeviceConflict(Exception):
    """The name is held by a link that is not a VXLAN device: never the agent's to delete."""


def diff_vxlan_device(current: Optional[VxlanState], desired: Optional[VxlanDevice]) -> DevicePlan:
    """The kernel cannot change a VXLAN device's VNI, port or local address: those make it again."""
    if current is not None and current.kind != "vxlan":
        if desired is None:
            return DevicePlan()
        raise DeviceConflict(f"{desired.name} exists and is a {current.kind or 'link'} device, not VXLAN")
    if desired is None:
        return DevicePlan(delete=current is not None)
    if current is None:
        return DevicePlan(create=True)
    if (current.vni, current.port, current.local, current.learning) != (desired.vni, desired.port,
                                                                         desired.local, False):
        return DevicePlan(delete=True, create=True)
    return DevicePlan(mtu=desired.mtu if current.mtu != desired.mtu else None,
                      mac=desired.mac if current.mac != desired.mac else None,
                      up=not current.up)


@dataclass(frozen=True)
class FdbEntry:
    mac: str
    dst: IPAddress

    def __str__(self) -> str:
        return f"{self.mac} dst {self.dst}"


@dataclass(frozen=True)
class NeighEntry:
    ip: IPAddress
    mac: str

    def __str__(self) -> str:
        return f"{self.ip} lladdr {self.mac}"


@dataclass
class EntryPlan:
    """Entries on the device to set (missing or different) and to remove (no peer wants them)."""

    fdb_set: list[FdbEntry] = field(default_factory=list)
    fdb_delete: list[FdbEntry] = field(default_factory=list)
    neigh_set: list[NeighEntry] = field(default_factory=list)
    neigh_delete: list[NeighEntry] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.fdb_set or self.fdb_delete or self.neigh_set or self.neigh_delete)


def diff_vxlan_entries(fdb: Iterable[FdbEntry], neighbours: Iterable[NeighEntry],
                       peers: Sequence[VxlanPeer]) -> EntryPlan:
    """Every permanent entry on the device is the agent's (the device is its own and learns
    nothing), so whatever no peer wants is stale: a node removed or moved to another address."""
    fdb, neighbours = list(fdb), list(neighbours)
    want_fdb = [FdbEntry(p.mac, p.remote) for p in peers]
    want_neigh = [NeighEntry(vtep, p.mac) for p in peers for vtep in p.vteps]
    plan = EntryPlan()
    plan.fdb_set = [e for e in want_fdb if e not in fdb]
    plan.fdb_delete = [e for e in fdb if e not in want_fdb]
    plan.neigh_set = [e for e in want_neigh if e not in neighbours]
    wanted_ips = {e.ip for e in want_neigh}
    # A neighbour whose MAC changed is replaced in place, not deleted first.
    plan.neigh_delete = [e for e in neighbours if e.ip not in wanted_ips]
    return plan


# -- bridge addresses ---------------------------------------------------------------------
@dataclass
class AddressPlan:
    delete: list[IPInterface] = field(default_factory=list)   # ours, no longer wanted
    add: list[IPInterface] = field(default_factory=list)


def diff_addresses(current: Iterable[IPInterface], desired: Sequence[IPInterface],
                   managed: Iterable[IPNetwork]) -> AddressPlan:
    """Converge the bridge's gateway addresses.

    Only addresses inside `managed` (the cluster CIDRs and the podCIDRs the agent
    wrote before) are the agent's to remove: whatever else an operator put on the
    bridge stays. Stale ones go first, so no old gateway outlives the change.
    """
    current = list(current)
    managed = list(managed)
    plan = AddressPlan()
    for address in current:
        if address not in desired and any(address.version == net.version and address.ip in net
                                          for net in managed):
            plan.delete.append(address)
    plan.add = [address for address in desired if address not in current]
    return plan


# -- iptables -----------------------------------------------------------------------------
@dataclass(frozen=True)
class NatState:
    """The parts of `iptables -t nat -S` that concern one chain."""

    chain_exists: bool
    rules: tuple[tuple[str, ...], ...]       # argv after `-A <chain>`
    jumps: tuple[tuple[str, ...], ...]       # POSTROUTING rules that jump to the chain, argv after `-A POSTROUTING`


def parse_nat_rules(lines: Iterable[str], chain: str) -> NatState:
    exists = False
    rules: list[tuple[str, ...]] = []
    jumps: list[tuple[str, ...]] = []
    for line in lines:
        args = shlex.split(line)
        if args[:2] == ["-N", chain]:
            exists = True
        elif args[:2] == ["-A", chain]:
            rules.append(tuple(args[2:]))
        elif args[:2] == ["-A", "POSTROUTING"] and args[-2:] == ["-j", chain]:
            jumps.append(tuple(args[2:]))
    return NatState(exists, tuple(rules), tuple(jumps))


def _quote(arg: str) -> str:
    # iptables-restore understands double quotes only.
    return f'"{arg}"' if any(c.isspace() for c in arg) else arg


def masq_restore_script(current: NatState, desired: MasqChain) -> Optional[str]:
    """An `iptables-restore --noflush` script that converges the chain and its jumps, or None.

    Declaring the chain (`:CHAIN - [0:0]`) flushes it under --noflush, so the
    chain is rewritten whole; POSTROUTING (shared with others) only gets the
    jumps that are missing added and the stale ones deleted, in one commit.
    """
    if current.chain_exists and current.rules == desired.rules and current.jumps == desired.jumps:
        return None
    lines = ["*nat", f":{desired.chain} - [0:0]"]
    lines += [" ".join(["-A", desired.chain, *map(_quote, rule)]) for rule in desired.rules]
    seen = set()
    for jump in current.jumps:
        if jump not in desired.jumps or jump in seen:
            lines.append(" ".join(["-D", "POSTROUTING", *map(_quote, jump)]))
        seen.add(jump)
    for jump in desired.jumps:
        if jump not in current.jumps:
            lines.append(" ".join(["-A", "POSTROUTING", *map(_quote, jump)]))
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def masq_teardown_script(current: NatState, chain: str) -> Optional[str]:
    """Remove the chain and its jumps (a family the node no longer has podCIDRs in), or None."""
    if not current.chain_exists:
        return None
    lines = ["*nat", f":{chain} - [0:0]"]
    lines += [" ".join(["-D", "POSTROUTING", *map(_quote, jump)]) for jump in current.jumps]
    lines += [f"-X {chain}", "COMMIT"]
    return "\n".join(lines) + "\n"
