"""The agent's kernel operations beyond the plugin's: the VXLAN device, its forwarding
(FDB) and neighbour entries, routes through a device, and where the InternalIP lives.

Part of the netlink adapter layer: it extends `cni_bridge.netlink.Netlink` (which
alone imports pyroute2, lazily) and talks to the kernel only through its handle.
The plugin never loads this module.
"""
from __future__ import annotations

import errno
import ipaddress
from typing import Any, Optional

from ..netlink import Netlink, _code
from .diff import FdbEntry, NeighEntry, VxlanState
from .overlay import Underlay, VxlanDevice

_AF = {4: 2, 6: 10}             # AF_INET, AF_INET6
_NUD_PERMANENT = 0x80
_NTF_SELF = 0x02                # the entry belongs to the VXLAN device itself (not to a bridge)
_RTNH_F_ONLINK = 0x04
_IFF_UP = 0x01
_GONE = (errno.ENOENT, errno.ESRCH, errno.ENODEV, errno.EADDRNOTAVAIL)


class OverlayNetlink(Netlink):
    # -- where the underlay is ------------------------------------------------------
    def underlay(self, address: ipaddress.IPv4Address) -> Optional[Underlay]:
        """The link holding `address`, with its prefix and MTU; None when no link does."""
        for msg in self.ipr.get_addr(family=_AF[4]):
            if msg.get_attr("IFA_ADDRESS") != str(address):
                continue
            links = self.ipr.link("get", index=msg["index"])
            if not links:
                return None
            link = self._to_link(links[0])
            return Underlay(ipaddress.IPv4Interface(f"{address}/{msg['prefixlen']}"), link.name, link.mtu)
        return None

    # -- the device -----------------------------------------------------------------
    def vxlan_state(self, name: str) -> Optional[VxlanState]:
        try:
            msgs = self.ipr.link("get", ifname=name)
        except Exception as exc:
            if _code(exc) in (errno.ENODEV, errno.ENOENT):
                return None
            raise
        if not msgs:
            return None
        msg = msgs[0]
        link = self._to_link(msg)
        if link.kind != "vxlan":
            return VxlanState(link.index, link.kind)
        data = msg.get_attr("IFLA_LINKINFO").get_attr("IFLA_INFO_DATA")
        local = data.get_attr("IFLA_VXLAN_LOCAL")
        return VxlanState(
            index=link.index, kind="vxlan", vni=data.get_attr("IFLA_VXLAN_ID"),
            port=data.get_attr("IFLA_VXLAN_PORT"),
            local=ipaddress.ip_address(local) if local else None,
            learning=bool(data.get_attr("IFLA_VXLAN_LEARNING")),
            mac=link.mac, mtu=link.mtu, up=link.up,
        )

    def create_vxlan(self, device: VxlanDevice) -> None:
        # No `remote`/`group`: without a default destination the device floods nothing,
        # and without learning it only knows the FDB entries the agent writes.
        self.ipr.link("add", ifname=device.name, kind="vxlan", vxlan_id=device.vni,
                      vxlan_local=str(device.local), vxlan_port=device.port, vxlan_learning=0,
                      address=device.mac, mtu=device.mtu)

    def set_vxlan(self, index: int, mtu: Optional[int], mac: Optional[str], up: bool) -> None:
        changes: dict[str, Any] = {}
        if mtu:
            changes["mtu"] = mtu
        if mac:
            changes["address"] = mac
        if up:
            changes["state"] = "up"
        if changes:
            self.ipr.link("set", index=index, **changes)

    def delete_index(self, index: int) -> None:
        try:
            self.ipr.link("del", index=index)
        except Exception as exc:
            if _code(exc) not in _GONE:
                raise

    # -- forwarding entries (MAC -> remote underlay address) ----------------------------
    def fdb_entries(self, index: int) -> list[FdbEntry]:
        found = []
        for msg in self.ipr.fdb("dump", ifindex=index):
            dst = msg.get_attr("NDA_DST")
            if msg["ifindex"] != index or not msg["state"] & _NUD_PERMANENT or dst is None:
                continue
            found.append(FdbEntry(msg.get_attr("NDA_LLADDR").lower(), ipaddress.ip_address(dst)))
        return found

    def set_fdb(self, index: int, entry: FdbEntry) -> None:
        self.ipr.fdb("replace", ifindex=index, lladdr=entry.mac, dst=str(entry.dst),
                     state=_NUD_PERMANENT, flags=_NTF_SELF)

    def delete_fdb(self, index: int, entry: FdbEntry) -> None:
        try:
            self.ipr.fdb("del", ifindex=index, lladdr=entry.mac, dst=str(entry.dst), flags=_NTF_SELF)
        except Exception as exc:
            if _code(exc) not in _GONE:
                raise

    # -- neighbours (VTEP address -> VTEP MAC) -------------------------------------------
    def neighbours(self, index: int) -> list[NeighEntry]:
        found = []
        for family in (4, 6):
            try:
                msgs = self.ipr.get_neighbours(family=_AF[family], ifindex=index)
            except Exception as exc:     # IPv6 disabled: no entries of that family
                if _code(exc) in (errno.EAFNOSUPPORT,):
                    continue
                raise
            for msg in msgs:
                mac = msg.get_attr("NDA_LLADDR")
                if msg["ifindex"] != index or not msg["state"] & _NUD_PERMANENT or not mac:
                    continue
                found.append(NeighEntry(ipaddress.ip_address(msg.get_attr("NDA_DST")), mac.lower()))
        return found

    def set_neighbour(self, index: int, entry: NeighEntry) -> None:
        self.ipr.neigh("replace", ifindex=index, dst=str(entry.ip), lladdr=entry.mac,
                       state=_NUD_PERMANENT, family=_AF[entry.ip.version])

    def delete_neighbour(self, index: int, entry: NeighEntry) -> None:
        try:
            self.ipr.neigh("del", ifindex=index, dst=str(entry.ip), family=_AF[entry.ip.version])
        except Exception as exc:
            if _code(exc) not in _GONE:
                raise

    # -- routes through a device --------------------------------------------------------
    def replace_device_route(self, dst: Any, via: Any, index: int, proto: int, onlink: bool) -> None:
        """`dst via <via> dev <index> [onlink]` in the main table, replacing any route to `dst`."""
        self.ipr.route("replace", dst=str(dst), gateway=str(via), oif=index, proto=proto,
                       flags=_RTNH_F_ONLINK if onlink else 0, family=_AF[dst.version], table=254)
