"""Read the node as it is: conflists, bridges, reservations, veths, masquerade rules, routes,
the agent's VXLAN device and entries, daemon.

Reads only: netlink dumps and GETs, files, `iptables -S`, `nft -j list`, and a status
request to the daemon. Nothing here takes the IPAM store lock or writes.
Besides the view, it keeps what the checks need (`NetworkFacts`): the leak
findings of `cni-ipam check` (its own code), the masquerade rules' owners,
the config errors ADD would raise.
"""
from __future__ import annotations

import ipaddress
import json
import os
import socket
from dataclasses import dataclass, field
from typing import Any, Optional

from ipam.cli import Finding, NetworkState, find_problems, read_network
from ipam.config import DEFAULT_DATA_DIR
from ipam.filestore import current_boot_id

from .. import conflist, masq
from ..conflist import PLUGIN_TYPE, ConfFile, PluginConf
from ..plan import configured_ip_versions, host_veth_name, masq_chain_name
from ..protocol.errors import CNIError
from . import daemon_probe, overlay, pools
from .model import Attachment, Bridge, ConfFileView, Network, NodeView, Overlay, PeerRoute, Port, VxlanDevice

DEFAULT_CACHE_DIR = "/var/lib/cni"       # libcni's result cache: <dir>/results/<net>-<cid>-<ifname>
AGENT_ROUTE_PROTO = 157                  # cni_bridge.agent.desired.ROUTE_PROTO (not imported: it is the agent's)
DEFAULT_VXLAN = "cni-vxlan"              # cni_bridge.agent.overlay.VxlanOptions.name, the agent's default


@dataclass
class Options:
    conf_dir: str = "/etc/cni/net.d"
    bin_dir: str = "/opt/cni/bin"
    cache_dir: str = DEFAULT_CACHE_DIR
    daemon_socket: Optional[str] = None  # None: the conflists' daemonSocket, else the default path
    vxlan_name: str = DEFAULT_VXLAN      # the agent's --vxlan-name (a VXLAN device its routes use is found anyway)


@dataclass
class NetworkFacts:
    plugin: PluginConf
    conf_file: ConfFile
    ip_versions: set[int] = field(default_factory=set)
    store_error: str = ""
    findings: list[Finding] = field(default_factory=list)      # cni-ipam check's, for this network
    masq_error: str = ""
    masq_orphans: list[str] = field(default_factory=list)   # keys of rules whose attachment is gone
    masq_orphan_backends: dict[str, str] = field(default_factory=dict)   # key -> backend holding it
    nft_rules_missing: bool = False      # nftables holds elements of the network but its chain no rules


@dataclass
class Reading:
    view: NodeView
    files: list[ConfFile]
    facts: list[tuple[Network, NetworkFacts]]
    options: Options


def read_node(options: Options, netlink_factory: Any = None) -> Reading:
    view = NodeView(hostname=socket.gethostname(), conf_dir=options.conf_dir, bin_dir=options.bin_dir)
    files = conflist.read_conf_dir(options.conf_dir)
    view.files = [_file_view(f) for f in files]
    host = (netlink_factory or _netlink)(None)
    try:
        links = host.links()
        by_name = {link.name: link for link in links}
        facts = []
        cache = _runtime_cache(options.cache_dir)
        boot_id = current_boot_id()
        for conf_file, plugin in _bridge_plugins(files):
            network, fact = _read_network(conf_file, plugin, host, by_name, links, cache, boot_id, options)
            view.networks.append(network)
            facts.append((network, fact))
        _find_stray_veths(view.networks, links)
        names = {link.index: link.name for link in links}
        routes = _node_routes(host)
        view.uplink, view.peers = _routes(routes, names)
        view.overlay = _overlay(host, links, [r for r in routes if r.proto == AGENT_ROUTE_PROTO], names,
                                options.vxlan_name)
    finally:
        host.close()
    view.cluster_masquerade = _agent_masquerade()
    view.daemon = daemon_probe.probe(_daemon_socket(options, files))
    return Reading(view, files, facts, options)


def _netlink(netns: Optional[str]) -> Any:
    # The agent's extension of the adapter: it also reads the VXLAN device, FDB and neighbours.
    from ..agent.overlay_netlink import OverlayNetlink

    return OverlayNetlink(netns)


def _file_view(conf_file: ConfFile) -> ConfFileView:
    error = conf_file.error or ""
    if not error:
        for plugin in conf_file.plugins:
            if plugin.type == PLUGIN_TYPE:
                try:
                    conflist.validate_for_add(plugin.config)
                except CNIError as err:
                    error = f"plugins[{plugin.index}] ({plugin.type}): {conflist.describe(err)}"
                    break
    return ConfFileView(path=conf_file.path, network=conf_file.name, cni_version=conf_file.cni_version,
                        plugins=conf_file.types, valid=not error, error=error)


def _bridge_plugins(files: list[ConfFile]) -> list[tuple[ConfFile, PluginConf]]:
    return [(f, p) for f in files for p in f.plugins if p.type == PLUGIN_TYPE and f.name]


def _read_network(conf_file: ConfFile, plugin: PluginConf, host: Any, by_name: dict, links: list,
                  cache: dict, boot_id: str, options: Options) -> tuple[Network, NetworkFacts]:
    config = plugin.config
    ipam = config.get("ipam") if isinstance(config.get("ipam"), dict) else {}
    facts = NetworkFacts(plugin, conf_file, ip_versions=configured_ip_versions(ipam))
    network = Network(
        name=conf_file.name, file=conf_file.path, cni_version=conf_file.cni_version, plugins=conf_file.types,
        bridge=_bridge(host, by_name, links, _text(config.get("bridge"), "cni0")),
        ipam_type=plugin.ipam_type, data_dir=_text(ipam.get("dataDir"), DEFAULT_DATA_DIR),
        is_gateway=config.get("isGateway") is True or config.get("isDefaultGateway") is True,
        ip_masq=config.get("ipMasq") is True)
    if network.ip_masq:
        network.masq_backend = masq.backend_name(_text(config.get("ipMasqBackend"), "") or None)
    if plugin.ipam_type not in pools.STORE_TYPES:
        facts.store_error = f"IPAM type {plugin.ipam_type!r} keeps no store inspect can read"
        return network, facts
    try:
        state = read_network(network.data_dir, network.name)
    except (CNIError, OSError) as err:
        facts.store_error = f"cannot read the IPAM store: {err}"
        return network, facts
    facts.findings = find_problems(state, boot_id, None, host_veths=True)
    conf = pools.ipam_conf(plugin)
    if conf is not None:
        network.pools = pools.pools(network.name, conf, [e.reservation for e in state.entries], boot_id)
    masq_keys: Optional[dict[str, str]] = None
    if network.ip_masq:
        try:
            masq_keys = _masq_keys(network.name)
            facts.nft_rules_missing = _nft_rules_missing(network.name, masq_keys)
        except CNIError as err:
            facts.masq_error = err.msg
    network.attachments = _attachments(network, state, by_name, cache, boot_id, masq_keys,
                                       {"nftables"} if facts.nft_rules_missing else set())
    if masq_keys is not None:
        held = {masq_chain_name(network.name, a.container_id, a.ifname) for a in network.attachments}
        facts.masq_orphans = sorted(set(masq_keys) - held)
        facts.masq_orphan_backends = {key: masq_keys[key] for key in facts.masq_orphans}
    return network, facts


def _masq_keys(network: str) -> dict[str, str]:
    """{attachment key (plan.masq_chain_name): backend} of the network's masquerade rules, read by
    the backends' own readers as GC reads them (`masq.attachments` is their union): iptables
    chains and nftables set elements alike."""
    found: dict[str, str] = {}
    for backend, keys in masq.attachments_by_backend(network).items():
        for key in keys:
            found.setdefault(key, backend)
    return found


def _nft_rules_missing(network: str, masq_keys: dict[str, str]) -> bool:
    """nftables holds the network's pod addresses but its chain lacks the masquerade rules."""
    return "nftables" in masq_keys.values() and not masq.nftables.masquerading(network)


def _text(value: Any, default: str) -> str:
    return value if isinstance(value, str) and value else default


def _bridge(host: Any, by_name: dict, links: list, name: str) -> Bridge:
    link = by_name.get(name)
    if link is None:
        return Bridge(name=name)
    try:
        addresses = [str(a) for a in host.addresses(name)]
    except Exception:   # the bridge went away while we looked
        addresses = []
    ports = [Port(l.name, l.kind, l.mac, l.up) for l in links if l.master == link.index]
    return Bridge(name=name, exists=True, up=link.up, mtu=link.mtu, mac=link.mac,
                  addresses=sorted(addresses, key=_address_order), ports=ports)


def _address_order(text: str) -> tuple:
    iface = ipaddress.ip_interface(text)
    return (iface.version, iface.ip.is_link_local, iface.ip)


def _attachments(network: Network, state: NetworkState, by_name: dict, cache: dict, boot_id: str,
                 masq_keys: Optional[dict[str, str]], inert: set[str]) -> list[Attachment]:
    """`inert`: backends whose rules masquerade nothing now (an nftables chain without its rules)."""
    grouped: dict[tuple[str, str], Attachment] = {}
    for entry in state.entries:
        r = entry.reservation
        if r.damaged:
            continue   # a finding of its own; no owner to show
        found = grouped.get(r.owner)
        if found is None:
            veth = host_veth_name(r.container_id, r.ifname)
            link = by_name.get(veth)
            pod = cache.get((network.name, r.container_id, r.ifname), {})
            backend = (masq_keys or {}).get(masq_chain_name(network.name, *r.owner), "")
            found = grouped[r.owner] = Attachment(
                container_id=r.container_id, ifname=r.ifname, ips=[], netns=r.netns,
                netns_exists=os.path.exists(r.netns) if r.netns else None,
                host_veth=veth, host_veth_exists=link is not None, host_veth_mac=link.mac if link else "",
                pod_name=pod.get("K8S_POD_NAME", ""), pod_namespace=pod.get("K8S_POD_NAMESPACE", ""),
                masquerade=None if masq_keys is None else bool(backend) and backend not in inert,
                masq_backend=backend,
                boot=entry.boot(boot_id))
        found.ips.append(str(r.ip))
        if not found.netns and r.netns:
            found.netns, found.netns_exists = r.netns, os.path.exists(r.netns)
    attachments = sorted(grouped.values(), key=lambda a: (a.container_id, a.ifname))
    for attachment in attachments:
        attachment.mac = _pod_mac(attachment)
    return attachments


def _pod_mac(attachment: Attachment) -> str:
    if not attachment.netns_exists:
        return ""
    from ..netlink import link_mac

    return link_mac(attachment.netns, attachment.ifname) or ""


def _find_stray_veths(networks: list[Network], links: list) -> None:
    """Veths on a cni-bridge bridge that no reservation of the networks using that bridge names."""
    expected: dict[str, set[str]] = {}
    for network in networks:
        expected.setdefault(network.bridge.name, set()).update(a.host_veth for a in network.attachments)
    for network in networks:
        if network.bridge.exists:
            network.stray_veths = sorted(p.name for p in network.bridge.ports
                                         if p.kind == "veth" and p.name not in expected[network.bridge.name])


def _node_routes(host: Any) -> list:
    routes = []
    for family in (4, 6):
        try:
            routes += host.routes(family)
        except Exception:   # IPv6 disabled
            continue
    return routes


def _routes(routes: list, names: dict[int, str]) -> tuple[str, list[PeerRoute]]:
    uplink, peers = "", []
    for route in routes:
        if route.dst.prefixlen == 0 and not uplink:
            uplink = names.get(route.oif, "")
        elif route.proto == AGENT_ROUTE_PROTO:
            peers.append(PeerRoute(dst=str(route.dst), via=str(route.gw or ""),
                                   device=names.get(route.oif, ""), source="agent"))
    return uplink, peers


def _overlay(host: Any, links: list, agent_routes: list, names: dict[int, str], vxlan_name: str) -> Overlay:
    """The agent's VXLAN device (the one its routes use, else the one of `vxlan_name`) and the peers."""
    link = _vxlan_link(links, agent_routes, vxlan_name)
    if link is None:
        return Overlay(peers=overlay.peers(agent_routes, names))
    state = host.vxlan_state(link.name)
    if state is None or state.kind != "vxlan":   # gone while we looked
        return Overlay(peers=overlay.peers(agent_routes, names))
    device = VxlanDevice(link.name, state.vni or 0, state.port or 0, str(state.local or ""), state.mac,
                         state.mtu, state.up, state.learning)
    return Overlay(device, overlay.peers(agent_routes, names, state.index, host.fdb_entries(state.index),
                                         host.neighbours(state.index)))


def _vxlan_link(links: list, agent_routes: list, vxlan_name: str) -> Any:
    used = {route.oif for route in agent_routes}
    candidates = [l for l in links if l.kind == "vxlan" and (l.index in used or l.name == vxlan_name)]
    return min(candidates, key=lambda l: l.index not in used, default=None)


def _agent_masquerade() -> list[str]:
    """The IP families whose node-agent masquerade chain is in place."""
    from ..agent.apply import nat_rules
    from ..agent.desired import MASQ_CHAIN
    from ..agent.diff import parse_nat_rules
    from ..agent.topology import AgentError

    families = []
    for family in (4, 6):
        try:
            # Only lines naming the chain matter; shlex-splitting every pod's rules costs ~1 ms per pod.
            state = parse_nat_rules([line for line in nat_rules(family) if MASQ_CHAIN in line], MASQ_CHAIN)
        except AgentError:
            continue
        if state.chain_exists and state.jumps:
            families.append(f"IPv{family}")
    return families


def _daemon_socket(options: Options, files: list[ConfFile]) -> str:
    from ..daemon_client import CONFIG_KEY, DEFAULT_SOCKET

    if options.daemon_socket:
        return options.daemon_socket
    for _, plugin in _bridge_plugins(files):
        path = plugin.config.get(CONFIG_KEY)
        if isinstance(path, str) and path:
            return path
    return DEFAULT_SOCKET


def _runtime_cache(cache_dir: str) -> dict[tuple[str, str, str], dict[str, str]]:
    """CNI_ARGS of each attachment, from libcni's result cache (containerd, podman, cnitool write it)."""
    found: dict[tuple[str, str, str], dict[str, str]] = {}
    results = os.path.join(cache_dir, "results")
    try:
        names = os.listdir(results)
    except OSError:
        return found
    for name in names:
        try:
            with open(os.path.join(results, name), "rb") as f:
                cached = json.loads(f.read())
            key = (cached["networkName"], cached["containerId"], cached["ifName"])
            args = {str(k): str(v) for k, v in cached.get("cniArgs") or []}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
        found[key] = args
    return found


__all__ = ["Options", "Reading", "NetworkFacts", "read_node"]
