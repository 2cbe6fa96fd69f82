"""CNI result types, decoded from any supported version and encoded to one at the edge."""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field, replace
from typing import Any, Optional, Union

from .errors import CNIError, Code
from .versions import at_least, is_legacy

IPInterface = Union[ipaddress.IPv4Interface, ipaddress.IPv6Interface]
IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

# Fields the 1.1.0 spec added; dropped when answering an older version.
_ROUTE_11 = ("mtu", "advmss", "priority", "table", "scope")


@dataclass(frozen=True)
class Interface:
    name: str
    mac: str = ""
    sandbox: str = ""
    mtu: Optional[int] = None


@dataclass(frozen=True)
class IPConfig:
    address: IPInterface
    gateway: Optional[IPAddress] = None
    interface: Optional[int] = None

    @property
    def family(self) -> int:
        return self.address.version


@dataclass(frozen=True)
class Route:
    dst: IPNetwork
    gw: Optional[IPAddress] = None
    mtu: Optional[int] = None
    advmss: Optional[int] = None
    priority: Optional[int] = None
    table: Optional[int] = None
    scope: Optional[int] = None


@dataclass(frozen=True)
class DNS:
    nameservers: tuple[str, ...] = ()
    domain: str = ""
    search: tuple[str, ...] = ()
    options: tuple[str, ...] = ()

    def is_empty(self) -> bool:
        return not (self.nameservers or self.domain or self.search or self.options)

    def to_dict(self) -> dict:
        out: dict[str, Any] = {}
        if self.nameservers:
            out["nameservers"] = list(self.nameservers)
        if self.domain:
            out["domain"] = self.domain
        if self.search:
            out["search"] = list(self.search)
        if self.options:
            out["options"] = list(self.options)
        return out

    @classmethod
    def from_dict(cls, data: Any) -> "DNS":
        if not data:
            return cls()
        if not isinstance(data, dict):
            raise CNIError(Code.DECODE_FAILURE, "dns must be an object")
        return cls(
            nameservers=tuple(_str_list(data.get("nameservers"), "dns.nameservers")),
            domain=str(data.get("domain") or ""),
            search=tuple(_str_list(data.get("search"), "dns.search")),
            options=tuple(_str_list(data.get("options"), "dns.options")),
        )


@dataclass(frozen=True)
class Result:
    interfaces: tuple[Interface, ...] = ()
    ips: tuple[IPConfig, ...] = ()
    routes: tuple[Route, ...] = ()
    dns: DNS = field(default_factory=DNS)

    def with_(self, **changes: Any) -> "Result":
        return replace(self, **changes)

    def to_dict(self, cni_version: str) -> dict:
        """Encode in the shape of `cni_version` (the only place versions differ)."""
        legacy = is_legacy(cni_version)
        v11 = at_least(cni_version, "1.1.0")
        out: dict[str, Any] = {"cniVersion": cni_version}
        if self.interfaces:
            out["interfaces"] = [_interface_dict(i, v11) for i in self.interfaces]
        out["ips"] = [_ip_dict(ip, legacy) for ip in self.ips]
        if self.routes:
            out["routes"] = [_route_dict(r, v11) for r in self.routes]
        out["dns"] = self.dns.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: Any, what: str = "result") -> "Result":
        """Decode a result of any supported version (prevResult or an IPAM answer)."""
        if not isinstance(data, dict):
            raise CNIError(Code.DECODE_FAILURE, f"{what} must be a JSON object")
        try:
            interfaces = tuple(
                Interface(
                    name=str(i["name"]),
                    mac=str(i.get("mac") or ""),
                    sandbox=str(i.get("sandbox") or ""),
                    mtu=i.get("mtu"),
                )
                for i in data.get("interfaces") or ()
            )
            ips = tuple(
                IPConfig(
                    address=ipaddress.ip_interface(ip["address"]),
                    gateway=ipaddress.ip_address(ip["gateway"]) if ip.get("gateway") else None,
                    interface=ip.get("interface"),
                )
                for ip in data.get("ips") or ()
            )
            routes = tuple(_route_from(r) for r in data.get("routes") or ())
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CNIError(Code.DECODE_FAILURE, f"cannot decode {what}", str(exc)) from None
        return cls(interfaces=interfaces, ips=ips, routes=routes, dns=DNS.from_dict(data.get("dns")))


def _route_from(r: dict) -> Route:
    return Route(
        dst=ipaddress.ip_network(r["dst"], strict=False),
        gw=ipaddress.ip_address(r["gw"]) if r.get("gw") else None,
        **{k: r[k] for k in _ROUTE_11 if r.get(k) is not None},
    )


def _str_list(value: Any, what: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise CNIError(Code.DECODE_FAILURE, f"{what} must be a list of strings")
    return value


def _interface_dict(i: Interface, v11: bool) -> dict:
    out: dict[str, Any] = {"name": i.name}
    if i.mac:
        out["mac"] = i.mac
    if i.sandbox:
        out["sandbox"] = i.sandbox
    if v11 and i.mtu:
        out["mtu"] = i.mtu
    return out


def _ip_dict(ip: IPConfig, legacy: bool) -> dict:
    out: dict[str, Any] = {}
    if legacy:
        out["version"] = str(ip.family)
    if ip.interface is not None:
        out["interface"] = ip.interface
    out["address"] = str(ip.address)
    if ip.gateway is not None:
        out["gateway"] = str(ip.gateway)
    return out


def _route_dict(r: Route, v11: bool) -> dict:
    out: dict[str, Any] = {"dst": str(r.dst)}
    if r.gw is not None:
        out["gw"] = str(r.gw)
    if v11:
        for key in _ROUTE_11:
            value = getattr(r, key)
            if value is not None:
                out[key] = value
    return out
