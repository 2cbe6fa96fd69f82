"""IPAMConf: ranges, legacy subnet, validation, host-local defaults, requested IPs."""
from __future__ import annotations

import ipaddress

import pytest

from cni_bridge.confbase import load
from cni_bridge.protocol.errors import CNIError
from ipam.config import IPAMNetConf

ip = ipaddress.ip_address


def netconf(ipam: dict, **extra) -> IPAMNetConf:
    return load(IPAMNetConf, {"cniVersion": "1.0.0", "name": "pods", "type": "cni-bridge",
                              "ipam": {"type": "cni-ipam", **ipam}, **extra})


def bad(ipam: dict, *fragments: str) -> CNIError:
    with pytest.raises(CNIError) as info:
        netconf(ipam)
    assert info.value.code == 7
    for fragment in fragments:
        assert fragment in info.value.details
    return info.value


def test_ranges_form_and_data_dir_default():
    c = netconf({"ranges": [[{"subnet": "10.22.0.0/16"}], [{"subnet": "fd00:22::/64"}]]})
    sets = c.ipam.range_sets
    assert [[r.subnet for r in s] for s in sets] == [["10.22.0.0/16"], ["fd00:22::/64"]]
    assert c.ipam.data_dir == "/var/lib/cni/networks"


def test_legacy_subnet_becomes_one_range_set():
    c = netconf({"subnet": "10.1.0.0/24", "rangeStart": "10.1.0.10", "rangeEnd": "10.1.0.20",
                 "gateway": "10.1.0.254"})
    (only,), = c.ipam.range_sets
    assert (only.start, only.end, only.gateway_ip) == (ip("10.1.0.10"), ip("10.1.0.20"), ip("10.1.0.254"))


def test_subnet_and_ranges_together_rejected():
    bad({"subnet": "10.1.0.0/24", "ranges": [[{"subnet": "10.2.0.0/24"}]]}, "subnet", "ranges")


def test_no_ranges_rejected():
    bad({}, "no address ranges")
    bad({"ranges": [[]]}, "empty range set")


@pytest.mark.parametrize("subnet", ["10.1.0.1/24", "fd00::1/64"])
def test_host_bits_set_rejected(subnet):
    bad({"ranges": [[{"subnet": subnet}]]}, subnet)


@pytest.mark.parametrize("subnet", ["10.1.0.0/31", "10.1.0.1/32", "fd00::/127", "fd00::1/128"])
def test_too_small_subnets_rejected(subnet):
    bad({"ranges": [[{"subnet": subnet}]]}, "too small")


def test_slash_30_is_the_smallest_ipv4_subnet():
    (r,), = netconf({"ranges": [[{"subnet": "10.1.0.0/30"}]]}).ipam.range_sets
    assert (r.start, r.end, r.gateway_ip) == (ip("10.1.0.1"), ip("10.1.0.2"), ip("10.1.0.1"))


@pytest.mark.parametrize("key", ["rangeStart", "rangeEnd", "gateway"])
def test_addresses_outside_the_subnet_rejected(key):
    bad({"ranges": [[{"subnet": "10.1.0.0/24", key: "10.2.0.5"}]]}, key, "outside subnet")


@pytest.mark.parametrize("key", ["rangeStart", "rangeEnd", "gateway"])
def test_non_addresses_rejected(key):
    bad({"ranges": [[{"subnet": "10.1.0.0/24", key: "ten"}]]}, "not an IP address")


def test_start_after_end_rejected():
    bad({"ranges": [[{"subnet": "10.1.0.0/24", "rangeStart": "10.1.0.50", "rangeEnd": "10.1.0.40"}]]},
        "after rangeEnd")


def test_garbage_subnet_rejected():
    bad({"ranges": [[{"subnet": "10.1.0.0/33"}]]}, "not a valid subnet")
    bad({"ranges": [[{"subnet": 10}]]}, "subnet")


def test_overlapping_ranges_rejected_within_and_across_sets():
    bad({"ranges": [[{"subnet": "10.1.0.0/24"}, {"subnet": "10.1.0.0/25"}]]}, "overlaps")
    bad({"ranges": [[{"subnet": "10.1.0.0/24"}], [{"subnet": "10.1.0.0/24"}]]}, "overlaps")


def test_disjoint_pieces_of_one_subnet_allowed():
    c = netconf({"ranges": [[
        {"subnet": "10.1.0.0/24", "rangeStart": "10.1.0.10", "rangeEnd": "10.1.0.19"},
        {"subnet": "10.1.0.0/24", "rangeStart": "10.1.0.20", "rangeEnd": "10.1.0.29"},
    ]]})
    assert [r.size() for r in c.ipam.range_sets[0]] == [10, 10]


def test_mixed_families_in_one_set_rejected():
    bad({"ranges": [[{"subnet": "10.1.0.0/24"}, {"subnet": "fd00::/64"}]]}, "mixes IPv4 and IPv6")


def test_ipv4_defaults_gateway_start_end():
    (r,), = netconf({"ranges": [[{"subnet": "10.22.0.0/16"}]]}).ipam.range_sets
    # start is network+1, which is also the gateway: the allocator skips it
    assert r.gateway_ip == ip("10.22.0.1")
    assert r.start == ip("10.22.0.1")
    assert r.end == ip("10.22.255.254")   # broadcast excluded
    assert r.size() == 65534


def test_ipv6_defaults_keep_the_last_address():
    (r,), = netconf({"ranges": [[{"subnet": "fd00:1::/120"}]]}).ipam.range_sets
    assert (r.gateway_ip, r.start, r.end) == (ip("fd00:1::1"), ip("fd00:1::1"), ip("fd00:1::ff"))


def test_range_contains_respects_start_end_and_family():
    (r,), = netconf({"ranges": [[{"subnet": "10.1.0.0/24", "rangeStart": "10.1.0.10",
                                  "rangeEnd": "10.1.0.20"}]]}).ipam.range_sets
    assert r.contains(ip("10.1.0.10")) and r.contains(ip("10.1.0.20"))
    assert not r.contains(ip("10.1.0.9")) and not r.contains(ip("10.1.0.21"))
    assert not r.contains(ip("::a01:a"))


def test_routes():
    c = netconf({"ranges": [[{"subnet": "10.1.0.0/24"}]],
                 "routes": [{"dst": "0.0.0.0/0"}, {"dst": "192.168.0.0/16", "gw": "10.1.0.254"}]})
    routes = [r.to_route() for r in c.ipam.routes]
    assert [(str(r.dst), r.gw) for r in routes] == [("0.0.0.0/0", None), ("192.168.0.0/16", ip("10.1.0.254"))]
    bad({"ranges": [[{"subnet": "10.1.0.0/24"}]], "routes": [{"dst": "default"}]}, "not a CIDR")
    bad({"ranges": [[{"subnet": "10.1.0.0/24"}]], "routes": [{"dst": "0.0.0.0/0", "gw": "x"}]}, "gw")


RANGES = {"ranges": [[{"subnet": "10.1.0.0/24"}], [{"subnet": "fd00::/64"}]]}


def test_requested_ips_pooled_from_all_sources_in_order():
    c = netconf(RANGES, runtimeConfig={"ips": ["10.1.0.5/24"]}, args={"cni": {"ips": ["fd00::5"]}})
    assert c.requested_ips({"IP": "10.1.0.9"}) == [ip("10.1.0.5"), ip("fd00::5"), ip("10.1.0.9")]


def test_requested_ips_deduplicated_and_comma_list():
    c = netconf(RANGES, runtimeConfig={"ips": ["10.1.0.5"]}, args={"cni": {"ips": ["10.1.0.5/24"]}})
    assert c.requested_ips({"IP": "10.1.0.5, fd00::7"}) == [ip("10.1.0.5"), ip("fd00::7")]
    assert netconf(RANGES).requested_ips({}) == []


@pytest.mark.parametrize("source", ["runtime", "args", "cni_args"])
def test_malformed_requested_ip_is_code_7(source):
    extra = {"runtime": {"runtimeConfig": {"ips": ["10.1.0.x"]}},
             "args": {"args": {"cni": {"ips": ["10.1.0.x"]}}}}.get(source, {})
    c = netconf(RANGES, **extra)
    with pytest.raises(CNIError) as info:
        c.requested_ips({"IP": "10.1.0.x"} if source == "cni_args" else {})
    assert info.value.code == 7 and "10.1.0.x" in info.value.msg
