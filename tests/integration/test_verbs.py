"""Every verb of both executables, exec'd for real against scratch namespaces."""
from __future__ import annotations

import os
import shlex

import pytest

from tests.integration.cnitest import (
    addr_of, addresses, assert_nothing_left, bridge_conf, ipam_conf, link,
    our_chains, our_masq_rules, reservations, reserved_ips, veths, with_prev, NETWORK,
)

ALL_VERSIONS = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]


# -- ADD / DEL -------------------------------------------------------------------------
def test_add_then_del_twice_cleans_everything(cni, pod):
    conf = bridge_conf(cni, isGateway=True, ipMasq=True)
    result = cni.add(conf, "c1", pod)
    ip = addr_of(result)
    assert reserved_ips(cni) == {ip}
    assert len(our_chains(cni.ns)) == 1
    assert link(pod, "eth0") is not None and len(veths(cni.ns)) == 1

    cni.delete(conf, "c1", pod.path)
    assert link(pod, "eth0") is None
    assert_nothing_left(cni)
    cni.delete(conf, "c1", pod.path)  # a repeated DEL must succeed too
    assert_nothing_left(cni)


def test_del_with_empty_netns_releases_ip_and_masquerade(cni, pod):
    conf = bridge_conf(cni, isGateway=True, ipMasq=True)
    cni.add(conf, "c1", pod)
    assert our_masq_rules(cni.ns) and reservations(cni)
    cni.delete(conf, "c1", netns="")
    assert_nothing_left(cni)
    # The host end was found by name and deleted, which takes the container end with it.
    assert link(pod, "eth0") is None


def test_del_after_netns_deleted_releases_ip_and_masquerade(cni, make_netns):
    pod = make_netns("p")
    conf = bridge_conf(cni, isGateway=True, ipMasq=True)
    cni.add(conf, "c1", pod)
    assert our_masq_rules(cni.ns) and reservations(cni)
    path = pod.path
    pod.delete()
    assert not os.path.exists(path)
    cni.delete(conf, "c1", netns=path)
    assert_nothing_left(cni)
    cni.delete(conf, "c1", netns=path)


def test_del_of_unknown_container_succeeds(cni, pod):
    conf = bridge_conf(cni, version="1.1.0", ipMasq=True)
    cni.delete(conf, "never-added", pod.path)
    # 1.1.0 runtimes always send prevResult; an empty one must still succeed.
    cni.delete(with_prev(conf, {}), "never-added", pod.path)
    cni.delete(with_prev(conf, {"cniVersion": "1.1.0"}), "never-added", "")
    assert_nothing_left(cni)


def test_del_keeps_other_attachments(cni, make_netns):
    conf = bridge_conf(cni, isGateway=True, ipMasq=True)
    pods = [make_netns("p"), make_netns("p")]
    results = [cni.add(conf, f"c{i}", p) for i, p in enumerate(pods)]
    cni.delete(conf, "c0", pods[0].path)
    assert reserved_ips(cni) == {addr_of(results[1])}
    assert len(our_chains(cni.ns)) == 1 and len(veths(cni.ns)) == 1
    assert addresses(pods[1], "eth0") == [results[1]["ips"][0]["address"]]


# -- CHECK -----------------------------------------------------------------------------
@pytest.mark.parametrize("version", ["0.4.0", "1.0.0", "1.1.0"])
def test_check_passes_on_fresh_add(cni, pod, version):
    conf = bridge_conf(cni, version=version, isDefaultGateway=True, ipMasq=True,
                       ipam=ipam_conf(cni, routes=[{"dst": "192.168.200.0/24"}]))
    result = cni.add(conf, "c1", pod)
    res = cni.check(conf, result, "c1", pod)
    assert res.rc == 0, res.stdout
    assert res.stdout.strip() == ""


def _break_address(cni, pod, result):
    pod.exec("ip", "addr", "del", result["ips"][0]["address"], "dev", "eth0")
    return "address"


def _break_route(cni, pod, result):
    pod.exec("ip", "route", "del", "192.168.200.0/24")
    return "route"


def _break_default_route(cni, pod, result):
    pod.exec("ip", "route", "del", "default")
    return "route"


def _break_host_veth(cni, pod, result):
    cni.ns.exec("ip", "link", "del", result["interfaces"][1]["name"])
    return ""


def _break_masquerade(cni, pod, result):
    chain = our_chains(cni.ns)[0]
    for line in our_masq_rules(cni.ns):
        if line.startswith("iptables -A POSTROUTING"):
            cni.ns.exec("iptables", "-t", "nat", "-D", *shlex.split(line)[2:])
    cni.ns.exec("iptables", "-t", "nat", "-F", chain)
    cni.ns.exec("iptables", "-t", "nat", "-X", chain)
    return "masquerade"


def _break_reservation(cni, pod, result):
    for path in (cni.data_dir / NETWORK).iterdir():
        if path.name == addr_of(result):
            path.unlink()
    return ""


@pytest.mark.parametrize("breaker", [_break_address, _break_route, _break_default_route,
                                     _break_host_veth, _break_masquerade, _break_reservation],
                         ids=lambda f: f.__name__[len("_break_"):])
def test_check_fails_when_something_is_gone(cni, pod, breaker):
    conf = bridge_conf(cni, isDefaultGateway=True, ipMasq=True,
                       ipam=ipam_conf(cni, routes=[{"dst": "192.168.200.0/24"}]))
    result = cni.add(conf, "c1", pod)
    assert cni.check(conf, result, "c1", pod).rc == 0
    word = breaker(cni, pod, result)
    err = cni.fails(None, "cni-bridge", "CHECK", with_prev(conf, result), word,
                    container_id="c1", netns=pod.path)
    assert err["code"] >= 100 or err["code"] == 3, err
    cni.delete(conf, "c1", pod.path)
    assert_nothing_left(cni)


def test_check_fails_when_container_interface_replaced(cni, pod):
    conf = bridge_conf(cni)
    result = cni.add(conf, "c1", pod)
    pod.exec("ip", "link", "del", "eth0")
    pod.exec("ip", "link", "add", "eth0", "type", "veth", "peer", "name", "other0")
    cni.fails(None, "cni-bridge", "CHECK", with_prev(conf, result), container_id="c1", netns=pod.path)


def test_check_without_prev_result_fails(cni, pod):
    conf = bridge_conf(cni)
    cni.add(conf, "c1", pod)
    cni.fails(None, "cni-bridge", "CHECK", conf, "prevResult", container_id="c1", netns=pod.path)


@pytest.mark.parametrize("version", ["0.3.0", "0.3.1"])
def test_check_refused_before_040(cni, pod, version):
    conf = bridge_conf(cni, version=version)
    result = cni.add(conf, "c1", pod)
    err = cni.fails(1, "cni-bridge", "CHECK", with_prev(conf, result), container_id="c1", netns=pod.path)
    assert err["cniVersion"] == version


# -- VERSION ---------------------------------------------------------------------------
@pytest.mark.parametrize("plugin", ["cni-bridge", "cni-ipam"])
def test_version(cni, plugin):
    for asked in ALL_VERSIONS:
        out = cni.ok(plugin, "VERSION", {"cniVersion": asked}).json
        assert out["cniVersion"] == asked
        assert out["supportedVersions"] == ALL_VERSIONS
    # An empty stdin or an unknown version still answers, in our latest version.
    out = cni.ok(plugin, "VERSION", "").json
    assert set(ALL_VERSIONS) <= set(out["supportedVersions"]) and out["cniVersion"] in ALL_VERSIONS


# -- GC --------------------------------------------------------------------------------
@pytest.mark.parametrize("key", ["cni.dev/valid-attachments", "cni.dev/attachments"])
def test_gc_keeps_live_attachments_and_removes_the_rest(cni, make_netns, key):
    conf = bridge_conf(cni, version="1.1.0", isGateway=True, ipMasq=True)
    pods = [make_netns("p") for _ in range(2)]
    results = [cni.add(conf, f"c{i}", p) for i, p in enumerate(pods)]
    assert len(our_chains(cni.ns)) == 2 and len(reservations(cni)) == 2

    gc_conf = {**conf, key: [{"containerID": "c0", "ifname": "eth0"}]}
    res = cni.ok("cni-bridge", "GC", gc_conf)
    assert res.stdout.strip() == ""
    assert reserved_ips(cni) == {addr_of(results[0])}
    chains = our_chains(cni.ns)
    assert len(chains) == 1
    kept_chain_rules = [l for l in our_masq_rules(cni.ns) if "POSTROUTING" in l]
    assert len(kept_chain_rules) == 1 and f"{addr_of(results[0])}/32" in kept_chain_rules[0]
    # The live attachment still works and still passes CHECK.
    assert cni.check(conf, results[0], "c0", pods[0]).rc == 0

    # GC again is a no-op; then an empty list removes the last one.
    cni.ok("cni-bridge", "GC", gc_conf)
    assert reserved_ips(cni) == {addr_of(results[0])}
    cni.ok("cni-bridge", "GC", {**conf, key: []})
    assert reservations(cni) == {} and our_masq_rules(cni.ns) == []
    for i, p in enumerate(pods):
        cni.delete(conf, f"c{i}", p.path)
    assert_nothing_left(cni)


def test_gc_and_check_with_long_network_name_dual_stack(cni, make_netns):
    """Rule comments are cut by iptables at 255 characters; a long network name and a
    containerd-length ID must not make CHECK fail or GC miss rules."""
    name = "long-network-" + "n" * 150
    conf = {**bridge_conf(cni, "10.77.0.0/24", "fd77::/64", version="1.1.0", isGateway=True,
                          ipMasq=True), "name": name}
    live, stale = "a" * 64, "b" * 64
    pods = {cid: make_netns("p") for cid in (live, stale)}
    results = {cid: cni.add(conf, cid, pod) for cid, pod in pods.items()}
    for cid, pod in pods.items():
        res = cni.check(conf, results[cid], cid, pod)
        assert res.rc == 0, res.stdout
    assert len(our_chains(cni.ns)) == 4  # two attachments, two families
    cni.ok("cni-bridge", "GC", {**conf, "cni.dev/valid-attachments": [{"containerID": live, "ifname": "eth0"}]})
    assert reserved_ips(cni, name) == {addr_of(results[live], 4), addr_of(results[live], 6)}
    rules = our_masq_rules(cni.ns)
    assert len(our_chains(cni.ns)) == 2
    assert not any(addr_of(results[stale], 4) in r or addr_of(results[stale], 6) in r for r in rules)
    assert cni.check(conf, results[live], live, pods[live]).rc == 0
    cni.delete(conf, live, pods[live].path)
    assert our_masq_rules(cni.ns) == []


def test_gc_leaves_other_networks_alone(cni, make_netns):
    conf_a = bridge_conf(cni, "10.77.0.0/24", version="1.1.0", ipMasq=True)
    conf_b = {**bridge_conf(cni, "10.78.0.0/24", version="1.1.0", ipMasq=True), "name": "other"}
    pa, pb = make_netns("p"), make_netns("p")
    cni.add(conf_a, "a", pa)
    rb = cni.add(conf_b, "b", pb)
    cni.ok("cni-bridge", "GC", {**conf_a, "cni.dev/valid-attachments": []})
    assert reservations(cni) == {}
    assert reserved_ips(cni, "other") == {addr_of(rb)}
    assert len(our_chains(cni.ns)) == 1


def test_gc_needs_version_110(cni):
    conf = bridge_conf(cni, version="1.0.0")
    cni.fails(1, "cni-bridge", "GC", {**conf, "cni.dev/valid-attachments": []})


# -- STATUS ----------------------------------------------------------------------------
def test_status_ok(cni):
    conf = bridge_conf(cni, version="1.1.0", ipMasq=True)
    res = cni.ok("cni-bridge", "STATUS", conf)
    assert res.stdout.strip() == ""
    assert cni.ok("cni-ipam", "STATUS", conf).stdout.strip() == ""


def test_status_50_when_range_exhausted(cni, pod):
    ipam = ipam_conf(cni)
    ipam["ranges"] = [[{"subnet": "10.77.0.0/24", "rangeStart": "10.77.0.10", "rangeEnd": "10.77.0.10"}]]
    conf = bridge_conf(cni, version="1.1.0", ipam=ipam)
    cni.ok("cni-bridge", "STATUS", conf)
    cni.add(conf, "c1", pod)
    cni.fails(50, "cni-bridge", "STATUS", conf)
    cni.fails(50, "cni-ipam", "STATUS", conf)
    cni.delete(conf, "c1", pod.path)
    cni.ok("cni-bridge", "STATUS", conf)


def _path_without_iptables(cni, keep: tuple[str, ...] = ()) -> str:
    """A PATH directory holding `ip` (to enter the netns) and the tools in `keep`, but no iptables."""
    directory = cni.tmp / ("noiptables-" + "-".join(keep) if keep else "noiptables")
    directory.mkdir(exist_ok=True)
    for tool in ("ip", *keep):
        target = next(f"{d}/{tool}" for d in ("/usr/sbin", "/sbin", "/usr/bin", "/bin")
                      if os.path.exists(f"{d}/{tool}"))
        if not (directory / tool).exists():
            os.symlink(target, directory / tool)
    return str(directory)


def test_status_50_when_ipmasq_without_iptables(cni):
    conf = bridge_conf(cni, version="1.1.0", ipMasq=True)
    env = {"PATH": _path_without_iptables(cni)}
    cni.fails(50, "cni-bridge", "STATUS", conf, "iptables", env=env)
    # Without ipMasq nothing needs iptables.
    cni.ok("cni-bridge", "STATUS", {**conf, "ipMasq": False}, env=env)


def test_status_50_when_ipmasq_has_ipv6_ranges_without_ip6tables(cni):
    env = {"PATH": _path_without_iptables(cni, keep=("iptables", "iptables-restore"))}
    dual = bridge_conf(cni, "10.77.0.0/24", "fd77::/64", version="1.1.0", ipMasq=True)
    cni.fails(50, "cni-bridge", "STATUS", dual, "ip6tables", env=env)
    cni.ok("cni-bridge", "STATUS", bridge_conf(cni, version="1.1.0", ipMasq=True), env=env)


def test_add_ipmasq_without_iptables_fails_and_leaves_nothing(cni, pod):
    conf = bridge_conf(cni, isGateway=True, ipMasq=True)
    cni.fails(None, "cni-bridge", "ADD", conf, "iptables", container_id="c1", netns=pod.path,
              env={"PATH": _path_without_iptables(cni)})
    assert link(pod, "eth0") is None
    assert_nothing_left(cni)


def test_status_needs_version_110(cni):
    cni.fails(1, "cni-bridge", "STATUS", bridge_conf(cni, version="1.0.0"))


# -- cni-ipam on its own ---------------------------------------------------------------
def ipam_only_conf(cni, version="1.1.0", **ipam_extra):
    return {"cniVersion": version, "name": NETWORK, "type": "cni-ipam",
            "ipam": ipam_conf(cni, "10.77.0.0/24", "fd77::/64", **ipam_extra)}


def test_ipam_every_verb(cni, pod):
    conf = ipam_only_conf(cni, routes=[{"dst": "0.0.0.0/0"}])
    out = cni.ok("cni-ipam", "ADD", conf, container_id="c1", netns=pod.path).json
    assert out["cniVersion"] == "1.1.0"
    assert "interfaces" not in out
    assert [ip["address"] for ip in out["ips"]] == ["10.77.0.2/24", "fd77::2/64"]
    assert [ip.get("gateway") for ip in out["ips"]] == ["10.77.0.1", "fd77::1"]
    assert all("interface" not in ip and "version" not in ip for ip in out["ips"])
    assert out["routes"] == [{"dst": "0.0.0.0/0"}]
    stored = reservations(cni)
    assert set(stored) == {"10.77.0.2", "fd77::2"} and all("c1" in t for t in stored.values())
    # IPAM touches no interface.
    assert link(pod, "eth0") is None and veths(cni.ns) == []

    assert cni.ok("cni-ipam", "CHECK", with_prev(conf, out), container_id="c1", netns=pod.path).stdout == ""
    cni.fails(None, "cni-ipam", "CHECK", with_prev(conf, out), container_id="c2", netns=pod.path)

    out2 = cni.ok("cni-ipam", "ADD", conf, container_id="c2", netns=pod.path).json
    assert [ip["address"] for ip in out2["ips"]] == ["10.77.0.3/24", "fd77::3/64"]
    cni.ok("cni-ipam", "GC", {**conf, "cni.dev/valid-attachments": [{"containerID": "c2", "ifname": "eth0"}]})
    assert reserved_ips(cni) == {"10.77.0.3", "fd77::3"}
    cni.ok("cni-ipam", "STATUS", conf)

    for _ in range(2):
        cni.ok("cni-ipam", "DEL", conf, container_id="c2", netns=pod.path)
        assert reservations(cni) == {}
    cni.fails(None, "cni-ipam", "CHECK", with_prev(conf, out2), container_id="c2", netns=pod.path)


def test_ipam_legacy_version_shape_and_del_without_netns(cni, pod):
    conf = ipam_only_conf(cni, version="0.3.1")
    out = cni.ok("cni-ipam", "ADD", conf, container_id="c1", netns=pod.path).json
    assert out["cniVersion"] == "0.3.1"
    assert [ip["version"] for ip in out["ips"]] == ["4", "6"]
    cni.ok("cni-ipam", "DEL", conf, container_id="c1")
    assert reservations(cni) == {}

