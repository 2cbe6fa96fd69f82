"""Parallel pods on one bridge and one range, and the bounded IPAM lock wait (code 11)."""
from __future__ import annotations

import fcntl
import ipaddress
import os
from concurrent.futures import ThreadPoolExecutor

from tests.support.netns import unique
from tests.support.reliability import bridge_conf, cni_error, ipam_conf, leftovers, no_traceback, store_files

PODS = 40
NET = "load"


def test_parallel_adds_then_dels_on_one_bridge(cni_host, make_netns):
    bridge = unique("br")   # does not exist yet: the first ADDs race to create it and its gateway
    conf = bridge_conf(cni_host.data_dir, bridge, network=NET, subnet="10.92.0.0/24")
    pods = [make_netns("p") for _ in range(PODS)]

    def add(i):
        return cni_host.run("cni-bridge", "ADD", conf, container_id=f"pod{i}", netns=pods[i].path, timeout=180)

    def delete(i):
        return cni_host.run("cni-bridge", "DEL", conf, container_id=f"pod{i}", netns=pods[i].path, timeout=180)

    with ThreadPoolExecutor(max_workers=PODS) as pool:
        added = list(pool.map(add, range(PODS)))
    for res in added:
        no_traceback(res)
        assert res.rc == 0, res.stdout
    addresses = [ipaddress.ip_interface(res.json["ips"][0]["address"]) for res in added]
    assert len(set(addresses)) == PODS
    assert all(a.ip in ipaddress.ip_network("10.92.0.0/24") and a.ip != ipaddress.ip_address("10.92.0.1")
               for a in addresses)
    gateway = cni_host.netns.exec("ip", "-4", "-o", "addr", "show", "dev", bridge).stdout
    assert gateway.count(" inet ") == 1 and "10.92.0.1/24" in gateway
    assert len(leftovers(cni_host, NET)["chains"]) == PODS
    # The pods really share the bridge: the first reaches the last.
    ping = pods[0].exec("busybox", "ping", "-c", "1", "-W", "2", str(addresses[-1].ip), check=False)
    assert ping.returncode == 0, ping.stdout + ping.stderr

    with ThreadPoolExecutor(max_workers=PODS) as pool:
        deleted = list(pool.map(delete, range(PODS)))
    for res in deleted:
        no_traceback(res)
        assert res.rc == 0, res.stdout
    assert leftovers(cni_host, NET) == {}


def _hold_lock(data_dir, network):
    directory = os.path.join(data_dir, network)
    os.makedirs(os.path.join(directory, "owners"), exist_ok=True)
    fd = os.open(os.path.join(directory, "lock"), os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def test_lock_timeout_is_code_11_and_leaves_nothing(cni_host, make_netns):
    conf = ipam_conf(cni_host.data_dir, network=NET, lockTimeout=0.3)
    fd = _hold_lock(cni_host.data_dir, NET)
    try:
        error = cni_error(cni_host.run("cni-ipam", "ADD", conf, container_id="c1", netns="/none"))
        assert error["code"] == 11 and "lock" in error["msg"]
        assert store_files(cni_host.data_dir, NET) == {"reservations": [], "owners": [], "temp_files": []}

        pod = make_netns("p")
        bconf = bridge_conf(cni_host.data_dir, unique("br"), network=NET, lockTimeout=0.3)
        error = cni_error(cni_host.run("cni-bridge", "ADD", bconf, container_id="c2", netns=pod.path))
        assert error["code"] == 11
        assert leftovers(cni_host, NET) == {} and "eth0" not in pod.links()
    finally:
        os.close(fd)   # closing the descriptor drops the flock
    res = cni_host.run("cni-ipam", "ADD", conf, container_id="c1", netns="/none")
    assert res.rc == 0, res.stdout
    assert cni_host.run("cni-ipam", "DEL", conf, container_id="c1").rc == 0
