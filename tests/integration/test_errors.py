"""Bad input gives a CNI error object (exit 1, no traceback) and leaves nothing behind."""
from __future__ import annotations

import os

import pytest

from tests.integration.cnitest import (
    addresses, assert_cni_error, assert_nothing_left, bridge_conf, ipam_conf, link, link_kind,
    links, our_chains, reservations, reserved_ips, veths, with_prev,
)

PLUGINS = ["cni-bridge", "cni-ipam"]


@pytest.fixture
def host_links(cni):
    """The host netns's links before the test's failing call."""
    return set(links(cni.ns))


# -- environment ------------------------------------------------------------------------
@pytest.mark.parametrize("plugin", PLUGINS)
@pytest.mark.parametrize("verb, drop", [
    ("ADD", ["CNI_CONTAINERID"]),
    ("ADD", ["CNI_NETNS"]),
    ("ADD", ["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"]),
    ("ADD", ["CNI_PATH"]),
    ("CHECK", ["CNI_NETNS"]),
    ("DEL", ["CNI_CONTAINERID", "CNI_IFNAME"]),
    ("GC", ["CNI_PATH"]),
])
def test_missing_env_vars_named_in_code_4(cni, pod, host_links, plugin, verb, drop):
    conf = bridge_conf(cni, version="1.1.0", ipMasq=True)
    if verb == "CHECK":
        conf["prevResult"] = {"cniVersion": "1.1.0", "ips": []}
    if verb == "GC":
        conf["cni.dev/valid-attachments"] = []
    kw = {"container_id": "c1", "netns": pod.path, "ifname": "eth0", "env": {}}
    for name in drop:
        if name == "CNI_PATH":
            kw["env"]["CNI_PATH"] = ""
        else:
            kw[{"CNI_CONTAINERID": "container_id", "CNI_NETNS": "netns", "CNI_IFNAME": "ifname"}[name]] = ""
    cni.fails(4, plugin, verb, conf, *drop, **kw)
    assert link(pod, "eth0") is None
    assert_nothing_left(cni, host_links)


@pytest.mark.parametrize("plugin", PLUGINS)
@pytest.mark.parametrize("command", ["", "FOO", "add"])
def test_bad_cni_command(cni, pod, plugin, command):
    cni.fails(4, plugin, command, bridge_conf(cni), "CNI_COMMAND", container_id="c1", netns=pod.path)
    assert_nothing_left(cni)


@pytest.mark.parametrize("ifname", ["eth0/1", "a" * 16, "has space", "..", "eth:0"])
def test_invalid_ifname(cni, pod, host_links, ifname):
    conf = bridge_conf(cni, ipMasq=True)
    cni.fails(4, "cni-bridge", "ADD", conf, "CNI_IFNAME", container_id="c1", netns=pod.path, ifname=ifname)
    assert [n for n in links(pod) if n != "lo"] == []
    assert_nothing_left(cni, host_links)


@pytest.mark.parametrize("cid", ["-leading-dash", "a/b", "white space", "semi;colon"])
def test_invalid_container_id(cni, pod, host_links, cid):
    cni.fails(4, "cni-bridge", "ADD", bridge_conf(cni), "CNI_CONTAINERID", container_id=cid, netns=pod.path)
    assert_nothing_left(cni, host_links)


# -- stdin --------------------------------------------------------------------------------
@pytest.mark.parametrize("plugin", PLUGINS)
@pytest.mark.parametrize("stdin", [b"", b"{not json", b"\xff\xfe\x00garbage", b"[1, 2]", b'"a string"',
                                   b'{"cniVersion": "1.0.0",'], ids=repr)
def test_undecodable_stdin_is_code_6(cni, pod, host_links, plugin, stdin):
    res = cni.run_bytes(plugin, stdin, {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1",
                                        "CNI_NETNS": pod.path, "CNI_IFNAME": "eth0"})
    assert_cni_error(res, 6)
    assert_nothing_left(cni, host_links)


# -- network config -------------------------------------------------------------------
def _set(path: str, value):
    """A config mutation: set (or delete, for value=KeyError) the dotted key `path`."""
    def mutate(conf: dict) -> dict:
        node = conf
        keys = path.split(".")
        for key in keys[:-1]:
            node = node[int(key)] if isinstance(node, list) else node[key]
        last = keys[-1]
        if isinstance(node, list):
            node[int(last)] = value
        elif value is KeyError:
            node.pop(last, None)
        else:
            node[last] = value
        return conf
    return mutate


BAD_CONFIGS = {
    "subnet-prefix-33": _set("ipam.ranges.0.0.subnet", "10.77.0.0/33"),
    "subnet-not-an-ip": _set("ipam.ranges.0.0.subnet", "nonsense"),
    "subnet-host-bits": _set("ipam.ranges.0.0.subnet", "10.77.0.1/24"),
    "subnet-slash-32": _set("ipam.ranges.0.0.subnet", "10.77.0.5/32"),
    "range-start-outside": _set("ipam.ranges.0.0.rangeStart", "10.78.0.10"),
    "range-end-outside": _set("ipam.ranges.0.0.rangeEnd", "10.77.1.10"),
    "range-start-after-end": lambda c: _set("ipam.ranges.0.0.rangeEnd", "10.77.0.5")(
        _set("ipam.ranges.0.0.rangeStart", "10.77.0.50")(c)),
    "gateway-outside": _set("ipam.ranges.0.0.gateway", "192.168.0.1"),
    "no-ranges": _set("ipam.ranges", []),
    "ranges-not-list": _set("ipam.ranges", "10.77.0.0/24"),
    "overlapping-ranges": _set("ipam.ranges", [[{"subnet": "10.77.0.0/24"}], [{"subnet": "10.77.0.0/25"}]]),
    "missing-name": _set("name", KeyError),
    "bad-name": _set("name", "bad name!"),
    "missing-ipam": _set("ipam", KeyError),
    "missing-ipam-type": _set("ipam.type", KeyError),
    "empty-ipam-type": _set("ipam.type", ""),
    "missing-type": _set("type", KeyError),
    "isGateway-string": _set("isGateway", "true"),
    "ipMasq-int": _set("ipMasq", 1),
    "mtu-string": _set("mtu", "1500"),
    "mtu-too-small": _set("mtu", 10),
    "bridge-int": _set("bridge", 5),
    "bridge-too-long": _set("bridge", "b" * 16),
    "hairpin-and-promisc": lambda c: {**c, "hairpinMode": True, "promiscMode": True},
    "bad-runtime-mac": _set("runtimeConfig", {"mac": "zz:zz"}),
    "bad-requested-ip": _set("runtimeConfig", {"ips": ["not-an-ip"]}),
    "route-dst-bad": _set("ipam.routes", [{"dst": "nowhere"}]),
    "dns-wrong-type": _set("dns", {"nameservers": "10.0.0.1"}),
}


@pytest.mark.parametrize("mutate", BAD_CONFIGS.values(), ids=BAD_CONFIGS.keys())
def test_invalid_config_is_code_7(cni, pod, host_links, mutate):
    conf = mutate(bridge_conf(cni, isGateway=True, ipMasq=True))
    cni.fails(7, "cni-bridge", "ADD", conf, container_id="c1", netns=pod.path)
    assert link(pod, "eth0") is None
    assert_nothing_left(cni, host_links)


def test_invalid_ipam_config_is_code_7_for_cni_ipam_too(cni, pod):
    conf = bridge_conf(cni)
    conf["ipam"]["ranges"][0][0]["subnet"] = "10.77.0.1/24"
    cni.fails(7, "cni-ipam", "ADD", conf, "10.77.0.1/24", container_id="c1", netns=pod.path)
    assert reservations(cni) == {}


# -- conflicts with what is already there ------------------------------------------------
def test_existing_interface_in_container_is_left_untouched(cni, pod):
    pod.exec("ip", "link", "add", "eth0", "type", "veth", "peer", "name", "keep1")
    pod.exec("ip", "link", "set", "eth0", "address", "02:00:00:00:00:01", "mtu", "1234", "up")
    pod.exec("ip", "addr", "add", "192.168.7.7/24", "dev", "eth0")
    before = link(pod, "eth0")
    conf = bridge_conf(cni, isGateway=True, ipMasq=True)
    cni.fails(None, "cni-bridge", "ADD", conf, "eth0", container_id="c1", netns=pod.path)
    after = link(pod, "eth0")
    for key in ("ifindex", "address", "mtu", "flags"):
        assert after[key] == before[key], key
    assert link_kind(after) == "veth" and link(pod, "keep1") is not None
    assert addresses(pod, "eth0") == ["192.168.7.7/24"]
    assert_nothing_left(cni)
    # The same container can still get another interface.
    cni.add(conf, "c1", pod, ifname="net1")
    assert len(reserved_ips(cni)) == 1


def test_second_add_without_del_fails_and_keeps_the_first(cni, pod):
    conf = bridge_conf(cni, isGateway=True, ipMasq=True)
    result = cni.add(conf, "c1", pod)
    cni.fails(None, "cni-bridge", "ADD", conf, "eth0", container_id="c1", netns=pod.path)
    assert reserved_ips(cni) == {result["ips"][0]["address"].split("/")[0]}
    assert len(our_chains(cni.ns)) == 1 and len(veths(cni.ns)) == 1
    assert cni.check(conf, result, "c1", pod).rc == 0


def test_range_exhausted_is_code_100(cni, make_netns):
    conf = bridge_conf(cni, "10.77.0.0/30", isGateway=True, ipMasq=True)  # one usable address
    first = make_netns("p")
    cni.add(conf, "c1", first)
    before = set(links(cni.ns))
    second = make_netns("p")
    cni.fails(100, "cni-bridge", "ADD", conf, container_id="c2", netns=second.path)
    assert link(second, "eth0") is None
    assert set(links(cni.ns)) == before
    assert reserved_ips(cni) == {"10.77.0.2"} and len(our_chains(cni.ns)) == 1


def _not_a_netns(kind: str, tmp_path) -> str:
    if kind == "regular-file":
        path = tmp_path / "file"
        path.write_text("not a namespace\n")
        return str(path)
    if kind == "directory":
        return str(tmp_path)
    if kind == "missing":
        return str(tmp_path / "no-such-netns")
    if kind == "mount-namespace":
        return "/proc/self/ns/mnt"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["regular-file", "directory", "missing", "mount-namespace"])
def test_cni_netns_not_a_network_namespace(cni, host_links, tmp_path, kind):
    path = _not_a_netns(kind, tmp_path)
    conf = bridge_conf(cni, isGateway=True, ipMasq=True)
    cni.fails(None, "cni-bridge", "ADD", conf, container_id="c1", netns=path)
    assert_nothing_left(cni, host_links)
    if kind == "missing":
        assert not os.path.exists(path), "the plugin created the namespace it was given"
    # DEL of such a path is still fine (best effort), CHECK is an error.
    cni.delete(conf, "c1", path)
    cni.fails(None, "cni-bridge", "CHECK", with_prev(conf, {"cniVersion": "1.0.0", "ips": []}),
              container_id="c1", netns=path)


def test_ipam_plugin_not_in_cni_path(cni, pod, host_links):
    conf = bridge_conf(cni, isGateway=True, ipMasq=True, ipam={"type": "no-such-ipam", "subnet": "10.77.0.0/24"})
    cni.fails(None, "cni-bridge", "ADD", conf, "no-such-ipam", container_id="c1", netns=pod.path)
    assert link(pod, "eth0") is None
    assert_nothing_left(cni, host_links)


def test_bridge_name_taken_by_non_bridge(cni, pod):
    conf = bridge_conf(cni, isGateway=True, ipMasq=True)
    cni.ns.exec("ip", "link", "add", conf["bridge"], "type", "ifb")
    before = set(links(cni.ns))
    cni.fails(104, "cni-bridge", "ADD", conf, conf["bridge"], container_id="c1", netns=pod.path)
    assert link_kind(link(cni.ns, conf["bridge"])) == "ifb"
    assert link(pod, "eth0") is None
    assert_nothing_left(cni, before)


def test_failure_after_kernel_changes_rolls_everything_back(cni, pod):
    """A route the kernel refuses (gateway not on-link) fails ADD after the veth, the addresses
    and the IPAM reservation were made: all of them must be undone."""
    ipam = ipam_conf(cni, routes=[{"dst": "10.200.0.0/16", "gw": "192.168.1.1"}])
    conf = bridge_conf(cni, isGateway=True, ipMasq=True, ipam=ipam)
    cni.fails(108, "cni-bridge", "ADD", conf, container_id="c1", netns=pod.path)
    assert link(pod, "eth0") is None
    assert_nothing_left(cni)


def test_ipv6_disabled_in_pod_rolls_back_a_dual_stack_add(cni, pod):
    """The kernel refuses the IPv6 address after the veth and the IPv4 address were made."""
    pod.exec("sh", "-c", "echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6; "
                         "echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6")
    conf = bridge_conf(cni, "10.77.0.0/24", "fd77::/64", isGateway=True, ipMasq=True)
    cni.fails(108, "cni-bridge", "ADD", conf, container_id="c1", netns=pod.path)
    assert [n for n in links(pod) if n != "lo"] == []
    assert_nothing_left(cni)
