"""Interop with Debian's reference plugins (containernetworking-plugins 1.1.1, cniVersion <= 1.0.0).

- cni-bridge with the reference host-local IPAM (exec'd from CNI_PATH);
- the reference bridge with cni-ipam;
- the reference portmap, tuning and bandwidth chained after cni-bridge, fed its result as
  prevResult the way libcni does, and the chain's DEL in reverse order cleaning up.
"""
from __future__ import annotations

import pytest

from tests.integration.cnitest import (
    addr_of, addresses, assert_nothing_left, bridge_conf, ipam_conf, link, link_kind, links,
    nat_rules, ping, reservations, reserved_ips, routes, tcp_exchange, veths, with_prev,
)
from tests.support.netns import REFERENCE_DIR

pytestmark = pytest.mark.skipif(
    not all((REFERENCE_DIR / p).exists() for p in ("bridge", "host-local", "portmap", "tuning", "bandwidth")),
    reason="Debian's containernetworking-plugins are not installed in /usr/lib/cni",
)


# -- cni-bridge + host-local ------------------------------------------------------------
@pytest.mark.parametrize("version", ["0.3.1", "1.0.0"])
def test_cni_bridge_with_host_local(cni, pod, version):
    ipam = ipam_conf(cni, "10.77.0.0/24", "fd77::/64", type_="host-local",
                     routes=[{"dst": "0.0.0.0/0"}])
    conf = bridge_conf(cni, version=version, isGateway=True, ipMasq=True, ipam=ipam)
    result = cni.add(conf, "c1", pod)
    assert result["cniVersion"] == version
    assert [ip["address"] for ip in result["ips"]] == ["10.77.0.2/24", "fd77::2/64"]
    assert sorted(addresses(pod, "eth0")) == ["10.77.0.2/24", "fd77::2/64"]
    # host-local's own on-disk format: one file per IP holding "<cid>\r\n<ifname>".
    assert reservations(cni) == {"10.77.0.2": "c1\r\neth0", "fd77::2": "c1\r\neth0"}
    assert ping(pod, "10.77.0.1").returncode == 0
    if version >= "0.4.0":
        res = cni.check(conf, result, "c1", pod)
        assert res.rc == 0, res.stdout
    cni.delete(conf, "c1", pod.path)
    assert_nothing_left(cni)


def test_host_local_error_is_passed_through_and_nothing_left(cni, make_netns):
    ipam = ipam_conf(cni, type_="host-local")
    ipam["ranges"] = [[{"subnet": "10.77.0.0/30"}]]  # one usable address
    conf = bridge_conf(cni, isGateway=True, ipMasq=True, ipam=ipam)
    cni.add(conf, "c1", make_netns("p"))
    other = make_netns("p")
    cni.fails(None, "cni-bridge", "ADD", conf, "no IP addresses available", container_id="c2",
              netns=other.path)
    assert link(other, "eth0") is None
    assert reserved_ips(cni) == {"10.77.0.2"} and len(veths(cni.ns)) == 1


# -- reference bridge + cni-ipam ----------------------------------------------------------
@pytest.mark.parametrize("version", ["0.4.0", "1.0.0"])
def test_reference_bridge_with_cni_ipam(cni, make_netns, version):
    conf = {"cniVersion": version, "name": "itest", "type": "bridge", "bridge": "refbr0",
            "isGateway": True, "ipMasq": True,
            "ipam": ipam_conf(cni, "10.77.0.0/24", routes=[{"dst": "0.0.0.0/0"}])}
    pods = [make_netns("p"), make_netns("p")]
    results = [cni.add(conf, f"c{i}", p, plugin="bridge") for i, p in enumerate(pods)]
    assert all(r["cniVersion"] == version and r["ips"][0]["interface"] == 2 for r in results)
    ips = [addr_of(r) for r in results]
    assert ips == ["10.77.0.2", "10.77.0.3"]
    assert reserved_ips(cni) == set(ips)
    assert addresses(cni.ns, "refbr0") == ["10.77.0.1/24"]
    assert next(r for r in routes(pods[0]) if r["dst"] == "default")["gateway"] == "10.77.0.1"
    assert ping(pods[0], ips[1]).returncode == 0
    for i, p in enumerate(pods):  # the reference bridge forwards CHECK to cni-ipam
        res = cni.check(conf, results[i], f"c{i}", p, plugin="bridge")
        assert res.rc == 0, res.stdout
    cni.delete(conf, "c0", pods[0].path, plugin="bridge")
    cni.delete(conf, "c1", "", plugin="bridge")  # no netns: IPAM DEL only
    assert reservations(cni) == {}
    assert link(pods[0], "eth0") is None


# -- chained plugins after cni-bridge -------------------------------------------------
HOST_PORT, POD_PORT = 18080, 8080


def chained(conf: dict, plugin: dict) -> dict:
    """A plugin's config as libcni builds it: the list's name and version, its own keys."""
    return {"cniVersion": conf["cniVersion"], "name": conf["name"], **plugin}


def test_portmap_tuning_bandwidth_chain(cni, pod, tmp_path):
    conf = bridge_conf(cni, isDefaultGateway=True, ipMasq=True)
    plugins = [
        chained(conf, {"type": "portmap", "capabilities": {"portMappings": True},
                       "runtimeConfig": {"portMappings": [
                           {"hostPort": HOST_PORT, "containerPort": POD_PORT, "protocol": "tcp"}]}}),
        chained(conf, {"type": "tuning", "mtu": 1300, "promisc": True, "dataDir": str(tmp_path / "tuning"),
                       "sysctl": {"net.ipv4.conf.eth0.arp_ignore": "1"}}),
        chained(conf, {"type": "bandwidth", "ingressRate": 8_000_000, "ingressBurst": 80_000,
                       "egressRate": 8_000_000, "egressBurst": 80_000}),
    ]
    first = cni.add(conf, "c1", pod)
    pod_ip = addr_of(first)
    host_veth = first["interfaces"][1]["name"]
    prev = first
    for plugin in plugins:
        out = cni.add(with_prev(plugin, prev), "c1", pod, plugin=plugin["type"])
        # Each accepts our result and passes it on (bandwidth appends its ifb device).
        assert out["cniVersion"] == "1.0.0"
        assert out["interfaces"][:3] == first["interfaces"]
        assert out["ips"] == first["ips"]
        prev = out

    # portmap: a DNAT chain for this container, and the mapping works from the host.
    nat = nat_rules(cni.ns)
    dn = [l for l in nat if "-A CNI-DN-" in l and f"--dport {HOST_PORT}" in l and "DNAT" in l]
    assert dn and any(f"{pod_ip}:{POD_PORT}" in l for l in dn), dn
    assert tcp_exchange(pod, cni.ns, "10.77.0.1", port=POD_PORT, connect_port=HOST_PORT) == "PING OVER TCP\n"
    # tuning: applied inside the pod.
    inner = link(pod, "eth0")
    assert inner["mtu"] == 1300 and "PROMISC" in inner["flags"]
    assert pod.exec("cat", "/proc/sys/net/ipv4/conf/eth0/arp_ignore").stdout.strip() == "1"
    # bandwidth: a tbf qdisc on the host veth and an ifb device for egress.
    assert "tbf" in cni.ns.exec("tc", "qdisc", "show", "dev", host_veth).stdout
    ifbs = [n for n, info in links(cni.ns).items() if link_kind(info) == "ifb"]
    assert len(ifbs) == 1
    # CHECK of cni-bridge with the chain's final result (what libcni caches).
    res = cni.check(conf, prev, "c1", pod)
    assert res.rc == 0, res.stdout

    # DEL in reverse order, each with the cached result, as libcni does.
    for plugin in reversed(plugins):
        cni.delete(with_prev(plugin, prev), "c1", pod.path, plugin=plugin["type"])
    cni.delete(with_prev(conf, prev), "c1", pod.path)
    assert [n for n, info in links(cni.ns).items() if link_kind(info) == "ifb"] == []
    assert [l for l in nat_rules(cni.ns) if "CNI-DN-" in l] == []
    assert link(pod, "eth0") is None
    assert_nothing_left(cni)


def test_chain_del_after_netns_is_gone(cni, make_netns, tmp_path):
    """The runtime lost the pod's netns: the whole chain's DEL still cleans up."""
    pod = make_netns("p")
    conf = bridge_conf(cni, isGateway=True, ipMasq=True)
    portmap = chained(conf, {"type": "portmap", "capabilities": {"portMappings": True},
                             "runtimeConfig": {"portMappings": [
                                 {"hostPort": HOST_PORT, "containerPort": POD_PORT, "protocol": "tcp"}]}})
    first = cni.add(conf, "c1", pod)
    final = cni.add(with_prev(portmap, first), "c1", pod, plugin="portmap")
    path = pod.path
    pod.delete()
    cni.delete(with_prev(portmap, final), "c1", path, plugin="portmap")
    cni.delete(with_prev(conf, final), "c1", path)
    assert [l for l in nat_rules(cni.ns) if "CNI-DN-" in l] == []
    assert_nothing_left(cni)
    assert final["ips"] == first["ips"]
