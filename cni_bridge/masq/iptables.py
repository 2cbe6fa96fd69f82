"""The iptables masquerade backend: one nat chain per attachment, found again by name.

The chain name and rule comment derive from (network, container ID, ifname)
alone, so DEL removes the rules even when the netns and its addresses are
gone. The chain name (a digest of all three) identifies the attachment; the
comment says which network the rules belong to, so GC can tell them apart.
"""
from __future__ import annotations

import ipaddress
import shlex
import shutil
from typing import Iterable, Sequence

from ..plan import (COMMENT_PREFIX, MASQ_CHAIN_PREFIX, MULTICAST, MasqPlan, masq_chain_name, masq_comment_network,
                   masq_comment_owner)
from ..protocol.errors import CNIError, Code
from ..protocol.result import IPAddress

_TOOLS = {4: "iptables", 6: "ip6tables"}
WAIT_SECONDS = "10"


def _tool(family: int, suffix: str = "") -> str:
    name = _TOOLS[family] + suffix
    path = shutil.which(name)
    if path is None:
        raise CNIError(Code.FIREWALL_FAILED, f"ipMasq needs {name}, which is not installed",
                       "install the iptables package or set ipMasq to false")
    return path


def _run(argv: list[str], stdin: str = "") -> str:
    import subprocess   # here: STATUS and ipMasq-off calls never need it

    proc = subprocess.run(argv, input=stdin, capture_output=True, text=True)
    if proc.returncode != 0:
        raise CNIError(Code.FIREWALL_FAILED, f"{' '.join(argv[:3])} failed: {proc.stderr.strip()}")
    return proc.stdout


def available() -> bool:
    return shutil.which(_TOOLS[4]) is not None


def missing_tools(versions: Iterable[int]) -> list[str]:
    """The iptables programs ipMasq needs for these IP versions that are not installed."""
    return [name for version in sorted(set(versions)) for name in (_TOOLS[version], _TOOLS[version] + "-restore")
            if shutil.which(name) is None]


def setup(plan: MasqPlan) -> None:
    """Install the attachment's chain and its POSTROUTING jump (replacing any earlier copy)."""
    families = sorted({rule.source.version for rule in plan.rules})
    for family in families:
        _delete_jumps(family, plan.chain)
        lines = ["*nat", f":{plan.chain} - [0:0]"]
        # iptables-restore understands double quotes only; the comment holds none.
        comment = '"' + plan.comment.replace('"', "?").replace("\\", "?") + '"'
        for rule in plan.rules:
            if rule.source.version != family:
                continue
            lines.append(f"-A {plan.chain} -d {rule.subnet} -m comment --comment {comment} -j ACCEPT")
        lines.append(f"-A {plan.chain} ! -d {MULTICAST[family]} -m comment --comment {comment} -j MASQUERADE")
        host = 32 if family == 4 else 128
        for rule in plan.rules:
            if rule.source.version == family:
                lines.append(f"-A POSTROUTING -s {rule.source}/{host} -m comment --comment {comment} -j {plan.chain}")
        lines.append("COMMIT")
        _run([_tool(family, "-restore"), "-w", WAIT_SECONDS, "--noflush"], "\n".join(lines) + "\n")


def teardown(network: str, container_id: str, ifname: str, sources: Sequence[IPAddress] = ()) -> bool:
    """Remove the attachment's jump rules and chain in both families; absent is fine.
    True if there was something to remove."""
    return remove(network, masq_chain_name(network, container_id, ifname))


def remove(network: str, chain: str) -> bool:
    """Remove one attachment's chain (as `attachments` names it) and its jumps; absent is fine."""
    found = False
    if not available():
        return found
    for family in (4, 6):
        if shutil.which(_TOOLS[family]) is None:
            continue
        found = _delete_jumps(family, chain) or found
        rules = _rules(family)
        if f"-N {chain}" in rules:
            found = True
            tool = _tool(family)
            _run([tool, "-w", WAIT_SECONDS, "-t", "nat", "-F", chain])
            _run([tool, "-w", WAIT_SECONDS, "-t", "nat", "-X", chain])
    return found


def _rules(family: int, chain: str = "") -> list[str]:
    argv = [_tool(family), "-w", WAIT_SECONDS, "-t", "nat", "-S"] + ([chain] if chain else [])
    return _run(argv).splitlines()


def _split(line: str) -> list[str]:
    """An `iptables -S` line as argv; [] for one that does not split (another program's
    rule must not make GC or CHECK fail)."""
    try:
        return shlex.split(line)
    except ValueError:
        return []


def _delete_jumps(family: int, chain: str) -> bool:
    tool = _tool(family)
    found = False
    for line in _rules(family, "POSTROUTING"):
        args = _split(line)
        if args[:2] == ["-A", "POSTROUTING"] and args[-2:] == ["-j", chain]:
            _run([tool, "-w", WAIT_SECONDS, "-t", "nat", "-D", "POSTROUTING"] + args[2:])
            found = True
    return found


def missing(network: str, container_id: str, ifname: str, sources: Iterable[IPAddress]) -> list[IPAddress]:
    """The pod addresses whose POSTROUTING jump into the attachment's chain is gone.

    Each IP family's table is read on its own: a dual-stack attachment whose IPv4
    jump was deleted still has its IPv6 one, and that must not hide the loss.
    """
    chain = masq_chain_name(network, container_id, ifname)
    by_family: dict[int, list[IPAddress]] = {}
    for ip in sources:
        by_family.setdefault(ip.version, []).append(ip)
    missing = []
    for family, ips in sorted(by_family.items()):
        jumped = set()
        for line in _rules(family, "POSTROUTING"):
            args = _split(line)
            if args[:2] == ["-A", "POSTROUTING"] and args[-2:] == ["-j", chain] and "-s" in args[:-1]:
                jumped.add(ipaddress.ip_network(args[args.index("-s") + 1], strict=False))
        missing += [ip for ip in ips if ipaddress.ip_network(ip) not in jumped]
    return missing


def attachments(network: str) -> set[str]:
    """The chains of every attachment this network has masquerade rules for.

    Each is `plan.masq_chain_name(network, container ID, ifname)`, so GC compares them
    with its live attachments' chains: that holds whatever the comment says, also for
    rules of an earlier release whose comment iptables cut short. A chain whose jump
    is already gone (a teardown that died half way) is found by its own rules.
    """
    found: set[str] = set()
    if not available():
        return found
    owner = masq_comment_network(network)
    for family in (4, 6):
        if shutil.which(_TOOLS[family]) is None:
            continue
        for line in _rules(family):
            if f"{COMMENT_PREFIX} net=" not in line:   # the whole table: split only our lines
                continue
            args = _split(line)
            if args[:1] != ["-A"] or "--comment" not in args[:-1]:
                continue
            if masq_comment_owner(args[args.index("--comment") + 1]) != owner:
                continue
            chain = args[1] if args[1] != "POSTROUTING" else args[-1]
            if chain.startswith(MASQ_CHAIN_PREFIX):
                found.add(chain)
    return found
