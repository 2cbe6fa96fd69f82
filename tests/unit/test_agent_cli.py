"""`cni-bridge agent` front door: errors before any kernel change, and the atomic conflist write."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from cni_bridge.agent.apply import write_conflist
from cni_bridge.agent.cli import main
from cni_bridge.agent.desired import CONFLIST_NAME


def run_cli(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_missing_node_is_a_one_line_error(tmp_path, capsys):
    topo = tmp_path / "t.json"
    topo.write_text(json.dumps({"clusterCIDR": "10.244.0.0/16",
                                "nodes": [{"name": "a", "internalIP": "10.0.0.1", "podCIDR": "10.244.0.0/24"}]}))
    rc, out, err = run_cli(capsys, "--node", "zz", "--topology", str(topo), "--once", "--conf-dir", str(tmp_path))
    assert rc == 1
    assert err.strip() == "cni-bridge agent: error: node 'zz' is not in the topology (nodes: a)"
    assert "Traceback" not in err
    assert not (tmp_path / CONFLIST_NAME).exists()


@pytest.mark.parametrize("content, message", [
    ("{", "is not valid JSON"),
    (json.dumps({"clusterCIDR": "10.244.0.0/16", "nodes": [{"name": "a"}]}), "internalIP is missing"),
])
def test_malformed_topology(tmp_path, capsys, content, message):
    topo = tmp_path / "t.json"
    topo.write_text(content)
    rc, _, err = run_cli(capsys, "--node", "a", "--topology", str(topo), "--once")
    assert rc == 1 and message in err and "Traceback" not in err


def test_unreadable_topology(tmp_path, capsys):
    rc, _, err = run_cli(capsys, "--node", "a", "--topology", str(tmp_path / "none.json"), "--once")
    assert rc == 1 and "cannot read topology file" in err and "No such file" in err


def test_kubernetes_mode_needs_cluster_cidr(capsys):
    rc, _, err = run_cli(capsys, "--node", "a")
    assert rc == 1 and "--cluster-cidr" in err


def test_subcommand_dispatch_from_the_cni_bridge_executable(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "CNI_COMMAND"}
    proc = subprocess.run([sys.executable, "-m", "cni_bridge.main", "agent", "--node", "x",
                           "--topology", str(tmp_path / "missing.json"), "--once"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 1
    assert "cannot read topology file" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "cni_bridge.main", "agent", "--help"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0 and "--topology" in proc.stdout


def test_write_conflist_is_atomic_and_skips_identical_content(tmp_path):
    conf_dir = tmp_path / "net.d"
    assert write_conflist(str(conf_dir), b"{}\n") is True
    path = conf_dir / CONFLIST_NAME
    inode = path.stat().st_ino
    assert write_conflist(str(conf_dir), b"{}\n") is False
    assert path.stat().st_ino == inode                       # untouched
    assert write_conflist(str(conf_dir), b'{"a": 1}\n') is True
    assert path.read_bytes() == b'{"a": 1}\n'
    assert path.stat().st_ino != inode                       # replaced by rename, never rewritten in place
    assert sorted(p.name for p in conf_dir.iterdir()) == [CONFLIST_NAME]   # no temp files left
    assert oct(path.stat().st_mode & 0o777) == "0o644"
