"""The view for people: aligned sections, one line per check with its verdict."""
from __future__ import annotations

from typing import TextIO

from ipam.cli import format_age, table

from . import overlay
from .model import FAIL, WARN, Attachment, Network, NodeView, OverlayPeer

MARK = {"ok": "ok", "warn": "WARN", "fail": "FAIL", "skip": "-"}


def render(view: NodeView, out: TextIO) -> None:
    out.write(f"node {view.hostname}   conf dir {view.conf_dir}   bin dir {view.bin_dir}"
              + (f"   uplink {view.uplink}" if view.uplink else "") + "\n")
    for network in view.networks:
        out.write("\n")
        _network(network, out)
    if not view.networks:
        out.write(f"\nno cni-bridge network in {view.conf_dir}\n")
    out.write("\n")
    _node(view, out)
    out.write("\nCHECKS\n")
    table([["VERDICT", "CHECK", "SUBJECT", "DETAIL"]]
          + [[MARK[c.verdict], c.name, c.subject or "-", c.detail] for c in view.checks], out)
    counts = view.verdicts()
    out.write(f"\n{counts['ok']} ok, {counts[WARN]} warnings, {counts[FAIL]} failed, {counts['skip']} skipped\n")


def _network(network: Network, out: TextIO) -> None:
    b = network.bridge
    out.write(f"NETWORK {network.name}   {network.file}   cniVersion {network.cni_version or '-'}   "
              f"plugins {', '.join(network.plugins)}\n")
    if b.exists:
        out.write(f"  bridge  {b.name} {'up' if b.up else 'DOWN'}  mtu {b.mtu}  {b.mac}  "
                  f"{' '.join(b.addresses) or 'no address'}  {len(b.ports)} ports\n")
    else:
        out.write(f"  bridge  {b.name} (does not exist)\n")
    masq = "off" if not network.ip_masq else \
        f"on{_paren(network.masq_backend)}, {sum(1 for a in network.attachments if a.masquerade)} of " \
        f"{len(network.attachments)} with rules"
    out.write(f"  ipam    {network.ipam_type} {network.data_dir}   gateway {'yes' if network.is_gateway else 'no'}"
              f"   masquerade {masq}\n")
    for pool in network.pools:
        out.write(f"  pool    {pool.label}  used {pool.used}  free {pool.free} of {pool.size}"
                  + (f"  ({pool.reclaimable} from an earlier boot)" if pool.reclaimable else "") + "\n")
    if network.attachments:
        rows = [["  CONTAINER", "IFNAME", "POD", "IPS", "NETNS", "HOST VETH", "MAC", "MASQ"]]
        rows += [["  " + _short(a.container_id), a.ifname, _pod(a), ",".join(a.ips), _netns(a),
                  a.host_veth + ("" if a.host_veth_exists else " (gone)"), a.mac or "-", _masq(a)]
                 for a in network.attachments]
        table(rows, out)
    if network.stray_veths:
        out.write(f"  stray veths (no reservation): {', '.join(network.stray_veths)}\n")


def _node(view: NodeView, out: TextIO) -> None:
    device = view.overlay.device
    if device is not None:
        out.write(f"VXLAN   {device.name} {'up' if device.up else 'DOWN'}  VNI {device.vni}  UDP {device.port}  "
                  f"local {device.local or '-'}  mtu {device.mtu}  {device.mac}\n")
    if view.overlay.peers:
        out.write("PEERS (node agent)\n")
        table([["  POD CIDR", "WAY", "VIA", "DEVICE", "VTEP MAC", "UNDERLAY", "STATE"]]
              + [_peer_row(p) for p in view.overlay.peers], out)
    out.write(f"cluster masquerade (agent): {', '.join(view.cluster_masquerade) or 'none'}\n")
    d = view.daemon
    if d is None:
        return
    if d.reachable:
        metrics = f"   metrics {d.metrics_address}" if d.metrics_address else ""
        out.write(f"DAEMON  {d.socket}  reachable  pid {d.pid}  {d.workers} workers "
                  f"({len(d.worker_pids)} running)  up {format_age(d.uptime_seconds)}{metrics}\n")
    elif d.exists:
        out.write(f"DAEMON  {d.socket}  NOT reachable: {d.error}\n")
    else:
        out.write(f"DAEMON  none at {d.socket} (calls run in-process)\n")


def _peer_row(p: OverlayPeer) -> list[str]:
    state = "complete" if p.complete else "INCOMPLETE: no " + ", no ".join(overlay.missing_parts(p))
    return ["  " + (p.pod_cidr or "-"), p.way, p.via or "-", p.device or "-", p.vtep_mac or "-",
            p.underlay or "-", state]


def _short(cid: str) -> str:
    return cid if len(cid) <= 16 else cid[:13] + "..."


def _pod(a: Attachment) -> str:
    return f"{a.pod_namespace}/{a.pod_name}" if a.pod_name else "-"


def _netns(a: Attachment) -> str:
    if not a.netns:
        return "?"
    return a.netns + ("" if a.netns_exists else " (gone)")


def _masq(a: Attachment) -> str:
    return "-" if a.masquerade is None else ("yes" + _paren(a.masq_backend) if a.masquerade else "MISSING")


def _paren(text: str) -> str:
    return f" ({text})" if text else ""
