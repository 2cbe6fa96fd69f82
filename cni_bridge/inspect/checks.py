"""Checks with a verdict per line, over what `gather` read.

The checks that exist elsewhere are called, not rewritten: ADD's config
validation (`conflist.validate_for_add`), STATUS's tool check
(`masq.missing_tools`), `cni-ipam check`'s leak findings (`find_problems`),
GC's masquerade owners (`masq.attachments`). New here: forwarding and
br_netfilter sysctls, plugins in the bin dir, veths no reservation explains,
the pools running out, the bridge and the daemon, the overlay peers' kernel entries.
"""
from __future__ import annotations

import os
from typing import Iterable

from .. import conflist, masq
from ..sysctl import _FORWARDING as FORWARDING_SYSCTLS
from . import overlay
from .gather import NetworkFacts, Reading
from .model import FAIL, OK, SKIP, WARN, Check, Network, Overlay

# cni-ipam check's findings that cost nothing now (ADD reclaims, the next call indexes, GC sweeps).
HARMLESS_FINDINGS = {"earlier-boot", "not-indexed", "temp-file"}
POOL_LOW = 0.1        # warn when less than this share of a range set is free
BR_NETFILTER = {4: "/proc/sys/net/bridge/bridge-nf-call-iptables", 6: "/proc/sys/net/bridge/bridge-nf-call-ip6tables"}


def evaluate(reading: Reading) -> list[Check]:
    checks: list[Check] = []
    routed = [(n, f) for n, f in reading.facts if n.is_gateway or n.ip_masq]
    checks += forwarding(_families(routed))
    checks += br_netfilter(_families(routed))
    checks += tools([(n, f) for n, f in reading.facts if n.ip_masq])
    checks += conf_files(reading)
    checks += plugins_present(reading)
    for network, facts in reading.facts:
        checks += network_checks(network, facts)
    checks += overlay_checks(reading.view.overlay)
    checks += daemon(reading)
    return checks


def _families(networks: Iterable[tuple[Network, NetworkFacts]]) -> set[int]:
    return {v for _, f in networks for v in (f.ip_versions or {4})}


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def forwarding(families: set[int]) -> list[Check]:
    checks = []
    for family in (4, 6):
        path = FORWARDING_SYSCTLS[family]
        name = path[len("/proc/sys/"):].replace("/", ".")
        value = _read(path)
        if family not in families:
            checks.append(Check(name, SKIP, f"= {value}; no gateway or ipMasq network uses IPv{family}"))
        elif value == "1":
            checks.append(Check(name, OK, "= 1"))
        else:
            checks.append(Check(name, FAIL, f"= {value}: pods get no traffic through the host "
                                            "(cni-bridge sets it at the next ADD; something turned it off)"))
    return checks


def br_netfilter(families: set[int]) -> list[Check]:
    checks = []
    for family in sorted(families):
        path = BR_NETFILTER[family]
        name = path[len("/proc/sys/"):].replace("/", ".")
        value = _read(path)
        if value is None:
            checks.append(Check(name, WARN, "br_netfilter is not loaded: traffic between pods of one bridge "
                                            "skips iptables, so kube-proxy's Service rules miss it "
                                            "(modprobe br_netfilter)"))
        elif value != "1":
            checks.append(Check(name, WARN, f"= {value}: bridged pod traffic skips iptables "
                                            "(kube-proxy's Service rules miss it)"))
        else:
            checks.append(Check(name, OK, "= 1"))
    return checks


def tools(masq_networks: list[tuple[Network, NetworkFacts]]) -> list[Check]:
    """STATUS's check, once per backend the networks use (their `ipMasqBackend`)."""
    if not masq_networks:
        return [Check("masquerade tools", SKIP, "no network sets ipMasq")]
    by_backend: dict[str, list[tuple[Network, NetworkFacts]]] = {}
    for network, facts in masq_networks:
        by_backend.setdefault(network.masq_backend, []).append((network, facts))
    checks = []
    for backend, networks in sorted(by_backend.items()):
        missing = masq.missing_tools(_families(networks), backend or None)
        names = ", ".join(n.name for n, _ in networks)
        if missing:
            checks.append(Check("masquerade tools", FAIL, f"{', '.join(missing)} missing (backend: {backend}): "
                                                          "ADD fails with 106 and STATUS answers 50", names))
        else:
            checks.append(Check("masquerade tools", OK, f"{backend} tools present (backend: {backend})", names))
    return checks


def conf_files(reading: Reading) -> list[Check]:
    files = reading.view.files
    if not files:
        return [Check("conflist", FAIL, f"no network config in {reading.options.conf_dir}: "
                                        "the runtime cannot attach pods")]
    return [Check("conflist", OK if f.valid else FAIL,
                  f"network {f.network}: {', '.join(f.plugins)}" if f.valid else f.error, f.path)
            for f in files]


def plugins_present(reading: Reading) -> list[Check]:
    checks = []
    bin_dir = reading.options.bin_dir
    for conf_file in reading.files:
        seen = set()
        for plugin in conf_file.plugins:
            for name in conflist.executables(plugin):
                if name in seen:
                    continue
                seen.add(name)
                path = os.path.join(bin_dir, name)
                present = os.path.isfile(path) and os.access(path, os.X_OK)
                checks.append(Check("plugin in bin dir", OK if present else FAIL,
                                    f"{path}" if present else f"{path} is missing: the runtime fails every "
                                                              f"pod of this network", conf_file.path))
    return checks


def network_checks(network: Network, facts: NetworkFacts) -> list[Check]:
    subject = network.name
    checks = []
    bridge = network.bridge
    if not bridge.exists:
        checks.append(Check("bridge", FAIL if network.attachments else OK,
                            f"{bridge.name} does not exist" + ("" if network.attachments else
                                                               " yet (the first ADD makes it)"), subject))
    else:
        checks.append(Check("bridge", OK if bridge.up else FAIL,
                            f"{bridge.name} {'up' if bridge.up else 'DOWN'}, {len(bridge.ports)} ports", subject))
    checks += pool_checks(network)
    if facts.store_error:
        verdict = SKIP if network.ipam_type and network.ipam_type not in ("cni-ipam", "host-local") else FAIL
        checks.append(Check("ipam store", verdict, facts.store_error, subject))
    leaks = [_finding_check(network, f) for f in facts.findings]
    leaks += [Check("leak:masq-rule", FAIL, f"{_masq_rules(facts.masq_orphan_backends.get(key, ''), key)} "
                                             "belong to no attachment that holds a reservation (GC removes them)",
                    f"{subject} {key}")
              for key in facts.masq_orphans]
    leaks += [Check("leak:stray-veth", FAIL, f"host veth on {bridge.name} that no reservation names "
                                             "(a DEL that never came, or made by hand)", f"{subject} {name}")
              for name in network.stray_veths]
    if facts.nft_rules_missing:
        checks.append(Check("masquerade rule", FAIL, "the nftables chain of this network lacks its masquerade "
                                                     "rules: its pods' traffic leaves unmasqueraded (the next ADD "
                                                     "writes them again)", subject))
    if facts.masq_error:
        leaks.append(Check("leak:masq-rule", FAIL, f"cannot read the masquerade rules: {facts.masq_error}", subject))
    if not leaks and not facts.store_error:
        leaks.append(Check("leaks", OK, f"{len(network.attachments)} attachments, none leaked", subject))
    return checks + leaks


def _masq_rules(backend: str, key: str) -> str:
    if backend == "nftables":
        return f"nftables set elements commented {key}"
    return f"the iptables masquerade chain {key} and its jump"


def _finding_check(network: Network, finding) -> Check:
    verdict = WARN if finding.kind in HARMLESS_FINDINGS else FAIL
    who = f"{finding.container_id}/{finding.ifname}" if finding.container_id else ""
    subject = " ".join(part for part in (network.name, finding.ip, who) if part)
    return Check(f"leak:{finding.kind}", verdict, finding.detail, subject)


def pool_checks(network: Network) -> list[Check]:
    checks = []
    sets: dict[int, list] = {}
    for pool in network.pools:
        sets.setdefault(pool.set_index, []).append(pool)
    for pools in sets.values():
        size, free = sum(p.size for p in pools), sum(p.free for p in pools)
        label = ", ".join(p.subnet for p in pools)
        detail = f"{label}: {size - free} used, {free} free of {size}"
        if free <= 0:
            checks.append(Check("ipam pool", FAIL, detail + ": ADD fails with 100", network.name))
        elif free < POOL_LOW * size:
            checks.append(Check("ipam pool", WARN, detail + ": running out", network.name))
        else:
            checks.append(Check("ipam pool", OK, detail, network.name))
    return checks


def overlay_checks(view: Overlay) -> list[Check]:
    """One line per peer pod CIDR: a VXLAN peer needs its route, neighbour and FDB entry.

    A missing part warns: the agent writes it again at its next pass; until then the
    peer's pods are unreachable from here."""
    checks = []
    device = view.device
    if device is not None:
        detail = f"VNI {device.vni}, UDP {device.port}, local {device.local or '-'}, mtu {device.mtu}"
        if not device.up:
            checks.append(Check("vxlan device", WARN if view.peers else OK, f"{detail}, DOWN", device.name))
        elif device.learning:
            checks.append(Check("vxlan device", WARN, f"{detail}: learning is on (the agent makes it without)",
                                device.name))
        else:
            checks.append(Check("vxlan device", OK, f"{detail}, up", device.name))
    for peer in view.peers:
        subject = peer.pod_cidr or f"{peer.via or peer.vtep_mac} (no route)"
        how = f"via {peer.via}" if peer.way == overlay.ROUTE else \
            f"VXLAN to {peer.underlay or '?'} (VTEP {peer.vtep_mac or '?'})"
        if peer.complete:
            checks.append(Check("overlay peer", OK, f"{how}: complete", subject))
        else:
            lacking = ", no ".join(overlay.missing_parts(peer))
            checks.append(Check("overlay peer", WARN, f"{how}: incomplete, no {lacking}: its pods are unreachable "
                                                      "until the agent's next pass", subject))
    return checks


def daemon(reading: Reading) -> list[Check]:
    view = reading.view.daemon
    if view is None or not view.exists:
        socket = view.socket if view else ""
        return [Check("daemon", SKIP, f"no socket at {socket}: calls run in-process", socket)]
    if view.reachable:
        return [Check("daemon", OK, f"pid {view.pid}, {view.workers} workers", view.socket)]
    return [Check("daemon", WARN, f"{view.error}: every call runs in-process (slower, still working)",
                  view.socket)]
