"""The overlay plan (backend per peer, VXLAN device, entries, MTU) and its diffs. Pure, no root."""
from __future__ import annotations

import ipaddress
from types import SimpleNamespace as NS

import pytest

from cni_bridge.agent import cli, kube
from cni_bridge.agent.apply import Changes
from cni_bridge.agent.desired import AgentOptions, desired_state
from cni_bridge.agent.diff import (DeviceConflict, FdbEntry, NeighEntry, RouteState, VxlanState, diff_routes,
                                   diff_vxlan_device, diff_vxlan_entries)
from cni_bridge.agent.overlay import OverlayOptions, Underlay, VxlanOptions, plan_overlay
from cni_bridge.agent.topology import AgentError, node_from_kubernetes, parse_topology
from cni_bridge.agent.vtep import VTEP_MAC_ANNOTATION, derived_vtep_mac, parse_vtep_mac

A = ipaddress.ip_address
N = ipaddress.ip_network
UNDERLAY = Underlay(ipaddress.IPv4Interface("192.168.1.11/24"), "eth0", 1500)

TOPOLOGY = """{"clusterCIDR": "10.244.0.0/16,fd00:10:244::/56", "nodes": [
  {"name": "n1", "internalIP": "192.168.1.11", "podCIDR": "10.244.1.0/24,fd00:10:244:1::/64"},
  {"name": "n2", "internalIP": "192.168.1.12", "podCIDR": "10.244.2.0/24"},
  {"name": "n3", "internalIP": "192.168.2.13", "podCIDR": "10.244.3.0/24,fd00:10:244:3::/64"},
  {"name": "n4", "internalIP": "192.168.3.14", "podCIDR": "10.244.4.0/24", "vtepMAC": "0E:AA:00:00:00:04"}]}"""


def plan(backend="auto", underlay=UNDERLAY, text=TOPOLOGY, node="n1"):
    topology = parse_topology(text)
    return plan_overlay(topology.nodes, topology.node(node), OverlayOptions(backend), underlay)


def routes(p):
    return {(str(r.dst), str(r.via), r.device, r.onlink) for r in p.routes}


def test_vtep_mac_is_derived_from_the_ipv4_address_and_is_unicast_local():
    mac = derived_vtep_mac(A("10.253.2.13"))
    assert mac == "0e:cb:0a:fd:02:0d"
    first = int(mac[:2], 16)
    assert first & 0b10 and not first & 0b01


@pytest.mark.parametrize("bad", ["01:00:5e:00:00:01", "0e:cb:0a", "zz:cb:0a:fd:02:0d", "00:00:00:00:00:00", 7])
def test_bad_vtep_macs_are_refused(bad):
    with pytest.raises(ValueError):
        parse_vtep_mac(bad)


def test_topology_derives_macs_unless_given_and_refuses_duplicates():
    topology = parse_topology(TOPOLOGY)
    assert topology.node("n1").vtep_mac == "0e:cb:c0:a8:01:0b"
    assert topology.node("n4").vtep_mac == "0e:aa:00:00:00:04"
    dup = TOPOLOGY.replace("0E:AA:00:00:00:04", "0e:cb:c0:a8:01:0b")
    with pytest.raises(AgentError, match="has the VTEP MAC 0e:cb:c0:a8:01:0b of node 'n1'"):
        parse_topology(dup)
    with pytest.raises(AgentError, match="node 'n4': vtepMAC: .* multicast"):
        parse_topology(TOPOLOGY.replace("0E:AA", "01:AA"))


def test_auto_routes_the_own_subnet_directly_and_tunnels_the_rest():
    p = plan("auto")
    assert p.backend_of == {"n2": "routes", "n3": "vxlan", "n4": "vxlan"}
    assert routes(p) == {
        ("10.244.2.0/24", "192.168.1.12", None, False),
        ("10.244.3.0/24", "10.244.3.0", "cni-vxlan", True),
        ("fd00:10:244:3::/64", "fd00:10:244:3::", "cni-vxlan", True),
        ("10.244.4.0/24", "10.244.4.0", "cni-vxlan", True),
    }
    peers = {peer.node: peer for peer in p.vxlan_peers}
    assert set(peers) == {"n3", "n4"}
    assert peers["n3"].mac == "0e:cb:c0:a8:02:0d" and peers["n3"].remote == A("192.168.2.13")
    assert peers["n3"].vteps == (A("10.244.3.0"), A("fd00:10:244:3::"))
    assert peers["n4"].mac == "0e:aa:00:00:00:04"
    device = p.device
    assert (device.name, device.vni, device.port, str(device.local), device.mac, device.mtu) == \
        ("cni-vxlan", 1, 8472, "192.168.1.11", "0e:cb:c0:a8:01:0b", 1450)
    assert p.pod_mtu == 1450


def test_auto_tunnels_ipv6_pods_of_a_same_subnet_peer_without_an_ipv6_address():
    text = TOPOLOGY.replace('"10.244.2.0/24"', '"10.244.2.0/24,fd00:10:244:2::/64"')
    p = plan("auto", text=text)
    assert ("10.244.2.0/24", "192.168.1.12", None, False) in routes(p)
    assert ("fd00:10:244:2::/64", "fd00:10:244:2::", "cni-vxlan", True) in routes(p)
    assert p.backend_of["n2"] == "routes+vxlan"
    assert not any("fd00:10:244:2::/64" in note for note in p.notes)


def test_vxlan_backend_tunnels_every_peer():
    p = plan("vxlan")
    assert set(p.backend_of.values()) == {"vxlan"}
    assert all(r.device == "cni-vxlan" and r.onlink for r in p.routes)
    assert {peer.node for peer in p.vxlan_peers} == {"n2", "n3", "n4"}


def test_routes_backend_has_no_device_and_no_mtu_change():
    p = plan("routes", underlay=None)
    assert p.device is None and p.vxlan_peers == () and p.pod_mtu is None
    assert ("10.244.3.0/24", "192.168.2.13", None, False) in routes(p)
    assert any("no IPv6 InternalIP, no route to fd00:10:244:3::/64" in note for note in p.notes)


def test_auto_keeps_the_device_but_the_kernel_mtu_when_every_peer_is_direct():
    text = (TOPOLOGY.replace("192.168.2.13", "192.168.1.13").replace("192.168.3.14", "192.168.1.14")
            .replace(',fd00:10:244:3::/64"', '"'))      # IPv6 pods of n3 would need the tunnel
    p = plan("auto", text=text)
    assert p.device is not None        # peers may still send to this node through it
    assert p.vxlan_peers == () and p.pod_mtu is None
    state = desired_state(parse_topology(text), "n1", AgentOptions(), OverlayOptions("auto"), UNDERLAY)
    assert "mtu" not in state.conflist["plugins"][0]


def test_the_conflist_gets_the_tunnel_mtu_and_an_explicit_mtu_wins():
    topology = parse_topology(TOPOLOGY)
    state = desired_state(topology, "n1", AgentOptions(), OverlayOptions("auto"), UNDERLAY)
    assert state.conflist["plugins"][0]["mtu"] == 1450
    jumbo = Underlay(UNDERLAY.address, "eth0", 9000)
    assert desired_state(topology, "n1", AgentOptions(), OverlayOptions(), jumbo).conflist["plugins"][0]["mtu"] == 8950
    assert desired_state(topology, "n1", AgentOptions(mtu=1300), OverlayOptions(),
                         UNDERLAY).conflist["plugins"][0]["mtu"] == 1300


def test_without_the_underlay_auto_routes_directly_and_vxlan_is_an_error():
    p = plan("auto", underlay=None)
    assert p.device is None and all(r.device is None for r in p.routes)
    assert any("no interface of this node holds its InternalIP 192.168.1.11" in note for note in p.notes)
    with pytest.raises(AgentError, match="--backend vxlan: no interface of this node holds"):
        plan("vxlan", underlay=None)


def test_device_options_are_used():
    topology = parse_topology(TOPOLOGY)
    options = OverlayOptions("vxlan", VxlanOptions("vx-test", 42, 4789))
    p = plan_overlay(topology.nodes, topology.node("n1"), options, UNDERLAY)
    assert (p.device.name, p.device.vni, p.device.port) == ("vx-test", 42, 4789)
    assert {r.device for r in p.routes} == {"vx-test"}


# -- diffs ------------------------------------------------------------------------------------
DEVICE = plan("auto").device


def state_of(device, **changes):
    values = dict(index=7, kind="vxlan", vni=device.vni, port=device.port, local=device.local, learning=False,
                  mac=device.mac, mtu=device.mtu, up=True)
    values.update(changes)
    return VxlanState(**values)


def test_device_diff_is_empty_when_converged_and_fixes_what_it_can_in_place():
    assert diff_vxlan_device(state_of(DEVICE), DEVICE).empty
    fix = diff_vxlan_device(state_of(DEVICE, mtu=1500, up=False, mac="0e:00:00:00:00:01"), DEVICE)
    assert (fix.delete, fix.create, fix.mtu, fix.mac, fix.up) == (False, False, 1450, DEVICE.mac, True)


@pytest.mark.parametrize("change", [{"vni": 2}, {"port": 4789}, {"local": A("192.168.1.99")}, {"learning": True}])
def test_device_diff_makes_the_device_again_for_what_the_kernel_cannot_change(change):
    fix = diff_vxlan_device(state_of(DEVICE, **change), DEVICE)
    assert fix.delete and fix.create


def test_device_diff_creates_deletes_and_never_touches_a_foreign_link():
    assert diff_vxlan_device(None, DEVICE).create
    assert diff_vxlan_device(state_of(DEVICE), None).delete
    assert diff_vxlan_device(None, None).empty
    assert diff_vxlan_device(VxlanState(3, "bridge"), None).empty
    with pytest.raises(DeviceConflict, match="is a bridge device"):
        diff_vxlan_device(VxlanState(3, "bridge"), DEVICE)


def test_entry_diff_sets_missing_replaces_moved_and_removes_stale():
    peers = plan("auto").vxlan_peers
    want_fdb = [FdbEntry(p.mac, p.remote) for p in peers]
    want_neigh = [NeighEntry(v, p.mac) for p in peers for v in p.vteps]
    assert diff_vxlan_entries(want_fdb, want_neigh, peers).empty
    moved = FdbEntry(want_fdb[0].mac, A("192.168.9.9"))
    gone_fdb, gone_neigh = FdbEntry("0e:cb:c0:a8:05:05", A("192.168.5.5")), NeighEntry(A("10.244.5.0"), "0e:cb:c0:a8:05:05")
    wrong_mac = NeighEntry(want_neigh[0].ip, "0e:00:00:00:00:09")
    current_fdb = [moved, gone_fdb] + want_fdb[1:]
    current_neigh = [wrong_mac, gone_neigh] + want_neigh[1:]
    fix = diff_vxlan_entries(current_fdb, current_neigh, peers)
    assert fix.fdb_set == [want_fdb[0]] and fix.fdb_delete == [moved, gone_fdb]
    assert fix.neigh_set == [want_neigh[0]] and fix.neigh_delete == [gone_neigh]


def test_route_diff_replaces_a_route_through_another_device():
    route = next(r for r in plan("auto").routes if r.device)
    here = RouteState(route.dst, route.via, 157, oif=7)
    assert diff_routes([here], [route], 157, {"cni-vxlan": 7}).empty
    assert diff_routes([here], [route], 157, {"cni-vxlan": 9}).replace == [route]   # the device was made again
    direct = RouteState(route.dst, A("192.168.2.13"), 157, oif=2)
    assert diff_routes([direct], [route], 157, {"cni-vxlan": 7}).replace == [route]


# -- modes ----------------------------------------------------------------------------------
def test_kubernetes_nodes_carry_the_annotated_mac_and_bad_ones_are_ignored():
    def obj(annotations):
        return NS(metadata=NS(name="w2", annotations=annotations), spec=NS(pod_cidrs=["10.244.2.0/24"]),
                  status=NS(addresses=[NS(type="InternalIP", address="172.18.0.3")]))

    node, warnings = node_from_kubernetes(obj({VTEP_MAC_ANNOTATION: "0E:CB:AC:12:00:03"}))
    assert node.vtep_mac == "0e:cb:ac:12:00:03" and warnings == []
    node, warnings = node_from_kubernetes(obj({VTEP_MAC_ANNOTATION: "nonsense"}))
    assert node.vtep_mac is None and "ignoring annotation" in warnings[0]
    node, _ = node_from_kubernetes(obj(None))
    assert node.vtep_mac is None


def kube_node(name, cidr, ip, mac=None):
    annotations = {VTEP_MAC_ANNOTATION: mac} if mac else {}
    return NS(metadata=NS(name=name, annotations=annotations), spec=NS(pod_cidrs=[cidr], pod_cidr=cidr),
              status=NS(addresses=[NS(type="InternalIP", address=ip)]))


def test_kubernetes_mode_publishes_its_own_mac_and_tunnels_only_to_peers_that_did():
    states, published = [], []
    agent = kube.NodeAgent("w1", (N("10.244.0.0/16"),), AgentOptions(), "/conf",
                           apply_fn=lambda state, conf: states.append(state) or Changes(),
                           underlay_fn=lambda topology, name: Underlay(ipaddress.IPv4Interface("172.18.0.2/24"),
                                                                       "eth0", 1500),
                           publish_fn=lambda name, mac: published.append((name, mac)))
    agent.replace_all([kube_node("w1", "10.244.1.0/24", "172.18.0.2"),
                       kube_node("w2", "10.244.2.0/24", "172.19.0.3"),
                       kube_node("w3", "10.244.3.0/24", "172.20.0.4", mac="0e:cb:ac:14:00:04")])
    agent.sync()
    assert published == [("w1", "0e:cb:ac:12:00:02")]
    assert [peer.node for peer in states[-1].vxlan_peers] == ["w3"]      # w2 has not published yet
    assert any("node w2: no VTEP MAC published yet" in note for note in states[-1].notes)
    # The own node comes back with the annotation: nothing more to publish.
    assert agent.handle_event("MODIFIED", kube_node("w1", "10.244.1.0/24", "172.18.0.2", mac="0e:cb:ac:12:00:02"))
    agent.sync()
    assert len(published) == 1


def test_cli_refuses_bad_vxlan_options(tmp_path, capsys):
    topology = tmp_path / "t.json"
    topology.write_text(TOPOLOGY)
    for flag, value, message in (("--vxlan-vni", "0", "not a VXLAN network identifier"),
                                 ("--vxlan-port", "70000", "not a UDP port"),
                                 ("--vxlan-name", "a-name-far-too-long", "not an interface name")):
        rc = cli.main(["--node", "n1", "--topology", str(topology), "--once", "--conf-dir", str(tmp_path),
                       flag, value])
        assert rc == 1
        assert message in capsys.readouterr().err
