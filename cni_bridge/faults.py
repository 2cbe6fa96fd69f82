"""Test-only fault injection: make the process SIGKILL itself at a named step.

Tests set ``CNI_BRIDGE_FAULT=<point name>``; the entry points (the only code
that reads os.environ) pass that value to `arm()` once at start. `point()` is
called between the steps of ADD and DEL; unarmed it is one comparison with
None, so production runs pay nothing measurable.

SIGKILL, not an exception: a killed plugin runs no rollback, no `finally`, no
atexit. That is the fault the store and the orchestration must survive.

`POINTS` is the registry: every name used with `point()` is listed here with
the verb that reaches it, so tests and the benchmark can iterate over all of
them (a test checks the registry against the source).

The same points are where the node daemon may stop a call cooperatively (its
time limit, a client that hung up): `set_step_check()` installs a function
called with each point's name, which may raise a CNIError. The points sit
between steps, inside ADD's rollback, so a call stopped there unwinds cleanly;
nothing is ever raised from inside a step (a signal could land between a
setns into the pod and the way back).
"""
from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from typing import Callable, Optional

ENV_VAR = "CNI_BRIDGE_FAULT"


@dataclass(frozen=True)
class Point:
    name: str
    verb: str       # the CNI verb whose run reaches this point
    where: str


POINTS: tuple[Point, ...] = (
    # cni-bridge ADD (cni_bridge/plugin.py), in order.
    Point("add.ipam-reserved", "ADD", "IPAM reserved the addresses; no kernel change yet"),
    Point("add.bridge-ready", "ADD", "the bridge exists and is up"),
    Point("add.veth-created", "ADD", "the veth pair exists, host end not yet on the bridge"),
    Point("add.veth-attached", "ADD", "the host end is a bridge port"),
    Point("add.addresses-set", "ADD", "the container interface has its addresses"),
    Point("add.routes-set", "ADD", "the container interface is up with its routes"),
    Point("add.gateway-set", "ADD", "the bridge holds the gateway address"),
    Point("add.forwarding-set", "ADD", "IP forwarding is on"),
    Point("add.masq-set", "ADD", "the masquerade chain and its jump are installed"),
    Point("add.result-ready", "ADD", "everything is made; the result is not printed yet"),
    # IPAM allocate (ipam/allocator.py), in order.
    Point("ipam.add.locked", "ADD", "the store lock is held, nothing written"),
    Point("ipam.add.owner-recorded", "ADD", "the owner index names the IPs, no IP file yet"),
    Point("ipam.add.ip-written", "ADD", "the first IP file is written, the cursor not yet"),
    Point("ipam.add.cursor-written", "ADD", "the round-robin cursor is written, lock not yet released"),
    # Inside every atomic store write (ipam/filestore.py); first reached on ADD.
    Point("ipam.store.temp-written", "ADD", "a temp file is written and fsynced, not yet renamed"),
    # cni-bridge DEL (cni_bridge/plugin.py), in order.
    Point("del.container-link-removed", "DEL", "the container interface is deleted"),
    Point("del.host-veth-removed", "DEL", "the host veth is deleted (or was gone)"),
    Point("del.ipam-released", "DEL", "IPAM released the addresses"),
    Point("del.masq-removed", "DEL", "the masquerade chain is removed"),
    # IPAM release (ipam/allocator.py), in order.
    Point("ipam.del.locked", "DEL", "the store lock is held, nothing removed"),
    Point("ipam.del.ip-removed", "DEL", "the first IP file is removed, the owner index not yet"),
    Point("ipam.del.owner-removed", "DEL", "the owner index entry is removed, lock not yet released"),
)

NAMES = frozenset(p.name for p in POINTS)

_armed: Optional[str] = None
_step_check: Optional[Callable[[str], None]] = None


def arm(name: Optional[str]) -> None:
    """Die at point `name` (None or "" disarms). Called once by an entry point."""
    global _armed
    _armed = name or None


def set_step_check(check: Optional[Callable[[str], None]]) -> None:
    """Call `check(name)` at every point from now on (None: stop). Used by the node daemon."""
    global _step_check
    _step_check = check


def point(name: str) -> None:
    if _armed is not None and name == _armed:
        os.kill(os.getpid(), signal.SIGKILL)
    if _step_check is not None:
        _step_check(name)
