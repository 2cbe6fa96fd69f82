"""The static front end (packaging/shim) on its own terms.

tests/integration/test_daemon.py already runs every daemon test through both
front ends; these cover what only the static one does: hand non-CNI calls and
VERSION on, re-feed stdin to the Python program, and report a broken install.
"""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.integration.test_daemon import config, reservations, start_daemon  # noqa: F401 (fixture)
from tests.support.netns import REPO, VENV_BIN, CniHost, make_cni_path, unique


@pytest.fixture
def cni_host(shim_bin, make_netns, tmp_path) -> CniHost:
    return CniHost(netns=make_netns("h"), cni_path=make_cni_path(tmp_path / "bin", shim_bin),
                   data_dir=tmp_path / "ipam")


def run_bare(cni_host: CniHost, *argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(cni_host.cni_path / "cni-bridge"), *argv], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=60,
                          env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **(env or {})})


def test_without_cni_command_the_python_program_answers(cni_host):
    usage = run_bare(cni_host)   # like the reference plugins' skeleton: about text and versions, status 0
    assert usage.returncode == 0 and "cni-bridge: CNI plugin" in usage.stderr and usage.stdout == ""
    assert "CNI protocol versions supported: 0.3.0, 0.3.1, 0.4.0, 1.0.0, 1.1.0" in usage.stderr
    typo = run_bare(cni_host, "deamon")
    assert typo.returncode == 2 and "unknown subcommand 'deamon'" in typo.stderr
    helped = run_bare(cni_host, "--help")
    assert helped.returncode == 0 and "Subcommands" in helped.stderr
    agent = run_bare(cni_host, "agent", "--help")
    assert agent.returncode == 0 and "--topology" in agent.stdout + agent.stderr


def test_version_is_answered_by_the_daemon_and_without_it(cni_host, start_daemon):
    daemon = start_daemon()
    answers = []
    for sock in (str(daemon.socket), ""):
        res = cni_host.run("cni-bridge", "VERSION", {"cniVersion": "1.0.0", "daemonSocket": sock})
        assert res.rc == 0, res.stdout + res.stderr
        answers.append(json.loads(res.stdout))
    assert answers[0] == answers[1]
    assert "1.1.0" in answers[0]["supportedVersions"]
    assert daemon.served("VERSION", "-") == 1


@pytest.mark.parametrize("padding", [100_000, 3_000_000], ids=["larger-than-a-pipe", "larger-than-a-request"])
def test_stdin_reaches_the_python_program_whole(cni_host, make_netns, tmp_path, padding):
    """No daemon: the front end has read stdin and must hand all of it on."""
    pod = make_netns("p")
    conf = config(cni_host, str(tmp_path / "none.sock"), unique("br"), padding="x" * padding)
    add = cni_host.run("cni-bridge", "ADD", conf, container_id="c1", netns=pod.path)
    assert add.rc == 0, add.stdout[-2000:] + add.stderr[-2000:]
    assert "eth0" in pod.links()
    assert cni_host.run("cni-bridge", "DEL", conf, container_id="c1", netns=pod.path).rc == 0
    assert reservations(cni_host.data_dir) == []


def test_a_missing_python_program_is_a_cni_error(cni_host, make_netns, tmp_path):
    (cni_host.cni_path / "cni-bridge-python").unlink()
    pod = make_netns("p")
    conf = dict(config(cni_host, "", unique("br")), cniVersion="0.4.0")
    res = cni_host.run("cni-bridge", "ADD", conf, container_id="c1", netns=pod.path)
    assert res.rc == 1
    error = json.loads(res.stdout)
    assert error["cniVersion"] == "0.4.0" and error["code"] == 999
    assert "cni-bridge-python" in error["msg"] and "cni-bridge-python" in error["details"]
    assert pod.links() == ["lo"]


def test_install_script_lays_out_a_cni_bin_dir(shim_bin, tmp_path):
    dest = tmp_path / "opt-cni-bin"
    script = REPO / "scripts" / "install_front_end.sh"
    for _ in range(2):   # installing again over an install is fine
        proc = subprocess.run(["sh", str(script), str(dest)], capture_output=True, text=True, timeout=300,
                              env={"PATH": os.environ["PATH"], "PYTHON_PLUGIN": str(VENV_BIN / "cni-bridge")})
        assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in dest.iterdir()) == ["cni-bridge", "cni-bridge-python", "cni-ipam"]
    assert (dest / "cni-bridge").read_bytes() == shim_bin.read_bytes()
    for exe in ("cni-bridge", "cni-ipam"):
        answer = subprocess.run([str(dest / exe)], env={"CNI_COMMAND": "VERSION"}, input="{}",
                                capture_output=True, text=True, timeout=60)
        assert answer.returncode == 0 and "supportedVersions" in answer.stdout, answer.stdout + answer.stderr


@pytest.mark.parametrize("stdin", [b"not json", b"", b"{\"cniVersion\": "], ids=["text", "empty", "truncated"])
def test_undecodable_stdin_gets_the_python_programs_error(cni_host, make_netns, stdin):
    pod = make_netns("p")
    answers = []
    for plugin in ("cni-bridge", "cni-bridge-python"):
        res = cni_host.run(plugin, "ADD", stdin, container_id="c1", netns=pod.path)
        answers.append((res.rc, res.stdout, res.stderr))
    assert answers[0] == answers[1]
    assert answers[0][0] == 1 and json.loads(answers[0][1])["code"] == 6
