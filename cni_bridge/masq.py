"""IP masquerade with iptables: one nat chain per attachment, found again by name.

The chain name and rule comment derive from (network, container ID, ifname)
alone, so DEL removes the rules even when the netns and its addresses are
gone, and GC can tell which attachment every rule belongs to.
"""
from __future__ import annotations

import ipaddress
import shlex
import shutil
from typing import Iterable

from .plan import MULTICAST, MasqPlan, masq_chain_name, masq_comment_network, parse_masq_comment
from .protocol.errors import CNIError, Code
from .protocol.result import IPAddress

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


def teardown(network: str, container_id: str, ifname: str) -> None:
    """Remove the attachment's jump rules and chain in both families; absent is fine."""
    if not available():
        return
    chain = masq_chain_name(network, container_id, ifname)
    for family in (4, 6):
        if shutil.which(_TOOLS[family]) is None:
            continue
        _delete_jumps(family, chain)
        rules = _rules(family)
        if f"-N {chain}" in rules:
            tool = _tool(family)
            _run([tool, "-w", WAIT_SECONDS, "-t", "nat", "-F", chain])
            _run([tool, "-w", WAIT_SECONDS, "-t", "nat", "-X", chain])


def _rules(family: int, chain: str = "") -> list[str]:
    argv = [_tool(family), "-w", WAIT_SECONDS, "-t", "nat", "-S"] + ([chain] if chain else [])
    return _run(argv).splitlines()


def _delete_jumps(family: int, chain: str) -> None:
    tool = _tool(family)
    for line in _rules(family, "POSTROUTING"):
        args = shlex.split(line)
        if args[:2] == ["-A", "POSTROUTING"] and args[-2:] == ["-j", chain]:
            _run([tool, "-w", WAIT_SECONDS, "-t", "nat", "-D", "POSTROUTING"] + args[2:])


def missing_jumps(network: str, container_id: str, ifname: str, sources: Iterable[IPAddress]) -> list[IPAddress]:
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
            args = shlex.split(line)
            if args[:2] == ["-A", "POSTROUTING"] and args[-2:] == ["-j", chain] and "-s" in args[:-1]:
                jumped.add(ipaddress.ip_network(args[args.index("-s") + 1], strict=False))
        missing += [ip for ip in ips if ipaddress.ip_network(ip) not in jumped]
    return missing


def attachments(network: str) -> set[tuple[str, str]]:
    """(container ID, ifname) of every masquerade rule this network has installed."""
    found: set[tuple[str, str]] = set()
    if not available():
        return found
    for family in (4, 6):
        if shutil.which(_TOOLS[family]) is None:
            continue
        for line in _rules(family, "POSTROUTING"):
            owner = _owner_of(shlex.split(line))
            if owner and owner[0] == masq_comment_network(network):
                found.add((owner[1], owner[2]))
    return found


def _owner_of(args: Iterable[str]) -> tuple[str, str, str] | None:
    args = list(args)
    if "--comment" in args:
        index = args.index("--comment")
        if index + 1 < len(args):
            return parse_masq_comment(args[index + 1])
    return None
