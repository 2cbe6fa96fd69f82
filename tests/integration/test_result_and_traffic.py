"""The ADD result matches the kernel, and two dual-stack pods on one bridge talk to each other.

The two attachments are made once for the module (read-only tests share them).
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest

from tests.integration.cnitest import (
    Cni, addr_of, addresses, assert_nothing_left, bridge_conf, link, ping, tcp_exchange, veths,
)
from tests.support.netns import CniHost, Netns, make_cni_path


@dataclass
class Lab:
    cni: Cni
    conf: dict
    pods: list[Netns]
    results: list[dict]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lab")
    made: list[Netns] = []
    try:
        host = Netns("h")
        made.append(host)
        cni = Cni(CniHost(host, make_cni_path(tmp / "bin"), tmp / "ipam"), tmp)
        conf = bridge_conf(cni, "10.77.0.0/24", "fd77::/64", isDefaultGateway=True, ipMasq=True)
        pods, results = [], []
        for i in range(2):
            pod = Netns("p")
            made.append(pod)
            pods.append(pod)
            results.append(cni.add(conf, f"c{i}", pod))
        yield Lab(cni, conf, pods, results)
    finally:
        for ns in reversed(made):
            ns.delete()


def test_result_interfaces_match_the_kernel(lab):
    for pod, result in zip(lab.pods, lab.results):
        bridge, veth, inner = result["interfaces"]
        assert bridge["name"] == lab.conf["bridge"] and "sandbox" not in bridge
        assert bridge["mac"] == link(lab.cni.ns, bridge["name"])["address"]
        host_veth = link(lab.cni.ns, veth["name"])
        assert host_veth is not None and veth["mac"] == host_veth["address"] and "sandbox" not in veth
        assert host_veth["master"] == bridge["name"]
        assert inner["name"] == "eth0" and inner["sandbox"] == pod.path
        assert inner["mac"] == link(pod, "eth0")["address"]
    assert sorted(r["interfaces"][1]["name"] for r in lab.results) == veths(lab.cni.ns)
    assert lab.results[0]["interfaces"][0] == lab.results[1]["interfaces"][0]


def test_result_ips_match_the_kernel(lab):
    for pod, result in zip(lab.pods, lab.results):
        assert [ip["interface"] for ip in result["ips"]] == [2, 2]
        assert sorted(ip["address"] for ip in result["ips"]) == sorted(addresses(pod, "eth0"))
        assert [ip["gateway"] for ip in result["ips"]] == ["10.77.0.1", "fd77::1"]
        assert {"dst": "0.0.0.0/0", "gw": "10.77.0.1"} in result["routes"]
        assert {"dst": "::/0", "gw": "fd77::1"} in result["routes"]
    assert addr_of(lab.results[0]) != addr_of(lab.results[1])
    assert addr_of(lab.results[0], 6) != addr_of(lab.results[1], 6)


def test_check_passes_for_both(lab):
    for i, (pod, result) in enumerate(zip(lab.pods, lab.results)):
        res = lab.cni.check(lab.conf, result, f"c{i}", pod)
        assert res.rc == 0, res.stdout


def test_ping_between_pods(lab):
    a, b = lab.pods
    res = ping(a, addr_of(lab.results[1]))
    assert res.returncode == 0, res.stdout + res.stderr
    res = ping(b, addr_of(lab.results[0]))
    assert res.returncode == 0, res.stdout + res.stderr


def test_ping6_between_pods(lab):
    a, b = lab.pods
    res = ping(a, addr_of(lab.results[1], 6), family=6)
    assert res.returncode == 0, res.stdout + res.stderr
    res = ping(b, addr_of(lab.results[0], 6), family=6)
    assert res.returncode == 0, res.stdout + res.stderr


def test_tcp_exchange_between_pods(lab):
    a, b = lab.pods
    assert tcp_exchange(a, b, addr_of(lab.results[0])) == "PING OVER TCP\n"
    assert tcp_exchange(b, a, addr_of(lab.results[1], 6), port=5556) == "PING OVER TCP\n"


def test_pod_reaches_its_gateway(lab):
    assert ping(lab.pods[0], "10.77.0.1").returncode == 0
    assert ping(lab.pods[0], "fd77::1", family=6).returncode == 0


def test_zz_del_both_leaves_nothing(lab):
    """Runs last in this module (pytest keeps file order): tears the lab down through DEL."""
    bridge_mac = lab.results[0]["interfaces"][0]["mac"]
    for i, pod in enumerate(lab.pods):
        lab.cni.delete(lab.conf, f"c{i}", pod.path)
        assert link(pod, "eth0") is None
        # The bridge MAC is pinned: it does not follow the ports as they go.
        assert link(lab.cni.ns, lab.conf["bridge"])["address"] == bridge_mac
    assert_nothing_left(lab.cni)
    assert ping(lab.pods[0], addr_of(lab.results[1])).returncode != 0
