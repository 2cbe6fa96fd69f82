"""The daemon and the static front end when the plugin stops waiting (real daemon, real kernel).

tests/unit/test_daemon_abandoned.py covers the rules with a fake plugin; here
a real ADD is held inside the daemon (a gated iptables-restore) while a front
end built with a short answer timeout gives up on it.
"""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.integration.test_daemon import (config, our_nat_lines, reservations, start_daemon,  # noqa: F401
                                           start_gated_daemon, wait_for)
from tests.support.netns import REPO, CniHost, make_cni_path, unique

ANSWER_TIMEOUT = "3s"


@pytest.fixture(scope="module")
def impatient_shim(shim_bin, tmp_path_factory):
    """The static front end built to wait only ANSWER_TIMEOUT for the daemon's answer."""
    out = tmp_path_factory.mktemp("impatient") / "cni-bridge"
    proc = subprocess.run(["sh", str(REPO / "scripts" / "build_shim.sh"), str(out)], capture_output=True,
                          text=True, timeout=600,
                          env={**os.environ, "FORCE": "1", "SHIM_LDFLAGS": f"-X main.answerTimeout={ANSWER_TIMEOUT}"})
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture
def cni_host(impatient_shim, make_netns, tmp_path) -> CniHost:
    return CniHost(netns=make_netns("h"), cni_path=make_cni_path(tmp_path / "bin", impatient_shim),
                   data_dir=tmp_path / "ipam")


def test_an_add_the_front_end_gave_up_on_is_rolled_back_and_not_redone(cni_host, start_daemon, make_netns,
                                                                        tmp_path):
    daemon, gate = start_gated_daemon(start_daemon, tmp_path)
    pod, bridge = make_netns("p"), unique("br")
    conf = config(cni_host, str(daemon.socket), bridge, ipMasq=True)
    res = cni_host.run("cni-bridge", "ADD", conf, container_id="c1", netns=pod.path)
    assert res.rc == 1, res.stdout + res.stderr
    error = json.loads(res.stdout)
    assert error["code"] == 11 and "gave no answer" in error["msg"]
    assert gate.with_suffix(".entered").exists(), "the daemon was not holding the call"
    gate.touch()   # the held ADD goes on, finds its client gone at the next step and rolls back
    wait_for(lambda: "hung up" in daemon.log_text(), "the daemon to notice the hang-up")
    wait_for(lambda: pod.links() == ["lo"], "the pod interface to be removed")
    assert reservations(cni_host.data_dir) == []
    assert our_nat_lines(cni_host) == []
    # The runtime's retry works as usual.
    again = cni_host.run("cni-bridge", "ADD", conf, container_id="c1", netns=pod.path)
    assert again.rc == 0, again.stdout + again.stderr
    assert cni_host.run("cni-bridge", "DEL", conf, container_id="c1", netns=pod.path).rc == 0
    assert reservations(cni_host.data_dir) == [] and our_nat_lines(cni_host) == []


def test_a_variable_that_is_not_utf8_is_never_rewritten_on_the_way_to_the_daemon(cni_host, start_daemon,
                                                                                 make_netns):
    daemon = start_daemon()
    pod, bridge = make_netns("p"), unique("br")
    conf = config(cni_host, str(daemon.socket), bridge)
    env = {"CNI_COMMAND": "ADD", "CNI_PATH": str(cni_host.cni_path), "CNI_CONTAINERID": "c1",
           "CNI_NETNS": pod.path, "CNI_IFNAME": "eth0", "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAME=caf\xe9"}
    proc = subprocess.run(["ip", "netns", "exec", cni_host.netns.name, str(cni_host.cni_path / "cni-bridge")],
                          input=json.dumps(conf).encode(), capture_output=True, timeout=60,
                          env={k.encode(): v.encode("latin-1") for k, v in env.items()})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # JSON would have turned the byte into U+FFFD: the call ran in-process instead.
    assert daemon.served("ADD", "c1") == 0
    assert "eth0" in pod.links()
    assert cni_host.run("cni-bridge", "DEL", conf, container_id="c1", netns=pod.path).rc == 0


def test_the_fallback_is_found_from_the_executable_not_argv0(cni_host):
    proc = subprocess.run(["/nonexistent/dir/cni-bridge"], executable=str(cni_host.cni_path / "cni-bridge"),
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
                          env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "cni-bridge: CNI plugin" in proc.stderr
