"""Make the node hold the desired state: conflist file, bridge gateway, VXLAN device and
its entries, peer routes, masquerade chain.

Each step reads what is there first and changes only what differs, so a
second pass with the same topology writes nothing and runs no iptables
command that changes anything. Routes go through the netlink adapter.
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from .. import sysctl
from ..protocol.errors import CNIError
from .desired import CONFLIST_NAME, MASQ_CHAIN, ROUTE_PROTO, AgentOptions, DesiredState, desired_state, \
    written_pod_cidrs
from .diff import (DeviceConflict, RouteState, diff_addresses, diff_routes, diff_vxlan_device, diff_vxlan_entries,
                   masq_restore_script, masq_teardown_script, parse_nat_rules)
from .overlay import OverlayOptions, Underlay
from .topology import AgentError, IPNetwork, Topology

log = logging.getLogger("cni_bridge.agent")

_TOOLS = {4: "iptables", 6: "ip6tables"}
_WAIT = "10"


@dataclass
class Changes:
    conflist_written: bool = False
    addresses_added: list[str] = field(default_factory=list)
    addresses_removed: list[str] = field(default_factory=list)
    routes_replaced: list[str] = field(default_factory=list)
    routes_deleted: list[str] = field(default_factory=list)
    masq_synced: list[int] = field(default_factory=list)     # families whose chain was rewritten or removed
    vxlan: list[str] = field(default_factory=list)           # device and FDB/neighbour changes, as text
    errors: list[str] = field(default_factory=list)

    @property
    def any(self) -> bool:
        return bool(self.conflist_written or self.addresses_added or self.addresses_removed
                    or self.routes_replaced or self.routes_deleted or self.masq_synced or self.vxlan)

    def summary(self) -> str:
        failed = f" ({len(self.errors)} failed)" if self.errors else ""
        if not self.any:
            return "nothing to change" + failed
        parts = []
        if self.conflist_written:
            parts.append("conflist written")
        if self.addresses_removed:
            parts.append("bridge addresses removed: " + ", ".join(self.addresses_removed))
        if self.addresses_added:
            parts.append("bridge addresses set: " + ", ".join(self.addresses_added))
        if self.vxlan:
            parts.append("vxlan: " + ", ".join(self.vxlan))
        if self.routes_replaced:
            parts.append("routes set: " + ", ".join(self.routes_replaced))
        if self.routes_deleted:
            parts.append("routes removed: " + ", ".join(self.routes_deleted))
        if self.masq_synced:
            parts.append("masquerade synced: " + ", ".join(f"IPv{f}" for f in self.masq_synced))
        return "; ".join(parts) + failed


def _default_netlink() -> Any:
    from .overlay_netlink import OverlayNetlink

    return OverlayNetlink(None)


def read_underlay(topology: Topology, node_name: str,
                  netlink_factory: Callable[[], Any] = _default_netlink) -> Optional[Underlay]:
    """Where this node's IPv4 InternalIP lives (link, prefix, MTU); None if nowhere."""
    address = topology.node(node_name).internal_ip(4)
    if address is None:
        return None
    with netlink_factory() as nl:
        return nl.underlay(address)


def plan_node(topology: Topology, node_name: str, options: AgentOptions, overlay: OverlayOptions,
              netlink_factory: Callable[[], Any] = _default_netlink) -> DesiredState:
    """The desired state, from the topology and the one fact it needs from the kernel."""
    underlay = read_underlay(topology, node_name, netlink_factory) if overlay.backend != "routes" else None
    return desired_state(topology, node_name, options, overlay, underlay)


def apply(state: DesiredState, conf_dir: str,
          netlink_factory: Callable[[], Any] = _default_netlink) -> Changes:
    """One pass. Problems with one part do not stop the others; they end up in Changes.errors."""
    changes = Changes()
    for note in state.notes:
        log.info("%s", note)
    try:
        sysctl.enable_forwarding(state.forwarding)
    except CNIError as err:
        changes.errors.append(err.msg)
    # Read before it is overwritten: the podCIDRs written last time own the bridge addresses
    # to remove, even when the cluster CIDR moved with them.
    previous = previous_pod_cidrs(conf_dir)
    try:
        changes.conflist_written = write_conflist(conf_dir, state.conflist_bytes())
    except OSError as exc:
        changes.errors.append(f"cannot write {os.path.join(conf_dir, CONFLIST_NAME)}: {exc.strerror or exc}")
    try:
        # Before the routes: a peer may now own the old podCIDR, whose connected route goes with the address.
        sync_bridge(state, previous, netlink_factory, changes)
    except CNIError as err:
        changes.errors.append(str(err))
    link_index: dict[str, int] = {}
    try:
        # Before the routes: VXLAN routes name the device, which may have to be made first.
        link_index = sync_vxlan(state, netlink_factory, changes)
    except AgentError as err:
        changes.errors.append(str(err))
    except Exception as exc:   # a netlink dump refused: the rest of the pass still runs
        changes.errors.append(f"cannot read the VXLAN device {state.vxlan_name}: {_reason(exc)}")
    try:
        sync_routes(state, netlink_factory, changes, link_index)
    except CNIError as err:
        changes.errors.append(err.msg)
    try:
        sync_masq(state, changes)
    except AgentError as err:
        changes.errors.append(str(err))
    return changes


# -- conflist ---------------------------------------------------------------------------
def write_conflist(conf_dir: str, content: bytes, name: str = CONFLIST_NAME) -> bool:
    """Atomically (temp file in the same dir, fsync, rename); False when the file already holds `content`."""
    path = os.path.join(conf_dir, name)
    try:
        with open(path, "rb") as existing:
            if existing.read() == content:
                return False
    except FileNotFoundError:
        pass
    os.makedirs(conf_dir, exist_ok=True)
    # A name the runtime ignores (libcni loads *.conf, *.conflist, *.json) until the rename.
    fd, tmp = tempfile.mkstemp(dir=conf_dir, prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(content)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    dir_fd = os.open(conf_dir, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return True


def previous_pod_cidrs(conf_dir: str) -> tuple[IPNetwork, ...]:
    try:
        with open(os.path.join(conf_dir, CONFLIST_NAME), "rb") as f:
            return written_pod_cidrs(f.read())
    except OSError:
        return ()


# -- bridge ---------------------------------------------------------------------------
def sync_bridge(state: DesiredState, previous: tuple[IPNetwork, ...],
                netlink_factory: Callable[[], Any], changes: Changes) -> None:
    """The bridge holds the gateway of each own podCIDR and no stale one of the agent's.

    The plugin adds a gateway at ADD but never removes one of another subnet, so
    after a podCIDR change only the agent knows the old one is stale.
    """
    with netlink_factory() as nl:
        try:
            if nl.link(state.bridge) is None:
                return  # no pod yet: the plugin makes the bridge, with its gateway, at the first ADD
            current = nl.addresses(state.bridge)
        except Exception as exc:
            changes.errors.append(f"cannot read the addresses of {state.bridge}: {_reason(exc)}")
            return
        plan = diff_addresses(current, state.gateways, state.cluster_cidrs + previous)
        for stale in plan.delete:
            try:
                nl.del_address(state.bridge, stale)
            except Exception as exc:
                changes.errors.append(f"cannot remove {stale} from {state.bridge}: {_reason(exc)}")
                continue
            changes.addresses_removed.append(str(stale))
        for gateway in plan.add:
            try:
                nl.add_address(state.bridge, gateway)
            except Exception as exc:
                changes.errors.append(f"cannot add {gateway} to {state.bridge}: {_reason(exc)}")
                continue
            changes.addresses_added.append(str(gateway))


# -- routes -----------------------------------------------------------------------------
def sync_vxlan(state: DesiredState, netlink_factory: Callable[[], Any], changes: Changes) -> dict[str, int]:
    """The device as desired (or gone), then exactly the peers' FDB and neighbour entries.

    Everything is read back from the kernel, so a restarted agent adopts the device
    and entries it made before (same link, nothing rewritten) and drops stale ones.
    Returns {device name: link index} for the routes that go through it.
    """
    name = state.vxlan_name
    with netlink_factory() as nl:
        current = nl.vxlan_state(name)
        try:
            plan = diff_vxlan_device(current, state.vxlan)
        except DeviceConflict as exc:
            raise AgentError(f"cannot make the VXLAN device: {exc}; pass --vxlan-name") from None
        if plan.delete and current is not None:
            nl.delete_index(current.index)        # its routes, FDB and neighbour entries go with it
            if not plan.create:
                changes.vxlan.append(f"{name} removed")
        if state.vxlan is None:
            return {}
        if plan.create:
            try:
                nl.create_vxlan(state.vxlan)
            except Exception as exc:
                raise AgentError(f"cannot create the VXLAN device {name}: {_reason(exc)}") from None
            changes.vxlan.append(f"{name} {'made again' if plan.delete else 'created'} "
                                 f"(VNI {state.vxlan.vni}, UDP {state.vxlan.port}, local {state.vxlan.local})")
            current = nl.vxlan_state(name)
            if current is None:
                raise AgentError(f"the VXLAN device {name} vanished right after it was made")
            plan = diff_vxlan_device(current, state.vxlan)    # a new device is down: only "up" is left
        if plan.mtu or plan.mac or plan.up:
            nl.set_vxlan(current.index, plan.mtu, plan.mac, plan.up)
            changes.vxlan += ([f"{name} mtu {plan.mtu}"] if plan.mtu else []) + \
                             ([f"{name} address {plan.mac}"] if plan.mac else [])
        index = current.index
        entries = diff_vxlan_entries(nl.fdb_entries(index), nl.neighbours(index), state.vxlan_peers)
        # Stale entries first: a moved node's MAC gets its new destination, not a second one.
        steps = ([("remove fdb", nl.delete_fdb, e) for e in entries.fdb_delete]
                 + [("remove neighbour", nl.delete_neighbour, e) for e in entries.neigh_delete]
                 + [("fdb", nl.set_fdb, e) for e in entries.fdb_set]
                 + [("neighbour", nl.set_neighbour, e) for e in entries.neigh_set])
        for what, step, entry in steps:
            try:
                step(index, entry)
            except Exception as exc:
                action = what if what.startswith("remove") else f"set {what}"
                changes.errors.append(f"cannot {action} {entry}: {_reason(exc)}")
                continue
            changes.vxlan.append(f"{what} {entry}")
        return {name: index}


def sync_routes(state: DesiredState, netlink_factory: Callable[[], Any], changes: Changes,
                link_index: Optional[dict[str, int]] = None) -> None:
    link_index = link_index or {}
    with netlink_factory() as nl:
        current = []
        for family in (4, 6):
            try:
                current += [RouteState(r.dst, r.gw, r.proto, r.oif) for r in nl.routes(family)]
            except Exception as exc:  # IPv6 disabled: no routes of that family to manage
                log.debug("cannot list IPv%d routes: %s", family, exc)
        plan = diff_routes(current, state.routes, ROUTE_PROTO, link_index)
        for route in plan.replace:
            text = f"{route.dst} via {route.via}" + (f" dev {route.device}" if route.device else "") + f" ({route.node})"
            try:
                if route.device:
                    if route.device not in link_index:
                        raise AgentError(f"no device {route.device}")
                    nl.replace_device_route(route.dst, route.via, link_index[route.device], ROUTE_PROTO,
                                            route.onlink)
                else:
                    nl.replace_route(route.dst, route.via, ROUTE_PROTO)
            except Exception as exc:
                changes.errors.append(f"cannot set route {text}: {_reason(exc)}")
                continue
            changes.routes_replaced.append(text)
        for stale in plan.delete:
            text = f"{stale.dst} via {stale.gw}"
            try:
                nl.delete_route(stale.dst, stale.gw, ROUTE_PROTO)
            except Exception as exc:
                changes.errors.append(f"cannot remove route {text}: {_reason(exc)}")
                continue
            changes.routes_deleted.append(text)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, CNIError):  # its code is a CNI code, not an errno
        return str(exc)
    code = getattr(exc, "code", None) or getattr(exc, "errno", None)
    if isinstance(code, int) and code > 0:
        return os.strerror(code)
    return str(exc) or type(exc).__name__


# -- masquerade -------------------------------------------------------------------------
def _tool(family: int, suffix: str = "") -> Optional[str]:
    return shutil.which(_TOOLS[family] + suffix)


def _run(argv: list[str], stdin: Optional[str] = None) -> str:
    proc = subprocess.run(argv, input=stdin, capture_output=True, text=True)
    if proc.returncode != 0:
        raise AgentError(f"{os.path.basename(argv[0])} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def nat_rules(family: int) -> list[str]:
    tool = _tool(family)
    if tool is None:
        return []
    return _run([tool, "-w", _WAIT, "-t", "nat", "-S"]).splitlines()


def sync_masq(state: DesiredState, changes: Changes) -> None:
    wanted = {chain.family: chain for chain in state.masq}
    for family in (4, 6):
        chain = wanted.get(family)
        if chain is not None and _tool(family) is None:
            raise AgentError(f"masquerading IPv{family} pod traffic needs {_TOOLS[family]}, which is not installed")
        if _tool(family) is None:
            continue
        current = parse_nat_rules(nat_rules(family), MASQ_CHAIN)
        script = masq_restore_script(current, chain) if chain else masq_teardown_script(current, MASQ_CHAIN)
        if script is None:
            continue
        restore = _tool(family, "-restore")
        if restore is None:
            raise AgentError(f"{_TOOLS[family]}-restore is not installed")
        _run([restore, "-w", _WAIT, "--noflush"], script)
        changes.masq_synced.append(family)
