"""The netlink adapter: the only module that imports pyroute2 (lazily).

A small set of idempotent operations that re-read kernel state, so concurrent
ADDs racing on one bridge and retried ADDs after a crash both converge.
`tests/unit/fake_netlink.py` implements the same interface for no-root tests.
"""
from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
from dataclasses import dataclass
import functools
from typing import Any, Callable, Iterator, Optional, TypeVar

from .protocol.errors import CNIError, Code
from .protocol.result import IPAddress, IPInterface, IPNetwork

F = TypeVar("F", bound=Callable[..., Any])
_AF = {4: 2, 6: 10}          # AF_INET, AF_INET6
_IFA_F_NODAD = 0x02          # pods get no duplicate address detection wait (addresses are IPAM-unique)
_BRIDGE_MODE_HAIRPIN = 1
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
    """rtnetlink in one network namespace (the current one when `netns` is None)."""

    def __init__(self, netns: Optional[str] = None) -> None:
        IPRoute = _iproute_class()
        self.netns = netns
        try:
            # groups=0: no multicast subscription, so a burst of pods does not
            # flood every socket with everyone's link and address events.
            # A namespace's socket is made here (see _socket_in_netns), not
            # with IPRoute(netns=...), which forks a helper process per socket.
            sock = _socket_in_netns(netns) if netns else None
            self.ipr = IPRoute(use_socket=sock, groups=0) if sock else IPRoute(groups=0)
        except OSError as exc:
            raise CNIError(Code.INVALID_ENV, f"CNI_NETNS {netns!r} is not a usable network namespace",
                           exc.strerror or str(exc)) from None
        # The links this object has seen, by name. A Netlink lives for one CNI
        # call, so a link's index (and a veth's MAC) seen earlier in the call is
        # still right; each GET is ~0.5 ms of decoding, and an ADD needed twelve.
        self._seen: dict[str, Link] = {}

    def close(self) -> None:
        self.ipr.close()

    def __enter__(self) -> "Netlink":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- links ---------------------------------------------------------------
    def link(self, name: str) -> Optional[Link]:
        """The link as the kernel has it now."""
        try:
            # A GET by name: the kernel returns the one link. (get_links(ifname=...)
            # dumps every link and filters here, which costs O(pods) per lookup.)
            msgs = self.ipr.link("get", ifname=name)
        except Exception as exc:
            if _code(exc) in (errno.ENODEV, errno.ENOENT):
                self._seen.pop(name, None)
                return None
            raise
        if not msgs:
            self._seen.pop(name, None)
            return None
        link = self._seen[name] = self._to_link(msgs[0])
        return link

    def known_link(self, name: str) -> Optional[Link]:
        """The link as first seen in this call: right for its index and a veth's MAC,
        not for state that changes (up, master, a bridge's MAC as ports come and go)."""
        return self._seen.get(name) or self.link(name)

    def links(self) -> list[Link]:
        """Every link of the namespace, in one dump (for read-only views such as `inspect`)."""
        return [self._to_link(msg) for msg in self.ipr.get_links()]

    def _to_link(self, msg: Any) -> Link:
        info = msg.get_attr("IFLA_LINKINFO")
        kind = info.get_attr("IFLA_INFO_KIND") if info else ""
        hairpin = False
        protinfo = msg.get_attr("IFLA_PROTINFO")
        if protinfo is not None:
            hairpin = bool(protinfo.get_attr("IFLA_BRPORT_MODE"))
        return Link(
            index=msg["index"],
            name=msg.get_attr("IFLA_IFNAME"),
            kind=kind or "",
            mac=(msg.get_attr("IFLA_ADDRESS") or "").lower(),
            mtu=msg.get_attr("IFLA_MTU") or 0,
            master=msg.get_attr("IFLA_MASTER") or 0,
            up=bool(msg["flags"] & 1),
            promisc=bool(msg["flags"] & 0x100),
            hairpin=hairpin,
        )

    @_kernel_refusal("set up the bridge")
    def ensure_bridge(self, name: str, mtu: Optional[int], promisc: bool) -> Link:
        """Create the bridge if missing; tolerate a concurrent creator (EEXIST)."""
        created = False
        existing = self.link(name)
        if existing is None:
            try:
                kwargs: dict[str, Any] = {"ifname": name, "kind": "bridge"}
                if mtu:
                    kwargs["mtu"] = mtu
                self.ipr.link("add", **kwargs)
                created = True
            except Exception as exc:
                if _code(exc) != errno.EEXIST:
                    raise
            existing = self.link(name)
        if existing is None or existing.kind != "bridge":
            raise CNIError(Code.BRIDGE_CONFLICT, f"interface {name} exists and is not a bridge",
                           "choose another 'bridge' name or remove that interface")
        if created:
            # Pin the MAC so it no longer follows the lowest port MAC as pods come and go.
            self.ipr.link("set", index=existing.index, address=existing.mac)
        changes: dict[str, Any] = {}
        if not existing.up:
            changes["state"] = "up"
        if promisc and not existing.promisc:
            changes["flags"] = 0x100
            changes["change"] = 0x100
        if mtu and existing.mtu != mtu and not created:
            changes["mtu"] = mtu
        if not changes and not created:
            return existing
        if changes:
            self.ipr.link("set", index=existing.index, **changes)
        return self.link(name) or existing

    @_kernel_refusal("create the veth pair")
    def add_veth(self, name: str, peer: str, peer_netns: str, mtu: Optional[int], peer_mac: str) -> Link:
        """Create a veth here with its peer placed straight into `peer_netns`."""
        import os

        fd = os.open(peer_netns, os.O_RDONLY)
        try:
            peer_spec: dict[str, Any] = {"ifname": peer, "net_ns_fd": fd}
            if mtu:
                peer_spec["mtu"] = mtu
            if peer_mac:
                peer_spec["address"] = peer_mac
            kwargs: dict[str, Any] = {"ifname": name, "kind": "veth", "peer": peer_spec}
            if mtu:
                kwargs["mtu"] = mtu
            self.ipr.link("add", **kwargs)
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
        self.ipr.link("set", index=port_link.index, master=bridge_link.index, state="up")
        if hairpin:
            self.ipr.brport("set", index=port_link.index, mode=_BRIDGE_MODE_HAIRPIN)

    @_kernel_refusal("bring the interface up")
    def set_up(self, name: str) -> None:
        link = self.known_link(name)
        if link is not None:   # setting an up link up changes nothing; cheaper than asking
            self.ipr.link("set", index=link.index, state="up")

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
            self.ipr.link("set", index=link.index, address=link.mac)

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
        link = self.link(name)
        if link is None:
            return False
        try:
            self.ipr.link("del", index=link.index)
        except Exception as exc:
            if _code(exc) not in (errno.ENODEV, errno.ENOENT):
                raise
            return False
        finally:
            self._seen.pop(name, None)
        return True

    # -- addresses ---------------------------------------------------------------
    def addresses(self, name: str, version: Optional[int] = None) -> list[IPInterface]:
        """The link's addresses, of one IP version when given: the dump is filtered
        here, not in the kernel, and a host holds an IPv6 link-local address per veth."""
        link = self.known_link(name)
        if link is None:
            return []
        found = []
        family = {"family": _AF[version]} if version else {}
        for msg in self.ipr.get_addr(index=link.index, **family):
            addr = msg.get_attr("IFA_ADDRESS")
            found.append(ipaddress.ip_interface(f"{addr}/{msg['prefixlen']}"))
        return found

    @_kernel_refusal("add the address")
    def add_address(self, name: str, address: IPInterface) -> None:
        """Add; an identical address already there (a concurrent ADD) is fine."""
        link = self.known_link(name)
        assert link is not None
        kwargs: dict[str, Any] = {"index": link.index, "address": str(address.ip),
                                  "prefixlen": address.network.prefixlen}
        if address.version == 4:
            kwargs["broadcast"] = str(address.network.broadcast_address)
        else:
            kwargs["flags"] = _IFA_F_NODAD
        try:
            self.ipr.addr("add", **kwargs)
        except Exception as exc:
            if _code(exc) != errno.EEXIST:
                raise

    @_kernel_refusal("remove the address")
    def del_address(self, name: str, address: IPInterface) -> None:
        link = self.known_link(name)
        if link is None:
            return
        try:
            self.ipr.addr("del", index=link.index, address=str(address.ip),
                          prefixlen=address.network.prefixlen)
        except Exception as exc:
            if _code(exc) not in (errno.EADDRNOTAVAIL, errno.ENOENT, errno.ENODEV):
                raise

    # -- routes --------------------------------------------------------------------
    def routes(self, family: int) -> list[KernelRouteInfo]:
        found = []
        for msg in self.ipr.get_routes(family=_AF[family], table=254):
            dst = msg.get_attr("RTA_DST")
            prefix = f"{dst}/{msg['dst_len']}" if dst else ("0.0.0.0/0" if family == 4 else "::/0")
            gw = msg.get_attr("RTA_GATEWAY")
            found.append(KernelRouteInfo(
                dst=ipaddress.ip_network(prefix, strict=False),
                gw=ipaddress.ip_address(gw) if gw else None,
                oif=msg.get_attr("RTA_OIF") or 0,
                proto=msg["proto"],
            ))
        return found

    def replace_route(self, dst: IPNetwork, gw: IPAddress, proto: int) -> None:
        """Main-table route `dst via gw` (next hop on-link), replacing any route to `dst`."""
        self.ipr.route("replace", dst=str(dst), gateway=str(gw), proto=proto,
                       family=_AF[dst.version], table=254)

    def delete_route(self, dst: IPNetwork, gw: Optional[IPAddress], proto: int) -> None:
        """Delete a main-table route; already gone is fine."""
        kwargs: dict[str, Any] = {"dst": str(dst), "proto": proto, "family": _AF[dst.version], "table": 254}
        if gw is not None:
            kwargs["gateway"] = str(gw)
        try:
            self.ipr.route("del", **kwargs)
        except Exception as exc:
            if _code(exc) not in (errno.ESRCH, errno.ENOENT):
                raise

    @_kernel_refusal("add the route")
    def add_route(self, dst: IPNetwork, gw: Optional[IPAddress], device: str) -> None:
        link = self.known_link(device)
        assert link is not None
        kwargs: dict[str, Any] = {"dst": str(dst), "oif": link.index, "family": _AF[dst.version]}
        if gw is not None:
            kwargs["gateway"] = str(gw)
        else:
            kwargs["scope"] = 253  # link scope: the destination is on the wire
        try:
            self.ipr.route("add", **kwargs)
        except Exception as exc:
            if _code(exc) != errno.EEXIST:
                raise


# -- a cheap read for views over many namespaces ------------------------------------------
_RTM_NEWLINK, _RTM_GETLINK, _NLMSG_ERROR = 16, 18, 2
_NLM_F_REQUEST = 1
_IFLA_ADDRESS, _IFLA_IFNAME = 1, 3


def link_mac(netns: str, ifname: str) -> Optional[str]:
    """The MAC of link `ifname` in the namespace at `netns`, None when either is missing.

    One RTM_GETLINK on a bare socket: `inspect` reads one link in each of
    hundreds of pod namespaces, where an IPRoute per namespace costs ~5 ms.
    """
    import struct

    try:
        sock = _socket_in_netns(netns)
    except OSError:
        return None
    with sock:
        name = ifname.encode() + b"\0"
        attr = struct.pack("HH", 4 + len(name), _IFLA_IFNAME) + name
        attr += b"\0" * (-len(attr) % 4)
        body = struct.pack("BxHiII", 0, 0, 0, 0, 0) + attr            # struct ifinfomsg, then the name
        sock.sendto(struct.pack("IHHII", 16 + len(body), _RTM_GETLINK, _NLM_F_REQUEST, 1, 0) + body, (0, 0))
        sock.settimeout(5.0)
        data = sock.recv(65536)
    length, kind = struct.unpack_from("IH", data)
    if kind != _RTM_NEWLINK:
        return None   # NLMSG_ERROR: no such link
    offset = 16 + 16
    while offset + 4 <= length:
        size, attr_type = struct.unpack_from("HH", data, offset)
        if size < 4:
            break
        if attr_type == _IFLA_ADDRESS:
            return ":".join(f"{b:02x}" for b in data[offset + 4:offset + size])
        offset += (size + 3) & ~3
    return None
