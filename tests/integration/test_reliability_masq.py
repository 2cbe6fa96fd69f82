"""Masquerade rules go with their attachment: DEL without a netns, DEL after the netns, GC."""
from __future__ import annotations

from tests.support.netns import unique
from tests.support.reliability import bridge_conf, gc_conf, leftovers, masq_chains, no_traceback, wait_until

NET = "masq"


def _add(cni_host, conf, cid, pod):
    res = cni_host.run("cni-bridge", "ADD", conf, container_id=cid, netns=pod.path)
    assert res.rc == 0, res.stdout
    return res


def test_del_with_empty_netns_removes_rules(cni_host, make_netns):
    conf = bridge_conf(cni_host.data_dir, unique("br"), network=NET, subnet="10.98.0.0/24")
    pod = make_netns("p")
    _add(cni_host, conf, "c1", pod)
    assert len(masq_chains(cni_host.netns)) == 1
    res = cni_host.run("cni-bridge", "DEL", conf, container_id="c1", netns="")
    no_traceback(res)
    assert res.rc == 0, res.stdout
    # The host veth goes too (and its peer with it), so the pod is detached.
    assert leftovers(cni_host, NET) == {}
    assert "eth0" not in pod.links()


def test_del_after_netns_is_gone_removes_rules(cni_host, make_netns):
    conf = bridge_conf(cni_host.data_dir, unique("br"), network=NET, subnet="10.98.0.0/24")
    pod = make_netns("p")
    _add(cni_host, conf, "c1", pod)
    path = pod.path
    pod.delete()
    res = cni_host.run("cni-bridge", "DEL", conf, container_id="c1", netns=path)
    no_traceback(res)
    assert res.rc == 0, res.stdout
    assert masq_chains(cni_host.netns) == []
    assert wait_until(lambda: leftovers(cni_host, NET) == {}), leftovers(cni_host, NET)
    # And DEL again is still fine.
    assert cni_host.run("cni-bridge", "DEL", conf, container_id="c1", netns=path).rc == 0


def test_gc_removes_rules_of_attachments_no_longer_valid(cni_host, make_netns):
    bridge = unique("br")
    conf = bridge_conf(cni_host.data_dir, bridge, network=NET, subnet="10.98.0.0/24")
    other = bridge_conf(cni_host.data_dir, bridge, network="othernet", subnet="10.99.0.0/24")
    pods = {cid: make_netns("p") for cid in ("keep", "gone1", "gone2")}
    for cid, pod in pods.items():
        _add(cni_host, conf, cid, pod)
    other_pod = make_netns("p")
    _add(cni_host, other, "gone1", other_pod)      # same container ID, another network
    assert len(masq_chains(cni_host.netns)) == 4

    for cid in ("gone1", "gone2"):
        pods[cid].delete()                          # the runtime lost them without a DEL
    res = cni_host.run("cni-bridge", "GC", gc_conf(conf, [("keep", "eth0")]))
    no_traceback(res)
    assert res.rc == 0, res.stdout
    assert len(masq_chains(cni_host.netns)) == 2    # keep's, and the other network's
    rules = "\n".join(cni_host.netns.nat_rules())
    assert "id=keep " in rules and "net=othernet id=gone1" in rules and "net=masq id=gone1" not in rules

    assert cni_host.run("cni-bridge", "DEL", conf, container_id="keep", netns=pods["keep"].path).rc == 0
    assert cni_host.run("cni-bridge", "DEL", other, container_id="gone1", netns=other_pod.path).rc == 0
    assert wait_until(lambda: leftovers(cni_host, NET) == {}), leftovers(cni_host, NET)
    assert leftovers(cni_host, "othernet") == {}
