"""plan_attachment(): pure decisions from config + IPAM result."""
from __future__ import annotations

import ipaddress
import string

import pytest

from cni_bridge.confbase import load
from cni_bridge.config import BridgeConf
from cni_bridge.plan import (KernelRoute, configured_ip_versions, host_veth_name, masq_chain_name, masq_comment,
                             parse_masq_comment, plan_attachment)
from cni_bridge.protocol.errors import CNIError
from cni_bridge.protocol.result import DNS, IPConfig, Result, Route

ip = ipaddress.ip_address
ip_if = ipaddress.ip_interface
net = ipaddress.ip_network

V4 = IPConfig(ip_if("10.22.0.5/16"), ip("10.22.0.1"))
V6 = IPConfig(ip_if("fd00:22::5/64"), ip("fd00:22::1"))


def conf(**extra) -> BridgeConf:
    return load(BridgeConf, {"cniVersion": "1.0.0", "name": "pods", "type": "cni-bridge",
                             "ipam": {"type": "cni-ipam"}, **extra})


def plan(c: BridgeConf, ipam: Result, cid="c1", ifname="eth0", cni_args=None):
    return plan_attachment(c, cid, ifname, cni_args or {}, ipam)


def test_result_ips_point_at_the_container_interface():
    p = plan(conf(), Result(ips=(V4, V6)))
    assert [i.interface for i in p.result.ips] == [2, 2]
    assert p.addresses == (V4.address, V6.address)


def test_no_ips_from_ipam_is_code_7():
    with pytest.raises(CNIError) as info:
        plan(conf(), Result())
    assert info.value.code == 7


def test_gateway_filled_with_subnet_first_address_when_ipam_gave_none():
    no_gw = IPConfig(ip_if("10.30.0.9/24"))
    p = plan(conf(isGateway=True), Result(ips=(no_gw,)))
    assert p.result.ips[0].gateway == ip("10.30.0.1")
    assert p.gateway_addresses == (ip_if("10.30.0.1/24"),)


def test_without_is_gateway_the_gateway_is_not_invented_nor_put_on_the_bridge():
    no_gw = IPConfig(ip_if("10.30.0.9/24"))
    p = plan(conf(), Result(ips=(no_gw, V6)))
    assert p.result.ips[0].gateway is None and p.result.ips[1].gateway == V6.gateway
    assert p.gateway_addresses == () and p.forwarding == ()


def test_is_default_gateway_adds_default_routes_per_family():
    p = plan(conf(isDefaultGateway=True), Result(ips=(V4, V6)))
    assert set(p.result.routes) == {Route(net("0.0.0.0/0"), V4.gateway), Route(net("::/0"), V6.gateway)}
    assert set(p.routes) == {KernelRoute(net("0.0.0.0/0"), V4.gateway), KernelRoute(net("::/0"), V6.gateway)}


def test_is_default_gateway_skips_families_ipam_already_routes_by_default():
    ipam_default = Route(net("0.0.0.0/0"), ip("10.22.0.254"))
    p = plan(conf(isDefaultGateway=True), Result(ips=(V4, V6), routes=(ipam_default,)))
    defaults = [r for r in p.result.routes if r.dst.prefixlen == 0]
    assert defaults == [ipam_default, Route(net("::/0"), V6.gateway)]


def test_routes_without_gw_resolve_to_the_family_gateway_in_the_kernel_only():
    routes = (Route(net("0.0.0.0/0")), Route(net("fd10::/48")), Route(net("192.168.0.0/16"), ip("10.22.0.7")))
    p = plan(conf(isGateway=True), Result(ips=(V4, V6), routes=routes))
    assert p.routes == (KernelRoute(net("0.0.0.0/0"), V4.gateway), KernelRoute(net("fd10::/48"), V6.gateway),
                        KernelRoute(net("192.168.0.0/16"), ip("10.22.0.7")))
    assert p.result.routes == routes   # the result reports what IPAM said


def test_route_of_a_family_without_gateway_stays_link_scoped():
    no_gw = IPConfig(ip_if("10.30.0.9/24"))
    p = plan(conf(), Result(ips=(no_gw,), routes=(Route(net("10.40.0.0/16")),)))
    assert p.routes == (KernelRoute(net("10.40.0.0/16"), None),)


def test_gateway_addresses_deduplicated():
    second = IPConfig(ip_if("10.22.0.6/16"), ip("10.22.0.1"))
    p = plan(conf(isGateway=True), Result(ips=(V4, second, V6)))
    assert p.gateway_addresses == (ip_if("10.22.0.1/16"), ip_if("fd00:22::1/64"))


@pytest.mark.parametrize("extra,families", [
    ({}, ()), ({"isGateway": True}, (4, 6)), ({"ipMasq": True}, (4, 6)), ({"isDefaultGateway": True}, (4, 6)),
])
def test_forwarding_families(extra, families):
    assert plan(conf(**extra), Result(ips=(V4, V6))).forwarding == families


def test_forwarding_only_for_families_in_use():
    assert plan(conf(isGateway=True), Result(ips=(V6,))).forwarding == (6,)


def test_masquerade_plan():
    p = plan(conf(ipMasq=True), Result(ips=(V4, V6)), cid="abc123", ifname="eth1")
    assert p.masq is not None
    assert p.masq.chain == masq_chain_name("pods", "abc123", "eth1")
    assert [(str(r.source), str(r.subnet)) for r in p.masq.rules] == [
        ("10.22.0.5", "10.22.0.0/16"), ("fd00:22::5", "fd00:22::/64")]
    assert parse_masq_comment(p.masq.comment) == ("pods", "abc123", "eth1")
    assert plan(conf(), Result(ips=(V4,))).masq is None


def test_masquerade_chain_name_fits_iptables_and_is_deterministic():
    names = {masq_chain_name("n" * 64, f"{'f' * 63}{i}", "eth0") for i in range(50)}
    assert len(names) == 50   # distinct per attachment
    assert all(len(n) <= 28 for n in names)
    assert masq_chain_name("a", "b", "c") == masq_chain_name("a", "b", "c")
    assert masq_chain_name("a", "b", "c") != masq_chain_name("a", "b", "d")
    assert masq_chain_name("ab", "c", "d") != masq_chain_name("a", "bc", "d")  # no concatenation clash


def test_masq_comment_round_trip_and_foreign_comments():
    for args in [("pods", "c1", "eth0"), ("my.net-1", "0123abcd" * 8, "net1.100")]:
        assert parse_masq_comment(masq_comment(*args)) == args
    assert parse_masq_comment('name: "pods" id: "c1"') is None
    assert parse_masq_comment("") is None


def test_masq_comment_fits_iptables_for_the_longest_names():
    from cni_bridge.plan import masq_comment_network

    long_net, long_cid = "n" * 200, "c" * 64
    comment = masq_comment(long_net, long_cid, "a" * 15)
    assert len(comment) <= 255          # iptables' comment limit
    parsed = parse_masq_comment(comment)
    assert parsed == (masq_comment_network(long_net), long_cid, "a" * 15)
    assert masq_comment_network("n" * 201) != parsed[0]   # still tells networks apart


def test_host_veth_name_is_deterministic_and_short():
    name = host_veth_name("c1", "eth0")
    assert name == host_veth_name("c1", "eth0")
    assert name != host_veth_name("c1", "eth1") and name != host_veth_name("c2", "eth0")
    names = {host_veth_name("x" * 64 + str(i), "eth0") for i in range(200)}
    assert len(names) == 200
    for n in names | {name}:
        assert len(n) <= 15 and n.startswith("veth")
        assert set(n) <= set(string.ascii_lowercase + string.digits)


def test_plan_uses_the_deterministic_veth_name():
    assert plan(conf(), Result(ips=(V4,)), cid="abc", ifname="eth3").host_veth == host_veth_name("abc", "eth3")


def test_dns_from_the_bridge_config_wins_over_ipam():
    ipam_dns = DNS(("10.0.0.53",), "ipam.local")
    assert plan(conf(), Result(ips=(V4,), dns=ipam_dns)).result.dns == ipam_dns
    own = plan(conf(dns={"nameservers": ["1.1.1.1"], "search": ["a.b"]}), Result(ips=(V4,), dns=ipam_dns))
    assert own.result.dns == DNS(("1.1.1.1",), "", ("a.b",))


def test_mac_from_cni_args_is_validated_and_lowercased():
    p = plan(conf(), Result(ips=(V4,)), cni_args={"MAC": "0A:58:0A:16:00:05"})
    assert p.mac == "0a:58:0a:16:00:05"
    with pytest.raises(CNIError) as info:
        plan(conf(), Result(ips=(V4,)), cni_args={"MAC": "0a:58"})
    assert info.value.code == 7
    assert plan(conf(runtimeConfig={"mac": "0a:00:00:00:00:01"}), Result(ips=(V4,)),
                cni_args={"MAC": "0a:58"}).mac == "0a:00:00:00:00:01"


def test_plan_copies_link_settings():
    p = plan(conf(bridge="br9", mtu=1400, hairpinMode=True, forceAddress=True), Result(ips=(V4,)), ifname="net1")
    assert (p.bridge, p.mtu, p.hairpin, p.promisc, p.force_address, p.container_ifname) == \
        ("br9", 1400, True, False, True, "net1")


@pytest.mark.parametrize("ipam, versions", [
    ({"type": "cni-ipam", "ranges": [[{"subnet": "10.1.0.0/16"}], [{"subnet": "fd00::/64"}]]}, {4, 6}),
    ({"type": "host-local", "subnet": "fd00::/64"}, {6}),
    ({"type": "cni-ipam", "ranges": [[{"subnet": "10.1.0.0/16"}, {"subnet": "10.2.0.0/16"}]]}, {4}),
    ({"type": "dhcp"}, set()),
    ({"type": "cni-ipam", "ranges": [[{"subnet": "not-a-subnet"}], "junk", [7]]}, set()),
    (None, set()),
])
def test_configured_ip_versions(ipam, versions):
    assert configured_ip_versions(ipam) == versions
