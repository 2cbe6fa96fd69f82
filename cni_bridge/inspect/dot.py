"""The node as a Graphviz graph: uplink, VXLAN device and peers, each bridge with its veths and pods.

A peer reached by a route hangs off the uplink (dashed edge, "route"); one behind
VXLAN hangs off the VXLAN device (bold edge, "tunnel", its underlay address).

Leaked or broken parts are drawn red, so a picture shows them too.
"""
from __future__ import annotations

from typing import TextIO

from . import overlay
from .model import Network, NodeView, OverlayPeer

BAD = 'color="#c0392b", fontcolor="#c0392b"'


def _q(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render(view: NodeView, out: TextIO) -> None:
    out.write(f"digraph {_q('node ' + view.hostname)} {{\n")
    out.write('  graph [rankdir=LR, fontname="Helvetica", fontsize=11, label=' + _q(f"node {view.hostname}")
              + ', labelloc=t];\n')
    out.write('  node [fontname="Helvetica", fontsize=10, shape=box, style=rounded];\n')
    out.write('  edge [arrowhead=none, fontname="Helvetica", fontsize=9];\n')
    uplink = "uplink"
    out.write(f"  {uplink} [label={_q('uplink ' + (view.uplink or '(no default route)'))}, shape=cds];\n")
    tunnel = _vxlan(view, uplink, out)
    for index, peer in enumerate(view.overlay.peers):
        _peer(f"peer{index}", peer, uplink, tunnel, out)
    for index, network in enumerate(view.networks):
        _network(index, network, uplink, out)
    out.write("}\n")


def _vxlan(view: NodeView, uplink: str, out: TextIO) -> str:
    """The VXLAN device, over the uplink; its node name ("" when there is none)."""
    device = view.overlay.device
    if device is None:
        return ""
    label = f"vxlan {device.name}\nVNI {device.vni}, UDP {device.port}\nlocal {device.local}"
    out.write(f"  vxlan [label={_q(label)}, shape=hexagon{'' if device.up else ', ' + BAD}];\n")
    out.write(f"  {uplink} -> vxlan [style=dotted];\n")
    return "vxlan"


def _peer(name: str, peer: OverlayPeer, uplink: str, tunnel: str, out: TextIO) -> None:
    lines = [peer.pod_cidr or "(no route)"]
    if peer.way == overlay.ROUTE:
        lines.append(f"via {peer.via}")
    else:
        lines += [f"VTEP {peer.vtep_mac or '?'}", f"underlay {peer.underlay or '?'}"]
    if not peer.complete:
        lines.append("no " + ", no ".join(overlay.missing_parts(peer)))
    out.write(f"  {name} [label={_q(chr(10).join(lines))}, shape=ellipse{'' if peer.complete else ', ' + BAD}];\n")
    if peer.way == overlay.VXLAN and tunnel:
        out.write(f"  {tunnel} -> {name} [style=bold, label=\"tunnel\"];\n")
    else:
        out.write(f"  {uplink} -> {name} [style=dashed, label=\"route\"];\n")


def _network(index: int, network: Network, uplink: str, out: TextIO) -> None:
    b = network.bridge
    bridge = f"br{index}"
    out.write(f"  subgraph cluster_{index} {{\n    label={_q('network ' + network.name)};\n"
              "    style=dashed; color=grey;\n")
    addresses = [a for a in b.addresses if not a.startswith("fe80:")]
    label = "\n".join([f"bridge {b.name}" + ("" if b.exists else " (missing)")] + addresses
                      + [f"{p.subnet}: {p.used} used, {p.free} free" for p in network.pools])
    attrs = "shape=box3d" + ("" if b.exists and b.up else ", " + BAD)
    out.write(f"    {bridge} [label={_q(label)}, {attrs}];\n")
    for n, a in enumerate(network.attachments):
        veth, pod = f"v{index}_{n}", f"p{index}_{n}"
        veth_attrs = "shape=cds" + ("" if a.host_veth_exists else ", style=dashed, " + BAD)
        out.write(f"    {veth} [label={_q(a.host_veth + ('' if a.host_veth_exists else chr(10) + 'missing'))}, "
                  f"{veth_attrs}];\n")
        title = f"{a.pod_namespace}/{a.pod_name}" if a.pod_name else a.container_id[:16]
        lines = [title, f"{a.ifname} {a.mac}".strip()] + a.ips
        gone = a.netns_exists is False
        if gone:
            lines.append("netns gone: leaked")
        pod_attrs = "shape=component" + (", " + BAD if gone else "")
        out.write(f"    {pod} [label={_q(chr(10).join(lines))}, {pod_attrs}];\n")
        out.write(f"    {bridge} -> {veth};\n    {veth} -> {pod};\n")
    for n, name in enumerate(network.stray_veths):
        out.write(f"    s{index}_{n} [label={_q(name + chr(10) + 'no reservation')}, shape=cds, {BAD}];\n")
        out.write(f"    {bridge} -> s{index}_{n};\n")
    out.write("  }\n")
    how = ("routed" if network.is_gateway else "L2 only") + \
        (f", masquerade ({network.masq_backend})" if network.ip_masq else "")
    out.write(f"  {uplink} -> {bridge} [label={_q(how)}];\n")
