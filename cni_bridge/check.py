"""CHECK: compare the kernel with what ADD reported (prevResult)."""
from __future__ import annotations

from typing import Any

from . import masq
from .config import BridgeConf
from .plan import host_veth_name
from .protocol.env import CmdArgs
from .protocol.errors import CNIError, Code
from .protocol.result import Result


def _fail(msg: str, details: str = "") -> CNIError:
    return CNIError(Code.CHECK_FAILED, msg, details)


def verify_attachment(conf: BridgeConf, cmd: CmdArgs, prev: Result, host: Any, container: Any) -> None:
    bridge = host.link(conf.bridge)
    if bridge is None or bridge.kind != "bridge":
        raise _fail(f"bridge {conf.bridge} is missing")
    if conf.promisc_mode and not bridge.promisc:
        raise _fail(f"bridge {conf.bridge} is not in promiscuous mode")

    veth = host.link(host_veth_name(cmd.container_id, cmd.ifname))
    if veth is None:
        raise _fail(f"the host end of {cmd.ifname} is missing")
    if veth.master != bridge.index:
        raise _fail(f"{veth.name} is not a port of bridge {conf.bridge}")

    inner = container.link(cmd.ifname)
    if inner is None:
        raise _fail(f"interface {cmd.ifname} is missing in {cmd.netns}")
    reported = [i for i in prev.interfaces if i.name == cmd.ifname and i.sandbox]
    if not reported:
        raise _fail(f"prevResult does not list interface {cmd.ifname}")
    if reported[0].mac and reported[0].mac.lower() != inner.mac:
        raise _fail(f"{cmd.ifname} has MAC {inner.mac}, prevResult says {reported[0].mac}")

    index = prev.interfaces.index(reported[0])
    present = set(container.addresses(cmd.ifname))
    for ip in prev.ips:
        if ip.interface in (None, index) and ip.address not in present:
            raise _fail(f"address {ip.address} is missing on {cmd.ifname}")

    families = {ip.family for ip in prev.ips}
    kernel = {(r.dst, r.gw) for family in families for r in container.routes(family)}
    kernel_dsts = {dst for dst, _ in kernel}
    for route in prev.routes:
        if (route.dst, route.gw) not in kernel and not (route.gw is None and route.dst in kernel_dsts):
            raise _fail(f"route to {route.dst} is missing in {cmd.netns}")

    if conf.ip_masq:
        missing = masq.missing_jumps(conf.name, cmd.container_id, cmd.ifname, [ip.address.ip for ip in prev.ips],
                                     conf.ip_masq_backend)
        if missing:
            raise _fail(f"masquerade rules for {', '.join(map(str, missing))} "
                        f"({cmd.container_id}/{cmd.ifname}) are missing")
