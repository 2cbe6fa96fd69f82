"""A first end-to-end check: two pods on one bridge, ADD, traffic, DEL."""
from __future__ import annotations

from tests.support.netns import unique


def bridge_config(cni_host, bridge: str, **extra) -> dict:
    conf = {
        "cniVersion": "1.0.0", "name": "smoke", "type": "cni-bridge", "bridge": bridge,
        "isGateway": True,
        "ipam": {"type": "cni-ipam", "dataDir": str(cni_host.data_dir),
                 "ranges": [[{"subnet": "10.123.0.0/24"}]]},
    }
    conf.update(extra)
    return conf


def test_two_pods_ping_and_clean_up(cni_host, make_netns):
    bridge = unique("br")
    conf = bridge_config(cni_host, bridge)
    pods = [make_netns("p"), make_netns("p")]
    addrs = []
    for i, pod in enumerate(pods):
        res = cni_host.run("cni-bridge", "ADD", conf, container_id=f"c{i}", netns=pod.path)
        assert res.rc == 0, res.stdout
        addrs.append(res.json["ips"][0]["address"].split("/")[0])
    assert addrs[0] != addrs[1]
    ping = pods[0].exec("busybox", "ping", "-c", "1", "-W", "2", addrs[1], check=False)
    assert ping.returncode == 0, ping.stdout + ping.stderr
    for i, pod in enumerate(pods):
        res = cni_host.run("cni-bridge", "DEL", conf, container_id=f"c{i}", netns=pod.path)
        assert res.rc == 0, res.stdout
        assert "eth0" not in pod.links()
    assert [p for p in cni_host.netns.links() if p.startswith("veth")] == []
    assert sorted(p.name for p in (cni_host.data_dir / "smoke").iterdir() if p.name[0].isdigit()) == []
