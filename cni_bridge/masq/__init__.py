"""IP masquerade behind one interface; the backends (one module each) write the rules.

The plugin hands over a MasqPlan (which carries the network's `ipMasqBackend`)
or an attachment's identity, and never knows which rules exist. The configured
backend is tried first; when it holds nothing for an attachment, the other one is
asked too, so DEL, GC and CHECK handle attachments that another backend made (an
upgrade from iptables chains, or a network whose backend was switched).

Default (no `ipMasqBackend`): iptables, as the reference `bridge` plugin, unless
only `nft` is installed. nftables keeps ADD and DEL cost flat with the pods on
the node; docs/performance.md has the figures.
"""
from __future__ import annotations

import shutil
from typing import Iterable, Optional, Sequence

from ..plan import MasqPlan
from ..protocol.result import IPAddress
from . import iptables, nftables

BACKENDS = {"iptables": iptables, "nftables": nftables}


def backend_name(configured: Optional[str]) -> str:
    """The backend for a network's `ipMasqBackend` (None: the default)."""
    if configured:
        return configured
    if shutil.which("iptables") is None and nftables.available():
        return "nftables"
    return "iptables"


def _ordered(configured: Optional[str]) -> list:
    first = backend_name(configured)
    return [BACKENDS[first]] + [module for name, module in BACKENDS.items() if name != first]


def available() -> bool:
    return any(module.available() for module in BACKENDS.values())


def missing_tools(versions: Iterable[int], backend: Optional[str] = None) -> list[str]:
    """The programs the network's backend needs for these IP versions that are not installed."""
    return BACKENDS[backend_name(backend)].missing_tools(versions)


def setup(plan: MasqPlan) -> None:
    BACKENDS[backend_name(plan.backend)].setup(plan)


def teardown(network: str, container_id: str, ifname: str, backend: Optional[str] = None,
             sources: Sequence[IPAddress] = ()) -> None:
    """Remove the attachment's rules, whichever backend made them; absent is fine.

    The pod's addresses (when known) go to the configured backend only: it removes
    them directly. Another backend finds the attachment's rules by its key, so an
    attachment it does not hold costs a read, not a failed delete."""
    for position, module in enumerate(_ordered(backend)):
        if module.available() and module.teardown(network, container_id, ifname, sources if position == 0 else ()):
            return


def attachments(network: str) -> set[str]:
    """Keys (plan.masq_chain_name) of every attachment with rules of this network, in any backend."""
    found: set[str] = set()
    for keys in attachments_by_backend(network).values():
        found |= keys
    return found


def attachments_by_backend(network: str) -> dict[str, set[str]]:
    """`attachments`, per backend name: which backend holds each attachment's rules (inspect shows it)."""
    return {name: module.attachments(network) for name, module in BACKENDS.items()}


def remove(network: str, key: str) -> None:
    """Remove one attachment's rules (by its key, as `attachments` names it) from every backend."""
    for module in BACKENDS.values():
        module.remove(network, key)


def missing_jumps(network: str, container_id: str, ifname: str, sources: Iterable[IPAddress],
                  backend: Optional[str] = None) -> list[IPAddress]:
    """The pod addresses that no backend masquerades for this attachment."""
    missing = list(sources)
    for module in _ordered(backend):
        if not missing:
            break
        if module.available():
            missing = module.missing(network, container_id, ifname, missing)
    return missing
