"""ADD answers in the shape of the requested cniVersion; unknown versions are refused."""
from __future__ import annotations

import pytest

from tests.integration.cnitest import assert_nothing_left, bridge_conf, link, veths

VERSIONS = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]


@pytest.mark.parametrize("version", VERSIONS)
def test_add_answers_in_requested_shape(cni, pod, version):
    conf = bridge_conf(cni, "10.77.0.0/24", "fd77::/64", version=version, isGateway=True)
    result = cni.add(conf, "c1", pod)
    assert result["cniVersion"] == version
    assert [i["name"] for i in result["interfaces"]] == [conf["bridge"], veths(cni.ns)[0], "eth0"]
    legacy = version < "1.0.0"
    assert len(result["ips"]) == 2
    for ip, family in zip(result["ips"], ("4", "6")):
        assert ip["interface"] == 2
        if legacy:
            assert ip["version"] == family
        else:
            assert "version" not in ip
    cni.delete(conf, "c1", pod.path)
    assert link(pod, "eth0") is None
    assert_nothing_left(cni)


@pytest.mark.parametrize("bad", ["0.1.0", "0.2.0", "0.3.2", "1.2.0", "2.0.0", "1.0", "latest", None])
def test_unknown_version_refused_with_code_1(cni, pod, bad):
    conf = bridge_conf(cni, version="1.0.0")
    if bad is None:
        del conf["cniVersion"]  # a config without cniVersion is 0.1.0, which we do not serve
    else:
        conf["cniVersion"] = bad
    cni.fails(1, "cni-bridge", "ADD", conf, container_id="c1", netns=pod.path)
    cni.fails(1, "cni-ipam", "ADD", conf, container_id="c1", netns=pod.path)
    assert link(pod, "eth0") is None
    assert_nothing_left(cni)


def test_non_string_version_refused(cni, pod):
    conf = {**bridge_conf(cni), "cniVersion": 1.0}
    cni.fails(1, "cni-bridge", "ADD", conf, container_id="c1", netns=pod.path)
    assert_nothing_left(cni)
