"""Every cni-bridge and cni-ipam config key, observed in the kernel with ip/sysfs/iptables."""
from __future__ import annotations

import pytest

from tests.integration.cnitest import (
    addr_of, addresses, assert_nothing_left, bridge_conf, default_route, ipam_conf, link, link_kind,
    our_chains, our_masq_rules, ping, reserved_ips, routes, sysfs, veths,
)

IP_FORWARD = "/proc/sys/net/ipv4/ip_forward"
IP6_FORWARD = "/proc/sys/net/ipv6/conf/all/forwarding"


def set_sysctl(ns, path: str, value: str) -> None:
    ns.exec("sh", "-c", f"echo {value} > {path}")


def host_veth(result: dict) -> str:
    return result["interfaces"][1]["name"]


# -- bridge, isGateway, isDefaultGateway, forceAddress ----------------------------------
def test_default_bridge_name_is_cni0(cni, pod):
    conf = bridge_conf(cni)
    del conf["bridge"]
    result = cni.add(conf, "c1", pod)
    bridge = link(cni.ns, "cni0")
    assert bridge is not None and link_kind(bridge) == "bridge"
    assert result["interfaces"][0]["name"] == "cni0"
    assert link(cni.ns, host_veth(result))["master"] == "cni0"
    assert "UP" in bridge["flags"]


def test_existing_bridge_is_reused_and_brought_up(cni, pod):
    conf = bridge_conf(cni)
    cni.ns.exec("ip", "link", "add", conf["bridge"], "type", "bridge")
    index = link(cni.ns, conf["bridge"])["ifindex"]
    assert "UP" not in link(cni.ns, conf["bridge"])["flags"]
    result = cni.add(conf, "c1", pod)
    bridge = link(cni.ns, conf["bridge"])
    assert bridge["ifindex"] == index and "UP" in bridge["flags"]
    assert link(cni.ns, host_veth(result))["master"] == conf["bridge"]


def test_is_gateway_puts_gateway_on_bridge_and_enables_forwarding(cni, pod):
    set_sysctl(cni.ns, IP_FORWARD, 0)
    conf = bridge_conf(cni, isGateway=True)
    result = cni.add(conf, "c1", pod)
    assert addresses(cni.ns, conf["bridge"], 4) == ["10.77.0.1/24"]
    assert sysfs(cni.ns, IP_FORWARD) == "1"
    assert result["ips"][0]["gateway"] == "10.77.0.1"
    assert default_route(pod) is None  # only isDefaultGateway adds one
    assert ping(pod, "10.77.0.1").returncode == 0


def test_without_is_gateway_bridge_has_no_address_and_forwarding_untouched(cni, pod):
    set_sysctl(cni.ns, IP_FORWARD, 0)
    conf = bridge_conf(cni)
    cni.add(conf, "c1", pod)
    assert addresses(cni.ns, conf["bridge"]) == []
    assert sysfs(cni.ns, IP_FORWARD) == "0"


def test_is_default_gateway_adds_default_route(cni, pod):
    conf = bridge_conf(cni, isDefaultGateway=True)
    result = cni.add(conf, "c1", pod)
    route = default_route(pod)
    assert route is not None and route["gateway"] == "10.77.0.1" and route["dev"] == "eth0"
    assert {"dst": "0.0.0.0/0", "gw": "10.77.0.1"} in result["routes"]
    assert addresses(cni.ns, conf["bridge"], 4) == ["10.77.0.1/24"]  # implies isGateway


def test_is_default_gateway_keeps_ipam_default_route(cni, pod):
    ipam = ipam_conf(cni, routes=[{"dst": "0.0.0.0/0", "gw": "10.77.0.254"}])
    conf = bridge_conf(cni, isDefaultGateway=True, ipam=ipam)
    result = cni.add(conf, "c1", pod)
    assert [r for r in result["routes"] if r["dst"] == "0.0.0.0/0"] == [{"dst": "0.0.0.0/0", "gw": "10.77.0.254"}]
    assert default_route(pod)["gateway"] == "10.77.0.254"


def _bridge_with_address(cni, name: str, *cidrs: str) -> None:
    cni.ns.exec("ip", "link", "add", name, "type", "bridge")
    for cidr in cidrs:
        cni.ns.exec("ip", "addr", "add", cidr, "dev", name)
    cni.ns.exec("ip", "link", "set", name, "up")


def test_conflicting_bridge_address_without_force_address_fails_cleanly(cni, pod):
    conf = bridge_conf(cni, isGateway=True)
    _bridge_with_address(cni, conf["bridge"], "10.77.0.99/24")
    cni.fails(104, "cni-bridge", "ADD", conf, "10.77.0.99", container_id="c1", netns=pod.path)
    assert addresses(cni.ns, conf["bridge"]) == ["10.77.0.99/24"]
    assert link(pod, "eth0") is None
    assert_nothing_left(cni)


def test_force_address_replaces_conflicting_bridge_address(cni, pod):
    conf = bridge_conf(cni, isGateway=True, forceAddress=True)
    _bridge_with_address(cni, conf["bridge"], "10.77.0.99/24", "192.168.5.1/24")
    cni.add(conf, "c1", pod)
    # Only the address in the pod subnet is replaced; an unrelated one stays.
    assert sorted(addresses(cni.ns, conf["bridge"], 4)) == ["10.77.0.1/24", "192.168.5.1/24"]


# -- ipMasq -----------------------------------------------------------------------------
def test_ip_masq_rules_present_after_add_and_gone_after_del(cni, pod):
    conf = bridge_conf(cni, "10.77.0.0/24", "fd77::/64", isGateway=True, ipMasq=True)
    result = cni.add(conf, "c1", pod)
    v4, v6 = addr_of(result, 4), addr_of(result, 6)
    rules = our_masq_rules(cni.ns)
    chain = our_chains(cni.ns)
    assert len(chain) == 2 and chain[0] == chain[1]  # one chain per family, same name
    chain = chain[0]
    jumps = [r for r in rules if "-A POSTROUTING" in r]
    assert any(r.startswith("iptables ") and f"-s {v4}/32" in r and r.endswith(f"-j {chain}") for r in jumps)
    assert any(r.startswith("ip6tables ") and f"-s {v6}/128" in r and r.endswith(f"-j {chain}") for r in jumps)
    body = [r for r in rules if f"-A {chain}" in r]
    assert any("-d 10.77.0.0/24" in r and r.endswith("-j ACCEPT") for r in body)
    assert any("! -d 224.0.0.0/4" in r and r.endswith("-j MASQUERADE") for r in body)
    assert any("-d fd77::/64" in r and r.endswith("-j ACCEPT") for r in body)
    cni.delete(conf, "c1", pod.path)
    assert_nothing_left(cni)


def _outside(cni, make_netns):
    """A netns beyond the host (192.168.99.2) with no route back to the pod subnet."""
    outside = make_netns("o")
    cni.ns.exec("ip", "link", "add", "up0", "type", "veth", "peer", "name", "down0",
                "netns", outside.name)
    cni.ns.exec("ip", "addr", "add", "192.168.99.1/24", "dev", "up0")
    cni.ns.exec("ip", "link", "set", "up0", "up")
    outside.exec("ip", "addr", "add", "192.168.99.2/24", "dev", "down0")
    outside.exec("ip", "link", "set", "down0", "up")
    return outside


def test_ip_masq_lets_pods_reach_beyond_the_host(cni, make_netns):
    outside = _outside(cni, make_netns)
    masq = bridge_conf(cni, isDefaultGateway=True, ipMasq=True)
    plain = {**masq, "ipMasq": False}
    p1, p2 = make_netns("p"), make_netns("p")
    cni.add(masq, "c1", p1)
    cni.add(plain, "c2", p2)
    # The outside netns cannot route to 10.77.0.0/24: only masqueraded traffic gets answers.
    assert ping(p1, "192.168.99.2").returncode == 0
    assert ping(p2, "192.168.99.2", wait=1).returncode != 0
    assert routes(outside, 4) and all("10.77" not in r["dst"] for r in routes(outside, 4))


# -- mtu, hairpinMode, promiscMode ------------------------------------------------------
def test_mtu_on_bridge_veth_and_container(cni, pod):
    conf = bridge_conf(cni, mtu=1400)
    result = cni.add(conf, "c1", pod)
    assert link(cni.ns, conf["bridge"])["mtu"] == 1400
    assert link(cni.ns, host_veth(result))["mtu"] == 1400
    assert link(pod, "eth0")["mtu"] == 1400


def test_hairpin_mode_sets_port_flag(cni, make_netns):
    conf = bridge_conf(cni, hairpinMode=True)
    r1 = cni.add(conf, "c1", make_netns("p"))
    r2 = cni.add({**conf, "hairpinMode": False}, "c2", make_netns("p"))
    assert sysfs(cni.ns, f"/sys/class/net/{host_veth(r1)}/brport/hairpin_mode") == "1"
    assert sysfs(cni.ns, f"/sys/class/net/{host_veth(r2)}/brport/hairpin_mode") == "0"


def test_promisc_mode_sets_bridge_promiscuous(cni, make_netns):
    plain = bridge_conf(cni)
    cni.add(plain, "c1", make_netns("p"))
    assert "PROMISC" not in link(cni.ns, plain["bridge"])["flags"]
    cni.add({**plain, "promiscMode": True}, "c2", make_netns("p"))
    assert "PROMISC" in link(cni.ns, plain["bridge"])["flags"]


# -- dns, resolvConf --------------------------------------------------------------------
DNS = {"nameservers": ["10.96.0.10", "fd00::10"], "domain": "cluster.local",
       "search": ["ns.svc.cluster.local", "svc.cluster.local"], "options": ["ndots:5"]}


def test_dns_in_result(cni, pod):
    result = cni.add(bridge_conf(cni, dns=DNS), "c1", pod)
    assert result["dns"] == DNS


def test_resolv_conf_in_result(cni, pod, tmp_path):
    path = tmp_path / "resolv.conf"
    path.write_text("# a comment\nnameserver 10.96.0.10\nnameserver fd00::10\ndomain cluster.local\n"
                    "search ns.svc.cluster.local svc.cluster.local\noptions ndots:5\n")
    conf = bridge_conf(cni, ipam=ipam_conf(cni, resolvConf=str(path)))
    result = cni.add(conf, "c1", pod)
    assert result["dns"] == DNS


def test_missing_resolv_conf_fails_cleanly(cni, pod, tmp_path):
    conf = bridge_conf(cni, ipam=ipam_conf(cni, resolvConf=str(tmp_path / "absent.conf")))
    cni.fails(None, "cni-bridge", "ADD", conf, "absent.conf", container_id="c1", netns=pod.path)
    assert link(pod, "eth0") is None
    assert_nothing_left(cni)


# -- mac and ips capabilities (runtimeConfig, args.cni, CNI_ARGS) -----------------------
MAC = "0a:58:0a:4d:00:42"


@pytest.mark.parametrize("how", ["runtimeConfig", "args", "CNI_ARGS"])
def test_requested_mac(cni, pod, how):
    conf = bridge_conf(cni)
    cni_args = ""
    if how == "runtimeConfig":
        conf["runtimeConfig"] = {"mac": MAC}
    elif how == "args":
        conf["args"] = {"cni": {"mac": MAC}}
    else:
        cni_args = f"MAC={MAC}"
    result = cni.add(conf, "c1", pod, cni_args=cni_args)
    assert link(pod, "eth0")["address"] == MAC
    assert result["interfaces"][2]["mac"] == MAC


def test_runtime_config_mac_wins(cni, pod):
    conf = bridge_conf(cni, args={"cni": {"mac": "0a:58:0a:4d:00:01"}}, runtimeConfig={"mac": MAC})
    cni.add(conf, "c1", pod, cni_args="MAC=0a:58:0a:4d:00:02")
    assert link(pod, "eth0")["address"] == MAC


def test_invalid_mac_in_cni_args_fails_cleanly(cni, pod):
    conf = bridge_conf(cni, isGateway=True, ipMasq=True)
    cni.fails(7, "cni-bridge", "ADD", conf, "MAC", container_id="c1", netns=pod.path,
              cni_args="MAC=not-a-mac")
    assert link(pod, "eth0") is None
    assert_nothing_left(cni)


@pytest.mark.parametrize("how", ["runtimeConfig", "args", "CNI_ARGS"])
def test_requested_ip(cni, pod, how):
    conf = bridge_conf(cni, "10.77.0.0/24", "fd77::/64")
    cni_args = ""
    if how == "runtimeConfig":
        conf["runtimeConfig"] = {"ips": ["10.77.0.42/24", "fd77::42/64"]}
    elif how == "args":
        conf["args"] = {"cni": {"ips": ["10.77.0.42", "fd77::42"]}}
    else:
        cni_args = "IP=10.77.0.42,fd77::42"
    result = cni.add(conf, "c1", pod, cni_args=cni_args)
    assert [ip["address"] for ip in result["ips"]] == ["10.77.0.42/24", "fd77::42/64"]
    assert sorted(addresses(pod, "eth0")) == ["10.77.0.42/24", "fd77::42/64"]
    assert reserved_ips(cni) == {"10.77.0.42", "fd77::42"}


def test_requested_ip_outside_ranges_or_taken_fails_cleanly(cni, make_netns):
    conf = bridge_conf(cni, isGateway=True, ipMasq=True)
    p1, p2 = make_netns("p"), make_netns("p")
    cni.fails(None, "cni-bridge", "ADD", {**conf, "runtimeConfig": {"ips": ["10.99.0.5/24"]}},
              "10.99.0.5", container_id="c1", netns=p1.path)
    assert link(p1, "eth0") is None
    assert_nothing_left(cni)
    cni.add({**conf, "runtimeConfig": {"ips": ["10.77.0.5/24"]}}, "c1", p1)
    cni.fails(None, "cni-bridge", "ADD", {**conf, "runtimeConfig": {"ips": ["10.77.0.5/24"]}},
              "10.77.0.5", container_id="c2", netns=p2.path)
    assert link(p2, "eth0") is None
    assert reserved_ips(cni) == {"10.77.0.5"} and len(veths(cni.ns)) == 1
    assert len(our_chains(cni.ns)) == 1


@pytest.mark.parametrize("ip", ["10.77.0.1", "10.77.0.0", "10.77.0.255", "fd77::2"])
def test_requested_gateway_network_broadcast_or_foreign_family_refused(cni, pod, ip):
    conf = bridge_conf(cni, isGateway=True, ipMasq=True, runtimeConfig={"ips": [ip]})
    cni.fails(None, "cni-bridge", "ADD", conf, ip, container_id="c1", netns=pod.path)
    assert link(pod, "eth0") is None
    assert_nothing_left(cni)


# -- address families and range forms ---------------------------------------------------
def test_ipv6_only(cni, pod):
    set_sysctl(cni.ns, IP6_FORWARD, 0)
    conf = bridge_conf(cni, "fd77::/64", isDefaultGateway=True)
    result = cni.add(conf, "c1", pod)
    assert [ip["address"] for ip in result["ips"]] == ["fd77::2/64"]
    assert addresses(pod, "eth0") == ["fd77::2/64"]
    assert addresses(cni.ns, conf["bridge"], 6) == ["fd77::1/64"]
    assert sysfs(cni.ns, IP6_FORWARD) == "1"
    assert default_route(pod, 6)["gateway"] == "fd77::1"
    assert ping(pod, "fd77::1", 6).returncode == 0


def test_dual_stack(cni, pod):
    set_sysctl(cni.ns, IP_FORWARD, 0)
    set_sysctl(cni.ns, IP6_FORWARD, 0)
    conf = bridge_conf(cni, "10.77.0.0/24", "fd77::/64", isDefaultGateway=True)
    result = cni.add(conf, "c1", pod)
    assert [ip["address"] for ip in result["ips"]] == ["10.77.0.2/24", "fd77::2/64"]
    assert [ip["gateway"] for ip in result["ips"]] == ["10.77.0.1", "fd77::1"]
    assert sorted(addresses(pod, "eth0")) == ["10.77.0.2/24", "fd77::2/64"]
    assert sorted(addresses(cni.ns, conf["bridge"])) == ["10.77.0.1/24", "fd77::1/64"]
    assert default_route(pod, 4)["gateway"] == "10.77.0.1"
    assert default_route(pod, 6)["gateway"] == "fd77::1"
    assert sysfs(cni.ns, IP_FORWARD) == "1" and sysfs(cni.ns, IP6_FORWARD) == "1"


def test_legacy_subnet_form(cni, pod):
    ipam = {"type": "cni-ipam", "dataDir": str(cni.data_dir), "subnet": "10.78.0.0/24",
            "rangeStart": "10.78.0.50", "rangeEnd": "10.78.0.60", "gateway": "10.78.0.254"}
    conf = bridge_conf(cni, isGateway=True, ipam=ipam)
    result = cni.add(conf, "c1", pod)
    assert result["ips"] == [{"interface": 2, "address": "10.78.0.50/24", "gateway": "10.78.0.254"}]
    assert addresses(cni.ns, conf["bridge"]) == ["10.78.0.254/24"]
    assert addresses(pod, "eth0") == ["10.78.0.50/24"]


def test_range_start_and_end(cni, make_netns):
    ipam = ipam_conf(cni)
    ipam["ranges"] = [[{"subnet": "10.77.0.0/24", "rangeStart": "10.77.0.10", "rangeEnd": "10.77.0.11"},
                       {"subnet": "10.79.0.0/24", "rangeStart": "10.79.0.20", "rangeEnd": "10.79.0.20"}]]
    conf = bridge_conf(cni, ipam=ipam)
    got = [addr_of(cni.add(conf, f"c{i}", make_netns("p"))) for i in range(3)]
    assert got == ["10.77.0.10", "10.77.0.11", "10.79.0.20"]
    last = make_netns("p")
    cni.fails(100, "cni-bridge", "ADD", conf, container_id="c3", netns=last.path)
    assert link(last, "eth0") is None
    assert len(veths(cni.ns)) == 3 and len(reserved_ips(cni)) == 3


def test_routes(cni, pod):
    ipam = ipam_conf(cni, routes=[{"dst": "192.168.50.0/24"}, {"dst": "10.200.0.0/16", "gw": "10.77.0.254"}])
    conf = bridge_conf(cni, isGateway=True, ipam=ipam)
    result = cni.add(conf, "c1", pod)
    assert result["routes"] == ipam["routes"]
    table = {r["dst"]: r for r in routes(pod, 4)}
    assert table["192.168.50.0/24"]["gateway"] == "10.77.0.1"  # no gw: the bridge gateway
    assert table["10.200.0.0/16"]["gateway"] == "10.77.0.254"
    assert all(table[d]["dev"] == "eth0" for d in ("192.168.50.0/24", "10.200.0.0/16"))


# -- CNI_ARGS -------------------------------------------------------------------------
CONTAINERD_ARGS = ("IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;"
                   "K8S_POD_INFRA_CONTAINER_ID=0123456789abcdef;K8S_POD_UID=6f1c1f0e-43c8-4a7b-9e3a-2c1d5b7e9f00")


def test_containerd_cni_args(cni, pod):
    conf = bridge_conf(cni, ipMasq=True)
    cid = "3f5e1b7c9a2d4e6f8a0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f"  # containerd-style
    result = cni.add(conf, cid, pod, cni_args=CONTAINERD_ARGS)
    assert link(pod, "eth0") is not None and len(our_chains(cni.ns)) == 1
    assert cni.check(conf, result, cid, pod).rc == 0
    cni.delete(conf, cid, pod.path, cni_args=CONTAINERD_ARGS)
    assert_nothing_left(cni)


def test_unknown_cni_args_need_ignore_unknown(cni, pod):
    conf = bridge_conf(cni)
    cni.fails(4, "cni-bridge", "ADD", conf, "FOO", container_id="c1", netns=pod.path, cni_args="FOO=bar")
    assert_nothing_left(cni)
    cni.add(conf, "c1", pod, cni_args="IgnoreUnknown=1;FOO=bar;K8S_POD_NAME=x")
    assert link(pod, "eth0") is not None


def test_bridge_ports_have_ipv6_off_and_pods_still_talk_ipv6(cni, make_netns):
    # A port forwards frames; with IPv6 on, each one would hold a link-local address and
    # route, and every link event on a busy node walked them all.
    conf = bridge_conf(cni, "10.77.0.0/24", "fd77::/64", isDefaultGateway=True)
    p1, p2 = make_netns("p"), make_netns("p")
    r1, r2 = cni.add(conf, "c1", p1), cni.add(conf, "c2", p2)
    for result in (r1, r2):
        port = host_veth(result)
        assert sysfs(cni.ns, f"/proc/sys/net/ipv6/conf/{port}/disable_ipv6") == "1"
        assert "inet6" not in cni.ns.exec("ip", "-6", "addr", "show", "dev", port).stdout   # not even fe80::
    assert addresses(cni.ns, conf["bridge"], 6) == ["fd77::1/64"]     # the gateway keeps IPv6
    assert ping(p1, "fd77::3", 6).returncode == 0                     # pod to pod, bridged
    assert ping(p1, "fd77::1", 6).returncode == 0                     # pod to its gateway
