"""Pure planning: from config + IPAM result to exactly what the kernel should hold.

No netlink, no files: everything the orchestration applies is decided here so
it can be unit-tested without root.
"""
from __future__ import annotations

import hashlib
import ipaddress
import re
from dataclasses import dataclass
from typing import Optional

from .config import BridgeConf
from .protocol.errors import CNIError, Code
from .protocol.result import IPAddress, IPConfig, IPInterface, IPNetwork, Result, Route

DEFAULT_ROUTE = {4: ipaddress.ip_network("0.0.0.0/0"), 6: ipaddress.ip_network("::/0")}
MULTICAST = {4: "224.0.0.0/4", 6: "ff00::/8"}
MASQ_CHAIN_PREFIX = "CBR-"
COMMENT_PREFIX = "cni-bridge"
_MAC = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")


def _digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def host_veth_name(container_id: str, ifname: str) -> str:
    """Deterministic, so a retried ADD or a DEL can find what an earlier run made."""
    return "veth" + _digest(container_id, ifname)[:11]


def masq_chain_name(network: str, container_id: str, ifname: str) -> str:
    # iptables chain names hold at most 28 characters.
    return MASQ_CHAIN_PREFIX + _digest(network, container_id, ifname)[:24]


def _comment_field(value: str) -> str:
    """A name as written in a rule comment: itself up to 64 characters, else a digest."""
    return value if len(value) <= 64 else "sha256:" + _digest(value)[:24]


def masq_comment_network(network: str) -> str:
    """The network as written in rule comments (GC finds its network's rules by it)."""
    return _comment_field(network)


def masq_comment(network: str, container_id: str, ifname: str) -> str:
    """At most 166 characters: iptables keeps 255 of a comment and, as iptables-nft,
    silently drops the rest. None of the three can hold whitespace, so it parses back.
    GC and DEL identify an attachment by its chain, a digest of all three; the
    comment names the owning network for GC and the attachment for people."""
    return (f"{COMMENT_PREFIX} net={masq_comment_network(network)} id={_comment_field(container_id)}"
            f" if={ifname}")


_COMMENT_RE = re.compile(r"^cni-bridge net=(\S+) id=(\S+) if=(\S+)$")
# The network field is complete even in a comment that an earlier release let grow past
# 255 characters (its container ID was written whole): iptables cut it after the network.
_COMMENT_NETWORK_RE = re.compile(r"^cni-bridge net=(\S+) id=")


def parse_masq_comment(comment: str) -> Optional[tuple[str, str, str]]:
    """Inverse of masq_comment: (network, container ID or its digest, ifname), or None."""
    match = _COMMENT_RE.search(comment)
    return (match.group(1), match.group(2), match.group(3)) if match else None


def masq_comment_owner(comment: str) -> Optional[str]:
    """The network field of one of our comments, cut ones included; None for foreign rules."""
    match = _COMMENT_NETWORK_RE.search(comment)
    return match.group(1) if match else None


@dataclass(frozen=True)
class MasqRule:
    source: IPAddress          # the pod address whose traffic is masqueraded
    subnet: IPNetwork          # traffic to the pod subnet is left alone


@dataclass(frozen=True)
class MasqPlan:
    chain: str                 # the attachment's key: its iptables chain, its nftables element comment
    comment: str
    rules: tuple[MasqRule, ...]
    network: str = ""
    backend: Optional[str] = None   # ipMasqBackend; None: the default (masq.backend_name)


@dataclass(frozen=True)
class KernelRoute:
    dst: IPNetwork
    gw: Optional[IPAddress]


@dataclass(frozen=True)
class AttachmentPlan:
    bridge: str
    mtu: Optional[int]
    promisc: bool
    hairpin: bool
    host_veth: str
    container_ifname: str
    mac: str
    addresses: tuple[IPInterface, ...]           # inside the container
    routes: tuple[KernelRoute, ...]              # inside the container
    gateway_addresses: tuple[IPInterface, ...]   # on the bridge
    force_address: bool
    forwarding: tuple[int, ...]                  # IP families to forward on the host
    masq: Optional[MasqPlan]
    result: Result                               # IPAM's result, completed (ips, routes, dns)


def configured_ip_versions(ipam: object) -> set[int]:
    """IP versions of the subnets a host-local style `ipam` section names (`ranges`,
    legacy `subnet`); empty when it names none (another IPAM type, or a bad config,
    which ADD reports)."""
    if not isinstance(ipam, dict):
        return set()
    subnets = [ipam.get("subnet")]
    ranges = ipam.get("ranges")
    if isinstance(ranges, list):
        subnets += [r.get("subnet") for rs in ranges if isinstance(rs, list) for r in rs if isinstance(r, dict)]
    versions = set()
    for subnet in subnets:
        try:
            versions.add(ipaddress.ip_network(subnet, strict=False).version)
        except (TypeError, ValueError):
            continue
    return versions


def gateway_for(ip: IPConfig) -> IPAddress:
    """IPAM's gateway, or the subnet's first address as the reference plugin does."""
    return ip.gateway if ip.gateway is not None else ip.address.network[1]


def plan_attachment(conf: BridgeConf, container_id: str, ifname: str,
                    cni_args: dict[str, str], ipam: Result) -> AttachmentPlan:
    if not ipam.ips:
        raise CNIError(Code.INVALID_CONFIG, f"IPAM plugin {conf.ipam.type} returned no IP addresses")
    mac = conf.requested_mac(cni_args)
    if mac and not _MAC.match(mac):
        raise CNIError(Code.INVALID_CONFIG, f"requested MAC {mac!r} is not a MAC address")

    ips = tuple(
        IPConfig(ip.address, gateway_for(ip) if conf.is_gateway else ip.gateway, interface=2)
        for ip in ipam.ips
    )
    gateways_by_family: dict[int, IPAddress] = {}
    for ip in ips:
        if ip.gateway is not None:
            gateways_by_family.setdefault(ip.family, ip.gateway)

    result_routes = list(ipam.routes)
    if conf.is_default_gateway:
        have_default = {r.dst.version for r in ipam.routes if r.dst.prefixlen == 0}
        for family, gw in gateways_by_family.items():
            if family not in have_default:
                result_routes.append(Route(dst=DEFAULT_ROUTE[family], gw=gw))

    kernel_routes = []
    for route in result_routes:
        gw = route.gw if route.gw is not None else gateways_by_family.get(route.dst.version)
        kernel_routes.append(KernelRoute(route.dst, gw))

    gateway_addresses: tuple[IPInterface, ...] = ()
    if conf.is_gateway:
        seen = []
        for ip in ips:
            assert ip.gateway is not None
            addr = ipaddress.ip_interface(f"{ip.gateway}/{ip.address.network.prefixlen}")
            if addr not in seen:
                seen.append(addr)
        gateway_addresses = tuple(seen)
        for ip in ips:
            if any(gateway.ip == ip.address.ip for gateway in gateway_addresses):
                raise CNIError(Code.BRIDGE_CONFLICT,
                               f"IPAM gave the pod {ip.address.ip}, the gateway address bridge {conf.bridge} gets",
                               "set the IPAM gateway, or a range that leaves the gateway out")

    families = tuple(sorted({ip.family for ip in ips})) if (conf.is_gateway or conf.ip_masq) else ()
    masq = None
    if conf.ip_masq:
        masq = MasqPlan(
            chain=masq_chain_name(conf.name, container_id, ifname),
            comment=masq_comment(conf.name, container_id, ifname),
            rules=tuple(MasqRule(ip.address.ip, ip.address.network) for ip in ips),
            network=conf.name,
            backend=conf.ip_masq_backend,
        )

    return AttachmentPlan(
        bridge=conf.bridge,
        mtu=conf.mtu,
        promisc=conf.promisc_mode,
        hairpin=conf.hairpin_mode,
        host_veth=host_veth_name(container_id, ifname),
        container_ifname=ifname,
        mac=mac.lower(),
        addresses=tuple(ip.address for ip in ips),
        routes=tuple(kernel_routes),
        gateway_addresses=gateway_addresses,
        force_address=conf.force_address,
        forwarding=families,
        masq=masq,
        result=Result(ips=ips, routes=tuple(result_routes), dns=_dns(conf, ipam)),
    )


def _dns(conf: BridgeConf, ipam: Result):
    """The bridge's own `dns` key wins over what IPAM returned."""
    own = conf.dns.to_dns()
    return ipam.dns if own.is_empty() else own
