"""Delegating to an exec'd IPAM plugin (any type but cni-ipam), with a stand-in plugin in tmp_path."""
from __future__ import annotations

import json
import sys

import pytest

import ipam.plugin
from cni_bridge import ipam_client, masq, sysctl
from cni_bridge.plugin import BridgePlugin
from cni_bridge.protocol.errors import CNIError, Code

from .fake_netlink import FakeKernel, FakeNetlinkError
from .helpers import NETNS, cni_env, make_request

# A stand-in IPAM plugin: logs each call (verb, env, stdin) and answers as told by $MODE.
SCRIPT = """#!{python}
import json, os, sys
stdin = sys.stdin.read()
env = {{k: v for k, v in os.environ.items() if k.startswith("CNI_") or k == "PATH"}}
with open({log!r}, "a") as f:
    f.write(json.dumps({{"env": env, "stdin": stdin}}) + "\\n")
mode = {mode!r}
if mode == "ok":
    if env["CNI_COMMAND"] == "ADD":
        print(json.dumps({{"cniVersion": "1.0.0", "ips": [{{"address": "10.50.0.9/24", "gateway": "10.50.0.1"}}],
                          "routes": [{{"dst": "0.0.0.0/0"}}]}}))
elif mode == "cni-error":
    print(json.dumps({{"cniVersion": "1.0.0", "code": 100, "msg": "range full", "details": "d"}}))
    sys.exit(1)
elif mode == "garbage":
    print("not json at all")
elif mode == "crash":
    sys.stderr.write("panic: something broke\\n")
    sys.exit(2)
"""


@pytest.fixture
def make_ipam(tmp_path):
    def make(mode: str, name: str = "fake-ipam"):
        bindir = tmp_path / "bin"
        bindir.mkdir(exist_ok=True)
        log = tmp_path / f"{name}.log"
        script = bindir / name
        script.write_text(SCRIPT.format(python=sys.executable, log=str(log), mode=mode))
        script.chmod(0o755)
        return str(bindir), log
    return make


def calls(log):
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


CONFIG = {"cniVersion": "1.0.0", "name": "pods", "type": "cni-bridge", "isGateway": True,
          "ipam": {"type": "fake-ipam", "subnet": "10.50.0.0/24"}}


def request(verb, bindir, config=CONFIG, **env):
    return make_request(cni_env(verb, CNI_PATH=f"/nonexistent:{bindir}", **env), config)


def test_exec_add_passes_env_and_stdin_and_decodes_the_result(make_ipam):
    bindir, log = make_ipam("ok")
    req = request("ADD", bindir, CNI_ARGS="IgnoreUnknown=1;K8S_POD_NAME=web")
    res = ipam_client.add(req)
    assert [str(i.address) for i in res.ips] == ["10.50.0.9/24"]
    (call,) = calls(log)
    assert call["stdin"].encode() == req.stdin
    assert call["env"]["CNI_COMMAND"] == "ADD" and call["env"]["CNI_ARGS"] == "IgnoreUnknown=1;K8S_POD_NAME=web"
    assert call["env"]["CNI_PATH"] == f"/nonexistent:{bindir}" and call["env"]["CNI_NETNS"] == NETNS


@pytest.mark.parametrize("verb,fn", [("DEL", ipam_client.delete), ("CHECK", ipam_client.check),
                                     ("GC", ipam_client.gc), ("STATUS", ipam_client.status)])
def test_exec_other_verbs(make_ipam, verb, fn):
    bindir, log = make_ipam("ok")
    assert fn(request("ADD", bindir)) is None           # the verb comes from the call, not the request
    assert [c["env"]["CNI_COMMAND"] for c in calls(log)] == [verb]


def test_delegate_cni_error_is_passed_through(make_ipam):
    bindir, _ = make_ipam("cni-error")
    with pytest.raises(CNIError) as info:
        ipam_client.add(request("ADD", bindir))
    assert (info.value.code, info.value.msg, info.value.details) == (100, "range full", "d")


def test_delegate_garbage_output_is_code_105(make_ipam):
    bindir, _ = make_ipam("garbage")
    with pytest.raises(CNIError) as info:
        ipam_client.add(request("ADD", bindir))
    assert info.value.code == Code.DELEGATE_FAILED and "not JSON" in info.value.msg


def test_delegate_crash_is_code_105_with_its_stderr(make_ipam):
    bindir, _ = make_ipam("crash")
    with pytest.raises(CNIError) as info:
        ipam_client.delete(request("DEL", bindir))
    assert info.value.code == Code.DELEGATE_FAILED and "panic: something broke" in info.value.details


def test_missing_ipam_plugin_is_code_7_naming_the_search_path(tmp_path):
    with pytest.raises(CNIError) as info:
        ipam_client.add(request("ADD", str(tmp_path / "empty")))
    assert info.value.code == 7 and "fake-ipam" in info.value.msg
    assert str(tmp_path / "empty") in info.value.details


def test_non_executable_file_is_not_a_plugin(tmp_path):
    (tmp_path / "fake-ipam").write_text("#!/bin/sh\n")
    with pytest.raises(CNIError) as info:
        ipam_client.find_plugin("fake-ipam", (str(tmp_path),))
    assert info.value.code == 7


def test_bridge_rolls_back_an_execd_ipam_with_del(make_ipam, monkeypatch):
    bindir, log = make_ipam("ok")
    monkeypatch.setattr(sysctl, "enable_forwarding", lambda families: None)
    monkeypatch.setattr(sysctl, "refuse_router_advertisements", lambda bridge: None)
    monkeypatch.setattr(masq, "teardown", lambda *a: None)
    monkeypatch.setattr(ipam.plugin, "current_boot_id", lambda: "boot-test")
    kernel = FakeKernel()
    kernel.add_netns(NETNS)
    kernel.fail_next("add_route")
    with pytest.raises(FakeNetlinkError):
        BridgePlugin(kernel.factory).add(request("ADD", bindir))
    assert [c["env"]["CNI_COMMAND"] for c in calls(log)] == ["ADD", "DEL"]
    assert kernel.ns(NETNS).links == {}
