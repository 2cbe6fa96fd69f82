"""Review fixes (plugin side), no root: protocol edge cases, planning, CHECK and GC logic."""
from __future__ import annotations

import pytest

from cni_bridge.protocol.errors import Code

from .helpers import NETNS, cni_env, run_plugin
from .test_bridge_plugin import assert_nothing_left, config, host, kernel, plugin  # noqa: F401  (fixtures)
from .test_runner import FakePlugin, loader

DEEP = b"[" * 100000


# -- stdin nested deeper than the recursion limit ----------------------------------------
@pytest.mark.parametrize("command", ["ADD", "DEL", "CHECK", "GC", "STATUS"])
def test_deeply_nested_stdin_is_code_6(command):
    fake = FakePlugin()
    rc, out, err = run_plugin(loader(fake), cni_env(command), stdin=DEEP)
    assert rc == 1 and out["code"] == Code.DECODE_FAILURE, out
    assert "nested too deeply" in out["details"]
    assert "Traceback" not in err and fake.calls == []


def test_version_with_deeply_nested_stdin_still_answers():
    rc, out, _ = run_plugin(loader(FakePlugin()), cni_env("VERSION"), stdin=DEEP)
    assert rc == 0 and "1.1.0" in out["supportedVersions"]


def test_logged_run_survives_deeply_nested_stdin(tmp_path):
    """oplog.run_logged decodes stdin (looking for logFile) before the runner does."""
    import io

    from cni_bridge.oplog import BRIDGE_LOG_KEYS, run_logged

    out, err = io.StringIO(), io.StringIO()
    rc = run_logged("cni-bridge", loader(FakePlugin()), cni_env("ADD"), DEEP, out, BRIDGE_LOG_KEYS, err)
    assert rc == 1 and '"code": 6' in out.getvalue()


# -- masquerade comments fit iptables' 255 characters -------------------------------------
def test_masq_comment_is_bounded_for_any_container_id_and_names_its_network():
    from cni_bridge.plan import masq_comment, masq_comment_network, masq_comment_owner, parse_masq_comment

    for cid in ("c" * 224, "c" * 300, "c" * 5000):
        comment = masq_comment("n" * 500, cid, "a" * 15)
        assert len(comment) <= 166
        net, cid_field, ifname = parse_masq_comment(comment)
        assert (net, ifname) == (masq_comment_network("n" * 500), "a" * 15)
        assert cid_field.startswith("sha256:")
        assert masq_comment_owner(comment) == net
    assert masq_comment("n", "c" * 300, "eth0") != masq_comment("n", "c" * 301, "eth0")
    assert parse_masq_comment(masq_comment("pods", "c" * 64, "eth0")) == ("pods", "c" * 64, "eth0")


def test_masq_comment_owner_reads_comments_the_earlier_release_let_iptables_cut():
    from cni_bridge.plan import masq_comment_owner

    earlier = f"cni-bridge net=pods id={'c' * 300} if=eth0"[:255]
    assert masq_comment_owner(earlier) == "pods"
    assert masq_comment_owner("cni-bridge agent: masquerade pod traffic leaving the cluster") is None
    assert masq_comment_owner('name: "pods" id: "c1"') is None


# -- no pod address the bridge holds -------------------------------------------------------
def test_plan_refuses_a_pod_address_that_is_its_own_gateway():
    """An IPAM result without a gateway makes the subnet's first address the bridge's;
    an IPAM that handed out that address must not have it on the pod too."""
    import ipaddress

    from cni_bridge.confbase import load
    from cni_bridge.config import BridgeConf
    from cni_bridge.plan import plan_attachment
    from cni_bridge.protocol.errors import CNIError
    from cni_bridge.protocol.result import IPConfig, Result

    conf = load(BridgeConf, {"cniVersion": "1.0.0", "name": "pods", "type": "cni-bridge", "bridge": "br0",
                             "isGateway": True, "ipam": {"type": "other-ipam"}})
    first = Result(ips=(IPConfig(ipaddress.ip_interface("10.22.0.1/16"), None),))
    with pytest.raises(CNIError) as info:
        plan_attachment(conf, "c1", "eth0", {}, first)
    assert info.value.code == Code.BRIDGE_CONFLICT and "10.22.0.1" in info.value.msg
    second = Result(ips=(IPConfig(ipaddress.ip_interface("10.22.0.2/16"), None),))
    assert plan_attachment(conf, "c1", "eth0", {}, second).gateway_addresses == (
        ipaddress.ip_interface("10.22.0.1/16"),)


def test_add_refuses_an_address_the_bridge_holds_and_rolls_back(plugin, kernel, host, config, tmp_path):
    """Another network on the bridge holds 10.22.0.2 (its gateway, in 10.22.0.0/24);
    this network's IPAM (10.22.0.0/16) hands it out first."""
    import ipaddress

    bridge = kernel.new_link(kernel.host, "cni0", "bridge", up=True)
    bridge.addresses.append(ipaddress.ip_interface("10.22.0.2/24"))
    rc, out, err = run_plugin(lambda: plugin, cni_env("ADD"), config)
    assert rc == 1 and out["code"] == Code.BRIDGE_CONFLICT, out
    assert "10.22.0.2" in out["msg"] and "cni0" in out["msg"] and "Traceback" not in err
    assert_nothing_left(kernel, tmp_path)
    assert bridge.addresses == [ipaddress.ip_interface("10.22.0.2/24")]   # nothing added to the bridge either
    assert host.masq_setup == [] and host.forwarding == []
    assert ("add_veth" not in {m for _, m in kernel.calls})                # refused before any link was made


# -- accept_ra=0 on the bridge, arp_notify=1 on the pod interface before it is up ----------
def test_add_refuses_router_advertisements_and_announces_the_pod_address(plugin, kernel, host, config):
    import ipaddress

    run_plugin(lambda: plugin, cni_env("ADD"), config)
    assert host.accept_ra_refused == ["cni0"]
    eth0 = kernel.ns(NETNS).links["eth0"]
    assert eth0.arp_notify and eth0.announced == [ipaddress.ip_address("10.22.0.2")]
    calls = [m for _, m in kernel.calls]
    assert calls.index("set_arp_notify") < calls.index("set_up")
    # The explicit announcement goes once the bridge forwards from the pod's port.
    assert calls.index("set_up") < calls.index("wait_port_forwarding") < calls.index("announce")


def test_ipv6_only_pod_makes_no_ipv4_announcement(plugin, kernel, host, config):
    config["ipam"]["ranges"] = [[{"subnet": "fd22::/64"}]]
    run_plugin(lambda: plugin, cni_env("ADD"), config)
    calls = [m for _, m in kernel.calls]
    assert "set_arp_notify" in calls and "announce" not in calls and "wait_port_forwarding" not in calls


def test_sysctl_set_link_tolerates_a_missing_file_and_reports_other_errors(monkeypatch, tmp_path, caplog):
    import builtins
    import errno
    import logging

    from cni_bridge import sysctl
    from cni_bridge.protocol.errors import CNIError

    real_open = builtins.open
    conf = tmp_path / "net/ipv6/conf/br0"
    conf.mkdir(parents=True)
    (conf / "accept_ra").write_text("1\n")
    monkeypatch.setattr(builtins, "open", lambda path, *a, **k: real_open(
        str(path).replace("/proc/sys", str(tmp_path)), *a, **k))
    sysctl.refuse_router_advertisements("br0")
    assert (conf / "accept_ra").read_text() == "0"
    sysctl.refuse_router_advertisements("nosuch0")            # IPv6 disabled: nothing to refuse
    assert sysctl.set_link(6, "nosuch0", "accept_ra", "0") is False
    (conf / "accept_ra").write_text("1")

    def failing_write(error):
        def fake_open(path, mode="r", *a, **k):
            if "w" in mode:
                raise error
            return real_open(str(path).replace("/proc/sys", str(tmp_path)), mode, *a, **k)
        return fake_open

    # /proc/sys mounted read-only (a node that is an unprivileged container): the
    # hardening is skipped with a warning, as the reference does, not the pod failed...
    monkeypatch.setattr(builtins, "open", failing_write(OSError(errno.EROFS, "Read-only file system")))
    with caplog.at_level(logging.WARNING):
        sysctl.refuse_router_advertisements("br0")
    assert "accept_ra" in caplog.text and "Read-only file system" in caplog.text
    # ... but a setting the pod needs still fails, and so does any other error.
    with pytest.raises(CNIError) as info:
        sysctl.set_link(6, "br0", "accept_ra", "0")
    assert info.value.code == Code.IO_FAILURE and "accept_ra" in info.value.msg
    monkeypatch.setattr(builtins, "open", failing_write(OSError(errno.EIO, "Input/output error")))
    with pytest.raises(CNIError):
        sysctl.refuse_router_advertisements("br0")


@pytest.mark.parametrize("states, expected, reads", [
    (["0", "0", "3"], True, 3),     # enabled a moment after the carrier came up
    (["3"], True, 1),
    (["1"], False, 1),              # STP listening: seconds away, not worth a wait
    ([], False, 1),                 # no such file: sysfs shows another namespace
])
def test_wait_port_forwarding_reads_sysfs(monkeypatch, states, expected, reads):
    import builtins
    import io

    from cni_bridge.netlink import Netlink

    seen = []

    def fake_open(path, *a, **k):
        seen.append(path)
        assert path == "/sys/class/net/veth0/brport/state"
        if not states:
            raise FileNotFoundError(2, "No such file or directory")
        return io.StringIO(states.pop(0) + "\n")

    monkeypatch.setattr(builtins, "open", fake_open)
    handle = Netlink.__new__(Netlink)   # no socket needed: sysfs only
    assert handle.wait_port_forwarding("veth0") is expected
    assert len(seen) == reads
