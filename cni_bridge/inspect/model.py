"""The node view: plain data that the readers fill in and the renderers print.

`NodeView.to_dict()` is the `--json` output; its keys are camelCase and its
shape is versioned by SCHEMA_VERSION (add keys freely, bump it to change or
remove one).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

SCHEMA_VERSION = 1

OK, WARN, FAIL, SKIP = "ok", "warn", "fail", "skip"
VERDICTS = (OK, WARN, FAIL, SKIP)


@dataclass
class Check:
    name: str                # what was checked, e.g. "net.ipv4.ip_forward", "leak:netns-gone"
    verdict: str             # ok, warn, fail or skip
    detail: str
    subject: str = ""        # the file, network or attachment it is about


@dataclass
class Port:
    name: str
    kind: str
    mac: str
    up: bool


@dataclass
class Bridge:
    name: str
    exists: bool = False
    up: bool = False
    mtu: int = 0
    mac: str = ""
    addresses: list[str] = field(default_factory=list)
    ports: list[Port] = field(default_factory=list)


@dataclass
class Pool:
    network: str
    set_index: int           # the range set (one address per set per attachment)
    subnet: str
    range_start: str
    range_end: str
    gateway: str
    size: int
    used: int
    reclaimable: int         # held by an earlier boot: ADD takes them back when needed
    free: int

    @property
    def label(self) -> str:
        return f"{self.subnet} [{self.range_start}-{self.range_end}]"


@dataclass
class Attachment:
    container_id: str
    ifname: str
    ips: list[str]
    netns: str                          # CNI_NETNS recorded at ADD ("" when the store has none)
    netns_exists: Optional[bool]        # None: unknown (no recorded netns)
    host_veth: str
    host_veth_exists: bool
    host_veth_mac: str = ""
    mac: str = ""                       # the pod interface's, read inside the netns
    pod_name: str = ""                  # from the runtime's CNI_ARGS (libcni result cache)
    pod_namespace: str = ""
    masquerade: Optional[bool] = None   # None: ipMasq is off for this network
    masq_backend: str = ""              # the backend holding its rules: iptables, nftables ("": none)
    boot: str = "current"               # current, earlier, unknown (host-local record)


@dataclass
class Network:
    name: str
    file: str
    cni_version: str
    plugins: list[str]
    bridge: Bridge
    ipam_type: str
    data_dir: str
    is_gateway: bool
    ip_masq: bool
    masq_backend: str = ""              # the backend ADD uses (ipMasqBackend or the default); "" without ipMasq
    pools: list[Pool] = field(default_factory=list)
    attachments: list[Attachment] = field(default_factory=list)
    stray_veths: list[str] = field(default_factory=list)   # bridge ports no reservation explains


@dataclass
class ConfFileView:
    path: str
    network: str
    cni_version: str
    plugins: list[str]
    valid: bool
    error: str = ""


@dataclass
class PeerRoute:
    dst: str
    via: str
    device: str
    source: str              # "agent" for the node agent's routes


@dataclass
class VxlanDevice:
    """The node agent's VXLAN device as the kernel holds it."""
    name: str
    vni: int = 0
    port: int = 0
    local: str = ""
    mac: str = ""
    mtu: int = 0
    up: bool = False
    learning: bool = False


@dataclass
class OverlayPeer:
    """How this node reaches one peer pod CIDR: a direct route, or VXLAN with its three kernel entries."""
    pod_cidr: str            # "" for VXLAN entries no agent route uses (a peer's route went away)
    way: str                 # "route" (via the peer's InternalIP) or "vxlan"
    via: str                 # route: the InternalIP; vxlan: the VTEP address (the podCIDR's network address)
    device: str
    vtep_mac: str = ""       # vxlan: from the neighbour entry of `via`
    underlay: str = ""       # vxlan: the remote InternalIP, from the FDB entry of the MAC
    route: bool = True
    neighbour: Optional[bool] = None   # None: not needed (a direct route)
    fdb: Optional[bool] = None
    complete: bool = True


@dataclass
class Overlay:
    device: Optional[VxlanDevice] = None      # None: no VXLAN device (the routes backend, or no agent)
    peers: list[OverlayPeer] = field(default_factory=list)


@dataclass
class Daemon:
    socket: str
    exists: bool = False
    reachable: bool = False
    pid: int = 0
    workers: int = 0
    worker_pids: list[int] = field(default_factory=list)
    uptime_seconds: float = 0.0
    metrics_address: str = ""
    error: str = ""


@dataclass
class NodeView:
    hostname: str
    conf_dir: str
    bin_dir: str
    files: list[ConfFileView] = field(default_factory=list)
    networks: list[Network] = field(default_factory=list)
    uplink: str = ""                                        # the default route's device
    peers: list[PeerRoute] = field(default_factory=list)
    overlay: Overlay = field(default_factory=Overlay)
    cluster_masquerade: list[str] = field(default_factory=list)   # families with the agent's chain
    daemon: Optional[Daemon] = None
    checks: list[Check] = field(default_factory=list)

    def verdicts(self) -> dict[str, int]:
        counts = {v: 0 for v in VERDICTS}
        for check in self.checks:
            counts[check.verdict] += 1
        return counts

    def to_dict(self) -> dict[str, Any]:
        body = _camel(dataclasses.asdict(self))
        body["summary"] = self.verdicts()
        return {"schemaVersion": SCHEMA_VERSION, **body}


def _camel(value: Any) -> Any:
    if isinstance(value, dict):
        return {_camel_key(k): _camel(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_camel(v) for v in value]
    return value


def _camel_key(key: str) -> str:
    head, *rest = key.split("_")
    return head + "".join(_ACRONYMS.get(part, part.capitalize()) for part in rest)


_ACRONYMS = {"id": "ID", "cidr": "CIDR"}
