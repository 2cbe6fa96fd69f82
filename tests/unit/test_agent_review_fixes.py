"""The agent converges after the cluster changes under it (no root: pure plans and the fake kernel)."""
from __future__ import annotations

import ipaddress
import json

import pytest

from cni_bridge.agent.apply import Changes, sync_bridge
from cni_bridge.agent.desired import AgentOptions, conflist, desired_state, written_pod_cidrs
from cni_bridge.agent.diff import diff_addresses
from cni_bridge.agent.topology import parse_topology
from tests.unit.fake_netlink import FakeKernel

I = ipaddress.ip_interface
N = ipaddress.ip_network


def topology(own_cidr: str, cluster: str = "10.244.0.0/16,fd00:10:244::/56"):
    return parse_topology(json.dumps({"clusterCIDR": cluster, "nodes": [
        {"name": "n1", "internalIP": "172.18.0.2", "podCIDR": own_cidr},
        {"name": "n2", "internalIP": "172.18.0.3", "podCIDR": "10.244.2.0/24,fd00:10:244:2::/64"},
    ]}))


# -- defect 1: a changed podCIDR leaves the old gateway on the bridge ----------------------------
def test_desired_state_names_the_bridge_and_one_gateway_per_pod_cidr():
    state = desired_state(topology("10.244.7.0/24,fd00:10:244:7::/64"), "n1", AgentOptions(bridge="br9"))
    assert state.bridge == "br9"
    assert state.gateways == (I("10.244.7.1/24"), I("fd00:10:244:7::1/64"))
    assert state.cluster_cidrs == (N("10.244.0.0/16"), N("fd00:10:244::/56"))


def test_address_diff_removes_only_the_agents_stale_addresses():
    current = [I("10.244.1.1/24"), I("192.168.77.1/24"), I("fe80::1/64"), I("10.244.7.1/16"),
               I("10.245.3.1/24")]
    plan = diff_addresses(current, [I("10.244.7.1/24")], [N("10.244.0.0/16"), N("10.245.3.0/24")])
    # the old gateway, the right IP with the wrong prefix, the previously written podCIDR's
    assert plan.delete == [I("10.244.1.1/24"), I("10.244.7.1/16"), I("10.245.3.1/24")]
    assert plan.add == [I("10.244.7.1/24")]
    assert diff_addresses([I("10.244.7.1/24"), I("192.168.77.1/24")], [I("10.244.7.1/24")],
                          [N("10.244.0.0/16")]) == diff_addresses([], [], [])


def test_written_pod_cidrs_reads_back_the_agents_conflist_and_nothing_else():
    node = topology("10.244.1.0/24,fd00:10:244:1::/64").node("n1")
    content = json.dumps(conflist(node, AgentOptions())).encode()
    assert written_pod_cidrs(content) == (N("10.244.1.0/24"), N("fd00:10:244:1::/64"))
    for junk in (b"", b"{", b"[]", b'{"plugins": 3}', b'{"plugins": [{"type": "cni-bridge"}]}',
                 b'{"plugins": [{"type": "cni-bridge", "ipam": {"ranges": [[{"subnet": "x"}]]}}]}'):
        assert written_pod_cidrs(junk) == ()


def make_bridge(kernel: FakeKernel, *addresses: str) -> None:
    link = kernel.new_link(kernel.host, "cni0", "bridge", up=True)
    link.addresses = [I(a) for a in addresses]


def test_sync_bridge_moves_the_gateway_and_keeps_foreign_addresses():
    kernel = FakeKernel()
    make_bridge(kernel, "10.244.1.1/24", "192.168.77.1/24")
    state = desired_state(topology("10.244.7.0/24"), "n1")
    changes = Changes()
    sync_bridge(state, (N("10.244.1.0/24"),), lambda: kernel.factory(None), changes)
    assert kernel.host.links["cni0"].addresses == [I("192.168.77.1/24"), I("10.244.7.1/24")]
    assert changes.addresses_removed == ["10.244.1.1/24"] and changes.addresses_added == ["10.244.7.1/24"]
    assert "bridge addresses removed: 10.244.1.1/24" in changes.summary() and changes.errors == []

    again = Changes()
    sync_bridge(state, (N("10.244.7.0/24"),), lambda: kernel.factory(None), again)
    assert not again.any and kernel.open_handles() == []


def test_sync_bridge_leaves_a_missing_bridge_to_the_plugin():
    kernel = FakeKernel()
    changes = Changes()
    sync_bridge(desired_state(topology("10.244.7.0/24"), "n1"), (), lambda: kernel.factory(None), changes)
    assert kernel.host.links == {} and not changes.any and changes.errors == []


def test_sync_bridge_reports_a_refused_address_change_and_keeps_going():
    from cni_bridge.protocol.errors import CNIError, Code

    kernel = FakeKernel()
    make_bridge(kernel, "10.244.1.1/24")
    kernel.fail_next("del_address", CNIError(Code.KERNEL_REFUSED, "the kernel refused to remove the address",
                                             "Operation not permitted"))
    changes = Changes()
    sync_bridge(desired_state(topology("10.244.7.0/24"), "n1"), (), lambda: kernel.factory(None), changes)
    assert changes.errors == ["cannot remove 10.244.1.1/24 from cni0: "
                              "the kernel refused to remove the address: Operation not permitted"]
    assert changes.addresses_added == ["10.244.7.1/24"]


# -- defect 2: a half-written topology file ends the resync loop ---------------------------------
GOOD = json.dumps({"clusterCIDR": "10.244.0.0/16", "nodes": [
    {"name": "n1", "internalIP": "172.18.0.2", "podCIDR": "10.244.1.0/24"},
    {"name": "n2", "internalIP": "172.18.0.3", "podCIDR": "10.244.2.0/24"}]})


class Stop(Exception):
    pass


def run_loop(monkeypatch, tmp_path, contents):
    """topology_mode without --once over successive file contents (one per resync); the
    desired states it applied, in order, and the run's end (Stop once the contents run out)."""
    from cni_bridge.agent import apply as apply_module
    from cni_bridge.agent import cli

    topo = tmp_path / "topology.json"
    pending = list(contents)
    applied = []

    def next_round(seconds):
        assert seconds == 5
        if not pending:
            raise Stop
        topo.write_text(pending.pop(0))

    monkeypatch.setattr(apply_module, "apply", lambda state, conf_dir: applied.append(state) or Changes())
    monkeypatch.setattr(cli.time, "sleep", next_round)
    topo.write_text(pending.pop(0))
    args = cli.build_parser().parse_args(["--node", "n1", "--topology", str(topo), "--resync", "5"])
    try:
        cli.topology_mode(args)
    except Stop:
        return applied, "stopped"
    return applied, "returned"


def test_resync_loop_survives_half_written_files_and_keeps_the_last_state(monkeypatch, tmp_path, caplog):
    moved = GOOD.replace("10.244.2.0/24", "10.244.3.0/24")
    applied, end = run_loop(monkeypatch, tmp_path, [GOOD, "", GOOD[:40], "  \n", moved])
    assert end == "stopped"                       # the loop never gave up
    # Nothing applied while the file was bad (the node keeps what it has); the edit is followed.
    assert [[str(r.dst) for r in s.routes] for s in applied] == [["10.244.2.0/24"], ["10.244.3.0/24"]]
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 3
    assert "is empty" in errors[0] and "is not valid JSON" in errors[1] and "reading it again in 5s" in errors[0]


def test_resync_loop_waits_when_the_node_is_missing_from_an_edited_file(monkeypatch, tmp_path, caplog):
    only_n2 = json.dumps({"clusterCIDR": "10.244.0.0/16", "nodes": [
        {"name": "n2", "internalIP": "172.18.0.3", "podCIDR": "10.244.2.0/24"}]})
    applied, end = run_loop(monkeypatch, tmp_path, [GOOD, only_n2, GOOD])
    assert end == "stopped" and len(applied) == 2
    assert any("node 'n1' is not in the topology" in r.getMessage() for r in caplog.records)


def test_once_with_an_empty_file_is_a_clear_error(tmp_path, capsys):
    from cni_bridge.agent.cli import main

    topo = tmp_path / "topology.json"
    topo.write_text("")
    rc = main(["--node", "n1", "--topology", str(topo), "--once", "--conf-dir", str(tmp_path / "net.d")])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.strip() == f"cni-bridge agent: error: {topo} is empty"
    assert not (tmp_path / "net.d").exists()


# -- nearby: Kubernetes API errors are one clear line, not an "internal error" with headers -------
FORBIDDEN_BODY = json.dumps({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Forbidden",
                             "code": 403, "message": 'nodes is forbidden: User "system:serviceaccount:x:y" '
                                                     'cannot list resource "nodes"'})


def forbidden():
    """What the official client raises for a 403 (built the way it builds it from the response)."""
    from types import SimpleNamespace

    rest = pytest.importorskip("kubernetes.client.rest")
    resp = SimpleNamespace(status=403, reason="Forbidden", data=FORBIDDEN_BODY.encode(),
                           headers={"Content-Type": "application/json", "Audit-Id": "0f2c"})
    return rest.ApiException(http_resp=resp)


class FailingApi:
    def __init__(self, exc):
        self.exc = exc
        self.calls = 0

    def list_node(self, **kwargs):
        self.calls += 1
        raise self.exc


def test_once_in_kubernetes_mode_reports_an_api_error_in_one_line(monkeypatch, tmp_path, capsys):
    from cni_bridge.agent import kube
    from cni_bridge.agent.cli import main

    monkeypatch.setattr(kube, "load_client", lambda kubeconfig: (FailingApi(forbidden()), None))
    rc = main(["--node", "n1", "--cluster-cidr", "10.244.0.0/16", "--once", "--conf-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 1
    assert err == ('cni-bridge agent: error: cannot list Nodes from the Kubernetes API: HTTP 403 Forbidden: '
                   'nodes is forbidden: User "system:serviceaccount:x:y" cannot list resource "nodes"\n')


def test_the_watch_loop_logs_api_errors_in_one_line_and_backs_off(monkeypatch, caplog):
    from cni_bridge.agent import kube

    sleeps = []
    monkeypatch.setattr(kube.time, "sleep", sleeps.append)
    agent = kube.NodeAgent("n1", (N("10.244.0.0/16"),), AgentOptions(), "/conf", apply_fn=None)
    api = FailingApi(forbidden())
    kube.run(agent, api, None, resync=60, should_stop=lambda: api.calls >= 3)
    assert sleeps == [1.0, 2.0, 4.0]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings[0] == ('Kubernetes API: HTTP 403 Forbidden: nodes is forbidden: User '
                           '"system:serviceaccount:x:y" cannot list resource "nodes"; retrying in 1s')
    assert all("\n" not in w and "Audit-Id" not in w for w in warnings)


def test_api_errors_without_a_status_body_keep_their_type_and_first_line():
    from cni_bridge.agent import kube

    rest = pytest.importorskip("kubernetes.client.rest")
    # a watch ERROR event, which the client turns into an ApiException without a body
    assert kube.api_error(rest.ApiException(status=410, reason="Expired: too old resource version")) \
        == "HTTP 410 Expired: too old resource version"
    assert kube.api_error(ConnectionResetError(104, "Connection reset by peer")) \
        == "ConnectionResetError: [Errno 104] Connection reset by peer"
