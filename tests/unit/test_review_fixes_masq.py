"""masq's reading of `iptables -S` output, without iptables: GC and CHECK over odd lines."""
from __future__ import annotations

import ipaddress

import pytest

from cni_bridge.masq import iptables as masq
from cni_bridge.plan import masq_chain_name, masq_comment


@pytest.fixture
def nat(monkeypatch):
    """`iptables -S` output per family, as the test sets it."""
    tables: dict[int, list[str]] = {4: [], 6: []}
    monkeypatch.setattr(masq.shutil, "which", lambda name: f"/usr/sbin/{name}")
    monkeypatch.setattr(masq, "_rules", lambda family, chain="": [
        line for line in tables[family] if not chain or line.split()[1:2] in (["POSTROUTING"], [chain])])
    return tables


def test_gc_and_check_skip_lines_they_cannot_split(nat):
    chain = masq_chain_name("pods", "c1", "eth0")
    comment = masq_comment("pods", "c1", "eth0")
    nat[4] = [
        "-P POSTROUTING ACCEPT",
        '-A POSTROUTING -m comment --comment "unbalanced quote -j MASQUERADE',
        f'-A POSTROUTING -s 10.22.0.2/32 -m comment --comment "{comment}" -j {chain}',
        f'-A {chain} ! -d 224.0.0.0/4 -m comment --comment "{comment}" -j MASQUERADE',
    ]
    assert masq.attachments("pods") == {chain}
    assert masq.missing("pods", "c1", "eth0", [ipaddress.ip_address("10.22.0.2")]) == []
