"""The raw rtnetlink client (`cni_bridge/rtnl.py`) and the adapter on it, against a real
kernel in scratch namespaces: what it reads matches `ip`, refusals carry the errno, big
dumps come back whole, and the plugin's ADD and DEL no longer load pyroute2."""
from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cni_bridge import rtnl
from cni_bridge.netlink import Netlink, link_mac
from cni_bridge.protocol.errors import CNIError

ROOT = Path(__file__).resolve().parents[2]


def test_reads_match_ip(make_netns):
    ns = make_netns("rt")
    ns.exec("ip", "link", "add", "d0", "type", "bridge")
    ns.exec("ip", "link", "set", "d0", "up", "mtu", "1400", "address", "02:00:00:00:00:42")
    ns.exec("ip", "addr", "add", "10.91.0.5/24", "dev", "d0")
    ns.exec("ip", "-6", "addr", "add", "fd91::5/64", "dev", "d0", "nodad")
    ns.exec("ip", "route", "add", "10.92.0.0/16", "via", "10.91.0.1", "dev", "d0", "proto", "static")
    ns.exec("ip", "route", "add", "10.93.0.0/16", "dev", "d0", "table", "100")
    with Netlink(ns.path) as nl:
        link = nl.link("d0")
        assert link is not None and (link.kind, link.mac, link.mtu, link.up) == ("bridge", "02:00:00:00:00:42",
                                                                                 1400, True)
        assert nl.link("nonexistent") is None
        assert ipaddress.ip_interface("10.91.0.5/24") in nl.addresses("d0")
        assert ipaddress.ip_interface("fd91::5/64") in nl.addresses("d0", 6)
        assert all(a.version == 4 for a in nl.addresses("d0", 4))
        assert nl.addresses("lo", 4) == [ipaddress.ip_interface("127.0.0.1/8")]   # filtered by link
        routes = {(str(r.dst), str(r.gw), r.proto) for r in nl.routes(4)}
        assert ("10.92.0.0/16", "10.91.0.1", 4) in routes
        assert not any(r[0] == "10.93.0.0/16" for r in routes)   # table 100 is not the main table
    assert link_mac(ns.path, "d0") == "02:00:00:00:00:42"
    assert link_mac(ns.path, "nonexistent") is None


def test_changes_are_the_kernels(make_netns):
    ns = make_netns("rt")
    ns.exec("ip", "link", "add", "d1", "type", "bridge")
    with Netlink(ns.path) as nl:
        nl.add_address("d1", ipaddress.ip_interface("10.94.0.9/24"))
        nl.add_address("d1", ipaddress.ip_interface("10.94.0.9/24"))      # again: EEXIST is fine
        nl.set_up("d1")
        nl.add_route(ipaddress.ip_network("10.95.0.0/16"), ipaddress.ip_address("10.94.0.1"), "d1")
        nl.replace_route(ipaddress.ip_network("10.96.0.0/16"), ipaddress.ip_address("10.94.0.2"), 157)
    shown = ns.exec("ip", "-4", "addr", "show", "d1").stdout
    assert "10.94.0.9/24 brd 10.94.0.255" in shown
    routes = ns.exec("ip", "route").stdout
    assert "10.95.0.0/16 via 10.94.0.1 dev d1 proto static" in routes
    assert "10.96.0.0/16 via 10.94.0.2 dev d1 proto 157" in routes
    with Netlink(ns.path) as nl:
        nl.delete_route(ipaddress.ip_network("10.96.0.0/16"), ipaddress.ip_address("10.94.0.2"), 157)
        nl.delete_route(ipaddress.ip_network("10.96.0.0/16"), None, 157)    # already gone: fine
        nl.del_address("d1", ipaddress.ip_interface("10.94.0.9/24"))
        assert nl.delete_link("d1") is True
        assert nl.delete_link("d1") is False
    assert "10.96.0.0/16" not in ns.exec("ip", "route").stdout
    assert "d1" not in ns.links()


def test_a_refusal_carries_the_errno_and_the_kernels_words(make_netns):
    ns = make_netns("rt")
    with Netlink(ns.path) as nl:
        with pytest.raises(rtnl.NetlinkError) as caught:
            nl.rt.request(rtnl.RTM_DELLINK, rtnl.ifinfo(999999))
        assert caught.value.errno == caught.value.code == 19            # ENODEV
        ns.exec("ip", "link", "add", "d2", "type", "bridge")
        # A gateway that is not on-link: a CNI error naming the step, not a traceback.
        with pytest.raises(CNIError) as refused:
            nl.add_route(ipaddress.ip_network("10.97.0.0/16"), ipaddress.ip_address("10.98.0.1"), "d2")
        assert "add the route" in refused.value.msg
        # The socket still answers the next request in order.
        assert nl.link("d2") is not None


def test_a_dump_bigger_than_one_datagram_comes_back_whole(make_netns):
    ns = make_netns("rt")
    batch = "".join(f"link add dm{i} type bridge\n" for i in range(400))
    ns.exec("ip", "-batch", "-", input=batch)
    with Netlink(ns.path) as nl:
        names = {link.name for link in nl.links()}
    assert {f"dm{i}" for i in range(400)} <= names and "lo" in names


def test_bridge_and_veth_as_the_plugin_makes_them(make_netns):
    host, pod = make_netns("rh"), make_netns("rp")
    with Netlink(host.path) as nl:
        bridge = nl.ensure_bridge("brrt", 1450, promisc=True)
        assert nl.ensure_bridge("brrt", 1450, promisc=True).index == bridge.index   # idempotent
        veth = nl.add_veth("vethrt", "eth0", pod.path, 1450, "02:00:00:00:00:07")
        nl.attach("vethrt", "brrt", hairpin=True)
        port = nl.link("vethrt")
        assert port is not None and port.master == bridge.index and port.up and veth.mtu == 1450
        assert nl.link("brrt").promisc
    assert host.exec("cat", "/sys/class/net/vethrt/brport/hairpin_mode").stdout.strip() == "1"
    assert "02:00:00:00:00:07" in pod.exec("ip", "link", "show", "eth0").stdout


def test_the_plugins_add_and_del_never_load_pyroute2(cni_host, make_netns, tmp_path):
    pod = make_netns("p")
    conf = {"cniVersion": "1.0.0", "name": "rtprobe", "type": "cni-bridge", "bridge": "brprobe",
            "isGateway": True, "daemonSocket": "",
            "ipam": {"type": "cni-ipam", "dataDir": str(tmp_path / "ipam"), "ranges": [[{"subnet": "10.99.0.0/24"}]]}}
    probe = ("import sys\nfrom cni_bridge.main import main\nsys.argv = ['cni-bridge']\nrc = main()\n"
             "sys.stderr.write('\\nLOADED=' + ','.join(sorted(m for m in sys.modules if m.startswith('pyroute2'))))\n"
             "sys.exit(rc)")
    for command in ("ADD", "DEL"):
        env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT), "CNI_COMMAND": command,
               "CNI_CONTAINERID": "probe", "CNI_NETNS": pod.path, "CNI_IFNAME": "eth0", "CNI_PATH": "/nonexistent"}
        proc = cni_host.netns.exec(sys.executable, "-c", probe, input=json.dumps(conf), env=env, check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert proc.stderr.strip().endswith("LOADED="), proc.stderr
    assert subprocess.run(["ip", "netns", "exec", pod.name, "ip", "link", "show", "eth0"],
                          capture_output=True).returncode != 0
