"""An in-memory stand-in for cni_bridge.netlink.Netlink, for no-root orchestration tests.

One `FakeKernel` holds every network namespace: the host (key None) and
container namespaces keyed by their path. `kernel.factory` has the signature
BridgePlugin expects of `netlink_factory`; each call opens a handle on one
namespace, as the real adapter opens an rtnetlink socket.

It models the kernel behaviour the orchestration depends on, not just the
calls: a veth pair is one object with two ends (deleting either end, or the
namespace of one end, removes both); a bridge's ports lose their master when
it goes; addresses on an up link give a connected route; a route needs an up
link and a gateway reachable through a connected route; duplicate links are
EEXIST. Failures are injected per method with `kernel.fail_next(...)`.
"""
from __future__ import annotations

import errno
from dataclasses import dataclass, field
from typing import Any, Optional

from cni_bridge.netlink import KernelRouteInfo, Link
from cni_bridge.protocol.errors import CNIError, Code

RTPROT_KERNEL, RTPROT_BOOT = 2, 3


class FakeNetlinkError(Exception):
    """Like pyroute2's NetlinkError: carries an errno in `.code`."""

    def __init__(self, code: int, msg: str = "") -> None:
        super().__init__(code, msg or errno.errorcode.get(code, str(code)))
        self.code = code


@dataclass
class FakeLink:
    index: int
    name: str
    kind: str
    mac: str
    mtu: int = 1500
    master: int = 0
    up: bool = False
    promisc: bool = False
    hairpin: bool = False
    arp_notify: bool = False
    announced: list = field(default_factory=list)   # IPv4 addresses of the gratuitous ARPs sent
    addresses: list = field(default_factory=list)
    peer: Optional["FakeLink"] = None        # the other end of a veth
    ns: Optional["FakeNamespace"] = None

    def snapshot(self) -> Link:
        return Link(index=self.index, name=self.name, kind=self.kind, mac=self.mac, mtu=self.mtu,
                    master=self.master, up=self.up, promisc=self.promisc, hairpin=self.hairpin)


@dataclass
class StaticRoute:
    dst: Any
    gw: Any
    oif: int
    proto: int = RTPROT_BOOT


class FakeNamespace:
    def __init__(self, path: Optional[str]) -> None:
        self.path = path
        self.links: dict[str, FakeLink] = {}
        self.routes: list[StaticRoute] = []
        self.alive = True


class FakeKernel:
    def __init__(self) -> None:
        self.host = FakeNamespace(None)
        self.namespaces: dict[Optional[str], FakeNamespace] = {None: self.host}
        self._next_index = 1
        self._failures: dict[str, BaseException] = {}
        self.handles: list["FakeNetlink"] = []
        self.calls: list[tuple[Optional[str], str]] = []

    # -- test controls ---------------------------------------------------------------
    def add_netns(self, path: str) -> FakeNamespace:
        ns = FakeNamespace(path)
        self.namespaces[path] = ns
        return ns

    def remove_netns(self, path: str) -> None:
        """What the kernel does when the last reference to a namespace goes."""
        ns = self.namespaces.pop(path)
        for link in list(ns.links.values()):
            self._remove(link)
        ns.alive = False

    def fail_next(self, method: str, exc: Optional[BaseException] = None) -> None:
        """The next call of `method` (in any namespace) raises `exc` (default: EIO)."""
        self._failures[method] = exc if exc is not None else FakeNetlinkError(errno.EIO, f"injected failure in {method}")

    def pending_failures(self) -> list[str]:
        """Injected failures not yet triggered (a test whose step was never reached)."""
        return list(self._failures)

    def factory(self, netns: Optional[str]) -> "FakeNetlink":
        ns = self.namespaces.get(netns)
        if ns is None:
            # what the real adapter raises when CNI_NETNS cannot be opened
            raise CNIError(Code.INVALID_ENV, f"CNI_NETNS {netns!r} is not a usable network namespace",
                           "No such file or directory")
        handle = FakeNetlink(self, ns)
        self.handles.append(handle)
        return handle

    def open_handles(self) -> list["FakeNetlink"]:
        return [h for h in self.handles if not h.closed]

    def ns(self, path: Optional[str] = None) -> FakeNamespace:
        return self.namespaces[path]

    def new_link(self, ns: FakeNamespace, name: str, kind: str, mac: str = "", **attrs: Any) -> FakeLink:
        if name in ns.links:
            raise FakeNetlinkError(errno.EEXIST, f"{name} exists")
        index = self._next_index
        self._next_index += 1
        link = FakeLink(index=index, name=name, kind=kind, mac=mac or f"02:fa:ce:00:{index >> 8:02x}:{index & 0xff:02x}",
                        ns=ns, **attrs)
        ns.links[name] = link
        return link

    # -- internals -------------------------------------------------------------------------
    def _maybe_fail(self, ns: FakeNamespace, method: str) -> None:
        self.calls.append((ns.path, method))
        exc = self._failures.pop(method, None)
        if exc is not None:
            raise exc

    def _remove(self, link: FakeLink) -> None:
        ns = link.ns
        assert ns is not None
        if ns.links.get(link.name) is not link:
            return
        del ns.links[link.name]
        ns.routes = [r for r in ns.routes if r.oif != link.index]
        if link.kind == "bridge":
            for port in ns.links.values():
                if port.master == link.index:
                    port.master = 0
        if link.peer is not None:
            peer, link.peer, peer.peer = link.peer, None, None
            self._remove(peer)


class FakeNetlink:
    """The interface of cni_bridge.netlink.Netlink, over one FakeNamespace."""

    def __init__(self, kernel: FakeKernel, ns: FakeNamespace) -> None:
        self.kernel = kernel
        self.ns = ns
        self.netns = ns.path
        self.closed = False

    def _op(self, method: str) -> None:
        if self.closed:
            raise AssertionError(f"{method} on a closed netlink handle")
        self.kernel._maybe_fail(self.ns, method)

    def close(self) -> None:
        self.closed = True

    def __enter__(self) -> "FakeNetlink":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- links -------------------------------------------------------------------
    def link(self, name: str) -> Optional[Link]:
        self._op("link")
        link = self.ns.links.get(name)
        return link.snapshot() if link else None

    def known_link(self, name: str) -> Optional[Link]:
        return self.link(name)

    def links(self) -> list[Link]:
        self._op("links")
        return [link.snapshot() for link in self.ns.links.values()]

    def ensure_bridge(self, name: str, mtu: Optional[int], promisc: bool) -> Link:
        self._op("ensure_bridge")
        link = self.ns.links.get(name)
        if link is None:
            link = self.kernel.new_link(self.ns, name, "bridge", **({"mtu": mtu} if mtu else {}))
        if link.kind != "bridge":
            raise CNIError(Code.BRIDGE_CONFLICT, f"interface {name} exists and is not a bridge",
                           "choose another 'bridge' name or remove that interface")
        link.up = True
        if promisc:
            link.promisc = True
        if mtu:
            link.mtu = mtu
        return link.snapshot()

    def add_veth(self, name: str, peer: str, peer_netns: str, mtu: Optional[int], peer_mac: str) -> Link:
        self._op("add_veth")
        target = self.kernel.namespaces.get(peer_netns)
        if target is None:
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", peer_netns)
        if name in self.ns.links or peer in target.links:
            raise FakeNetlinkError(errno.EEXIST, "File exists")
        extra = {"mtu": mtu} if mtu else {}
        host_end = self.kernel.new_link(self.ns, name, "veth", **extra)
        inner = self.kernel.new_link(target, peer, "veth", mac=peer_mac, **extra)
        host_end.peer, inner.peer = inner, host_end
        return host_end.snapshot()

    def attach(self, port: str, bridge: str, hairpin: bool) -> None:
        self._op("attach")
        port_link, bridge_link = self.ns.links.get(port), self.ns.links.get(bridge)
        if port_link is None or bridge_link is None:
            raise CNIError(Code.INTERNAL, f"cannot attach {port} to {bridge}: link vanished")
        port_link.master = bridge_link.index
        port_link.up = True
        port_link.hairpin = hairpin

    def set_up(self, name: str) -> None:
        self._op("set_up")
        link = self.ns.links.get(name)
        if link is not None:
            link.up = True

    def set_arp_notify(self, name: str) -> None:
        self._op("set_arp_notify")
        link = self.ns.links.get(name)
        if link is not None:
            link.arp_notify = True

    def announce(self, name: str) -> None:
        self._op("announce")
        link = self.ns.links.get(name)
        if link is not None and link.arp_notify and link.up:   # what makes the kernel send it
            link.announced = [a.ip for a in link.addresses if a.version == 4]

    def wait_port_forwarding(self, port: str, timeout: float = 0.5) -> bool:
        self._op("wait_port_forwarding")
        link = self.ns.links.get(port)
        return bool(link is not None and link.master and link.up)

    def delete_link(self, name: str) -> bool:
        self._op("delete_link")
        link = self.ns.links.get(name)
        if link is None:
            return False
        self.kernel._remove(link)
        return True

    # -- addresses ------------------------------------------------------------------
    def addresses(self, name: str, version: Optional[int] = None) -> list:
        self._op("addresses")
        link = self.ns.links.get(name)
        return [a for a in link.addresses if version in (None, a.version)] if link else []

    def add_address(self, name: str, address: Any) -> None:
        self._op("add_address")
        link = self.ns.links.get(name)
        assert link is not None, f"add_address on missing link {name}"
        if address not in link.addresses:   # an identical address (EEXIST) is fine
            link.addresses.append(address)

    def del_address(self, name: str, address: Any) -> None:
        self._op("del_address")
        link = self.ns.links.get(name)
        if link is not None and address in link.addresses:
            link.addresses.remove(address)

    # -- routes -----------------------------------------------------------------------
    def _connected(self, family: int) -> list[KernelRouteInfo]:
        found = []
        for link in self.ns.links.values():
            if not link.up:
                continue
            for addr in link.addresses:
                if addr.version == family:
                    found.append(KernelRouteInfo(addr.network, None, link.index, RTPROT_KERNEL))
        return found

    def routes(self, family: int) -> list[KernelRouteInfo]:
        self._op("routes")
        static = [KernelRouteInfo(r.dst, r.gw, r.oif, r.proto) for r in self.ns.routes if r.dst.version == family]
        return self._connected(family) + static

    def add_route(self, dst: Any, gw: Any, device: str) -> None:
        self._op("add_route")
        link = self.ns.links.get(device)
        assert link is not None, f"add_route via missing link {device}"
        if not link.up:
            raise FakeNetlinkError(errno.ENETDOWN, f"{device} is down")
        if gw is not None and not any(gw in r.dst for r in self._connected(gw.version) if r.oif == link.index):
            raise FakeNetlinkError(errno.ENETUNREACH, f"gateway {gw} is not reachable via {device}")
        if any(r.dst == dst for r in self.ns.routes):
            return  # EEXIST, which the real adapter tolerates
        self.ns.routes.append(StaticRoute(dst, gw, link.index))

    def replace_route(self, dst: Any, gw: Any, proto: int) -> None:
        self._op("replace_route")
        self.ns.routes = [r for r in self.ns.routes if r.dst != dst]
        self.ns.routes.append(StaticRoute(dst, gw, 0, proto))

    def delete_route(self, dst: Any, gw: Any, proto: int) -> None:
        self._op("delete_route")
        self.ns.routes = [r for r in self.ns.routes
                          if not (r.dst == dst and r.proto == proto and (gw is None or r.gw == gw))]

    # -- test helpers (not part of the adapter's interface) -------------------------------
    def raw(self, name: str) -> Optional[FakeLink]:
        return self.ns.links.get(name)
