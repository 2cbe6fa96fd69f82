"""The masquerade interface picks a backend and falls back to the other one for attachments
it does not hold (upgrades, switched networks). Backends replaced by recorders, no root."""
from __future__ import annotations

import ipaddress

import pytest

from cni_bridge import masq
from cni_bridge.masq import nftables


class Recorder:
    def __init__(self, name: str, holds: set[str] = frozenset(), present: bool = True) -> None:
        self.name, self.holds, self.present = name, set(holds), present
        self.calls: list[tuple] = []

    def available(self) -> bool:
        return self.present

    def missing_tools(self, versions):
        return [] if self.present else [self.name]

    def setup(self, plan):
        self.calls.append(("setup", plan))

    def teardown(self, network, cid, ifname, sources):
        self.calls.append(("teardown", cid, tuple(sources)))
        found = cid in self.holds
        self.holds.discard(cid)
        return found

    def attachments(self, network):
        return set(self.holds)

    def remove(self, network, key):
        self.calls.append(("remove", key))

    def missing(self, network, cid, ifname, sources):
        return [] if cid in self.holds else list(sources)


@pytest.fixture
def backends(monkeypatch):
    found = {"iptables": Recorder("iptables"), "nftables": Recorder("nft")}
    monkeypatch.setattr(masq, "BACKENDS", found)
    monkeypatch.setattr(masq.nftables, "available", lambda: found["nftables"].present)
    monkeypatch.setattr(masq.shutil, "which", lambda name: "/usr/sbin/iptables" if found["iptables"].present else None)
    return found


POD = (ipaddress.ip_address("10.1.0.5"),)


def test_default_is_iptables_unless_only_nft_is_installed(backends):
    assert masq.backend_name(None) == "iptables"
    backends["iptables"].present = False
    assert masq.backend_name(None) == "nftables"
    backends["nftables"].present = False
    assert masq.backend_name(None) == "iptables"      # neither: STATUS and ADD name iptables as missing
    assert masq.backend_name("nftables") == "nftables"


def test_teardown_stops_at_the_configured_backend_when_it_held_the_attachment(backends):
    backends["nftables"].holds = {"c1"}
    masq.teardown("net", "c1", "eth0", "nftables", POD)
    assert backends["nftables"].calls == [("teardown", "c1", POD)]
    assert backends["iptables"].calls == []


def test_teardown_asks_the_other_backend_by_key_only(backends):
    """An attachment made before an upgrade: the configured backend gets the addresses and
    finds nothing; the other is asked without them (it finds rules by the attachment's key)."""
    backends["iptables"].holds = {"c1"}
    masq.teardown("net", "c1", "eth0", "nftables", POD)
    assert backends["nftables"].calls == [("teardown", "c1", POD)]
    assert backends["iptables"].calls == [("teardown", "c1", ())]


def test_teardown_skips_a_backend_whose_tool_is_missing(backends):
    backends["iptables"].present = False
    masq.teardown("net", "c1", "eth0", "nftables", POD)
    assert backends["iptables"].calls == []


def test_attachments_and_remove_cover_both_backends(backends):
    backends["iptables"].holds = {"old"}
    backends["nftables"].holds = {"new"}
    assert masq.attachments("net") == {"old", "new"}
    masq.remove("net", "old")
    assert backends["iptables"].calls == [("remove", "old")] and backends["nftables"].calls == [("remove", "old")]


def test_missing_jumps_is_what_no_backend_masquerades(backends):
    backends["iptables"].holds = {"old"}
    assert masq.missing_jumps("net", "old", "eth0", POD, "nftables") == []
    assert masq.missing_jumps("net", "gone", "eth0", POD, "nftables") == list(POD)


def test_missing_tools_are_the_configured_backends(backends):
    backends["nftables"].present = False
    assert masq.missing_tools({4}, "nftables") == ["nft"]
    assert masq.missing_tools({4}, "iptables") == []


def test_nft_json_elements_are_read_back():
    """`nft -j` writes commented elements as objects, plain ones as strings, and merged
    interval elements as prefixes or ranges."""
    assert nftables._element_value({"elem": {"val": "10.1.0.5", "comment": "CBR-x"}}) == ("10.1.0.5", "CBR-x")
    assert nftables._element_value("10.1.0.6") == ("10.1.0.6", "")
    nets = nftables._prefix_networks([{"prefix": {"addr": "10.1.0.0", "len": 21}},
                                      {"range": ["10.2.0.0", "10.2.1.255"]}])
    assert nets == [ipaddress.ip_network("10.1.0.0/21"), ipaddress.ip_network("10.2.0.0/23")]
