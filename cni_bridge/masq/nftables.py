"""The nftables masquerade backend: one table, one set of pod addresses per network.

Table `inet cni_bridge` holds, per network (named by a digest of its name):

    set pods4_<id> / pods6_<id>   the pod addresses, each element commented with its
                                  attachment's key (plan.masq_chain_name), so DEL,
                                  GC and CHECK find an attachment's addresses again
    set nets4_<id> / nets6_<id>   the pod subnets (interval sets): traffic to them
                                  is left alone, as the iptables backend's ACCEPT
    chain masq_<id>               a nat postrouting base chain with one masquerade
                                  rule per IP family that matches the sets

An ADD adds one element and a DEL deletes one, so their cost does not depend on
how many pods the node holds. Those element steps go to the kernel directly as
one nf_tables netlink batch (`nfnl`, no `nft` process); when netlink fails in a
way that is not the expected "exists"/"absent", the same step runs through `nft`,
whose error message the user then sees. The table, sets and chain are made, and
everything is read (GC, CHECK, inspect), with `nft`; they are (re)made only when a
check finds them missing, because re-adding a base chain or an interval-set
element costs ~15 ms in the kernel even when nothing changes.
"""
from __future__ import annotations

import errno
import hashlib
import ipaddress
import json
import logging
import shutil
from typing import Any, Callable, Iterable, Optional, Sequence

from ..plan import MULTICAST, MasqPlan, masq_chain_name
from ..protocol.errors import CNIError, Code
from ..protocol.result import IPAddress

log = logging.getLogger(__name__)

TOOL = "nft"
TABLE = "cni_bridge"
_FAMILY = {4: ("ip", "ipv4_addr"), 6: ("ip6", "ipv6_addr")}


def _network_id(network: str) -> str:
    # nft names are short identifiers; a network name may hold anything.
    return hashlib.sha256(network.encode()).hexdigest()[:16]


def pods_set(network: str, family: int) -> str:
    return f"pods{family}_{_network_id(network)}"


def nets_set(network: str, family: int) -> str:
    return f"nets{family}_{_network_id(network)}"


def chain_name(network: str) -> str:
    return f"masq_{_network_id(network)}"


def available() -> bool:
    return shutil.which(TOOL) is not None


def missing_tools(versions: Iterable[int]) -> list[str]:
    return [] if available() else [TOOL]


class _NftFailed(CNIError):
    def __init__(self, argv: list[str], stderr: str) -> None:
        super().__init__(Code.FIREWALL_FAILED, f"{' '.join(argv[:3])} failed: {stderr.strip()}")
        self.stderr = stderr


def _nft(script: str, json_out: bool = False) -> str:
    import subprocess   # here: STATUS and ipMasq-off calls never need it

    path = shutil.which(TOOL)
    if path is None:
        raise CNIError(Code.FIREWALL_FAILED, f"ipMasqBackend nftables needs {TOOL}, which is not installed",
                       "install the nftables package, or set ipMasqBackend to iptables")
    argv = [path] + (["-j"] if json_out else []) + ["-f", "-"]
    proc = subprocess.run(argv, input=script, capture_output=True, text=True)
    if proc.returncode != 0:
        raise _NftFailed(argv, proc.stderr)
    return proc.stdout


def _absent(err: _NftFailed) -> bool:
    return "No such file or directory" in err.stderr


def _list_command(kind: str, name: str) -> dict[str, Any]:
    return {"list": {kind: {"family": "inet", "table": TABLE, "name": name}}}


def _listed(*objects: tuple[str, str]) -> Optional[list[dict[str, Any]]]:
    """What `nft -j` lists for these (kind, name) objects of our table; None if any is absent.
    (With -j, nft reads its input as JSON too: one process lists them all.)"""
    script = json.dumps({"nftables": [_list_command(kind, name) for kind, name in objects]})
    try:
        out = _nft(script, json_out=True)
    except _NftFailed as err:
        if _absent(err):
            return None
        raise
    objects: list[dict[str, Any]] = []
    for line in out.splitlines():   # one JSON document per list command
        if line.strip():
            objects += json.loads(line).get("nftables", [])
    return objects


def _elements(obj: dict[str, Any]) -> list[Any]:
    return obj.get("set", {}).get("elem", [])


def _element_value(elem: Any) -> tuple[Any, str]:
    """(value, comment) of one element as `nft -j` writes it."""
    if isinstance(elem, dict) and "elem" in elem:
        return elem["elem"].get("val"), elem["elem"].get("comment", "")
    return elem, ""


def _prefix_networks(elements: list[Any]) -> list[Any]:
    nets = []
    for elem in elements:
        value, _ = _element_value(elem)
        if isinstance(value, dict) and "prefix" in value:
            nets.append(ipaddress.ip_network(f"{value['prefix']['addr']}/{value['prefix']['len']}", strict=False))
        elif isinstance(value, dict) and "range" in value:
            low, high = (ipaddress.ip_address(v) for v in value["range"])
            nets += list(ipaddress.summarize_address_range(low, high))
        elif isinstance(value, str):
            nets.append(ipaddress.ip_network(value))
    return nets


def _comment(key: str) -> str:
    return f'comment "{key}"'


def _by_family(network: str, addresses: Iterable[Any]) -> dict[str, list[Any]]:
    """Addresses grouped by the pods set they belong in."""
    grouped: dict[str, list[Any]] = {}
    for address in addresses:
        grouped.setdefault(pods_set(network, address.version), []).append(address)
    return grouped


def _netlink(steps: Callable[[], list[Any]]) -> Optional[int]:
    """Apply element steps as one nf_tables netlink batch: 0 when applied, the errno
    of an expected refusal (EEXIST, ENOENT; nothing applied), None when netlink could
    not do it (the caller runs the same step through `nft` instead)."""
    from . import nfnl   # here: STATUS and ipMasq-off calls never need it

    try:
        nfnl.run(steps())
        return 0
    except nfnl.NetlinkError as err:
        if err.errno in (errno.EEXIST, errno.ENOENT):
            return err.errno
        log.warning("nf_tables netlink refused an element step (%s); retrying with nft", err)
    except (nfnl.Unexpected, OSError, ValueError) as err:
        log.warning("nf_tables netlink failed (%s); retrying with nft", err)
    return None


# -- ADD --------------------------------------------------------------------------------------------
def setup(plan: MasqPlan) -> None:
    """Add the attachment's addresses to its network's set (making the table first if needed)."""
    network = plan.network
    families = sorted({rule.source.version for rule in plan.rules})
    subnets = {rule.subnet for rule in plan.rules}
    if not _ready(network, families, subnets):
        _nft(_ensure_script(network, subnets))
    if _netlink_add(plan):
        return
    adds = "".join(f"add element inet {TABLE} {pods_set(network, r.source.version)} "
                   f"{{ {r.source} {_comment(plan.chain)} }}\n" for r in plan.rules)
    creates = adds.replace("add element", "create element")
    try:
        _nft(creates)
    except _NftFailed as err:
        if "File exists" not in err.stderr:
            raise
        # An element left by an earlier attachment of this address: replace it, comment and all.
        deletes = "".join(f"delete element inet {TABLE} {pods_set(network, r.source.version)} {{ {r.source} }}\n"
                          for r in plan.rules)
        _nft(adds + deletes + adds)


def _netlink_add(plan: MasqPlan) -> bool:
    """The elements added through netlink (`create`; an element left by an earlier
    attachment of the address is replaced, comment and all). False: use `nft`."""
    from . import nfnl

    sets = _by_family(plan.network, (rule.source for rule in plan.rules))
    key = plan.chain

    def add(exclusive: bool) -> list[Any]:
        return [nfnl.add_step(TABLE, name, [(ip, key) for ip in ips], exclusive) for name, ips in sets.items()]

    outcome = _netlink(lambda: add(True))
    if outcome == errno.EEXIST:
        # add (so the delete finds every element), delete, add: one transaction
        outcome = _netlink(lambda: add(False) + [nfnl.delete_step(TABLE, name, ips) for name, ips in sets.items()]
                           + add(True))
    return outcome == 0


def _ready(network: str, families: list[int], subnets: set[Any]) -> bool:
    """Whether the chain exists with its rules and the sets hold these subnets (a read:
    no kernel commit). Read through netlink; through `nft` if that fails unexpectedly."""
    from . import nfnl

    try:
        return nfnl.use(lambda sock: _ready_netlink(sock, network, families, subnets))
    except (nfnl.Unexpected, OSError) as err:   # NetlinkError is an OSError
        log.warning("nf_tables netlink read failed (%s); reading with nft", err)
    return _ready_nft(network, families, subnets)


def _ready_netlink(sock: Any, network: str, families: list[int], subnets: set[Any]) -> bool:
    from . import nfnl

    if nfnl.rule_count(sock, TABLE, chain_name(network)) < 2:
        return False
    held = []
    for family in families:
        ranges = nfnl.intervals(sock, TABLE, nets_set(network, family))
        if ranges is None:
            return False
        held += ranges
    return all(any(size == subnet.max_prefixlen // 8 and first <= int(subnet.network_address)
                   and int(subnet.broadcast_address) <= last for size, first, last in held)
               for subnet in subnets)


def _ready_nft(network: str, families: list[int], subnets: set[Any]) -> bool:
    # One list per object: nft 1.0.6 fails a JSON list of the chain and both families'
    # sets in one go ("Unknown set ... in lookup expression"), which read as "not ready".
    listed: list[dict[str, Any]] = []
    for obj in (("chain", chain_name(network)), *(("set", nets_set(network, family)) for family in families)):
        found = _listed(obj)
        if found is None:
            return False
        listed += found
    if sum(1 for obj in listed if "rule" in obj) < 2:
        return False
    held = [net for obj in listed if "set" in obj for net in _prefix_networks(_elements(obj))]
    return all(any(subnet.version == net.version and subnet.subnet_of(net) for net in held) for subnet in subnets)


def _ensure_script(network: str, subnets: set[Any]) -> str:
    """Table, sets and chain (all idempotent to add), the chain's rules rewritten, the subnets added.
    One transaction, so concurrent ADDs of a new network each leave the same state."""
    chain = chain_name(network)
    lines = [f"add table inet {TABLE}"]
    for family, (_, addr_type) in _FAMILY.items():
        lines.append(f"add set inet {TABLE} {pods_set(network, family)} {{ type {addr_type}; }}")
        lines.append(f"add set inet {TABLE} {nets_set(network, family)} "
                     f"{{ type {addr_type}; flags interval; auto-merge; }}")
    lines.append(f"add chain inet {TABLE} {chain} {{ type nat hook postrouting priority srcnat; }}")
    lines.append(f"flush chain inet {TABLE} {chain}")
    label = json.dumps(f"cni-bridge net={network}"[:120])   # a quoted nft string; names hold no quotes
    for family, (proto, _) in _FAMILY.items():
        lines.append(f"add rule inet {TABLE} {chain} {proto} saddr @{pods_set(network, family)} "
                     f"{proto} daddr != @{nets_set(network, family)} {proto} daddr != {MULTICAST[family]} "
                     f"masquerade comment {label}")
    for subnet in sorted(subnets, key=lambda n: (n.version, n)):
        lines.append(f"add element inet {TABLE} {nets_set(network, subnet.version)} {{ {subnet} }}")
    return "\n".join(lines) + "\n"


# -- DEL, GC, CHECK -----------------------------------------------------------------------------------
def _members(network: str) -> list[tuple[int, str, str]]:
    """(family, address, key) of every pod address in the network's sets."""
    if not available():
        return []
    listed = _listed(*(("set", pods_set(network, family)) for family in _FAMILY))
    if listed is None:
        # One of the two sets is missing (a half-removed table): read them one at a time.
        listed = []
        for family in _FAMILY:
            listed += _listed(("set", pods_set(network, family))) or []
    found = []
    for obj in listed:
        family = 4 if obj.get("set", {}).get("type") == "ipv4_addr" else 6
        for elem in _elements(obj):
            value, key = _element_value(elem)
            if isinstance(value, str):
                found.append((family, value, key))
    return found


def _delete(network: str, members: Sequence[tuple[int, str]]) -> None:
    if _netlink_delete(network, [ipaddress.ip_address(address) for _, address in members]) == 0:
        return
    _nft_delete(network, members)


def _netlink_delete(network: str, addresses: list[Any]) -> Optional[int]:
    from . import nfnl

    return _netlink(lambda: [nfnl.delete_step(TABLE, name, ips)
                             for name, ips in _by_family(network, addresses).items()])


def _nft_delete(network: str, members: Sequence[tuple[int, str]]) -> None:
    _nft("".join(f"delete element inet {TABLE} {pods_set(network, family)} {{ {address} }}\n"
                 for family, address in members))


def teardown(network: str, container_id: str, ifname: str, sources: Sequence[IPAddress] = ()) -> bool:
    """Remove the attachment's addresses from the sets. True if there were any.

    With the pod's addresses known (read from its interface before DEL removed it)
    this is one element delete per address; otherwise the sets are read to find the
    attachment's elements by their comment."""
    if not available():
        return False
    if sources:
        outcome = _netlink_delete(network, [ipaddress.ip_address(str(ip)) for ip in sources])
        if outcome == 0:
            return True
        if outcome is None:
            try:
                _nft_delete(network, [(ip.version, str(ip)) for ip in sources])
                return True
            except _NftFailed as err:
                if not _absent(err):
                    raise
    return remove(network, masq_chain_name(network, container_id, ifname))


def remove(network: str, key: str) -> bool:
    """Remove every element of the network's sets that carries this attachment key."""
    mine = [(family, address) for family, address, owner in _members(network) if owner == key]
    if mine:
        _delete(network, mine)
    return bool(mine)


def attachments(network: str) -> set[str]:
    """The keys (plan.masq_chain_name) of every attachment with addresses in the network's sets."""
    return {key for _, _, key in _members(network) if key}


def missing(network: str, container_id: str, ifname: str, sources: Iterable[IPAddress]) -> list[IPAddress]:
    """The pod addresses that are not in the set with this attachment's key, or whose
    network's masquerade rule is gone."""
    key = masq_chain_name(network, container_id, ifname)
    sources = list(sources)
    if not available():
        return sources
    held = {(ipaddress.ip_address(address), owner) for _, address, owner in _members(network)}
    if not masquerading(network):
        return sources
    return [ip for ip in sources if (ip, key) not in held]


def masquerading(network: str) -> bool:
    """Whether the network's chain holds its masquerade rules (one per family): without
    them the set elements masquerade nothing."""
    chain = _listed(("chain", chain_name(network)))
    return sum(1 for obj in chain or [] if "rule" in obj) >= 2
