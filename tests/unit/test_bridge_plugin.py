"""BridgePlugin orchestration over the fake netlink layer, with the real in-process cni-ipam.

Host-only side effects that are not netlink (sysctl writes, iptables) are replaced
by recorders; IPAM runs for real against a dataDir in tmp_path.
"""
from __future__ import annotations

import errno
import inspect
import ipaddress
import os

import pytest

import ipam.plugin
from cni_bridge import masq, sysctl
from cni_bridge.netlink import Netlink
from cni_bridge.plan import host_veth_name, masq_chain_name
from cni_bridge.plugin import BridgePlugin
from cni_bridge.protocol.errors import CNIError, Code
from ipam.filestore import FileStore

from .fake_netlink import FakeKernel, FakeNetlink, FakeNetlinkError
from .helpers import CID, NETNS, cni_env, make_request, run_plugin

ip = ipaddress.ip_address
ip_if = ipaddress.ip_interface
net = ipaddress.ip_network
VETH = host_veth_name(CID, "eth0")


class HostEffects:
    """Records what would have touched the host outside netlink (sysctl, iptables)."""

    def __init__(self) -> None:
        self.forwarding: list[tuple[int, ...]] = []
        self.accept_ra_refused: list[str] = []
        self.ipv6_off_ports: list[str] = []
        self.masq_setup: list = []
        self.masq_teardown: list[tuple[str, str, str]] = []
        self.rules: set[tuple[str, str, str]] = set()   # (network, cid, ifname) of installed chains
        self.iptables = True
        self.nft = True
        self.teardown_sources: list[tuple] = []   # (backend, pod addresses) each teardown got
        self.ip6tables = True
        self.fail_forwarding: CNIError | None = None
        self.fail_masq: CNIError | None = None

    def enable_forwarding(self, families):
        if self.fail_forwarding:
            raise self.fail_forwarding
        self.forwarding.append(tuple(families))

    def refuse_router_advertisements(self, bridge):
        self.accept_ra_refused.append(bridge)

    def keep_ipv6_off_port(self, port):
        self.ipv6_off_ports.append(port)

    def setup(self, plan):
        self.masq_setup.append(plan)
        if self.fail_masq:
            raise self.fail_masq

    def teardown(self, network, cid, ifname, backend=None, sources=()):
        self.masq_teardown.append((network, cid, ifname))
        self.teardown_sources.append((backend, tuple(sources)))

    def attachments(self, network):
        return {masq_chain_name(n, c, i) for (n, c, i) in self.rules if n == network}

    def remove(self, network, key):
        self.masq_teardown += [rule for rule in sorted(self.rules) if masq_chain_name(*rule) == key]

    def missing_jumps(self, network, cid, ifname, sources, backend=None):
        return [] if (network, cid, ifname) in self.rules else list(sources)

    def missing_tools(self, versions, backend=None):
        if backend == "nftables":
            return [] if self.nft else ["nft"]
        present = {4: self.iptables, 6: self.ip6tables}
        return [{4: "iptables", 6: "ip6tables"}[v] for v in sorted(versions) if not present[v]]


@pytest.fixture
def host(monkeypatch) -> HostEffects:
    effects = HostEffects()
    monkeypatch.setattr(sysctl, "enable_forwarding", effects.enable_forwarding)
    monkeypatch.setattr(sysctl, "refuse_router_advertisements", effects.refuse_router_advertisements)
    monkeypatch.setattr(sysctl, "keep_ipv6_off_port", effects.keep_ipv6_off_port)
    monkeypatch.setattr(masq, "setup", effects.setup)
    monkeypatch.setattr(masq, "teardown", effects.teardown)
    monkeypatch.setattr(masq, "attachments", effects.attachments)
    monkeypatch.setattr(masq, "remove", effects.remove)
    monkeypatch.setattr(masq, "missing_jumps", effects.missing_jumps)
    monkeypatch.setattr(masq, "missing_tools", effects.missing_tools)
    monkeypatch.setattr(ipam.plugin, "current_boot_id", lambda: "boot-test")
    return effects


@pytest.fixture
def kernel() -> FakeKernel:
    k = FakeKernel()
    k.add_netns(NETNS)
    return k


@pytest.fixture
def plugin(kernel) -> BridgePlugin:
    return BridgePlugin(netlink_factory=kernel.factory)


@pytest.fixture
def config(tmp_path):
    return {
        "cniVersion": "1.0.0", "name": "pods", "type": "cni-bridge",
        "bridge": "cni0", "isGateway": True,
        "ipam": {"type": "cni-ipam", "dataDir": str(tmp_path / "ipam"),
                 "ranges": [[{"subnet": "10.22.0.0/16"}]], "routes": [{"dst": "0.0.0.0/0"}]},
    }


def store(tmp_path) -> FileStore:
    return FileStore(str(tmp_path / "ipam"), "pods")


def reservations(tmp_path):
    return [(str(r.ip), r.container_id) for r in store(tmp_path).reservations()]


def add(plugin, config, **env):
    return plugin.add(make_request(cni_env("ADD", **env), config))


def verb(plugin, name, config, **env):
    method = {"DEL": plugin.delete, "CHECK": plugin.check, "GC": plugin.gc, "STATUS": plugin.status}[name]
    return method(make_request(cni_env(name, **env), config))


def assert_nothing_left(kernel, tmp_path, host_links_before=()):
    """A failed ADD leaves no veth (either end), no reservation, no open handle (the bridge may stay)."""
    assert VETH not in kernel.host.links
    assert set(kernel.host.links) - set(host_links_before) <= {"cni0"}
    assert kernel.ns(NETNS).links == {}
    assert reservations(tmp_path) == []
    assert store(tmp_path).owners() == []
    assert kernel.open_handles() == []


# -- the fake itself ----------------------------------------------------------------------

def test_fake_has_the_adapter_interface():
    public = [n for n, f in inspect.getmembers(Netlink, inspect.isfunction) if not n.startswith("_")]
    assert {"link", "ensure_bridge", "add_veth", "attach", "delete_link", "add_route"} <= set(public)
    for name in public + ["__enter__", "__exit__"]:
        real, fake = inspect.signature(getattr(Netlink, name)), inspect.signature(getattr(FakeNetlink, name))
        assert list(real.parameters) == list(fake.parameters), name


def test_fake_veth_pair_dies_together(kernel):
    h = kernel.factory(None)
    h.add_veth("vethx", "eth0", NETNS, None, "")
    assert "eth0" in kernel.ns(NETNS).links
    h.delete_link("vethx")
    assert kernel.ns(NETNS).links == {}
    h.add_veth("vethx", "eth0", NETNS, None, "")
    kernel.remove_netns(NETNS)
    assert kernel.host.links == {}


# -- ADD -----------------------------------------------------------------------------------

def test_add_result_shape_and_kernel_state(plugin, kernel, host, config, tmp_path):
    rc, out, err = run_plugin(lambda: plugin, cni_env("ADD"), config)
    assert rc == 0, out
    bridge, veth, inner = kernel.host.links["cni0"], kernel.host.links[VETH], kernel.ns(NETNS).links["eth0"]
    assert out["interfaces"] == [
        {"name": "cni0", "mac": bridge.mac},
        {"name": VETH, "mac": veth.mac},
        {"name": "eth0", "mac": inner.mac, "sandbox": NETNS},
    ]
    assert out["ips"] == [{"interface": 2, "address": "10.22.0.2/16", "gateway": "10.22.0.1"}]
    assert out["routes"] == [{"dst": "0.0.0.0/0"}]
    # the kernel holds what the result says
    assert inner.addresses == [ip_if("10.22.0.2/16")] and inner.up
    assert kernel.ns(NETNS).routes[0].dst == net("0.0.0.0/0") and kernel.ns(NETNS).routes[0].gw == ip("10.22.0.1")
    assert veth.master == bridge.index and veth.up and veth.peer is inner
    assert bridge.addresses == [ip_if("10.22.0.1/16")] and bridge.up
    assert host.forwarding == [(4,)] and host.masq_setup == []
    assert reservations(tmp_path) == [("10.22.0.2", CID)]
    assert kernel.open_handles() == []


def test_add_dual_stack_default_gateway(plugin, kernel, host, config):
    config["isDefaultGateway"] = True
    config["ipam"]["ranges"].append([{"subnet": "fd00:22::/64"}])
    config["ipam"]["routes"] = []
    res = add(plugin, config)
    assert [str(i.address) for i in res.ips] == ["10.22.0.2/16", "fd00:22::2/64"]
    assert {(str(r.dst), str(r.gw)) for r in res.routes} == {("0.0.0.0/0", "10.22.0.1"), ("::/0", "fd00:22::1")}
    assert {(str(r.dst), str(r.gw)) for r in kernel.ns(NETNS).routes} == \
        {("0.0.0.0/0", "10.22.0.1"), ("::/0", "fd00:22::1")}
    assert kernel.host.links["cni0"].addresses == [ip_if("10.22.0.1/16"), ip_if("fd00:22::1/64")]
    assert host.forwarding == [(4, 6)]


def test_add_applies_mac_mtu_hairpin_and_masquerade(plugin, kernel, host, config):
    config.update(mtu=1400, hairpinMode=True, ipMasq=True, runtimeConfig={"mac": "0A:58:0A:16:00:99"})
    res = add(plugin, config)
    inner, veth = kernel.ns(NETNS).links["eth0"], kernel.host.links[VETH]
    assert inner.mac == "0a:58:0a:16:00:99" == res.interfaces[2].mac
    assert (inner.mtu, veth.mtu, kernel.host.links["cni0"].mtu) == (1400, 1400, 1400)
    assert veth.hairpin
    (plan,) = host.masq_setup
    assert plan.chain == masq_chain_name("pods", CID, "eth0")
    assert [(str(r.source), str(r.subnet)) for r in plan.rules] == [("10.22.0.2", "10.22.0.0/16")]


def test_second_container_shares_the_bridge_and_gateway(plugin, kernel, host, config):
    add(plugin, config)
    kernel.add_netns("/var/run/netns/pod-b")
    res = add(plugin, config, CNI_CONTAINERID="c2", CNI_NETNS="/var/run/netns/pod-b")
    assert str(res.ips[0].address) == "10.22.0.3/16"
    assert kernel.host.links["cni0"].addresses == [ip_if("10.22.0.1/16")]
    ports = [l for l in kernel.host.links.values() if l.master == kernel.host.links["cni0"].index]
    assert len(ports) == 2


def test_add_over_a_leftover_host_veth_of_the_same_attachment(plugin, kernel, host, config):
    # An earlier ADD died after making the veth; its host end has the deterministic name.
    kernel.add_netns("/var/run/netns/dead")
    kernel.factory(None).add_veth(VETH, "eth0", "/var/run/netns/dead", None, "")
    res = add(plugin, config)
    assert res.interfaces[1].name == VETH
    assert kernel.host.links[VETH].peer is kernel.ns(NETNS).links["eth0"]


def test_existing_ifname_is_code_102_and_takes_no_reservation(plugin, kernel, host, config, tmp_path):
    kernel.new_link(kernel.ns(NETNS), "eth0", "dummy")
    rc, out, _ = run_plugin(lambda: plugin, cni_env("ADD"), config)
    assert rc == 1 and out["code"] == 102 and "eth0" in out["msg"]
    assert reservations(tmp_path) == []
    assert VETH not in kernel.host.links and "cni0" not in kernel.host.links
    assert kernel.open_handles() == []


def test_missing_netns_is_an_error_and_takes_no_reservation(plugin, kernel, host, config, tmp_path):
    rc, out, _ = run_plugin(lambda: plugin, cni_env("ADD", CNI_NETNS="/var/run/netns/nope"), config)
    assert rc == 1 and out["code"] == 4 and "nope" in out["msg"]
    assert reservations(tmp_path) == []


def netlink_failure(method):
    return lambda kernel, host, config: kernel.fail_next(method)


def gateway_conflict(kernel, host, config):
    bridge = kernel.new_link(kernel.host, "cni0", "bridge", up=True)
    bridge.addresses.append(ip_if("10.22.0.254/16"))


def not_a_bridge(kernel, host, config):
    kernel.new_link(kernel.host, "cni0", "dummy")


def forwarding_fails(kernel, host, config):
    host.fail_forwarding = CNIError(Code.IO_FAILURE, "cannot enable IP forwarding")


def masq_fails(kernel, host, config):
    config["ipMasq"] = True
    host.fail_masq = CNIError(Code.FIREWALL_FAILED, "iptables-restore failed")


def unreachable_gateway(kernel, host, config):
    # IPAM route through a gateway outside the pod subnet: the kernel refuses the route.
    config["ipam"]["routes"] = [{"dst": "192.168.0.0/16", "gw": "10.99.0.1"}]


@pytest.mark.parametrize("inject,code", [
    (netlink_failure("ensure_bridge"), 999),
    (netlink_failure("add_veth"), 999),
    (netlink_failure("attach"), 999),
    (netlink_failure("add_address"), 999),
    (netlink_failure("set_up"), 999),
    (netlink_failure("add_route"), 999),
    (unreachable_gateway, 999),
    (gateway_conflict, Code.BRIDGE_CONFLICT),
    (not_a_bridge, Code.BRIDGE_CONFLICT),
    (forwarding_fails, Code.IO_FAILURE),
    (masq_fails, Code.FIREWALL_FAILED),
], ids=["ensure_bridge", "add_veth", "attach", "add_address", "set_up", "add_route", "route-unreachable",
        "gateway-conflict", "not-a-bridge", "forwarding", "masquerade"])
def test_failed_add_rolls_back_everything(plugin, kernel, host, config, tmp_path, inject, code):
    inject(kernel, host, config)
    before = set(kernel.host.links)
    rc, out, err = run_plugin(lambda: plugin, cni_env("ADD"), config)
    assert rc == 1 and out["code"] == code, out
    assert "Traceback" not in err + out["msg"] + out["details"]
    assert kernel.pending_failures() == []   # the injected step was reached
    assert_nothing_left(kernel, tmp_path, before)
    if config.get("ipMasq"):
        assert host.masq_teardown == [("pods", CID, "eth0")]


def test_add_succeeds_after_a_rolled_back_failure(plugin, kernel, host, config, tmp_path):
    kernel.fail_next("add_route")
    with pytest.raises(FakeNetlinkError):
        add(plugin, config)
    res = add(plugin, config)
    assert str(res.ips[0].address) == "10.22.0.3/16"   # round-robin moved on; .2 was released
    assert reservations(tmp_path) == [("10.22.0.3", CID)]


def test_gateway_conflict_message(plugin, kernel, host, config):
    gateway_conflict(kernel, host, config)
    with pytest.raises(CNIError) as info:
        add(plugin, config)
    assert "10.22.0.254/16" in info.value.details and "forceAddress" in info.value.details


def test_force_address_replaces_a_conflicting_bridge_address(plugin, kernel, host, config):
    gateway_conflict(kernel, host, config)
    kernel.host.links["cni0"].addresses.append(ip_if("192.168.7.1/24"))   # another subnet: kept
    config["forceAddress"] = True
    add(plugin, config)
    assert kernel.host.links["cni0"].addresses == [ip_if("192.168.7.1/24"), ip_if("10.22.0.1/16")]


def test_without_is_gateway_the_bridge_gets_no_address(plugin, kernel, host, config):
    config["isGateway"] = False
    res = add(plugin, config)
    assert kernel.host.links["cni0"].addresses == []
    assert res.ips[0].gateway == ip("10.22.0.1")   # IPAM's gateway is still reported
    assert host.forwarding == [()]


# -- DEL -----------------------------------------------------------------------------------

def test_del_removes_everything_and_is_idempotent(plugin, kernel, host, config, tmp_path):
    config["ipMasq"] = True
    add(plugin, config)
    verb(plugin, "DEL", config)
    assert "eth0" not in kernel.ns(NETNS).links and VETH not in kernel.host.links
    assert "cni0" in kernel.host.links          # the bridge is never deleted
    assert reservations(tmp_path) == []
    assert host.masq_teardown == [("pods", CID, "eth0")]
    verb(plugin, "DEL", config)
    assert host.masq_teardown == [("pods", CID, "eth0")] * 2
    assert kernel.open_handles() == []


def test_del_hands_masquerade_the_backend_and_the_pod_addresses(plugin, kernel, host, config):
    """The pod's addresses are read before its link goes: the nftables backend removes
    their set elements directly instead of searching the sets."""
    config.update(ipMasq=True, ipMasqBackend="nftables")
    add(plugin, config)
    verb(plugin, "DEL", config)
    assert host.teardown_sources == [("nftables", (ip("10.22.0.2"),))]
    verb(plugin, "DEL", config)                      # the link is gone: no addresses to hand over
    assert host.teardown_sources[-1] == ("nftables", ())
    verb(plugin, "DEL", {**config}, CNI_NETNS="")    # no netns at all
    assert host.teardown_sources[-1] == ("nftables", ())


def test_add_plans_masquerade_with_the_configured_backend(plugin, kernel, host, config):
    add(plugin, {**config, "ipMasq": True, "ipMasqBackend": "nftables"})
    (plan,) = host.masq_setup
    assert plan.backend == "nftables" and plan.network == "pods"


@pytest.mark.parametrize("backend", ["nft", "", 4, "IPTABLES"])
def test_a_bad_masquerade_backend_is_an_invalid_config(plugin, kernel, host, config, backend):
    rc, out, _ = run_plugin(lambda: plugin, cni_env("ADD"),
                            {**config, "ipMasq": True, "ipMasqBackend": backend})
    assert rc == 1 and out["code"] == Code.INVALID_CONFIG and "ipMasqBackend" in out.get("details", ""), out
    assert host.masq_setup == [] and kernel.open_handles() == []


def test_del_with_the_netns_gone(plugin, kernel, host, config, tmp_path):
    add(plugin, config)
    kernel.remove_netns(NETNS)
    rc, out, _ = run_plugin(lambda: plugin, cni_env("DEL"), config)
    assert rc == 0 and out is None
    assert reservations(tmp_path) == [] and VETH not in kernel.host.links


def test_del_without_cni_netns_still_releases_and_removes_the_host_end(plugin, kernel, host, config, tmp_path):
    add(plugin, config)
    opened_before = len(kernel.handles)
    verb(plugin, "DEL", config, CNI_NETNS=None)
    assert reservations(tmp_path) == [] and VETH not in kernel.host.links
    assert [h.netns for h in kernel.handles[opened_before:]] == [None]   # only the host was opened
    assert kernel.ns(NETNS).links == {}                        # the pair went with its host end


def test_del_of_an_unknown_attachment_succeeds(plugin, kernel, host, config):
    verb(plugin, "DEL", config, CNI_CONTAINERID="never-added")
    assert kernel.open_handles() == []


def test_del_reports_an_ipam_failure_after_doing_the_rest(plugin, kernel, host, config, tmp_path):
    add(plugin, config)
    import fcntl

    fd = os.open(os.path.join(store(tmp_path).dir, "lock"), os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    config["ipam"]["lockTimeout"] = 0.05
    try:
        with pytest.raises(CNIError) as info:
            verb(plugin, "DEL", config)
    finally:
        os.close(fd)
    assert info.value.code == 11
    assert VETH not in kernel.host.links          # the links went anyway
    verb(plugin, "DEL", config)                   # the retry releases the address
    assert reservations(tmp_path) == []


def test_del_undoes_ipam_and_masquerade_even_when_the_kernel_refuses_the_link(plugin, kernel, host, config,
                                                                                tmp_path, monkeypatch):
    """The pod's link is deleted in a second thread while IPAM and masquerade are undone:
    its failure reaches the caller, after the rest is done, as before."""
    config.update(ipMasq=True, ipMasqBackend="nftables")
    add(plugin, config)
    real_delete = FakeNetlink.delete_link

    def refuse(self, name):
        if self.netns == NETNS:
            raise CNIError(Code.KERNEL_REFUSED, "the kernel refused to delete the link")
        return real_delete(self, name)

    monkeypatch.setattr(FakeNetlink, "delete_link", refuse)
    with pytest.raises(CNIError) as info:
        verb(plugin, "DEL", config)
    assert info.value.code == Code.KERNEL_REFUSED
    assert reservations(tmp_path) == []
    assert host.teardown_sources == [("nftables", (ip("10.22.0.2"),))]   # read before the attempt
    assert kernel.open_handles() == []


def test_del_hands_an_unexpected_error_of_the_link_thread_to_the_caller(plugin, kernel, host, config,
                                                                        tmp_path, monkeypatch):
    add(plugin, config)
    monkeypatch.setattr(FakeNetlink, "delete_link", lambda self, name: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        verb(plugin, "DEL", config)
    assert reservations(tmp_path) == []        # IPAM ran meanwhile
    assert kernel.open_handles() == []


# -- CHECK ----------------------------------------------------------------------------------

@pytest.fixture
def added(plugin, kernel, host, config):
    res = add(plugin, config)
    return {**config, "cniVersion": "1.0.0", "prevResult": res.to_dict("1.0.0")}


def check_fails(plugin, conf) -> CNIError:
    with pytest.raises(CNIError) as info:
        verb(plugin, "CHECK", conf)
    assert info.value.code == Code.CHECK_FAILED
    return info.value


def test_check_passes_after_add(plugin, kernel, added):
    rc, out, _ = run_plugin(lambda: plugin, cni_env("CHECK"), added)
    assert rc == 0 and out is None
    assert kernel.open_handles() == []


def test_check_detects_a_missing_address(plugin, kernel, added):
    kernel.ns(NETNS).links["eth0"].addresses.clear()
    assert "10.22.0.2/16" in check_fails(plugin, added).msg


def test_check_detects_a_missing_route(plugin, kernel, added):
    kernel.ns(NETNS).routes.clear()
    assert "0.0.0.0/0" in check_fails(plugin, added).msg


def test_check_detects_a_missing_host_veth(plugin, kernel, added):
    kernel.factory(None).delete_link(VETH)
    assert "host end" in check_fails(plugin, added).msg


def test_check_detects_a_veth_off_the_bridge(plugin, kernel, added):
    kernel.host.links[VETH].master = 0
    assert "not a port" in check_fails(plugin, added).msg


def test_check_detects_a_changed_mac(plugin, kernel, added):
    kernel.ns(NETNS).links["eth0"].mac = "0a:00:00:00:00:01"
    assert "MAC" in check_fails(plugin, added).msg


def test_check_detects_a_missing_bridge(plugin, kernel, added):
    del kernel.host.links["cni0"]
    assert "bridge cni0" in check_fails(plugin, added).msg


def test_check_detects_a_released_reservation(plugin, kernel, added, tmp_path):
    from ipam.allocator import Allocator

    Allocator(store(tmp_path), [], "boot-test", 0).release((CID, "eth0"))
    with pytest.raises(CNIError) as info:
        verb(plugin, "CHECK", added)
    assert info.value.code == Code.CHECK_FAILED and "reserved" in info.value.msg


def test_check_detects_missing_masquerade_rules(plugin, kernel, host, added):
    conf = {**added, "ipMasq": True}
    assert "masquerade" in check_fails(plugin, conf).msg
    host.rules = {("pods", CID, "eth0")}
    verb(plugin, "CHECK", conf)
    assert kernel.open_handles() == []


def test_check_needs_prev_result(plugin, added):
    conf = {k: v for k, v in added.items() if k != "prevResult"}
    with pytest.raises(CNIError) as info:
        verb(plugin, "CHECK", conf)
    assert info.value.code == Code.INVALID_CONFIG


def test_check_tolerates_later_plugins_adding_things(plugin, kernel, added):
    inner = kernel.ns(NETNS).links["eth0"]
    inner.addresses.append(ip_if("10.99.0.5/24"))     # e.g. another plugin in the chain
    verb(plugin, "CHECK", added)
    assert kernel.open_handles() == []


# -- GC / STATUS -----------------------------------------------------------------------------

def test_gc_drops_stale_reservations_and_masquerade(plugin, kernel, host, config, tmp_path):
    add(plugin, config)
    kernel.add_netns("/var/run/netns/pod-b")
    add(plugin, config, CNI_CONTAINERID="c2", CNI_NETNS="/var/run/netns/pod-b")
    host.rules = {("pods", CID, "eth0"), ("pods", "c2", "eth0"), ("other-net", "zz", "eth0")}
    conf = {**config, "cniVersion": "1.1.0", "cni.dev/valid-attachments": [{"containerID": CID, "ifname": "eth0"}]}
    rc, out, _ = run_plugin(lambda: plugin, cni_env("GC"), conf)
    assert rc == 0, out
    assert reservations(tmp_path) == [("10.22.0.2", CID)]
    assert host.masq_teardown == [("pods", "c2", "eth0")]


def test_gc_needs_the_attachment_list(plugin, host, config):
    with pytest.raises(CNIError) as info:
        verb(plugin, "GC", {**config, "cniVersion": "1.1.0"})
    assert info.value.code == Code.INVALID_CONFIG


def test_status(plugin, kernel, host, config):
    conf = {**config, "cniVersion": "1.1.0"}
    verb(plugin, "STATUS", conf)
    assert kernel.handles == []          # STATUS needs no netlink
    host.iptables = False
    verb(plugin, "STATUS", conf)         # iptables matters only with ipMasq
    with pytest.raises(CNIError) as info:
        verb(plugin, "STATUS", {**conf, "ipMasq": True})
    assert info.value.code == Code.CANNOT_SERVE_ADD


def test_status_reports_a_missing_nft_for_the_nftables_backend(plugin, host, config):
    conf = {**config, "cniVersion": "1.1.0", "ipMasq": True, "ipMasqBackend": "nftables"}
    host.iptables = False
    verb(plugin, "STATUS", conf)              # iptables does not matter to this network
    host.nft = False
    with pytest.raises(CNIError) as info:
        verb(plugin, "STATUS", conf)
    assert info.value.code == Code.CANNOT_SERVE_ADD and "nft" in info.value.msg
    assert "nftables package" in info.value.details


def test_status_checks_the_firewall_tool_of_each_ip_version_the_ranges_name(plugin, host, config):
    dual = {**config, "cniVersion": "1.1.0", "ipMasq": True,
            "ipam": {**config["ipam"], "ranges": [[{"subnet": "10.22.0.0/16"}], [{"subnet": "fd22::/64"}]]}}
    host.ip6tables = False
    with pytest.raises(CNIError) as info:
        verb(plugin, "STATUS", dual)
    assert info.value.code == Code.CANNOT_SERVE_ADD and "ip6tables" in info.value.msg
    verb(plugin, "STATUS", {**config, "cniVersion": "1.1.0", "ipMasq": True})   # IPv4 only: fine


def test_status_when_ipam_is_exhausted(plugin, kernel, host, config):
    config["ipam"]["ranges"] = [[{"subnet": "10.22.0.0/30"}]]   # one usable address
    add(plugin, config)
    with pytest.raises(CNIError) as info:
        verb(plugin, "STATUS", {**config, "cniVersion": "1.1.0"})
    assert info.value.code == Code.CANNOT_SERVE_ADD and "no free addresses" in info.value.msg


def test_unknown_netlink_errors_surface_as_999_without_traceback(plugin, kernel, host, config):
    kernel.fail_next("add_veth", FakeNetlinkError(errno.EPERM, "Operation not permitted"))
    rc, out, err = run_plugin(lambda: plugin, cni_env("ADD"), config)
    assert rc == 1 and out["code"] == 999 and "Operation not permitted" in out["msg"]
    assert "Traceback" not in err
