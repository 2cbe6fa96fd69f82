"""Overlay peers from what the kernel holds: the agent's routes, and for those through its
VXLAN device the neighbour (VTEP address -> MAC) and FDB (MAC -> underlay) entries. Pure.

Inspect has no topology (no API server): a peer is known by its route, and a VXLAN
peer is complete when the route, its neighbour and the FDB entry of that MAC are
all there. Entries no route uses are listed too, incomplete (the route went away).
"""
from __future__ import annotations

from typing import Iterable, Optional

from .model import OverlayPeer

ROUTE, VXLAN = "route", "vxlan"


def peers(routes: Iterable, names: dict[int, str], device_index: int = 0, fdb: Iterable = (),
          neighbours: Iterable = ()) -> list[OverlayPeer]:
    """`routes`: the agent's (KernelRouteInfo); `fdb`, `neighbours`: the device's permanent entries."""
    fdb, neighbours = list(fdb), list(neighbours)
    mac_of = {n.ip: n.mac for n in neighbours}
    underlay_of = {e.mac: e.dst for e in fdb}
    device = names.get(device_index, "")
    found = []
    for route in routes:
        if device_index and route.oif == device_index:
            found.append(_vxlan_peer(str(route.dst), route.gw, device, mac_of.get(route.gw, ""), underlay_of))
        else:
            found.append(OverlayPeer(str(route.dst), ROUTE, str(route.gw or ""), names.get(route.oif, "")))
    routed = {route.gw for route in routes if device_index and route.oif == device_index}
    for entry in neighbours:
        if entry.ip not in routed:
            found.append(_vxlan_peer("", entry.ip, device, entry.mac, underlay_of, route=False))
    named = {entry.mac for entry in neighbours}
    found += [OverlayPeer("", VXLAN, "", device, entry.mac, str(entry.dst), route=False, neighbour=False, fdb=True,
                          complete=False) for entry in fdb if entry.mac not in named]
    return found


def _vxlan_peer(pod_cidr: str, via: object, device: str, mac: str, underlay_of: dict,
                route: bool = True) -> OverlayPeer:
    underlay: Optional[object] = underlay_of.get(mac) if mac else None
    return OverlayPeer(pod_cidr, VXLAN, str(via or ""), device, mac, str(underlay or ""), route=route,
                       neighbour=bool(mac), fdb=underlay is not None,
                       complete=route and bool(mac) and underlay is not None)


def missing_parts(peer: OverlayPeer) -> list[str]:
    """What a peer lacks, in words (empty when complete)."""
    parts = [("route", peer.route), ("neighbour entry", peer.neighbour), ("FDB entry", peer.fdb)]
    return [name for name, present in parts if present is False]
