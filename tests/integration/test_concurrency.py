"""Concurrent ADDs racing to create the same bridge and its gateway address."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from tests.integration.cnitest import (
    addr_of, addresses, assert_nothing_left, bridge_conf, link, link_kind, our_chains, ping,
    reserved_ips, veths,
)

PARALLEL = 10


def test_parallel_adds_on_a_missing_bridge_then_parallel_dels(cni, make_netns):
    conf = bridge_conf(cni, isGateway=True, ipMasq=True)
    assert link(cni.ns, conf["bridge"]) is None
    pods = [make_netns("p") for _ in range(PARALLEL)]

    def add(i: int):
        return cni.run("cni-bridge", "ADD", conf, container_id=f"c{i}", netns=pods[i].path)

    with ThreadPoolExecutor(PARALLEL) as pool:
        answers = list(pool.map(add, range(PARALLEL)))
    failures = [(i, a.stdout, a.stderr) for i, a in enumerate(answers) if a.rc != 0]
    assert failures == []
    results = [a.json for a in answers]
    ips = [addr_of(r) for r in results]
    assert len(set(ips)) == PARALLEL
    assert reserved_ips(cni) == set(ips)
    assert link_kind(link(cni.ns, conf["bridge"])) == "bridge"
    assert addresses(cni.ns, conf["bridge"]) == ["10.77.0.1/24"]
    assert len(veths(cni.ns)) == PARALLEL and len(our_chains(cni.ns)) == PARALLEL
    assert all(link(cni.ns, r["interfaces"][1]["name"])["master"] == conf["bridge"] for r in results)
    # The first and the last pod can talk through the bridge they raced to create.
    assert ping(pods[0], ips[-1]).returncode == 0

    def delete(i: int):
        return cni.run("cni-bridge", "DEL", conf, container_id=f"c{i}", netns=pods[i].path)

    with ThreadPoolExecutor(PARALLEL) as pool:
        answers = list(pool.map(delete, range(PARALLEL)))
    assert [(i, a.stdout) for i, a in enumerate(answers) if a.rc != 0] == []
    assert all(link(p, "eth0") is None for p in pods)
    assert_nothing_left(cni)
