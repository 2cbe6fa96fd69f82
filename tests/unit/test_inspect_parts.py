"""The parts of `cni-bridge inspect` that need no root: conflist reading, ADD's config checks,
the renderers and the exit status, on hand-made views."""
from __future__ import annotations

import io
import json
import shutil
import subprocess

import pytest

from cni_bridge import conflist
from cni_bridge.inspect import cli, dot, table
from cni_bridge.inspect.model import (FAIL, OK, SKIP, WARN, Attachment, Bridge, Check, Network, NodeView, Pool,
                                      Port)
from cni_bridge.protocol.errors import CNIError

BRIDGE = {"type": "cni-bridge", "bridge": "cni0", "ipam": {"type": "cni-ipam", "ranges": [[{"subnet": "10.1.0.0/24"}]]}}


def write(tmp_path, name: str, body) -> str:
    path = tmp_path / name
    path.write_text(body if isinstance(body, str) else json.dumps(body))
    return str(path)


def test_a_conflist_as_libcni_reads_it(tmp_path):
    conf = conflist.read_file(write(tmp_path, "10.conflist", {
        "cniVersion": "1.0.0", "name": "n", "plugins": [BRIDGE, {"type": "portmap"}]}))
    assert conf.error is None and conf.types == ["cni-bridge", "portmap"]
    # libcni hands every plugin the list's name and version
    assert conf.plugins[1].config == {"type": "portmap", "name": "n", "cniVersion": "1.0.0"}


def test_a_single_plugin_conf_file_is_a_list_of_one(tmp_path):
    conf = conflist.read_file(write(tmp_path, "10.conf", {**BRIDGE, "cniVersion": "0.3.1", "name": "single"}))
    assert (conf.error, conf.name, conf.cni_version, conf.types) == (None, "single", "0.3.1", ["cni-bridge"])


@pytest.mark.parametrize("body, error", [
    ("{", "not JSON"),
    ("[]", "not a JSON object"),
    ({"cniVersion": "1.0.0", "plugins": [BRIDGE]}, "no network name"),
    ({"cniVersion": "1.0.0", "name": "n", "plugins": []}, "no plugins list"),
    ({"cniVersion": "1.0.0", "name": "n", "plugins": [{"bridge": "x"}]}, "plugins[0] has no type"),
    ({"cniVersion": "1.0.0", "name": "n", "plugins": ["cni-bridge"]}, "plugins[0] is not a JSON object"),
])
def test_unusable_files(tmp_path, body, error):
    assert error in conflist.read_file(write(tmp_path, "x.conflist", body)).error


def test_conf_dir_lists_what_libcni_loads(tmp_path):
    for name in ("10-a.conflist", "20-b.conf", "30-c.json", "40-d.txt", ".50-e.conflist"):
        write(tmp_path, name, {})
    (tmp_path / "60-dir.conflist").mkdir()
    assert [p.rsplit("/", 1)[1] for p in conflist.list_files(str(tmp_path))] == \
        ["10-a.conflist", "20-b.conf", "30-c.json"]
    assert conflist.list_files(str(tmp_path / "missing")) == []


@pytest.mark.parametrize("change, code, words", [
    ({"mtu": "big"}, 7, "mtu"),
    ({"hairpinMode": True, "promiscMode": True}, 7, "hairpinMode and promiscMode"),
    ({"ipam": {"type": "cni-ipam", "ranges": [[{"subnet": "10.1.0.1/24"}]]}}, 7, "not a valid subnet"),
    ({"cniVersion": "9.9.9"}, 1, "unsupported cniVersion"),
])
def test_validate_for_add_refuses_as_add_does(change, code, words):
    with pytest.raises(CNIError) as caught:
        conflist.validate_for_add({**BRIDGE, "cniVersion": "1.0.0", "name": "n", **change})
    assert caught.value.code == code and words in conflist.describe(caught.value)


def test_validate_for_add_accepts_a_good_config():
    conflist.validate_for_add({**BRIDGE, "cniVersion": "1.0.0", "name": "n"})


@pytest.mark.parametrize("plugin, expected", [
    (BRIDGE, ["cni-bridge"]),                                                  # IPAM runs in-process
    ({**BRIDGE, "ipam": {"type": "host-local"}}, ["cni-bridge", "host-local"]),
    ({"type": "bridge", "ipam": {"type": "cni-ipam"}}, ["bridge", "cni-ipam"]),
    ({"type": "portmap"}, ["portmap"]),
])
def test_executables_a_runtime_needs(plugin, expected):
    assert conflist.executables(conflist.PluginConf(0, plugin)) == expected


def view(*checks: Check) -> NodeView:
    node = NodeView(hostname="n1", conf_dir="/etc/cni/net.d", bin_dir="/opt/cni/bin", uplink="eth0")
    pod = Attachment(container_id="c" * 64, ifname="eth0", ips=["10.1.0.2"], netns="/var/run/netns/a",
                     netns_exists=True, host_veth="veth0123456789a", host_veth_exists=True,
                     mac="0a:58:0a:01:00:02", pod_name='we"b', pod_namespace="shop", masquerade=True)
    gone = Attachment(container_id="old", ifname="eth0", ips=["10.1.0.3"], netns="/var/run/netns/b",
                      netns_exists=False, host_veth="vethfedcba98765", host_veth_exists=False)
    node.networks.append(Network(
        name="n", file="/etc/cni/net.d/10.conflist", cni_version="1.0.0", plugins=["cni-bridge"],
        bridge=Bridge("cni0", True, True, 1500, "aa:bb:cc:dd:ee:ff", ["10.1.0.1/24", "fe80::1/64"],
                      [Port("veth0123456789a", "veth", "", True)]),
        ipam_type="cni-ipam", data_dir="/var/lib/cni/networks", is_gateway=True, ip_masq=True,
        pools=[Pool("n", 0, "10.1.0.0/24", "10.1.0.1", "10.1.0.254", "10.1.0.1", 253, 2, 0, 251)],
        attachments=[pod, gone], stray_veths=["veth99999999999"]))
    node.checks = list(checks)
    return node


def test_exit_status():
    assert cli.exit_status(view(Check("a", OK, ""), Check("b", SKIP, "")), strict=False) == 0
    assert cli.exit_status(view(Check("a", WARN, "")), strict=False) == 0
    assert cli.exit_status(view(Check("a", WARN, "")), strict=True) == 1
    assert cli.exit_status(view(Check("a", OK, ""), Check("b", FAIL, "")), strict=False) == 1


def test_table_has_a_verdict_per_check():
    out = io.StringIO()
    table.render(view(Check("net.ipv4.ip_forward", OK, "= 1"), Check("leak:netns-gone", FAIL, "gone", "n x")), out)
    text = out.getvalue()
    lines = text.splitlines()
    checks_at = lines.index("CHECKS")
    assert lines[checks_at + 1].split() == ["VERDICT", "CHECK", "SUBJECT", "DETAIL"]
    assert lines[checks_at + 2].split()[:2] == ["ok", "net.ipv4.ip_forward"]
    assert lines[checks_at + 3].split()[:2] == ["FAIL", "leak:netns-gone"]
    assert "1 ok, 0 warnings, 1 failed, 0 skipped" in text
    assert 'shop/we"b' in text and "/var/run/netns/b (gone)" in text and "vethfedcba98765 (gone)" in text
    assert "stray veths (no reservation): veth99999999999" in text


def test_json_keys_are_camel_case():
    body = view(Check("x", OK, "")).to_dict()
    attachment = body["networks"][0]["attachments"][0]
    assert attachment["containerID"] == "c" * 64 and attachment["netnsExists"] is True
    assert body["networks"][0]["strayVeths"] == ["veth99999999999"] and body["summary"]["ok"] == 1
    json.dumps(body)   # plain JSON types only


def test_dot_escapes_and_marks_what_is_broken():
    out = io.StringIO()
    dot.render(view(), out)
    text = out.getvalue()
    assert text.startswith('digraph "node n1" {') and text.rstrip().endswith("}")
    assert r'shop/we\"b' in text                       # a quote in a pod name cannot end the label
    assert "netns gone: leaked" in text and "no reservation" in text
    assert "fe80::1/64" not in text                     # link-local addresses are noise in a picture
    if shutil.which("dot"):
        rendered = subprocess.run(["dot", "-Tsvg"], input=text, capture_output=True, text=True)
        assert rendered.returncode == 0 and rendered.stderr == "", rendered.stderr


def facts(**kw):
    from cni_bridge.inspect.gather import NetworkFacts

    return NetworkFacts(plugin=conflist.PluginConf(0, BRIDGE), conf_file=conflist.ConfFile("/x"), **kw)


def verdicts(found: list[Check]) -> dict[tuple[str, str], str]:
    return {(c.name, c.subject): c.verdict for c in found}


def test_network_checks_map_findings_to_verdicts():
    from cni_bridge.inspect.checks import network_checks
    from ipam.cli import Finding

    network = view().networks[0]
    found = verdicts(network_checks(network, facts(
        findings=[Finding("n", "netns-gone", "gone", "10.1.0.3", "old", "eth0"),
                  Finding("n", "earlier-boot", "boot x", "10.1.0.9", "prev", "eth0"),
                  Finding("n", "temp-file", "/x/.tmp-1")],
        masq_orphans=["CBR-0123456789abcdef01234567"])))
    assert found[("leak:netns-gone", "n 10.1.0.3 old/eth0")] == FAIL
    assert found[("leak:earlier-boot", "n 10.1.0.9 prev/eth0")] == WARN     # ADD reclaims it by itself
    assert found[("leak:temp-file", "n")] == WARN
    assert found[("leak:masq-rule", "n CBR-0123456789abcdef01234567")] == FAIL
    assert found[("leak:stray-veth", "n veth99999999999")] == FAIL
    assert found[("bridge", "n")] == OK and ("leaks", "n") not in found


def test_no_leak_is_one_ok_line():
    from cni_bridge.inspect.checks import network_checks

    network = view().networks[0]
    network.stray_veths = []
    assert verdicts(network_checks(network, facts()))[("leaks", "n")] == OK


@pytest.mark.parametrize("free, verdict", [(251, OK), (20, WARN), (0, FAIL)])
def test_pool_verdicts(free, verdict):
    from cni_bridge.inspect.checks import pool_checks

    network = view().networks[0]
    network.pools[0].free, network.pools[0].used = free, 253 - free
    (check,) = pool_checks(network)
    assert check.verdict == verdict and f"{free} free of 253" in check.detail


def test_a_missing_bridge_fails_only_with_pods_on_it():
    from cni_bridge.inspect.checks import network_checks

    network = view().networks[0]
    network.bridge = Bridge("cni0")
    assert verdicts(network_checks(network, facts()))[("bridge", "n")] == FAIL
    network.attachments = []
    assert verdicts(network_checks(network, facts()))[("bridge", "n")] == OK


def test_reading_a_node_on_the_fake_kernel(tmp_path):
    """gather, without root: attachments from the store (dual-stack grouped per owner), host veths from the
    link dump, pod names from libcni's cache, stray veths, pools."""
    import ipaddress

    from cni_bridge.inspect import gather
    from cni_bridge.plan import host_veth_name
    from ipam.filestore import FileStore, current_boot_id
    from ipam.store import Reservation
    from tests.unit.fake_netlink import FakeKernel

    kernel = FakeKernel()
    host = kernel.factory(None)
    host.ensure_bridge("cni0", None, False)
    host.add_address("cni0", ipaddress.ip_interface("10.1.0.1/24"))
    for cid in ("web", "gone"):
        kernel.add_netns(str(tmp_path / cid))     # paths that do not exist on disk: netns gone
        host.add_veth(host_veth_name(cid, "eth0"), "eth0", str(tmp_path / cid), None, "")
        host.attach(host_veth_name(cid, "eth0"), "cni0", False)
    kernel.add_netns("stray")
    host.add_veth("veth00000000000", "eth9", "stray", None, "")
    host.attach("veth00000000000", "cni0", False)
    host.delete_link(host_veth_name("gone", "eth0"))    # its pod went away without a DEL
    host.close()

    data_dir, conf_dir, cache = tmp_path / "ipam", tmp_path / "net.d", tmp_path / "cache" / "results"
    conf_dir.mkdir()
    cache.mkdir(parents=True)
    write(conf_dir, "10.conflist", {"cniVersion": "1.0.0", "name": "n", "plugins": [
        {**BRIDGE, "ipam": {"type": "cni-ipam", "dataDir": str(data_dir),
                            "ranges": [[{"subnet": "10.1.0.0/24"}], [{"subnet": "fd01::/120"}]]}}]})
    (cache / "n-web-eth0").write_text(json.dumps({"kind": "cniCacheV1", "containerId": "web", "ifName": "eth0",
                                                  "networkName": "n", "cniArgs": [["K8S_POD_NAME", "web-0"],
                                                                                  ["K8S_POD_NAMESPACE", "shop"]]}))
    store = FileStore(str(data_dir), "n")
    with store.locked():
        for ip, cid in (("10.1.0.2", "web"), ("fd01::2", "web"), ("10.1.0.3", "gone")):
            store.put(Reservation(ipaddress.ip_address(ip), cid, "eth0", current_boot_id(), 1.0,
                                  netns=str(tmp_path / cid)))
        store.set_owned(("web", "eth0"), [ipaddress.ip_address("10.1.0.2"), ipaddress.ip_address("fd01::2")])
        store.set_owned(("gone", "eth0"), [ipaddress.ip_address("10.1.0.3")])

    options = gather.Options(conf_dir=str(conf_dir), bin_dir=str(tmp_path), cache_dir=str(tmp_path / "cache"),
                             daemon_socket=str(tmp_path / "none.sock"))
    reading = gather.read_node(options, netlink_factory=kernel.factory)
    (network,) = reading.view.networks
    assert network.bridge.exists and network.bridge.addresses == ["10.1.0.1/24"]
    web, gone = sorted(network.attachments, key=lambda a: a.container_id != "web")
    assert (web.container_id, web.ips, web.pod_name, web.pod_namespace) == ("web", ["10.1.0.2", "fd01::2"],
                                                                           "web-0", "shop")
    assert web.host_veth_exists and web.netns_exists is False and web.masquerade is None
    assert gone.host_veth_exists is False
    assert network.stray_veths == ["veth00000000000"]
    assert [(p.subnet, p.used, p.free) for p in network.pools] == [("10.1.0.0/24", 2, 251), ("fd01::/120", 1, 253)]
    (_, facts), = reading.facts
    assert {(f.kind, f.container_id) for f in facts.findings} >= {("netns-gone", "web"), ("netns-gone", "gone")}
    assert reading.view.daemon is not None and reading.view.daemon.exists is False
    assert not kernel.open_handles()      # the host handle is closed


# -- overlay peers, from the kernel's entries (cni_bridge.inspect.overlay) -----------------------
def _kernel_entries():
    import ipaddress

    from cni_bridge.agent.diff import FdbEntry, NeighEntry
    from cni_bridge.netlink import KernelRouteInfo

    ip, net = ipaddress.ip_address, ipaddress.ip_network
    routes = [KernelRouteInfo(net("10.244.2.0/24"), ip("10.0.0.12"), oif=2, proto=157),
              KernelRouteInfo(net("10.244.3.0/24"), ip("10.244.3.0"), oif=9, proto=157),
              KernelRouteInfo(net("10.244.4.0/24"), ip("10.244.4.0"), oif=9, proto=157)]
    fdb = [FdbEntry("0e:cb:0a:01:00:0d", ip("10.1.0.13")), FdbEntry("0e:cb:0a:02:00:0e", ip("10.2.0.14"))]
    neighbours = [NeighEntry(ip("10.244.3.0"), "0e:cb:0a:01:00:0d"), NeighEntry(ip("10.244.4.0"), "0e:cb:0a:09:09:09"),
                  NeighEntry(ip("10.244.5.0"), "0e:cb:0a:02:00:0e")]
    return routes, fdb, neighbours


def test_overlay_peers_join_routes_neighbours_and_fdb_entries():
    from cni_bridge.inspect import overlay

    routes, fdb, neighbours = _kernel_entries()
    found = {p.pod_cidr or p.via: p for p in overlay.peers(routes, {2: "eth0", 9: "cni-vxlan"}, 9, fdb, neighbours)}
    direct, tunnel, no_fdb, no_route = (found[k] for k in ("10.244.2.0/24", "10.244.3.0/24", "10.244.4.0/24",
                                                           "10.244.5.0"))
    assert (direct.way, direct.via, direct.device, direct.complete) == ("route", "10.0.0.12", "eth0", True)
    assert (tunnel.way, tunnel.vtep_mac, tunnel.underlay, tunnel.complete) == \
        ("vxlan", "0e:cb:0a:01:00:0d", "10.1.0.13", True)
    # A neighbour whose MAC has no FDB entry: the packets have nowhere to go.
    assert (no_fdb.neighbour, no_fdb.fdb, no_fdb.complete, overlay.missing_parts(no_fdb)) == \
        (True, False, False, ["FDB entry"])
    # Entries of a peer whose route went away.
    assert (no_route.route, no_route.underlay, overlay.missing_parts(no_route)) == (False, "10.2.0.14", ["route"])
    assert len(found) == 4


def test_without_a_vxlan_device_every_agent_route_is_direct():
    from cni_bridge.inspect import overlay

    routes, _, _ = _kernel_entries()
    assert {p.way for p in overlay.peers(routes, {2: "eth0"})} == {"route"}


def test_overlay_checks_warn_on_an_incomplete_peer_and_a_down_device():
    from cni_bridge.inspect import overlay
    from cni_bridge.inspect.checks import overlay_checks
    from cni_bridge.inspect.model import Overlay, VxlanDevice

    routes, fdb, neighbours = _kernel_entries()
    peers = overlay.peers(routes, {2: "eth0", 9: "cni-vxlan"}, 9, fdb, neighbours)
    found = verdicts(overlay_checks(Overlay(VxlanDevice("cni-vxlan", 1, 8472, "10.0.0.11", up=False), peers)))
    assert found == {("vxlan device", "cni-vxlan"): WARN, ("overlay peer", "10.244.2.0/24"): OK,
                     ("overlay peer", "10.244.3.0/24"): OK, ("overlay peer", "10.244.4.0/24"): WARN,
                     ("overlay peer", "10.244.5.0 (no route)"): WARN}


def test_overlay_in_table_json_and_dot():
    from cni_bridge.inspect import overlay
    from cni_bridge.inspect.model import Overlay, VxlanDevice

    routes, fdb, neighbours = _kernel_entries()
    node = view()
    node.overlay = Overlay(VxlanDevice("cni-vxlan", 1, 8472, "10.0.0.11", up=True),
                           overlay.peers(routes, {2: "eth0", 9: "cni-vxlan"}, 9, fdb, neighbours))
    out = io.StringIO()
    table.render(node, out)
    assert "INCOMPLETE: no FDB entry" in out.getvalue() and "VXLAN   cni-vxlan up  VNI 1" in out.getvalue()
    peer = node.to_dict()["overlay"]["peers"][1]
    assert (peer["podCIDR"], peer["vtepMac"], peer["underlay"]) == ("10.244.3.0/24", "0e:cb:0a:01:00:0d", "10.1.0.13")
    picture = io.StringIO()
    dot.render(node, picture)
    assert picture.getvalue().count('label="tunnel"') == 3 and picture.getvalue().count('label="route"') == 1
    if shutil.which("dot"):
        rendered = subprocess.run(["dot", "-Tsvg"], input=picture.getvalue(), capture_output=True, text=True)
        assert rendered.returncode == 0 and rendered.stderr == "", rendered.stderr


def test_gather_names_the_backend_that_holds_each_attachments_rules(tmp_path, monkeypatch):
    """On the fake kernel, with each backend's reader answering as GC hears it: an attachment's
    rules in nftables, another's in iptables (made before a switch), and an element no one holds."""
    import ipaddress

    from cni_bridge.inspect import checks, gather
    from cni_bridge.masq import iptables, nftables
    from cni_bridge.plan import masq_chain_name
    from ipam.filestore import FileStore, current_boot_id
    from ipam.store import Reservation
    from tests.unit.fake_netlink import FakeKernel

    data_dir, conf_dir = tmp_path / "ipam", tmp_path / "net.d"
    conf_dir.mkdir()
    write(conf_dir, "10.conflist", {"cniVersion": "1.0.0", "name": "n", "plugins": [
        {**BRIDGE, "ipMasq": True, "ipMasqBackend": "nftables",
         "ipam": {"type": "cni-ipam", "dataDir": str(data_dir), "ranges": [[{"subnet": "10.1.0.0/24"}]]}}]})
    store = FileStore(str(data_dir), "n")
    with store.locked():
        for ip, cid in (("10.1.0.2", "new"), ("10.1.0.3", "old")):
            store.put(Reservation(ipaddress.ip_address(ip), cid, "eth0", current_boot_id(), 1.0))
            store.set_owned((cid, "eth0"), [ipaddress.ip_address(ip)])
    monkeypatch.setattr(nftables, "attachments", lambda net: {masq_chain_name(net, "new", "eth0"), "stray"})
    monkeypatch.setattr(iptables, "attachments", lambda net: {masq_chain_name(net, "old", "eth0")})
    monkeypatch.setattr(nftables, "masquerading", lambda net: True)

    options = gather.Options(conf_dir=str(conf_dir), bin_dir=str(tmp_path), cache_dir=str(tmp_path / "cache"),
                             daemon_socket=str(tmp_path / "none.sock"))
    reading = gather.read_node(options, netlink_factory=FakeKernel().factory)
    (network,) = reading.view.networks
    assert network.masq_backend == "nftables"
    assert {(a.container_id, a.masquerade, a.masq_backend) for a in network.attachments} == \
        {("new", True, "nftables"), ("old", True, "iptables")}
    (_, facts), = reading.facts
    leaks = [c for c in checks.network_checks(network, facts) if c.name == "leak:masq-rule"]
    assert [(c.verdict, c.subject) for c in leaks] == [(FAIL, "n stray")]
    assert "nftables set elements" in leaks[0].detail

    # The chain lost its rules: the elements masquerade nothing.
    monkeypatch.setattr(nftables, "masquerading", lambda net: False)
    reading = gather.read_node(options, netlink_factory=FakeKernel().factory)
    (network,) = reading.view.networks
    assert {(a.container_id, a.masquerade) for a in network.attachments} == {("new", False), ("old", True)}
    (_, facts), = reading.facts
    assert verdicts(checks.network_checks(network, facts))[("masquerade rule", "n")] == FAIL
