"""BridgeConf: defaults, strict types, cross-field rules, MAC precedence; bad config is code 7."""
from __future__ import annotations

import pytest

from cni_bridge.confbase import load
from cni_bridge.config import BridgeConf
from cni_bridge.protocol.errors import CNIError, Code

BASE = {"cniVersion": "1.0.0", "name": "pods", "type": "cni-bridge", "ipam": {"type": "cni-ipam"}}


def conf(**extra) -> BridgeConf:
    return load(BridgeConf, {**BASE, **extra})


def bad(config: dict) -> CNIError:
    with pytest.raises(CNIError) as info:
        load(BridgeConf, config)
    assert info.value.code == Code.INVALID_CONFIG == 7
    return info.value


def test_defaults_follow_the_reference_bridge():
    c = conf()
    assert c.bridge == "cni0"
    assert (c.is_gateway, c.is_default_gateway, c.force_address, c.ip_masq) == (False,) * 4
    assert (c.hairpin_mode, c.promisc_mode, c.mtu) == (False, False, None)
    assert c.ipam.type == "cni-ipam"


def test_camel_case_keys_and_unknown_keys_ignored():
    c = conf(bridge="br-pods", isGateway=True, ipMasq=True, mtu=1450, hairpinMode=True,
             capabilities={"portMappings": True}, somethingForPortmap=[1, 2])
    assert (c.bridge, c.is_gateway, c.ip_masq, c.mtu, c.hairpin_mode) == ("br-pods", True, True, 1450, True)


def test_model_is_frozen():
    c = conf()
    with pytest.raises(Exception):
        c.bridge = "other"  # type: ignore[misc]


@pytest.mark.parametrize("field,value", [
    ("isGateway", "true"), ("isGateway", 1), ("isDefaultGateway", "yes"), ("ipMasq", 0),
    ("forceAddress", "false"), ("hairpinMode", None), ("promiscMode", "1"),
    ("mtu", "1500"), ("mtu", True), ("mtu", 1500.5), ("bridge", 5),
])
def test_strict_types_name_the_field(field, value):
    err = bad({**BASE, field: value})
    assert field in err.details


def test_hairpin_and_promisc_are_exclusive():
    err = bad({**BASE, "hairpinMode": True, "promiscMode": True})
    assert "hairpinMode" in err.details and "promiscMode" in err.details
    assert conf(promiscMode=True).promisc_mode is True


def test_is_default_gateway_implies_is_gateway():
    c = conf(isDefaultGateway=True)
    assert c.is_gateway is True and c.is_default_gateway is True
    assert conf(isDefaultGateway=True, isGateway=False).is_gateway is True


@pytest.mark.parametrize("name", ["", "a" * 16, "br/0", "br:0", "br 0", "br\t0", ".", "..", "br\x0b0"])
def test_bad_bridge_names(name):
    err = bad({**BASE, "bridge": name})
    assert "bridge" in err.details


@pytest.mark.parametrize("name", ["b", "a" * 15, "br-pods.10", "cni_0"])
def test_good_bridge_names(name):
    assert conf(bridge=name).bridge == name


@pytest.mark.parametrize("mtu,ok", [(67, False), (68, True), (1500, True), (65535, True), (65536, False),
                                    (0, False), (-1, False)])
def test_mtu_range(mtu, ok):
    if ok:
        assert conf(mtu=mtu).mtu == mtu
    else:
        assert "mtu" in bad({**BASE, "mtu": mtu}).details


@pytest.mark.parametrize("missing", ["name", "type", "ipam"])
def test_missing_required_keys(missing):
    config = {k: v for k, v in BASE.items() if k != missing}
    assert missing in bad(config).details


@pytest.mark.parametrize("ipam", [{}, {"type": ""}, {"type": 5}, {"type": "../../bin/sh"}])
def test_ipam_type_must_name_a_plugin(ipam):
    assert "ipam" in bad({**BASE, "ipam": ipam}).details


@pytest.mark.parametrize("name", ["-pods", "po ds", "pods/x", ""])
def test_bad_network_names(name):
    assert "name" in bad({**BASE, "name": name}).details


@pytest.mark.parametrize("where", [{"args": {"cni": {"mac": "zz:zz"}}},
                                   {"runtimeConfig": {"mac": "0a:58:0a:16:00"}},
                                   {"runtimeConfig": {"mac": "0a-58-0a-16-00-05"}}])
def test_bad_macs_in_config(where):
    assert "MAC" in bad({**BASE, **where}).details


def test_mac_precedence_cni_args_then_args_then_runtime_config():
    a, b, c = "0a:00:00:00:00:0a", "0a:00:00:00:00:0b", "0a:00:00:00:00:0c"
    cni_args = {"MAC": a}
    assert conf().requested_mac(cni_args) == a
    assert conf(args={"cni": {"mac": b}}).requested_mac(cni_args) == b
    assert conf(args={"cni": {"mac": b}}, runtimeConfig={"mac": c}).requested_mac(cni_args) == c
    assert conf(runtimeConfig={"mac": c}).requested_mac({}) == c
    assert conf().requested_mac({}) == "" and conf().requested_mac(None) == ""


def test_gc_attachments_both_keys():
    keep = [{"containerID": "c1", "ifname": "eth0"}]
    assert conf(**{"cni.dev/valid-attachments": keep}).gc_keep() == {("c1", "eth0")}
    assert conf(**{"cni.dev/attachments": keep}).gc_keep() == {("c1", "eth0")}
    assert conf(**{"cni.dev/valid-attachments": []}).gc_keep() == set()
    assert conf().gc_keep() is None


def test_prev_result_decoded_or_code_6():
    prev = {"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.2/24"}]}
    assert str(conf(prevResult=prev).previous_result().ips[0].address) == "10.0.0.2/24"
    assert conf().previous_result() is None
    with pytest.raises(CNIError) as info:
        conf(prevResult={"ips": [{"address": "nope"}]}).previous_result()
    assert info.value.code == 6
