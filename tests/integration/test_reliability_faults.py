"""A plugin SIGKILLed at every step of ADD or DEL, then the runtime's DEL or GC: nothing leaks.

The fault points come from the registry in cni_bridge/faults.py; each test
first proves the kill happened at that point (exit by SIGKILL), so a point
that is never reached fails instead of passing vacuously.
"""
from __future__ import annotations

import re

import pytest

from cni_bridge.faults import NAMES, POINTS
from tests.support.netns import REPO, unique
from tests.support.reliability import (KILLED, bridge_conf, faulty, gc_conf, ipam_cli, leftovers,
                                       no_traceback, store_files, wait_until)

ADD_POINTS = [p.name for p in POINTS if p.verb == "ADD"]
DEL_POINTS = [p.name for p in POINTS if p.verb == "DEL"]
NET = "faults"


def test_registry_matches_the_code():
    """Every point() call names a registered point, and every registered point is placed."""
    used = set()
    for path in list((REPO / "cni_bridge").rglob("*.py")) + list((REPO / "ipam").rglob("*.py")):
        used |= set(re.findall(r'\bpoint\("([^"]+)"\)', path.read_text()))
    assert used == NAMES
    assert len(NAMES) == len(POINTS)


def _conf(cni_host, bridge):
    return bridge_conf(cni_host.data_dir, bridge, network=NET, subnet="10.91.0.0/24")


def _store_is_clean(cni_host) -> None:
    """The store reads back whole and `cni-ipam check` finds nothing suspicious."""
    res = ipam_cli(cni_host, "check", "--data-dir", str(cni_host.data_dir), "--network", NET)
    no_traceback(res)
    assert res.rc == 0, res.stdout + res.stderr


@pytest.mark.parametrize("point", ADD_POINTS)
def test_killed_add_then_del_leaks_nothing(cni_host, make_netns, point):
    conf, pod, cid = _conf(cni_host, unique("br")), make_netns("p"), unique("c")
    res = cni_host.run("cni-bridge", "ADD", conf, container_id=cid, netns=pod.path, env=faulty(point))
    assert res.rc == KILLED, (point, res.rc, res.stdout, res.stderr)

    res = cni_host.run("cni-bridge", "DEL", conf, container_id=cid, netns=pod.path)
    no_traceback(res)
    assert res.rc == 0, res.stdout
    # A temp file is the one trace a kill inside a write can leave: no reservation, GC removes it.
    left = leftovers(cni_host, NET, temp_files=point != "ipam.store.temp-written")
    assert left == {}, point
    assert "eth0" not in pod.links()

    # The store and the bridge still work: the same container can come back.
    res = cni_host.run("cni-bridge", "ADD", conf, container_id=cid, netns=pod.path)
    assert res.rc == 0, res.stdout
    assert cni_host.run("cni-bridge", "DEL", conf, container_id=cid, netns=pod.path).rc == 0
    if point != "ipam.store.temp-written":
        _store_is_clean(cni_host)


@pytest.mark.parametrize("point", ADD_POINTS)
def test_killed_add_then_gc_leaks_nothing(cni_host, make_netns, point):
    conf, pod, cid = _conf(cni_host, unique("br")), make_netns("p"), unique("c")
    res = cni_host.run("cni-bridge", "ADD", conf, container_id=cid, netns=pod.path, env=faulty(point))
    assert res.rc == KILLED, (point, res.rc, res.stdout, res.stderr)

    # The runtime never sends DEL; the sandbox goes away (and its veth pair with it), then GC runs.
    pod.delete()
    assert wait_until(lambda: not leftovers(cni_host, NET).get("veths")), leftovers(cni_host, NET)
    res = cni_host.run("cni-bridge", "GC", gc_conf(conf, []))
    no_traceback(res)
    assert res.rc == 0, res.stdout
    assert leftovers(cni_host, NET) == {}, point
    _store_is_clean(cni_host)


def test_killed_add_is_undone_by_gc_but_live_attachments_stay(cni_host, make_netns):
    """GC after a kill keeps what the runtime lists as live."""
    conf = _conf(cni_host, unique("br"))
    live_pod, dead_pod = make_netns("p"), make_netns("p")
    assert cni_host.run("cni-bridge", "ADD", conf, container_id="live", netns=live_pod.path).rc == 0
    res = cni_host.run("cni-bridge", "ADD", conf, container_id="dead", netns=dead_pod.path,
                       env=faulty("add.masq-set"))
    assert res.rc == KILLED
    dead_pod.delete()
    assert cni_host.run("cni-bridge", "GC", gc_conf(conf, [("live", "eth0")])).rc == 0
    files = store_files(cni_host.data_dir, NET)
    assert files["owners"] == ["owners/live:eth0"] and len(files["reservations"]) == 1
    assert len(leftovers(cni_host, NET)["chains"]) == 1
    assert cni_host.run("cni-bridge", "DEL", conf, container_id="live", netns=live_pod.path).rc == 0
    assert wait_until(lambda: leftovers(cni_host, NET) == {}), leftovers(cni_host, NET)


@pytest.mark.parametrize("point", DEL_POINTS)
def test_killed_del_then_del_again_leaks_nothing(cni_host, make_netns, point):
    conf, pod, cid = _conf(cni_host, unique("br")), make_netns("p"), unique("c")
    assert cni_host.run("cni-bridge", "ADD", conf, container_id=cid, netns=pod.path).rc == 0

    res = cni_host.run("cni-bridge", "DEL", conf, container_id=cid, netns=pod.path, env=faulty(point))
    assert res.rc == KILLED, (point, res.rc, res.stdout, res.stderr)
    res = cni_host.run("cni-bridge", "DEL", conf, container_id=cid, netns=pod.path)
    no_traceback(res)
    assert res.rc == 0, res.stdout
    assert leftovers(cni_host, NET) == {}, point
    _store_is_clean(cni_host)


@pytest.mark.parametrize("point", [p for p in ADD_POINTS if p.startswith("ipam.")])
def test_killed_ipam_add_then_ipam_del(cni_host, point):
    """The same for cni-ipam run on its own (as the reference bridge runs it)."""
    from tests.support.reliability import ipam_conf

    conf = ipam_conf(cni_host.data_dir, network=NET)
    res = cni_host.run("cni-ipam", "ADD", conf, container_id="c1", netns="/none", env=faulty(point))
    assert res.rc == KILLED, (point, res.rc, res.stdout)
    assert cni_host.run("cni-ipam", "DEL", conf, container_id="c1").rc == 0
    assert store_files(cni_host.data_dir, NET)["reservations"] == []
    assert store_files(cni_host.data_dir, NET)["owners"] == []
    # GC with the container still listed keeps nothing it does not own and sweeps temp files.
    assert cni_host.run("cni-ipam", "GC", gc_conf(conf, [("c1", "eth0")])).rc == 0
    assert store_files(cni_host.data_dir, NET) == {"reservations": [], "owners": [], "temp_files": []}
    _store_is_clean(cni_host)

