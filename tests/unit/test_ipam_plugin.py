"""IpamPlugin verbs over a FileStore in tmp_path, with Requests built from the runner's pieces."""
from __future__ import annotations

import fcntl
import ipaddress
import os

import pytest

import ipam.plugin
from cni_bridge.protocol.errors import CNIError
from ipam.plugin import IpamPlugin

from .helpers import cni_env, make_request, run_plugin


@pytest.fixture(autouse=True)
def fixed_boot(monkeypatch):
    monkeypatch.setattr(ipam.plugin, "current_boot_id", lambda: "boot-test")


@pytest.fixture
def config(tmp_path):
    return {
        "cniVersion": "1.1.0", "name": "pods", "type": "cni-bridge",
        "ipam": {"type": "cni-ipam", "dataDir": str(tmp_path / "ipam"),
                 "ranges": [[{"subnet": "10.22.0.0/29"}], [{"subnet": "fd00:22::/120"}]],
                 "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}]},
    }


def call(verb, config, **env):
    req = make_request(cni_env(verb, **env), config)
    plugin = IpamPlugin()
    return {"ADD": plugin.add, "DEL": plugin.delete, "CHECK": plugin.check,
            "GC": plugin.gc, "STATUS": plugin.status}[verb](req)


def fails(code, verb, config, **env) -> CNIError:
    with pytest.raises(CNIError) as info:
        call(verb, config, **env)
    assert info.value.code == code
    return info.value


def reserved(tmp_path):
    """Names of the reservation files (one per IP) in the network's directory."""
    d = tmp_path / "ipam" / "pods"
    if not d.exists():
        return []
    names = []
    for name in os.listdir(d):
        try:
            ipaddress.ip_address(name)
        except ValueError:
            continue
        names.append(name)
    return sorted(names)


def test_add_result_through_the_runner(config, tmp_path):
    rc, out, err = run_plugin(IpamPlugin, cni_env("ADD"), config)
    assert rc == 0, out
    assert out == {
        "cniVersion": "1.1.0",
        "ips": [{"address": "10.22.0.2/29", "gateway": "10.22.0.1"},
                {"address": "fd00:22::2/120", "gateway": "fd00:22::1"}],
        "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}],
        "dns": {},
    }
    assert reserved(tmp_path) == ["10.22.0.2", "fd00:22::2"]


def test_add_in_a_legacy_version_has_ips_version(config):
    rc, out, _ = run_plugin(IpamPlugin, cni_env("ADD"), {**config, "cniVersion": "0.3.1"})
    assert rc == 0 and [i["version"] for i in out["ips"]] == ["4", "6"]


def test_add_is_idempotent_and_del_releases(config, tmp_path):
    first = call("ADD", config)
    assert call("ADD", config) == first
    other = call("ADD", config, CNI_CONTAINERID="other")
    assert other.ips[0].address != first.ips[0].address
    call("DEL", config)
    call("DEL", config)                                    # repeated DEL succeeds
    call("DEL", config, CNI_NETNS=None)                    # DEL without netns too
    assert reserved(tmp_path) == ["10.22.0.3", "fd00:22::3"]


def test_requested_ips_from_cni_args_and_runtime_config(config):
    res = call("ADD", {**config, "runtimeConfig": {"ips": ["fd00:22::9/120"]}}, CNI_ARGS="IP=10.22.0.5")
    assert [str(i.address) for i in res.ips] == ["10.22.0.5/29", "fd00:22::9/120"]
    e = fails(101, "ADD", config, CNI_CONTAINERID="c2", CNI_ARGS="IgnoreUnknown=1;IP=10.22.0.5")
    assert "10.22.0.5" in e.msg


def test_exhaustion_is_code_100_and_status_says_50(config):
    for i in range(5):
        call("ADD", config, CNI_CONTAINERID=f"c{i}")
    fails(100, "ADD", config, CNI_CONTAINERID="c5")
    e = fails(50, "STATUS", config)
    assert "10.22.0.0/29" in e.msg


def test_status_ok_on_a_fresh_store(config):
    assert call("STATUS", config) is None


def test_status_is_50_when_the_store_cannot_be_made(config, tmp_path):
    (tmp_path / "ipam").write_text("a file where the dataDir should be")
    e = fails(50, "STATUS", config)
    assert "store" in e.msg


def test_add_on_an_unusable_data_dir_is_code_5(config, tmp_path):
    (tmp_path / "ipam").write_text("x")
    fails(5, "ADD", config)


def test_check(config):
    e = fails(107, "CHECK", config)
    assert "no address is reserved" in e.msg
    res = call("ADD", config)
    prev = res.to_dict("1.1.0")
    assert call("CHECK", {**config, "prevResult": prev}) is None
    prev["ips"][0]["address"] = "10.22.0.6/29"
    e = fails(107, "CHECK", {**config, "prevResult": prev})
    assert "10.22.0.6" in e.msg


def test_check_ignores_prev_result_ips_of_other_plugins(config):
    res = call("ADD", config)
    prev = res.to_dict("1.1.0")
    prev["ips"].append({"address": "192.168.50.5/24"})   # added by another plugin in the chain
    assert call("CHECK", {**config, "prevResult": prev}) is None


@pytest.mark.parametrize("key", ["cni.dev/valid-attachments", "cni.dev/attachments"])
def test_gc_keeps_listed_attachments_and_drops_the_rest(config, tmp_path, key):
    for cid in ("keep", "gone1", "gone2"):
        call("ADD", config, CNI_CONTAINERID=cid)
    temp = tmp_path / "ipam" / "pods" / ".tmp-10.22.0.6.999"
    temp.write_text("{")
    call("GC", {**config, key: [{"containerID": "keep", "ifname": "eth0"}]})
    assert reserved(tmp_path) == ["10.22.0.2", "fd00:22::2"]
    assert os.listdir(tmp_path / "ipam" / "pods" / "owners") == ["keep:eth0"]
    assert not temp.exists()


def test_gc_needs_the_attachment_list(config):
    call("ADD", config)
    e = fails(7, "GC", config)
    assert "valid-attachments" in e.msg


def test_gc_with_empty_list_frees_everything(config, tmp_path):
    call("ADD", config)
    call("GC", {**config, "cni.dev/valid-attachments": []})
    assert reserved(tmp_path) == []


def test_lock_timeout_is_code_11(config, tmp_path):
    config["ipam"]["lockTimeout"] = 0.1
    d = tmp_path / "ipam" / "pods"
    d.mkdir(parents=True)
    fd = os.open(d / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        for verb in ("ADD", "DEL"):
            fails(11, verb, config)
    finally:
        os.close(fd)
    assert reserved(tmp_path) == []


def test_resolv_conf_merged_with_config_dns(config, tmp_path):
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("# comment\nnameserver 10.0.0.53\nnameserver 10.0.0.54 ; x\nsearch a.local b.local\n"
                      "domain corp.local\noptions ndots:5 timeout:1\n")
    config["ipam"]["resolvConf"] = str(resolv)
    res = call("ADD", {**config, "dns": {"search": ["override.local"]}})
    assert res.dns.nameservers == ("10.0.0.53", "10.0.0.54")
    assert res.dns.search == ("override.local",)
    assert res.dns.domain == "corp.local" and res.dns.options == ("ndots:5", "timeout:1")


def test_unreadable_resolv_conf_is_code_5_and_reserves_nothing(config, tmp_path):
    config["ipam"]["resolvConf"] = str(tmp_path / "missing.conf")
    e = fails(5, "ADD", config)
    assert "missing.conf" in e.msg
    assert reserved(tmp_path) == []


def test_bad_ipam_config_is_code_7(config):
    config["ipam"]["ranges"] = [[{"subnet": "10.22.0.1/24"}]]
    rc, out, _ = run_plugin(IpamPlugin, cni_env("ADD"), config)
    assert rc == 1 and out["code"] == 7 and "host bits" in out["details"]
