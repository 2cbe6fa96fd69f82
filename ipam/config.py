"""cni-ipam's config model: host-local compatible ranges, routes and dataDir."""
from __future__ import annotations

import functools
import ipaddress
from typing import Iterator, Optional

from pydantic import StrictStr, field_validator, model_validator

from cni_bridge.confbase import Model, NetConf, parse_ip_request
from cni_bridge.protocol.result import IPAddress, IPNetwork, Route

DEFAULT_DATA_DIR = "/var/lib/cni/networks"


def _network(text: str) -> IPNetwork:
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        raise ValueError(f"{text!r} is not a valid subnet ({exc})") from None


def _address(text: str) -> IPAddress:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise ValueError(f"{text!r} is not an IP address") from None


class Range(Model):
    """One contiguous pool inside a subnet; defaults follow host-local.

    The parsed addresses are cached properties (the model is frozen): the allocator
    asks for them for every candidate address, and a cached config lives on.
    """

    subnet: StrictStr
    range_start: Optional[StrictStr] = None
    range_end: Optional[StrictStr] = None
    gateway: Optional[StrictStr] = None

    @model_validator(mode="after")
    def _check(self) -> "Range":
        net = _network(self.subnet)
        if net.max_prefixlen - net.prefixlen < 2:
            raise ValueError(f"subnet {net} is too small: it leaves no usable addresses (a /31 or /32 cannot be used)")
        for label, text in (("rangeStart", self.range_start), ("rangeEnd", self.range_end), ("gateway", self.gateway)):
            if text is not None and _address(text) not in net:
                raise ValueError(f"{label} {text} is outside subnet {net}")
        if self.start > self.end:
            raise ValueError(f"rangeStart {self.start} is after rangeEnd {self.end}")
        return self

    @functools.cached_property
    def network(self) -> IPNetwork:
        return ipaddress.ip_network(self.subnet)

    @functools.cached_property
    def gateway_ip(self) -> IPAddress:
        return _address(self.gateway) if self.gateway else self.network[1]

    @functools.cached_property
    def start(self) -> IPAddress:
        if self.range_start:
            return _address(self.range_start)
        return self.network[1]

    @functools.cached_property
    def end(self) -> IPAddress:
        if self.range_end:
            return _address(self.range_end)
        net = self.network
        # IPv4 loses its broadcast address; IPv6 has none.
        return net[-2] if net.version == 4 else net[-1]

    def contains(self, ip: IPAddress) -> bool:
        return ip.version == self.network.version and self.start <= ip <= self.end

    def size(self) -> int:
        return int(self.end) - int(self.start) + 1

    def addresses_from(self, first: IPAddress) -> Iterator[IPAddress]:
        """Addresses from `first` (inclusive) to the end of this range, lazily."""
        cls = type(first)
        for value in range(int(first), int(self.end) + 1):
            yield cls(value)


class RouteConf(Model):
    dst: StrictStr
    gw: Optional[StrictStr] = None

    @field_validator("dst")
    @classmethod
    def _dst(cls, text: str) -> str:
        try:
            ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise ValueError(f"route dst {text!r} is not a CIDR") from None
        return text

    @field_validator("gw")
    @classmethod
    def _gw(cls, text: Optional[str]) -> Optional[str]:
        if text is not None:
            _address(text)
        return text

    def to_route(self) -> Route:
        return Route(
            dst=ipaddress.ip_network(self.dst, strict=False),
            gw=ipaddress.ip_address(self.gw) if self.gw else None,
        )


RangeSet = list[Range]


class IPAMConf(Model):
    type: StrictStr
    ranges: list[RangeSet] = []
    # Legacy single-range form, still accepted by host-local.
    subnet: Optional[StrictStr] = None
    range_start: Optional[StrictStr] = None
    range_end: Optional[StrictStr] = None
    gateway: Optional[StrictStr] = None
    routes: list[RouteConf] = []
    data_dir: StrictStr = DEFAULT_DATA_DIR
    resolv_conf: Optional[StrictStr] = None
    lock_timeout: float = 30.0

    @model_validator(mode="after")
    def _normalise(self) -> "IPAMConf":
        if self.subnet:
            if self.ranges:
                raise ValueError("give either 'subnet' or 'ranges', not both")
            legacy = Range(subnet=self.subnet, range_start=self.range_start,
                           range_end=self.range_end, gateway=self.gateway)
            object.__setattr__(self, "ranges", [[legacy]])
        if not self.ranges:
            raise ValueError("no address ranges: set 'ranges' (or the legacy 'subnet')")
        seen: list[Range] = []
        for index, range_set in enumerate(self.ranges):
            if not range_set:
                raise ValueError(f"ranges[{index}] is an empty range set")
            families = {r.network.version for r in range_set}
            if len(families) > 1:
                raise ValueError(f"ranges[{index}] mixes IPv4 and IPv6; use one range set per family")
            for rng in range_set:
                for other in seen:
                    if rng.network.version == other.network.version and \
                            rng.start <= other.end and other.start <= rng.end:
                        raise ValueError(f"range {rng.subnet} overlaps range {other.subnet}")
                seen.append(rng)
        return self

    @property
    def range_sets(self) -> list[RangeSet]:
        return self.ranges


class IPAMNetConf(NetConf):
    ipam: IPAMConf

    def requested_ips(self, cni_args: dict[str, str]) -> list[IPAddress]:
        """runtimeConfig.ips, args.cni.ips and CNI_ARGS IP=, pooled (host-local does the same)."""
        texts = list(self.runtime_config.ips) + list(self.args.cni.ips)
        texts += [t for t in cni_args.get("IP", "").split(",") if t.strip()]
        unique: list[IPAddress] = []
        for ip in map(parse_ip_request, texts):
            if ip not in unique:
                unique.append(ip)
        return unique


