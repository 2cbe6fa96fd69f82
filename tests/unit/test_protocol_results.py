"""Version gates and result encoding/decoding per cniVersion."""
from __future__ import annotations

import ipaddress
import json

import pytest

from cni_bridge.protocol import versions
from cni_bridge.protocol.errors import CNIError, Code
from cni_bridge.protocol.result import DNS, Interface, IPConfig, Result, Route
from cni_bridge.protocol.runner import version_info

ip_if = ipaddress.ip_interface
ip = ipaddress.ip_address
net = ipaddress.ip_network

ALL = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")


# -- version gates ---------------------------------------------------------------------

def gate(version, verb):
    with pytest.raises(CNIError) as info:
        versions.require_supported(version, verb)
    return info.value


@pytest.mark.parametrize("version", ALL)
@pytest.mark.parametrize("verb", ["ADD", "DEL"])
def test_add_and_del_allowed_at_every_supported_version(version, verb):
    versions.require_supported(version, verb)  # raises on refusal


@pytest.mark.parametrize("version,allowed", [("0.3.0", False), ("0.3.1", False), ("0.4.0", True),
                                             ("1.0.0", True), ("1.1.0", True)])
def test_check_needs_0_4_0(version, allowed):
    if allowed:
        versions.require_supported(version, "CHECK")
    else:
        err = gate(version, "CHECK")
        assert err.code == Code.INCOMPATIBLE_VERSION == 1
        assert "0.4.0" in err.details


@pytest.mark.parametrize("verb", ["GC", "STATUS"])
@pytest.mark.parametrize("version", ALL)
def test_gc_and_status_need_1_1_0(verb, version):
    if version == "1.1.0":
        versions.require_supported(version, verb)
    else:
        err = gate(version, verb)
        assert err.code == 1 and verb in err.msg and "1.1.0" in err.details


@pytest.mark.parametrize("version", ["0.1.0", "0.2.0", "1.2.0", "2.0.0", "1.0", "", "latest"])
def test_unknown_versions_are_code_1(version):
    err = gate(version, "ADD")
    assert err.code == 1 and repr(version) in err.msg
    assert "1.1.0" in err.details  # tells what is supported


def test_missing_cni_version_means_0_1_0_which_is_refused():
    assert versions.IMPLICIT_VERSION == "0.1.0"
    assert gate(versions.IMPLICIT_VERSION, "ADD").code == 1


def test_version_comparison():
    assert versions.at_least("1.1.0", "1.0.0") and not versions.at_least("0.4.0", "1.0.0")
    assert versions.is_legacy("0.4.0") and not versions.is_legacy("1.0.0")
    with pytest.raises(CNIError) as info:
        versions.parse("1.x.0")
    assert info.value.code == 1


@pytest.mark.parametrize("requested", ALL)
def test_version_echoes_a_supported_requested_version(requested):
    out = version_info(json.dumps({"cniVersion": requested}).encode())
    assert out["cniVersion"] == requested
    assert out["supportedVersions"] == list(ALL)


@pytest.mark.parametrize("stdin", [b"", b"{}", b'{"cniVersion": "9.9.9"}', b"not json", b"[1]",
                                   b'{"cniVersion": 1}', b"\xff\xfe"])
def test_version_falls_back_to_latest(stdin):
    out = version_info(stdin)
    assert out == {"cniVersion": "1.1.0", "supportedVersions": list(ALL)}


# -- result encoding -------------------------------------------------------------------

def sample_result() -> Result:
    return Result(
        interfaces=(
            Interface("cni0", "aa:bb:cc:00:00:01"),
            Interface("veth123", "aa:bb:cc:00:00:02"),
            Interface("eth0", "0a:58:0a:16:00:05", sandbox="/var/run/netns/x", mtu=1400),
        ),
        ips=(
            IPConfig(ip_if("10.22.0.5/16"), ip("10.22.0.1"), interface=2),
            IPConfig(ip_if("fd00::5/64"), ip("fd00::1"), interface=2),
        ),
        routes=(
            Route(net("0.0.0.0/0"), ip("10.22.0.1"), mtu=1400, advmss=1360, priority=10, table=100, scope=0),
            Route(net("192.168.0.0/16")),
        ),
        dns=DNS(("10.96.0.10",), "cluster.local", ("svc.cluster.local",), ("ndots:5",)),
    )


@pytest.mark.parametrize("version", ["0.3.0", "0.3.1", "0.4.0"])
def test_legacy_results_carry_ips_version(version):
    out = sample_result().to_dict(version)
    assert out["cniVersion"] == version
    assert [i["version"] for i in out["ips"]] == ["4", "6"]
    assert out["ips"][0] == {"version": "4", "interface": 2, "address": "10.22.0.5/16", "gateway": "10.22.0.1"}


@pytest.mark.parametrize("version", ["1.0.0", "1.1.0"])
def test_1x_results_have_no_ips_version(version):
    out = sample_result().to_dict(version)
    assert all("version" not in i for i in out["ips"])
    assert out["ips"][1] == {"interface": 2, "address": "fd00::5/64", "gateway": "fd00::1"}


@pytest.mark.parametrize("version", ["0.3.1", "0.4.0", "1.0.0"])
def test_1_1_only_fields_dropped_below_1_1_0(version):
    out = sample_result().to_dict(version)
    assert out["routes"][0] == {"dst": "0.0.0.0/0", "gw": "10.22.0.1"}
    assert out["routes"][1] == {"dst": "192.168.0.0/16"}
    assert "mtu" not in out["interfaces"][2]


def test_1_1_fields_kept_at_1_1_0():
    out = sample_result().to_dict("1.1.0")
    assert out["routes"][0] == {"dst": "0.0.0.0/0", "gw": "10.22.0.1", "mtu": 1400, "advmss": 1360,
                                "priority": 10, "table": 100, "scope": 0}
    assert out["interfaces"][2]["mtu"] == 1400


def test_interfaces_and_dns_encoding():
    out = sample_result().to_dict("1.0.0")
    assert out["interfaces"] == [
        {"name": "cni0", "mac": "aa:bb:cc:00:00:01"},
        {"name": "veth123", "mac": "aa:bb:cc:00:00:02"},
        {"name": "eth0", "mac": "0a:58:0a:16:00:05", "sandbox": "/var/run/netns/x"},
    ]
    assert out["dns"] == {"nameservers": ["10.96.0.10"], "domain": "cluster.local",
                          "search": ["svc.cluster.local"], "options": ["ndots:5"]}


def test_ipam_style_result_has_no_interfaces_and_no_interface_index():
    out = Result(ips=(IPConfig(ip_if("10.0.0.2/24"), ip("10.0.0.1")),)).to_dict("1.0.0")
    assert "interfaces" not in out and "routes" not in out
    assert out["ips"] == [{"address": "10.0.0.2/24", "gateway": "10.0.0.1"}]
    assert out["dns"] == {}


@pytest.mark.parametrize("version", ALL)
def test_encode_decode_round_trip(version):
    original = sample_result()
    back = Result.from_dict(json.loads(json.dumps(original.to_dict(version))))
    assert back.ips == original.ips
    assert back.dns == original.dns
    assert [i.name for i in back.interfaces] == ["cni0", "veth123", "eth0"]
    if version == "1.1.0":
        assert back.routes == original.routes
    else:
        assert back.routes == (Route(net("0.0.0.0/0"), ip("10.22.0.1")), Route(net("192.168.0.0/16")))


# -- decoding prevResult -----------------------------------------------------------------

def test_decode_0_3_1_prev_result():
    prev = {
        "cniVersion": "0.3.1",
        "interfaces": [{"name": "cni0", "mac": "aa:bb:cc:dd:ee:ff"},
                       {"name": "eth0", "mac": "0a:58:0a:f4:00:05", "sandbox": "/var/run/netns/p"}],
        "ips": [{"version": "4", "interface": 1, "address": "10.244.0.5/24", "gateway": "10.244.0.1"}],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dns": {},
    }
    res = Result.from_dict(prev, "prevResult")
    assert res.ips == (IPConfig(ip_if("10.244.0.5/24"), ip("10.244.0.1"), 1),)
    assert res.routes == (Route(net("0.0.0.0/0")),)
    assert res.interfaces[1] == Interface("eth0", "0a:58:0a:f4:00:05", "/var/run/netns/p")
    assert res.dns.is_empty()


def test_decode_1_1_prev_result_with_new_fields():
    prev = {
        "cniVersion": "1.1.0",
        "interfaces": [{"name": "eth0", "mtu": 9000, "socketPath": "/x", "pciID": "0000:00:01.0"}],
        "ips": [{"address": "fd00::5/64"}],
        "routes": [{"dst": "::/0", "gw": "fd00::1", "table": 7, "priority": 100}],
    }
    res = Result.from_dict(prev)
    assert res.interfaces == (Interface("eth0", mtu=9000),)
    assert res.ips == (IPConfig(ip_if("fd00::5/64")),)
    assert res.routes == (Route(net("::/0"), ip("fd00::1"), table=7, priority=100),)


def test_decode_empty_prev_result():
    assert Result.from_dict({}) == Result()


@pytest.mark.parametrize("bad", [
    [],
    "text",
    {"ips": [{"gateway": "10.0.0.1"}]},              # no address
    {"ips": [{"address": "300.1.2.3/24"}]},
    {"ips": "10.0.0.1/24"},
    {"routes": [{"gw": "10.0.0.1"}]},               # no dst
    {"interfaces": [{"mac": "aa"}]},                # no name
    {"dns": "8.8.8.8"},
    {"dns": {"nameservers": "8.8.8.8"}},
])
def test_undecodable_results_are_code_6(bad):
    with pytest.raises(CNIError) as info:
        Result.from_dict(bad, "prevResult")
    assert info.value.code == Code.DECODE_FAILURE == 6


def test_error_object_shape():
    err = CNIError(Code.INVALID_CONFIG, "bad", "because")
    assert err.to_dict("1.0.0") == {"cniVersion": "1.0.0", "code": 7, "msg": "bad", "details": "because"}
    assert str(err) == "bad: because"
