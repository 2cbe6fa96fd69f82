"""Kubernetes mode's state machine and watch loop, fed with stand-in Node objects (no cluster)."""
from __future__ import annotations

import ipaddress
from types import SimpleNamespace as NS

import pytest

from cni_bridge.agent import kube
from cni_bridge.agent.apply import Changes
from cni_bridge.agent.desired import AgentOptions

CLUSTER = (ipaddress.ip_network("10.244.0.0/16"),)


def node(name, cidr=None, ip=None, **extra):
    addresses = [NS(type="InternalIP", address=ip)] if ip else []
    return NS(metadata=NS(name=name, **extra), spec=NS(pod_cidrs=[cidr] if cidr else None, pod_cidr=cidr),
              status=NS(addresses=addresses))


class Recorder:
    def __init__(self):
        self.states = []

    def __call__(self, state, conf_dir):
        self.states.append(state)
        return Changes(conflist_written=len(self.states) == 1)


def make_agent():
    rec = Recorder()
    return kube.NodeAgent("w1", CLUSTER, AgentOptions(), "/conf", apply_fn=rec), rec


def test_waits_for_own_node_and_its_pod_cidr():
    agent, rec = make_agent()
    agent.replace_all([node("cp", "10.244.0.0/24", "172.18.0.2")])
    assert agent.sync() is None
    agent.handle_event("ADDED", node("w1", None, "172.18.0.3"))
    assert agent.sync() is None and rec.states == []
    assert agent.handle_event("MODIFIED", node("w1", "10.244.1.0/24", "172.18.0.3"))
    assert agent.sync() is not None
    (state,) = rec.states
    assert [str(r.dst) for r in state.routes] == ["10.244.0.0/24"]
    assert state.conflist["plugins"][0]["ipam"]["ranges"] == [[{"subnet": "10.244.1.0/24"}]]


def test_heartbeats_are_not_changes_but_moves_and_deletes_are():
    agent, _ = make_agent()
    agent.replace_all([node("w1", "10.244.1.0/24", "172.18.0.3"), node("w2", "10.244.2.0/24", "172.18.0.4")])
    assert not agent.handle_event("MODIFIED", node("w2", "10.244.2.0/24", "172.18.0.4", resource_version="9"))
    assert agent.handle_event("MODIFIED", node("w2", "10.244.2.0/24", "172.18.0.5"))
    assert agent.handle_event("DELETED", node("w2", "10.244.2.0/24", "172.18.0.5"))
    assert not agent.handle_event("DELETED", node("w2", "10.244.2.0/24", "172.18.0.5"))
    assert set(agent.nodes) == {"w1"}


class FakeApi:
    def __init__(self, batches):
        self.batches = batches
        self.lists = 0

    def list_node(self, **kwargs):
        self.lists += 1
        return NS(items=[node("w1", "10.244.1.0/24", "172.18.0.3")], metadata=NS(resource_version="1"))


class FakeWatchModule:
    def __init__(self, batches):
        self.batches = list(batches)

    def Watch(self):
        batches = self.batches

        class W:
            def stream(self, func, **kwargs):
                assert kwargs["resource_version"] == "1"
                batch = batches.pop(0) if batches else []
                if isinstance(batch, Exception):
                    raise batch
                yield from batch

            def stop(self):
                pass

        return W()


def test_run_lists_watches_and_relists_after_errors(monkeypatch):
    monkeypatch.setattr(kube.time, "sleep", lambda s: None)
    agent, rec = make_agent()
    batches = [
        [{"type": "ADDED", "object": node("w2", "10.244.2.0/24", "172.18.0.4")},
         {"type": "ERROR", "object": {"code": 410}}],
        ConnectionResetError("api server restarted"),
        [{"type": "DELETED", "object": node("w2", "10.244.2.0/24", "172.18.0.4")}],
    ]
    api = FakeApi(batches)
    watch = FakeWatchModule(batches)
    rounds = iter(range(100))
    kube.run(agent, api, watch, resync=60, should_stop=lambda: next(rounds) >= 6)
    assert api.lists >= 3
    routes = [[str(r.dst) for r in s.routes] for s in rec.states]
    assert ["10.244.2.0/24"] in routes          # w2 appeared
    assert routes[-1] == []                     # and went away again


def test_missing_client_is_a_clear_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_kubernetes(name, *args, **kwargs):
        if name == "kubernetes" or name.startswith("kubernetes."):
            raise ImportError("No module named 'kubernetes'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_kubernetes)
    with pytest.raises(kube.AgentError, match=r"pip install 'cni-bridge\[agent\]'"):
        kube.load_client(None)
