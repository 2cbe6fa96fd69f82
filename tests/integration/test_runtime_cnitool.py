"""The plugins driven by libcni (the cnitool harness), as containerd and podman drive them.

Every test runs cnitool inside a scratch "host" netns (cni_host) with its own
CNI_PATH (our two executables + Debian's reference plugins), its own NETCONFPATH
holding an adapted copy of a conflist from conf/, and its own libcni cache dir.
Containers are scratch namespaces. Nothing touches the machine's own network.

Known limits of the harness (tests/harness/README.md): libcni 1.1.2 cannot parse
1.1.0 results, so versions here are 1.0.0 and lower; the reference portmap 1.1.1
fails CHECK on IPv4-only setups whenever portMappings are passed
(containernetworking/plugins#819), so CHECK runs without CAP_ARGS, and the
CHECK with CAP_ARGS is only required to fail inside portmap, never in ours.
"""
from __future__ import annotations

import errno
import ipaddress
import json
import os
import shutil
import subprocess
import threading
import time

import pytest

from cni_bridge import ipam_client
from tests.support.netns import VENV_BIN, unique
from tests.support.runtime import (
    Cnitool,
    TcpServer,
    adapt_conflist,
    add_uplink,
    addresses,
    install_spy,
    owner_index,
    per_attachment_nat,
    plugin_types,
    reservations,
    result_ips,
    spy_calls,
    subnets_of,
    tcp_get,
    veths,
)

NODE_IP = "192.0.2.1"          # the scratch host's "node address" (TEST-NET-1)
HOST_PORT, POD_PORT = 18080, 8080
PORTMAP_CHECK_BUG = "could not check ipv6 dnat"   # containernetworking/plugins#819
K8S_STYLE_ARGS = ("IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;"
                  "K8S_POD_INFRA_CONTAINER_ID={cid};K8S_POD_UID=5f1d2c1e-0000-4000-8000-000000000001")


@pytest.fixture
def tool(cnitool_bin, cni_host, tmp_path) -> Cnitool:
    return Cnitool(binary=cnitool_bin, host=cni_host.netns, cni_path=cni_host.cni_path,
                   netconf_dir=tmp_path / "net.d", cache_dir=tmp_path / "cache")


@pytest.fixture
def node_ip(cni_host) -> str:
    """The scratch host's node address, on an uplink (the DNAT target of hostPorts)."""
    return add_uplink(cni_host.netns.exec, f"{NODE_IP}/24")


def port_mappings(host_port: int = HOST_PORT, pod_port: int = POD_PORT) -> dict:
    return {"portMappings": [{"hostPort": host_port, "containerPort": pod_port, "protocol": "tcp"}]}


def conflist(cni_host, filename: str, version: str | None = None, **kw) -> dict:
    return adapt_conflist(filename, name=kw.pop("name", unique("net")), bridge=kw.pop("bridge", unique("br")),
                          data_dir=cni_host.data_dir, version=version, **kw)


def assert_clean(cni_host, conf: dict, cid: str, tool: Cnitool, ifname: str = "eth0") -> None:
    """What a finished DEL must leave: no veth, reservation, per-attachment rule or cache entry."""
    name = conf["name"]
    assert veths(cni_host.netns) == [], "host-side veth left behind"
    assert reservations(cni_host.data_dir, name) == {}, "IP reservation left behind"
    assert owner_index(cni_host.data_dir, name) == [], "owner index entry left behind"
    assert per_attachment_nat(cni_host.netns, cid) == [], "nat rules left behind"
    assert not tool.cache_file(name, cid, ifname).exists(), "libcni cache entry left behind"


def legacy(version: str) -> bool:
    return tuple(map(int, version.split("."))) < (1, 0, 0)


# ----------------------------------------------------------------------------------------
# The conflists in conf/ through libcni: add, check, del, del again.
# ----------------------------------------------------------------------------------------
LIFECYCLE = [
    pytest.param("10-cni-bridge.conflist", "1.0.0", id="10-cni-bridge@1.0.0"),
    pytest.param("10-cni-bridge.conflist", "0.4.0", id="10-cni-bridge@0.4.0"),
    pytest.param("30-kindnet-style.conflist", "0.3.1", id="30-kindnet-style@0.3.1"),
    pytest.param("40-host-local.conflist", "1.0.0", id="40-host-local@1.0.0"),
    # 1.1.0 in conf/, but libcni 1.1.2 cannot parse 1.1.0 results: run it at 1.0.0.
    pytest.param("20-dual-stack.conflist", "1.0.0", id="20-dual-stack@1.0.0"),
]


@pytest.mark.parametrize("filename, version", LIFECYCLE)
def test_conflist_lifecycle_through_libcni(tool, cni_host, make_netns, node_ip, tmp_path, filename, version):
    conf = conflist(cni_host, filename, version)
    net = conf["name"]
    tool.write_conflist(conf)
    spy = tmp_path / "cni-bridge.log"   # libcni's CHECK errors do not name the plugin: ask ours
    install_spy(cni_host.cni_path, "cni-bridge", spy)
    pod = make_netns("p")
    cid = unique("ctr-")
    with_portmap = "portmap" in plugin_types(conf)
    cap = port_mappings() if with_portmap else None

    # ADD: the result libcni prints is ours (portmap passes it through) in the config's version.
    result = tool.add(net, pod.path, container_id=cid, cap_args=cap)
    assert result["cniVersion"] == version
    bridge, host_veth, inner = result["interfaces"]
    assert bridge["name"] == conf["plugins"][0]["bridge"]
    assert inner == {"name": "eth0", "mac": inner["mac"], "sandbox": pod.path}
    assert host_veth["name"] in veths(cni_host.netns)
    subnets = subnets_of(conf)
    assert len(result["ips"]) == len(subnets)
    for ip, subnet in zip(result["ips"], subnets):
        assert ipaddress.ip_interface(ip["address"]).network == subnet
        assert ip["interface"] == 2
        if legacy(version):   # 0.3.x/0.4.0 results carry ips[].version
            assert ip["version"] == str(subnet.version)
        else:
            assert "version" not in ip
    assert sorted(addresses(pod, "eth0")) == sorted(ip["address"] for ip in result["ips"])

    # The reservation on disk and the result libcni caches.
    reserved = {ip["address"].split("/")[0] for ip in result["ips"]}
    assert set(reservations(cni_host.data_dir, net)) == reserved
    cached = json.loads(tool.cache_file(net, cid).read_text())
    assert cached["kind"] == "cniCacheV1"
    assert (cached["containerId"], cached["ifName"], cached["networkName"]) == (cid, "eth0", net)
    assert cached["result"] == result
    if cap:
        assert cached["capabilityArgs"] == cap

    # Port mapping through the chained reference portmap: node address -> server in the pod.
    if with_portmap:
        with TcpServer(pod, POD_PORT, token=f"hello-{cid}"):
            got = tcp_get(cni_host.netns, node_ip, HOST_PORT)
        assert got.returncode == 0, got.stderr
        assert got.stdout.startswith(f"hello-{cid} from "), got.stdout
        assert any("CNI-DN-" in rule for rule in per_attachment_nat(cni_host.netns))

    # CHECK (libcni allows it from 0.4.0 on).
    if version.startswith("0.3."):
        refused = tool.run("check", net, pod.path, container_id=cid)
        assert refused.returncode != 0
        assert "does not support the CHECK command" in refused.stderr
    else:
        # Without portMappings: every plugin in the chain checks and passes.
        tool.ok("check", net, pod.path, container_id=cid)
        if cap:
            # With them, the reference portmap 1.1.1 fails on IPv4-only setups (plugins#819).
            # libcni runs CHECK in chain order, so a portmap failure means ours passed.
            # libcni runs CHECK in chain order: ours passed, then portmap failed (or not, once fixed).
            with_cap = tool.run("check", net, pod.path, container_id=cid, cap_args=cap)
            ours = spy_calls(spy)[-1]
            assert (ours.command, ours.rc) == ("CHECK", 0), ours.stdout
            assert with_cap.returncode == 0 or PORTMAP_CHECK_BUG in with_cap.stderr, with_cap.stderr
        # CHECK is not a no-op: take the addresses away and our plugin notices.
        pod.exec("ip", "addr", "flush", "dev", "eth0", "scope", "global")
        broken = tool.run("check", net, pod.path, container_id=cid)
        assert broken.returncode != 0
        ours = spy_calls(spy)[-1]
        error = json.loads(ours.stdout)
        assert (ours.command, ours.rc) == ("CHECK", 1)
        assert error["msg"] in broken.stderr and "is missing on eth0" in error["msg"], broken.stderr

    # DEL with the same CAP_ARGS (libcni does not reuse the cached ones), then DEL again.
    tool.ok("del", net, pod.path, container_id=cid, cap_args=cap)
    assert "eth0" not in pod.links()
    assert_clean(cni_host, conf, cid, tool)
    tool.ok("del", net, pod.path, container_id=cid, cap_args=cap)
    assert_clean(cni_host, conf, cid, tool)


# ----------------------------------------------------------------------------------------
# What libcni hands each plugin: prevResult on CHECK/DEL, runtimeConfig for portmap.
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("version", ["1.0.0", "0.3.1"])
def test_libcni_injects_prev_result_and_runtime_config(tool, cni_host, make_netns, tmp_path, version):
    conf = conflist(cni_host, "10-cni-bridge.conflist", version)
    net = conf["name"]
    tool.write_conflist(conf)
    ours, portmap = tmp_path / "cni-bridge.log", tmp_path / "portmap.log"
    install_spy(cni_host.cni_path, "cni-bridge", ours)
    install_spy(cni_host.cni_path, "portmap", portmap)
    pod, cid, cap = make_netns("p"), unique("ctr-"), port_mappings()

    result = tool.add(net, pod.path, container_id=cid, cap_args=cap)
    if version != "0.3.1":
        tool.ok("check", net, pod.path, container_id=cid)
    tool.ok("del", net, pod.path, container_id=cid, cap_args=cap)

    calls = spy_calls(ours)
    assert [c.command for c in calls] == (["ADD", "DEL"] if version == "0.3.1" else ["ADD", "CHECK", "DEL"])
    add = calls[0]
    assert add.env["CNI_CONTAINERID"] == cid and add.env["CNI_IFNAME"] == "eth0"
    assert add.env["CNI_NETNS"] == pod.path
    assert add.stdin["name"] == net and add.stdin["cniVersion"] == version
    assert "prevResult" not in add.stdin          # first in the chain
    assert "runtimeConfig" not in add.stdin       # cni-bridge declares no capabilities
    if version == "0.3.1":
        assert "prevResult" not in calls[1].stdin     # libcni sends the cache only from 0.4.0
    else:
        for call in calls[1:]:
            assert call.stdin["prevResult"] == result, call.command

    # portmap accepted our result as its prevResult and DNATs to our address.
    pm_add = spy_calls(portmap)[0]
    assert pm_add.command == "ADD" and pm_add.rc == 0
    assert pm_add.stdin["prevResult"] == json.loads(add.stdout)
    assert pm_add.stdin["runtimeConfig"] == cap
    assert_clean(cni_host, conf, cid, tool)


# ----------------------------------------------------------------------------------------
# Port mappings reached from another pod, and by the pod itself (hairpin).
# ----------------------------------------------------------------------------------------
def test_port_mapping_from_another_pod_and_hairpin(tool, cni_host, make_netns, node_ip):
    conf = conflist(cni_host, "10-cni-bridge.conflist")   # hairpinMode: true
    net = conf["name"]
    tool.write_conflist(conf)
    server, client = make_netns("p"), make_netns("p")
    cap = port_mappings()
    tool.add(net, server.path, container_id="server", cap_args=cap)
    tool.add(net, client.path, container_id="client")
    try:
        with TcpServer(server, POD_PORT, token="via-hostport"):
            from_pod = tcp_get(client, node_ip, HOST_PORT)
            hairpin = tcp_get(server, node_ip, HOST_PORT)
        assert from_pod.returncode == 0 and from_pod.stdout.startswith("via-hostport"), from_pod
        assert hairpin.returncode == 0 and hairpin.stdout.startswith("via-hostport"), hairpin
    finally:
        tool.ok("del", net, server.path, container_id="server", cap_args=cap)
        tool.ok("del", net, client.path, container_id="client")
    assert_clean(cni_host, conf, "server", tool)
    assert_clean(cni_host, conf, "client", tool)


# ----------------------------------------------------------------------------------------
# Two networks in one container (multus-style): eth0 on one bridge, net1 on another.
# ----------------------------------------------------------------------------------------
def test_two_networks_in_one_container(tool, cni_host, make_netns):
    first = conflist(cni_host, "10-cni-bridge.conflist", "1.0.0", subnets=["10.31.0.0/24"])
    second = conflist(cni_host, "30-kindnet-style.conflist", "0.3.1", subnets=["10.32.0.0/24"])
    # The container's default route is eth0's; the second network only adds its subnet.
    second["plugins"][0].update(isDefaultGateway=False, isGateway=True)
    second["plugins"][0]["ipam"]["routes"] = []
    for conf in (first, second):
        tool.write_conflist(conf)
    pod, peer, cid = make_netns("p"), make_netns("p"), unique("ctr-")

    r1 = tool.add(first["name"], pod.path, container_id=cid, ifname="eth0")
    r2 = tool.add(second["name"], pod.path, container_id=cid, ifname="net1")
    assert r2["interfaces"][2]["name"] == "net1"
    assert r1["interfaces"][0]["name"] != r2["interfaces"][0]["name"]      # two bridges
    assert addresses(pod, "eth0") == [r1["ips"][0]["address"]]
    assert addresses(pod, "net1") == [r2["ips"][0]["address"]]
    assert tool.cache_file(first["name"], cid, "eth0").exists()
    assert tool.cache_file(second["name"], cid, "net1").exists()
    assert len(veths(cni_host.netns)) == 2

    # A pod on the second network only reaches the container over net1.
    tool.add(second["name"], peer.path, container_id="peer", ifname="eth0")
    with TcpServer(pod, 7000, token="on-net1"):
        got = tcp_get(peer, result_ips(r2)[0], 7000)
    assert got.returncode == 0 and got.stdout.startswith("on-net1"), got

    # Removing one network leaves the other attachment (and its reservation) alone.
    tool.ok("del", first["name"], pod.path, container_id=cid, ifname="eth0")
    assert "eth0" not in pod.links() and "net1" in pod.links()
    assert reservations(cni_host.data_dir, first["name"]) == {}
    kept = reservations(cni_host.data_dir, second["name"])
    assert result_ips(r2)[0] in kept and len(kept) == 2          # net1 and the peer
    tool.ok("del", second["name"], pod.path, container_id=cid, ifname="net1")
    tool.ok("del", second["name"], peer.path, container_id="peer", ifname="eth0")
    assert_clean(cni_host, first, cid, tool, "eth0")
    assert_clean(cni_host, second, cid, tool, "net1")


# ----------------------------------------------------------------------------------------
# containerd: DEL on stop, DEL again on remove (by then the netns is gone).
# ----------------------------------------------------------------------------------------
def test_containerd_del_on_stop_and_again_on_remove(tool, cni_host, make_netns):
    conf = conflist(cni_host, "10-cni-bridge.conflist")
    net = conf["name"]
    tool.write_conflist(conf)
    pod, cid, cap = make_netns("p"), unique("ctr-"), port_mappings()
    tool.add(net, pod.path, container_id=cid, cap_args=cap)

    tool.ok("del", net, pod.path, container_id=cid, cap_args=cap)      # StopPodSandbox
    assert_clean(cni_host, conf, cid, tool)
    pod.delete()
    assert not os.path.exists(pod.path)
    tool.ok("del", net, pod.path, container_id=cid, cap_args=cap)      # RemovePodSandbox
    assert_clean(cni_host, conf, cid, tool)


def test_del_after_the_netns_is_already_gone(tool, cni_host, make_netns):
    """A crashed or rebooted sandbox: the first DEL comes when the netns no longer exists.
    The IP, the masquerade chain (ipMasq) and portmap's DNAT must still go."""
    conf = conflist(cni_host, "10-cni-bridge.conflist")
    net = conf["name"]
    tool.write_conflist(conf)
    pod, cid, cap = make_netns("p"), unique("ctr-"), port_mappings()
    tool.add(net, pod.path, container_id=cid, cap_args=cap)
    assert any(rule.startswith("-N CBR-") for rule in per_attachment_nat(cni_host.netns))
    pod.delete()

    tool.ok("del", net, pod.path, container_id=cid, cap_args=cap)
    assert_clean(cni_host, conf, cid, tool)
    tool.ok("del", net, pod.path, container_id=cid, cap_args=cap)
    assert_clean(cni_host, conf, cid, tool)


# ----------------------------------------------------------------------------------------
# Many sandboxes started at once on one network.
# ----------------------------------------------------------------------------------------
def test_parallel_adds_and_dels_on_one_network(tool, cni_host, make_netns):
    conf = conflist(cni_host, "10-cni-bridge.conflist")
    net = conf["name"]
    tool.write_conflist(conf)
    pods = [(make_netns("p"), f"par{i}") for i in range(10)]

    procs = [tool.popen("add", net, pod.path, container_id=cid) for pod, cid in pods]
    outs = [p.communicate(timeout=120) + (p.returncode,) for p in procs]
    for (out, err, rc), (_, cid) in zip(outs, pods):
        assert rc == 0, f"{cid}: {err}"
        assert "Traceback" not in out + err
    results = [json.loads(out) for out, _, _ in outs]
    ips = [result_ips(r)[0] for r in results]
    assert len(set(ips)) == 10, ips
    assert set(reservations(cni_host.data_dir, net)) == set(ips)
    assert len(veths(cni_host.netns)) == 10
    bridge = conf["plugins"][0]["bridge"]
    assert addresses(cni_host.netns, bridge) == [results[0]["ips"][0]["gateway"] + "/" +
                                                 results[0]["ips"][0]["address"].split("/")[1]]
    ping = pods[0][0].exec("busybox", "ping", "-c", "1", "-W", "2", ips[-1], check=False)
    assert ping.returncode == 0, ping.stdout + ping.stderr

    procs = [tool.popen("del", net, pod.path, container_id=cid) for pod, cid in pods]
    for p, (_, cid) in zip(procs, pods):
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, f"{cid}: {err}"
    for _, cid in pods:
        assert_clean(cni_host, conf, cid, tool)


# ----------------------------------------------------------------------------------------
# CNI_ARGS as kubelet/containerd and podman send them.
# ----------------------------------------------------------------------------------------
def test_runtime_cni_args_are_accepted(tool, cni_host, make_netns, tmp_path):
    conf = conflist(cni_host, "10-cni-bridge.conflist", subnets=["10.33.0.0/24"])
    net = conf["name"]
    tool.write_conflist(conf)
    log = tmp_path / "spy.log"
    install_spy(cni_host.cni_path, "cni-bridge", log)
    pod, cid = make_netns("p"), unique("ctr-")
    args = K8S_STYLE_ARGS.format(cid=cid)

    result = tool.add(net, pod.path, container_id=cid, cni_args=args)
    tool.ok("check", net, pod.path, container_id=cid, cni_args=args)
    tool.ok("del", net, pod.path, container_id=cid, cni_args=args)
    assert [c.env.get("CNI_ARGS") for c in spy_calls(log)] == [args] * 3
    assert result_ips(result)
    assert_clean(cni_host, conf, cid, tool)

    # The legacy IP= request (IgnoreUnknown still set, as runtimes do) picks the address.
    pinned = tool.add(net, pod.path, container_id=cid, cni_args=f"{args};IP=10.33.0.42")
    assert result_ips(pinned) == ["10.33.0.42"]
    tool.ok("del", net, pod.path, container_id=cid)
    assert_clean(cni_host, conf, cid, tool)

    # Without IgnoreUnknown an unknown key is an error (code 4), and nothing is left behind.
    refused = tool.run("add", net, pod.path, container_id=cid, cni_args="K8S_POD_NAME=web-0;FOO=bar")
    assert refused.returncode != 0
    assert 'plugin type="cni-bridge" failed (add)' in refused.stderr and "FOO" in refused.stderr
    assert json.loads(spy_calls(log)[-1].stdout)["code"] == 4
    assert_clean(cni_host, conf, cid, tool)


# ----------------------------------------------------------------------------------------
# "text file busy": a plugin executable still open for writing when the runtime execs it.
# ----------------------------------------------------------------------------------------
def test_plugin_file_busy_while_libcni_execs_it(tool, cni_host, make_netns):
    """A plugin being installed (file still open for writing) while the runtime runs ADD.

    libcni retries exec once a second on "text file busy". In libcni 1.1.2 the
    retry reuses the exec.Cmd, so the *plugin* runs fine on the retry but libcni
    then reports a failure with an empty message (containernetworking/cni#855,
    fixed upstream by PR #1183). Either way the runtime is left in a state our
    plugin must handle: a real ADD happened, libcni may think it did not, the
    runtime cleans up with DEL (no cached result) and tries again.
    """
    conf = conflist(cni_host, "10-cni-bridge.conflist")
    net = conf["name"]
    tool.write_conflist(conf)
    pod, cid = make_netns("p"), unique("ctr-")
    plugin = cni_host.cni_path / "cni-bridge"
    plugin.unlink()
    with open(plugin, "w") as writer:                        # "installation in progress"
        writer.write(f'#!/bin/sh\nexec {VENV_BIN / "cni-bridge"} "$@"\n')
        writer.flush()
        os.chmod(plugin, 0o755)
        proc = tool.popen("add", net, pod.path, container_id=cid)
        time.sleep(1.3)                                      # at least two busy exec attempts
        assert proc.poll() is None, "libcni gave up instead of retrying: " + proc.communicate()[1]
        assert "eth0" not in pod.links()                     # the plugin cannot have run yet
    out, err = proc.communicate(timeout=60)

    assert "eth0" in pod.links(), err                        # the retried exec did run ADD
    ip = addresses(pod, "eth0")[0].split("/")[0]
    assert set(reservations(cni_host.data_dir, net)) == {ip}
    if proc.returncode == 0:                                 # a libcni with the fix
        assert result_ips(json.loads(out)) == [ip]
    else:                                                    # libcni 1.1.2 (cni#855)
        assert err.startswith('plugin type="cni-bridge" failed (add):'), err
        assert not tool.cache_file(net, cid).exists()
    # The runtime's recovery: DEL (nothing cached) cleans everything, the retried ADD works.
    tool.ok("del", net, pod.path, container_id=cid)
    assert_clean(cni_host, conf, cid, tool)
    again = tool.add(net, pod.path, container_id=cid)
    assert addresses(pod, "eth0") == [again["ips"][0]["address"]]
    tool.ok("del", net, pod.path, container_id=cid)
    assert_clean(cni_host, conf, cid, tool)


def test_ipam_client_retries_text_file_busy(cni_host, make_netns, tmp_path, monkeypatch):
    """cni-bridge execs a non-cni-ipam IPAM plugin itself, and retries ETXTBSY as libcni does:
    a host-local copy held open for writing for a moment still serves the ADD."""
    busy = tmp_path / "busy-ipam"
    shutil.copy2("/usr/lib/cni/host-local", busy)
    attempts: list[str] = []
    real_run = subprocess.run

    def spy_run(*args, **kwargs):
        try:
            return real_run(*args, **kwargs)
        except OSError as exc:
            attempts.append(errno.errorcode.get(exc.errno or 0, str(exc.errno)))
            raise
    monkeypatch.setattr(subprocess, "run", spy_run)   # ipam_client looks it up at call time

    pod = make_netns("p")
    data_dir = tmp_path / "ipam"
    conf = {"cniVersion": "1.0.0", "name": "busy", "type": "cni-bridge",
            "ipam": {"type": "busy-ipam", "dataDir": str(data_dir), "ranges": [[{"subnet": "10.34.0.0/24"}]]}}
    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "busy1", "CNI_NETNS": pod.path,
           "CNI_IFNAME": "eth0", "CNI_PATH": str(tmp_path), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    writer = open(busy, "r+b")                  # held open for writing: exec gives ETXTBSY
    closer = threading.Timer(0.12, writer.close)
    closer.start()
    try:
        proc = ipam_client._run_retrying_busy(str(busy), env, json.dumps(conf).encode())
    finally:
        closer.cancel()
        writer.close()
    assert attempts and set(attempts) == {"ETXTBSY"}, attempts
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout)
    assert result["ips"][0]["address"] == "10.34.0.2/24"
    assert set(reservations(data_dir, "busy")) == {"10.34.0.2"}
