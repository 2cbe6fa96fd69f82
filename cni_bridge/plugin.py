"""cni-bridge's verbs, each reading top to bottom like the steps it takes."""
from __future__ import annotations

import contextlib
import logging
import threading
from typing import Any, Callable

from . import ipam_client, masq, sysctl
from .faults import point
from .confbase import load
from .config import BridgeConf
from .plan import AttachmentPlan, configured_ip_versions, host_veth_name, masq_chain_name, plan_attachment
from .protocol.errors import CNIError, Code
from .protocol.result import Interface, Result
from .protocol.runner import Request

log = logging.getLogger(__name__)


def _netlink(netns: str | None = None) -> Any:
    # Imported here so VERSION, STATUS and GC never pay for pyroute2.
    from .netlink import Netlink

    return Netlink(netns)


def _quietly(action: Callable[..., Any], *args: Any) -> Callable[[], None]:
    """A rollback step: best effort, never masks the error that triggered it."""
    def run() -> None:
        try:
            action(*args)
        except Exception as exc:  # rollback must go on with the next step
            log.warning("rollback step %s failed: %s", getattr(action, "__name__", action), exc)
    return run


class _Background:
    """Run `action` in a thread at once; `join` waits and raises what it raised."""

    def __init__(self, action: Callable[[], Any]) -> None:
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(action,), name="cni-bridge-del", daemon=True)
        self._thread.start()

    def _run(self, action: Callable[[], Any]) -> None:
        try:
            action()
        except BaseException as exc:   # handed to join(), in the calling thread
            self._error = exc

    def join(self) -> None:
        self._thread.join()
        if self._error is not None:
            raise self._error


class BridgePlugin:
    about = "cni-bridge: attach containers to a Linux bridge (reference `bridge` compatible)"

    def __init__(self, netlink_factory: Callable[[str | None], Any] = _netlink) -> None:
        self.netlink = netlink_factory

    # -- ADD -------------------------------------------------------------------
    def add(self, req: Request) -> Result:
        conf = load(BridgeConf, req.config)
        cmd = req.cmd
        with contextlib.ExitStack() as cleanup:
            container = self.netlink(cmd.netns)
            cleanup.callback(container.close)
            host = self.netlink(None)
            cleanup.callback(host.close)
            if container.link(cmd.ifname) is not None:
                raise CNIError(Code.INTERFACE_EXISTS,
                               f"interface {cmd.ifname} already exists in {cmd.netns}",
                               "a second ADD for the same container and ifname needs a DEL first")
            with contextlib.ExitStack() as undo:
                ipam_result = ipam_client.add(req)
                undo.callback(_quietly(ipam_client.delete, req))
                point("add.ipam-reserved")
                plan = plan_attachment(conf, cmd.container_id, cmd.ifname, dict(cmd.args), ipam_result)

                bridge = host.ensure_bridge(plan.bridge, plan.mtu, plan.promisc)
                sysctl.refuse_router_advertisements(plan.bridge)
                held = {v: host.addresses(plan.bridge, v) for v in sorted({a.version for a in plan.addresses})}
                self._refuse_bridge_addresses(plan, held)
                point("add.bridge-ready")
                undo.callback(_quietly(host.delete_link, plan.host_veth))
                try:
                    host.add_veth(plan.host_veth, cmd.ifname, cmd.netns, plan.mtu, plan.mac)
                except Exception:
                    # Left by an earlier ADD of this attachment that died (the pod's ifname is
                    # free: checked above)? Then replace it. Asked only on failure: a lookup
                    # up front cost every ADD a netlink round trip.
                    if not host.delete_link(plan.host_veth):
                        raise
                    host.add_veth(plan.host_veth, cmd.ifname, cmd.netns, plan.mtu, plan.mac)
                point("add.veth-created")
                sysctl.keep_ipv6_off_port(plan.host_veth)
                host.attach(plan.host_veth, plan.bridge, plan.hairpin)
                point("add.veth-attached")

                container.set_arp_notify(cmd.ifname)
                for address in plan.addresses:
                    container.add_address(cmd.ifname, address)
                point("add.addresses-set")
                container.set_up(cmd.ifname)
                for route in plan.routes:
                    container.add_route(route.dst, route.gw, cmd.ifname)
                point("add.routes-set")

                for gateway in plan.gateway_addresses:
                    self._ensure_gateway(host, plan, gateway, held[gateway.version])
                point("add.gateway-set")
                sysctl.enable_forwarding(plan.forwarding)
                point("add.forwarding-set")
                if plan.masq:
                    sources = tuple(rule.source for rule in plan.masq.rules)
                    undo.callback(_quietly(masq.teardown, conf.name, cmd.container_id, cmd.ifname,
                                           conf.ip_masq_backend, sources))
                    masq.setup(plan.masq)
                    point("add.masq-set")

                if any(address.version == 4 for address in plan.addresses):
                    # Neighbours may hold a reused address with the previous pod's MAC.
                    host.wait_port_forwarding(plan.host_veth)
                    container.announce(cmd.ifname)
                result = self._result(plan, host, container, cmd.netns, bridge.name)
                point("add.result-ready")
                undo.pop_all()
                return result

    @staticmethod
    def _refuse_bridge_addresses(plan: AttachmentPlan, held: dict[int, list[Any]]) -> None:
        """Networks sharing a bridge may have overlapping subnets, and one's IPAM can hand
        out the address another put on the bridge as its gateway. Refuse it before the pod
        announces it; the rollback frees the reservation and IPAM's round-robin moves on."""
        for address in plan.addresses:
            if any(present.ip == address.ip for present in held[address.version]):
                raise CNIError(Code.BRIDGE_CONFLICT,
                               f"IPAM gave the pod {address.ip}, which bridge {plan.bridge} holds",
                               "another network on this bridge uses it (as its gateway?): give the networks "
                               "sharing a bridge ranges that exclude each other's gateways, or their own bridges")

    @staticmethod
    def _ensure_gateway(host: Any, plan: AttachmentPlan, gateway: Any, held: list[Any]) -> None:
        """`held`: the bridge's addresses of the gateway's IP version, read earlier in this ADD."""
        for present in held:
            if present == gateway:
                return
            if present.version == gateway.version and present.network == gateway.network:
                if not plan.force_address:
                    raise CNIError(Code.BRIDGE_CONFLICT,
                                   f"bridge {plan.bridge} already has an IP address different from {gateway}",
                                   f"it holds {present}; set forceAddress to replace it")
                host.del_address(plan.bridge, present)
        host.add_address(plan.bridge, gateway)

    @staticmethod
    def _result(plan: AttachmentPlan, host: Any, container: Any, netns: str, bridge_name: str) -> Result:
        # The bridge afresh: its MAC follows its ports unless pinned. A veth's MAC stays put.
        bridge = host.link(bridge_name)
        veth, inner = host.known_link(plan.host_veth), container.known_link(plan.container_ifname)
        if bridge is None or veth is None or inner is None:
            raise CNIError(Code.INTERNAL, "an interface vanished while the attachment was being made")
        interfaces = (
            Interface(name=bridge.name, mac=bridge.mac),
            Interface(name=veth.name, mac=veth.mac),
            Interface(name=inner.name, mac=inner.mac, sandbox=netns),
        )
        return plan.result.with_(interfaces=interfaces)

    # -- DEL ---------------------------------------------------------------------
    def delete(self, req: Request) -> None:
        """Best effort and idempotent: every step runs even if an earlier one failed."""
        conf = load(BridgeConf, req.config)
        cmd = req.cmd
        errors: list[CNIError] = []

        def step(action: Callable[[], Any]) -> None:
            try:
                action()
            except CNIError as err:
                errors.append(err)

        sources: list = []   # the pod's addresses, read before its link goes (masquerade cleanup)
        removed: list[bool] = []
        sources_read = threading.Event()
        unlinking = None
        if cmd.netns:
            # The kernel holds the link's RTM_DELLINK for an RCU grace period (~15-20 ms),
            # with the GIL let go: IPAM and masquerade are undone meanwhile (the reference
            # releases IPAM before it deletes the link), so DEL costs the longest, not all.
            unlinking = _Background(lambda: removed.append(
                self._delete_container_link(cmd.netns, cmd.ifname, conf.ip_masq, sources, sources_read.set)))
        else:
            sources_read.set()
        step(lambda: ipam_client.delete(req))
        point("del.ipam-released")
        if conf.ip_masq:
            sources_read.wait()
            step(lambda: masq.teardown(conf.name, cmd.container_id, cmd.ifname, conf.ip_masq_backend,
                                       tuple(sources)))
            point("del.masq-removed")
        if unlinking is not None:
            step(unlinking.join)
            point("del.container-link-removed")
        if not any(removed):
            # The pod's link took its host end with it; without one, a crashed ADD may have left it.
            step(lambda: self._delete_host_veth(cmd.container_id, cmd.ifname))
        point("del.host-veth-removed")
        if errors:
            raise errors[0]

    def _delete_container_link(self, netns: str, ifname: str, read_addresses: bool, addresses: list[Any],
                               on_read: Callable[[], None]) -> bool:
        """Delete the pod's interface; True if there was one. Its addresses (when asked
        for) are appended to `addresses` first, and `on_read` is called once they are
        (or once there is nothing to read)."""
        try:
            try:
                container = self.netlink(netns)
            except CNIError:
                return False  # the netns is already gone, and the veth with it
            with container:
                if read_addresses:
                    addresses += [address.ip for address in container.addresses(ifname)
                                  if not address.ip.is_link_local]
                on_read()
                return container.delete_link(ifname)
        finally:
            on_read()

    def _delete_host_veth(self, container_id: str, ifname: str) -> None:
        # Normally gone with its peer; a crashed ADD can leave the host end alone.
        with self.netlink(None) as host:
            host.delete_link(host_veth_name(container_id, ifname))

    # -- CHECK ----------------------------------------------------------------------
    def check(self, req: Request) -> None:
        conf = load(BridgeConf, req.config)
        cmd = req.cmd
        prev = conf.previous_result()
        if prev is None:
            raise CNIError(Code.INVALID_CONFIG, "CHECK needs prevResult in the config")
        ipam_client.check(req)
        from .check import verify_attachment

        with self.netlink(None) as host, self.netlink(cmd.netns) as container:
            verify_attachment(conf, cmd, prev, host, container)

    # -- GC -------------------------------------------------------------------------
    def gc(self, req: Request) -> None:
        conf = load(BridgeConf, req.config)
        keep = conf.gc_keep()
        if keep is None:
            raise CNIError(Code.INVALID_CONFIG, "GC needs cni.dev/valid-attachments in the config")
        problems: list[str] = []
        try:
            ipam_client.gc(req)
        except CNIError as err:
            problems.append(f"IPAM: {err}")
        try:
            # Attachments are compared by chain: a comment may hold a digest of a long ID.
            stale = masq.attachments(conf.name) - {masq_chain_name(conf.name, *owner) for owner in keep}
        except CNIError as err:
            problems.append(f"masquerade rules: {err}")
            stale = set()
        for key in sorted(stale):
            try:
                masq.remove(conf.name, key)
            except CNIError as err:
                problems.append(f"masquerade rules {key}: {err}")
        if problems:
            raise CNIError(Code.IO_FAILURE, "GC could not remove everything", "; ".join(problems))

    # -- STATUS ---------------------------------------------------------------------
    def status(self, req: Request) -> None:
        conf = load(BridgeConf, req.config)
        if conf.ip_masq:
            # The IP versions the ranges name; IPv4 when the IPAM config names none.
            versions = configured_ip_versions(req.config.get("ipam")) or {4}
            missing = masq.missing_tools(versions, conf.ip_masq_backend)
            if missing:
                package = "nftables" if missing == ["nft"] else "iptables"
                raise CNIError(Code.CANNOT_SERVE_ADD, f"ipMasq is set but {', '.join(missing)} is not installed",
                               f"install the {package} package or set ipMasq to false")
        try:
            ipam_client.status(req)
        except CNIError as err:
            if err.code in (Code.CANNOT_SERVE_ADD, Code.LIMITED_CONNECTIVITY):
                raise
            raise CNIError(Code.CANNOT_SERVE_ADD, f"IPAM cannot serve ADD: {err.msg}", err.details) from None
