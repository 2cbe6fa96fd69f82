"""The netlink adapter: the only module that imports pyroute2 (lazily).

A small set of idempotent operations that re-read kernel state, so concurrent
ADDs racing on one bridge and retried ADDs after a crash both converge.
`tests/unit/fake_netlink.py` implements the same interface for no-root tests.

The plugin's operations speak rtnetlink through `rtnl` (no pyroute2 on the per-pod
path); pyroute2 serves the agent's overlay extension through `Netlink.ipr`.
"""
from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
from dataclasses import dataclass
import functools
from typing import Any, Callable, Iterator, Optional, TypeVar

from . import rtnl
from .protocol.errors import CNIError, Code
from .protocol.result import IPAddress, IPInterface, IPNetwork

F = TypeVar("F", bound=Callable[..., Any])
_AF = {4: 2, 6: 10}          # AF_INET, AF_INET6
_IFA_F_NODAD = 0x02          # pods get no duplicate address detection wait (addresses are IPAM-unique)
_BRIDGE_MODE_HAIRPIN = 1
_RTPROT_STATIC = 4           # the pod's routes: as `ip route add ... proto static`
_BR_STATE_DISABLED, _BR_STATE_FORWARDING = "0", "3"    # /sys/class/net/<port>/brport/state


@dataclass(frozen=True)
class Link:
    index: int
    name: str
    kind: str
    mac: str
    mtu: int
    master: int        # index of the bridge this link is a port of, 0 if none
    up: bool
    promisc: bool
    hairpin: bool = False


@dataclass(frozen=True)
class KernelRouteInfo:
    dst: IPNetwork
    gw: Optional[IPAddress]
    oif: int
    proto: int = 0     # rtnetlink protocol (who installed the route)


def _code(exc: BaseException) -> int:
    return getattr(exc, "code", None) or getattr(exc, "errno", None) or 0


def _kernel_refusal(action: str) -> Callable[[F], F]:
    """Turn a netlink error the kernel answered with into a CNI error naming the step.

    A refused route or address is usually a config problem (a gateway that is not
    on-link, IPv6 disabled in the pod); it deserves a message, not code 999.
    """
    def wrap(method: F) -> F:
        @functools.wraps(method)
        def run(self: "Netlink", *args: Any, **kwargs: Any) -> Any:
            try:
                return method(self, *args, **kwargs)
            except CNIError:
                raise
            except Exception as exc:
                code = _code(exc)
                if not isinstance(code, int) or code <= 0:
                    raise
                target = " ".join(str(a) for a in args[:2])
                raise CNIError(Code.KERNEL_REFUSED, f"the kernel refused to {action} ({target})",
                               os.strerror(code)) from None
        return run  # type: ignore[return-value]
    return wrap


def _iproute_class() -> Any:
    """pyroute2's IPRoute without pyroute2/__init__, which imports every pyroute2
    module (NDB, IPDB, conntrack, nftables, ...: ~40 ms of each exec'd call)."""
    import sys

    if "pyroute2" not in sys.modules:
        _register_bare_package("pyroute2")
    from pyroute2.iproute.linux import IPRoute

    return IPRoute


def _register_bare_package(name: str) -> None:
    """Register package `name` without running its __init__; submodules import on demand,
    and the first use of any other name runs the real __init__ after all."""
    import importlib.util
    import sys

    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return
    if spec is None or spec.loader is None or not spec.submodule_search_locations:
        return
    package = importlib.util.module_from_spec(spec)

    def complete(attr: str) -> Any:
        if attr.startswith("__") or importlib.util.find_spec(f"{name}.{attr}") is not None:
            raise AttributeError(attr)   # a submodule: the import system loads just that one
        del package.__getattr__
        spec.loader.exec_module(package)
        return getattr(package, attr)

    package.__getattr__ = complete  # type: ignore[attr-defined]
    sys.modules[name] = package


_CLONE_NEWNET = 0x40000000
_NETLINK_ROUTE = 0


@contextlib.contextmanager
def _inside_netns(path: str) -> Iterator[None]:
    """Run the body with this thread in the network namespace at `path` (never created).

    setns(2) moves only the calling thread: move it there and straight back. What the
    body opens belongs to that namespace: a socket stays in the one it was made in,
    and /proc/sys/net shows the calling thread's namespace.
    """
    import ctypes
    import sys

    libc = ctypes.CDLL(None, use_errno=True)
    target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            if libc.setns(target, _CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err), path)
            try:
                yield
            finally:
                if libc.setns(home, _CLONE_NEWNET) != 0:
                    # Host-side work must never run in the pod's namespace.
                    sys.stderr.write("cni-bridge: cannot return to the host network namespace\n")
                    os._exit(70)
        finally:
            os.close(home)
    finally:
        os.close(target)


def _socket_in_netns(path: str) -> "socket.socket":
    """A NETLINK_ROUTE socket living in the network namespace at `path`."""
    import socket

    with _inside_netns(path):
        return socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, _NETLINK_ROUTE)


class Netlink:
    """rtnetlink in one network namespace (the current one when `netns` is None).

    Requests go through `rtnl.Socket` (struct-packed messages, no pyroute2). `ipr`, a
    pyroute2 IPRoute on a second socket in the same namespace, is made on first use for
    the agent's overlay operations, which the per-pod path never calls."""

    def __init__(self, netns: Optional[str] = None) -> None:
        self.netns = netns
        try:
            # A namespace's socket is made from inside it (see _socket_in_netns).
            self.rt = rtnl.Socket(_socket_in_netns(netns)) if netns else rtnl.Socket.here()
        except OSError as exc:
            raise CNIError(Code.INVALID_ENV, f"CNI_NETNS {netns!r} is not a usable network namespace",
                           exc.strerror or str(exc)) from None
        self._ipr: Any = None
        # The links this object has seen, by name. A Netlink lives for one CNI
        # call, so a link's index (and a veth's MAC) seen earlier in the call is
        # still right, and need not be asked for again.
        self._seen: dict[str, Link] = {}

    @property
    def ipr(self) -> Any:
        """pyroute2's IPRoute in this namespace (groups=0: no multicast subscription)."""
        if self._ipr is None:
            IPRoute = _iproute_class()
            sock = _socket_in_netns(self.netns) if self.netns else None
            self._ipr = IPRoute(use_socket=sock, groups=0) if sock else IPRoute(groups=0)
        return self._ipr

    def close(self) -> None:
        self.rt.close()
        if self._ipr is not None:
            self._ipr.close()

    def __enter__(self) -> "Netlink":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- links ---------------------------------------------------------------
    def link(self, name: str) -> Optional[Link]:
        """The link as the kernel has it now."""
        body = rtnl.ifinfo() + rtnl.attr_str(rtnl.IFLA_IFNAME, name) \
            + rtnl.attr_u32(rtnl.IFLA_EXT_MASK, rtnl.RTEXT_FILTER_SKIP_STATS)
        try:
            # A GET by name: the kernel returns the one link.
            msg = self.rt.request(rtnl.RTM_GETLINK, body, flags=0)
        except OSError as exc:
            if _code(exc) in (errno.ENODEV, errno.ENOENT):
                self._seen.pop(name, None)
                return None
            raise
        if msg is None:
            self._seen.pop(name, None)
            return None
        link = self._seen[name] = _link(msg)
        return link

    def known_link(self, name: str) -> Optional[Link]:
        """The link as first seen in this call: right for its index and a veth's MAC,
        not for state that changes (up, master, a bridge's MAC as ports come and go)."""
        return self._seen.get(name) or self.link(name)

    def links(self) -> list[Link]:
        """Every link of the namespace, in one dump (for read-only views such as `inspect`)."""
        body = rtnl.ifinfo() + rtnl.attr_u32(rtnl.IFLA_EXT_MASK, rtnl.RTEXT_FILTER_SKIP_STATS)
        return [_link(msg) for msg in self.rt.dump(rtnl.RTM_GETLINK, body)
                if msg.kind == rtnl.RTM_NEWLINK]

    def _to_link(self, msg: Any) -> Link:
        """A Link from a pyroute2 message (the overlay's reads through `ipr`)."""
        info = msg.get_attr("IFLA_LINKINFO")
        kind = info.get_attr("IFLA_INFO_KIND") if info else ""
        return Link(
            index=msg["index"],
            name=msg.get_attr("IFLA_IFNAME"),
            kind=kind or "",
            mac=(msg.get_attr("IFLA_ADDRESS") or "").lower(),
            mtu=msg.get_attr("IFLA_MTU") or 0,
            master=msg.get_attr("IFLA_MASTER") or 0,
            up=bool(msg["flags"] & rtnl.IFF_UP),
            promisc=bool(msg["flags"] & rtnl.IFF_PROMISC),
        )

    def _set_link(self, index: int, *attributes: bytes, flags: int = 0, change: int = 0) -> None:
        self.rt.request(rtnl.RTM_SETLINK, rtnl.ifinfo(index, flags, change) + b"".join(attributes))

    @_kernel_refusal("set up the bridge")
    def ensure_bridge(self, name: str, mtu: Optional[int], promisc: bool) -> Link:
        """Create the bridge if missing; tolerate a concurrent creator (EEXIST)."""
        created = False
        existing = self.link(name)
        if existing is None:
            try:
                body = rtnl.ifinfo() + rtnl.attr_str(rtnl.IFLA_IFNAME, name)
                if mtu:
                    body += rtnl.attr_u32(rtnl.IFLA_MTU, mtu)
                body += rtnl.attr_nested(rtnl.IFLA_LINKINFO, rtnl.attr_str(rtnl.IFLA_INFO_KIND, "bridge"))
                self.rt.request(rtnl.RTM_NEWLINK, body, rtnl.F_ACK | rtnl.F_CREATE | rtnl.F_EXCL)
                created = True
            except OSError as exc:
                if _code(exc) != errno.EEXIST:
                    raise
            existing = self.link(name)
        if existing is None or existing.kind != "bridge":
            raise CNIError(Code.BRIDGE_CONFLICT, f"interface {name} exists and is not a bridge",
                           "choose another 'bridge' name or remove that interface")
        if created:
            # Pin the MAC so it no longer follows the lowest port MAC as pods come and go.
            self._set_link(existing.index, rtnl.attr(rtnl.IFLA_ADDRESS, rtnl.mac_bytes(existing.mac)))
        flags = change = 0
        if not existing.up:
            flags, change = flags | rtnl.IFF_UP, change | rtnl.IFF_UP
        if promisc and not existing.promisc:
            flags, change = flags | rtnl.IFF_PROMISC, change | rtnl.IFF_PROMISC
        new_mtu = mtu if mtu and existing.mtu != mtu and not created else 0
        if not change and not new_mtu and not created:
            return existing
        if change or new_mtu:
            self._set_link(existing.index, *([rtnl.attr_u32(rtnl.IFLA_MTU, new_mtu)] if new_mtu else []),
                           flags=flags, change=change)
        return self.link(name) or existing

    @_kernel_refusal("create the veth pair")
    def add_veth(self, name: str, peer: str, peer_netns: str, mtu: Optional[int], peer_mac: str) -> Link:
        """Create a veth here with its peer placed straight into `peer_netns`."""
        fd = os.open(peer_netns, os.O_RDONLY | os.O_CLOEXEC)
        try:
            peer_body = rtnl.ifinfo() + rtnl.attr_str(rtnl.IFLA_IFNAME, peer) \
                + rtnl.attr_u32(rtnl.IFLA_NET_NS_FD, fd)
            mtu_attr = rtnl.attr_u32(rtnl.IFLA_MTU, mtu) if mtu else b""
            peer_body += mtu_attr
            if peer_mac:
                peer_body += rtnl.attr(rtnl.IFLA_ADDRESS, rtnl.mac_bytes(peer_mac))
            body = rtnl.ifinfo() + rtnl.attr_str(rtnl.IFLA_IFNAME, name) + mtu_attr + rtnl.attr_nested(
                rtnl.IFLA_LINKINFO, rtnl.attr_str(rtnl.IFLA_INFO_KIND, "veth"),
                rtnl.attr_nested(rtnl.IFLA_INFO_DATA, rtnl.attr(rtnl.VETH_INFO_PEER, peer_body)))
            self.rt.request(rtnl.RTM_NEWLINK, body, rtnl.F_ACK | rtnl.F_CREATE | rtnl.F_EXCL)
        finally:
            os.close(fd)
        link = self.link(name)
        assert link is not None
        return link

    @_kernel_refusal("attach the veth to the bridge")
    def attach(self, port: str, bridge: str, hairpin: bool) -> None:
        port_link, bridge_link = self.known_link(port), self.known_link(bridge)
        if port_link is None or bridge_link is None:
            raise CNIError(Code.INTERNAL, f"cannot attach {port} to {bridge}: link vanished")
        self._set_link(port_link.index, rtnl.attr_u32(rtnl.IFLA_MASTER, bridge_link.index),
                       flags=rtnl.IFF_UP, change=rtnl.IFF_UP)
        if hairpin:
            # A bridge port setting: AF_BRIDGE, and IFLA_PROTINFO marked nested (else the
            # kernel reads it as the old one-byte port state).
            mode = rtnl.attr(rtnl.IFLA_BRPORT_MODE, bytes([_BRIDGE_MODE_HAIRPIN]))
            self.rt.request(rtnl.RTM_SETLINK, rtnl.ifinfo(port_link.index, family=rtnl.AF_BRIDGE)
                            + rtnl.attr_nested(rtnl.IFLA_PROTINFO, mode))

    @_kernel_refusal("bring the interface up")
    def set_up(self, name: str) -> None:
        link = self.known_link(name)
        if link is not None:   # setting an up link up changes nothing; cheaper than asking
            self._set_link(link.index, flags=rtnl.IFF_UP, change=rtnl.IFF_UP)
    def set_arp_notify(self, name: str) -> None:
        """net.ipv4.conf.<name>.arp_notify=1, before the link is set up: the kernel then
        announces the link's addresses (gratuitous ARP) whenever it comes up or its MAC
        changes (see announce), so neighbours holding a reused address with the previous
        pod's MAC learn the new one at once.

        No netlink request: the sysctl is written from inside the namespace (one setns
        each way, as for the socket). A link without IPv4 settings is left alone.
        """
        from . import sysctl

        try:
            with self._inside():
                sysctl.set_link(4, name, "arp_notify", "1", required=False)
        except OSError as exc:
            raise CNIError(Code.KERNEL_REFUSED, f"cannot enter {self.netns} to set arp_notify on {name}",
                           exc.strerror or str(exc)) from None

    @_kernel_refusal("announce the addresses")
    def announce(self, name: str) -> None:
        """Make the kernel announce the link's IPv4 addresses now (with arp_notify set).

        Needed beside arp_notify's announcement as the link comes up, which the bridge
        drops: it enables the peer's port only after it sees the carrier, a moment later
        (see wait_port_forwarding). Setting the MAC the link already has changes nothing
        but is a MAC change to arp_notify (NETDEV_CHANGEADDR): one request, and no packet
        socket, whose close waits for an RCU grace period (~15 ms).
        """
        link = self.known_link(name)
        if link is not None:
            self._set_link(link.index, rtnl.attr(rtnl.IFLA_ADDRESS, rtnl.mac_bytes(link.mac)))

    def wait_port_forwarding(self, port: str, timeout: float = 0.5) -> bool:
        """Wait until the bridge forwards frames from `port`: the kernel enables a port
        asynchronously once its carrier is up (usually at once, sometimes a few ms), and
        only then does an announcement from the pod reach its neighbours.

        Read from sysfs, which costs no netlink request. False (and no wait) when sysfs
        does not show this namespace's links, or the port is held by STP (seconds).
        """
        import time

        path = f"/sys/class/net/{port}/brport/state"
        deadline = time.monotonic() + timeout
        while True:
            try:
                with open(path) as f:
                    state = f.read().strip()
            except OSError:
                return False
            if state != _BR_STATE_DISABLED or time.monotonic() >= deadline:
                return state == _BR_STATE_FORWARDING
            time.sleep(0.001)

    def _inside(self) -> contextlib.AbstractContextManager[None]:
        return _inside_netns(self.netns) if self.netns else contextlib.nullcontext()

    def delete_link(self, name: str) -> bool:
        """Delete if present; False when there was nothing to delete."""
        try:
            # By name: the kernel resolves it, one round trip instead of a GET first.
            self.rt.request(rtnl.RTM_DELLINK, rtnl.ifinfo() + rtnl.attr_str(rtnl.IFLA_IFNAME, name))
        except OSError as exc:
            if _code(exc) not in (errno.ENODEV, errno.ENOENT):
                raise
            return False
        finally:
            self._seen.pop(name, None)
        return True

    # -- addresses ---------------------------------------------------------------
    def addresses(self, name: str, version: Optional[int] = None) -> list[IPInterface]:
        """The link's addresses, of one IP version when given. The kernel filters the dump
        by link (strict checking); the filter here is for kernels that do not."""
        link = self.known_link(name)
        if link is None:
            return []
        family = _AF[version] if version else 0
        found = []
        for msg in self.rt.dump(rtnl.RTM_GETADDR, rtnl.IFADDR.pack(family, 0, 0, 0, link.index)):
            if msg.kind != rtnl.RTM_NEWADDR:
                continue
            address = rtnl.parse_address(msg)
            if address.index != link.index or (family and address.family != family) or not address.address:
                continue
            found.append(ipaddress.ip_interface((address.address, address.prefixlen)))
        return found

    def _address_request(self, kind: int, flags: int, index: int, address: IPInterface, ifa_flags: int = 0) -> None:
        packed = address.ip.packed
        body = rtnl.IFADDR.pack(_AF[address.version], address.network.prefixlen, ifa_flags, 0, index)
        if address.version == 4:
            body += rtnl.attr(rtnl.IFA_LOCAL, packed) + rtnl.attr(rtnl.IFA_ADDRESS, packed)
            if kind == rtnl.RTM_NEWADDR:
                body += rtnl.attr(rtnl.IFA_BROADCAST, address.network.broadcast_address.packed)
        else:
            body += rtnl.attr(rtnl.IFA_ADDRESS, packed)
        self.rt.request(kind, body, flags)

    @_kernel_refusal("add the address")
    def add_address(self, name: str, address: IPInterface) -> None:
        """Add; an identical address already there (a concurrent ADD) is fine."""
        link = self.known_link(name)
        assert link is not None
        try:
            self._address_request(rtnl.RTM_NEWADDR, rtnl.F_ACK | rtnl.F_CREATE | rtnl.F_EXCL, link.index, address,
                                  0 if address.version == 4 else _IFA_F_NODAD)
        except OSError as exc:
            if _code(exc) != errno.EEXIST:
                raise

    @_kernel_refusal("remove the address")
    def del_address(self, name: str, address: IPInterface) -> None:
        link = self.known_link(name)
        if link is None:
            return
        try:
            self._address_request(rtnl.RTM_DELADDR, rtnl.F_ACK, link.index, address)
        except OSError as exc:
            if _code(exc) not in (errno.EADDRNOTAVAIL, errno.ENOENT, errno.ENODEV):
                raise

    # -- routes --------------------------------------------------------------------
    def routes(self, family: int) -> list[KernelRouteInfo]:
        """The main table's routes of one IP version."""
        found = []
        af = _AF[family]
        request = rtnl.RTMSG.pack(af, 0, 0, 0, rtnl.RT_TABLE_MAIN, 0, 0, 0, 0)
        for msg in self.rt.dump(rtnl.RTM_GETROUTE, request):
            if msg.kind != rtnl.RTM_NEWROUTE:
                continue
            route = rtnl.parse_route(msg)
            if route.table != rtnl.RT_TABLE_MAIN or route.family != af:
                continue
            dst = ipaddress.ip_network((route.dst, route.dst_len) if route.dst else
                                       ("0.0.0.0/0" if family == 4 else "::/0"), strict=False)
            found.append(KernelRouteInfo(
                dst=dst,
                gw=ipaddress.ip_address(route.gateway) if route.gateway else None,
                oif=route.oif,
                proto=route.protocol,
            ))
        return found

    def _route_request(self, kind: int, flags: int, dst: IPNetwork, gw: Optional[IPAddress], proto: int,
                       scope: int, route_type: int, oif: int = 0) -> None:
        body = rtnl.RTMSG.pack(_AF[dst.version], dst.prefixlen, 0, 0, rtnl.RT_TABLE_MAIN, proto, scope,
                               route_type, 0)
        if dst.prefixlen:
            body += rtnl.attr(rtnl.RTA_DST, dst.network_address.packed)
        if gw is not None:
            body += rtnl.attr(rtnl.RTA_GATEWAY, gw.packed)
        if oif:
            body += rtnl.attr_u32(rtnl.RTA_OIF, oif)
        self.rt.request(kind, body, flags)

    def replace_route(self, dst: IPNetwork, gw: IPAddress, proto: int) -> None:
        """Main-table route `dst via gw` (next hop on-link), replacing any route to `dst`."""
        self._route_request(rtnl.RTM_NEWROUTE, rtnl.F_ACK | rtnl.F_CREATE | rtnl.F_REPLACE, dst, gw, proto,
                            0, rtnl.RTN_UNICAST)

    def delete_route(self, dst: IPNetwork, gw: Optional[IPAddress], proto: int) -> None:
        """Delete a main-table route; already gone is fine."""
        try:
            # Scope "nowhere" and type 0 match any route to dst (with that gateway and proto).
            self._route_request(rtnl.RTM_DELROUTE, rtnl.F_ACK, dst, gw, proto, rtnl.RT_SCOPE_NOWHERE, 0)
        except OSError as exc:
            if _code(exc) not in (errno.ESRCH, errno.ENOENT):
                raise

    @_kernel_refusal("add the route")
    def add_route(self, dst: IPNetwork, gw: Optional[IPAddress], device: str) -> None:
        link = self.known_link(device)
        assert link is not None
        # With no gateway the destination is on the wire: link scope.
        scope = 0 if gw is not None else rtnl.RT_SCOPE_LINK
        try:
            self._route_request(rtnl.RTM_NEWROUTE, rtnl.F_ACK | rtnl.F_CREATE | rtnl.F_EXCL, dst, gw,
                                _RTPROT_STATIC, scope, rtnl.RTN_UNICAST, link.index)
        except OSError as exc:
            if _code(exc) != errno.EEXIST:
                raise


def _link(msg: rtnl.Message) -> Link:
    """A Link from an RTM_NEWLINK message."""
    _family, _type, index, flags, _change = rtnl.IFINFO.unpack_from(msg.body)
    found = rtnl.attrs(msg.body, rtnl.IFINFO.size)
    info = rtnl.attrs(found[rtnl.IFLA_LINKINFO]) if rtnl.IFLA_LINKINFO in found else {}
    protinfo = rtnl.attrs(found[rtnl.IFLA_PROTINFO]) if rtnl.IFLA_PROTINFO in found else {}
    mode = protinfo.get(rtnl.IFLA_BRPORT_MODE)
    return Link(index=index, name=rtnl.as_str(found.get(rtnl.IFLA_IFNAME)),
                kind=rtnl.as_str(info.get(rtnl.IFLA_INFO_KIND)), mac=rtnl.as_mac(found.get(rtnl.IFLA_ADDRESS)),
                mtu=rtnl.as_u32(found.get(rtnl.IFLA_MTU)), master=rtnl.as_u32(found.get(rtnl.IFLA_MASTER)),
                up=bool(flags & rtnl.IFF_UP), promisc=bool(flags & rtnl.IFF_PROMISC), hairpin=bool(mode and mode[0]))


# -- a cheap read for views over many namespaces ------------------------------------------

def link_mac(netns: str, ifname: str) -> Optional[str]:
    """The MAC of link `ifname` in the namespace at `netns`, None when either is missing.

    One RTM_GETLINK on a bare socket: `inspect` reads one link in each of hundreds of
    pod namespaces."""
    try:
        sock = rtnl.Socket(_socket_in_netns(netns))
    except OSError:
        return None
    try:
        sock.sock.settimeout(5.0)
        msg = sock.request(rtnl.RTM_GETLINK, rtnl.ifinfo() + rtnl.attr_str(rtnl.IFLA_IFNAME, ifname), flags=0)
    except OSError:
        return None   # no such link (or no answer)
    finally:
        sock.close()
    return _link(msg).mac or None if msg is not None else None
