"""Review fixes in cni-ipam, against real processes.

- The host-local -> cni-ipam swap (same dataDir, same network name): reservations the
  reference host-local made are freed by cni-ipam's DEL, pass its CHECK and are returned
  again by a repeated ADD (Debian's /usr/lib/cni/host-local does the ADDs).
- A repeated ADD that moves an attachment to another address, SIGKILLed midway, leaks
  neither address: the following DEL or ADD frees the old one.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.support.netns import REFERENCE_DIR, VENV_BIN
from tests.support.reliability import KILLED, faulty, ipam_conf, no_traceback, store_files

HOST_LOCAL = REFERENCE_DIR / "host-local"
NET = "swap"
SUBNET = "10.93.0.0/24"

needs_host_local = pytest.mark.skipif(not HOST_LOCAL.exists(),
                                      reason="Debian's containernetworking-plugins are not installed")


def _exec(binary: Path, command: str, conf: dict, cid: str, ifname: str = "eth0",
          env: dict | None = None) -> subprocess.CompletedProcess:
    """Exec an IPAM plugin the way a main plugin does: CNI_* env, the config on stdin.
    IPAM alone needs no netns (CNI_NETNS only has to be set for ADD and CHECK)."""
    call_env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
                "CNI_COMMAND": command, "CNI_CONTAINERID": cid, "CNI_IFNAME": ifname,
                "CNI_NETNS": f"/var/run/netns/{cid}", "CNI_PATH": str(REFERENCE_DIR), **(env or {})}
    proc = subprocess.run([str(binary)], input=json.dumps(conf), env=call_env, capture_output=True,
                          text=True, timeout=60)
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    return proc


def _conf(data_dir: Path, type_: str) -> dict:
    # host-local 1.1.1 speaks up to 1.0.0; CHECK needs 0.4.0 or later.
    conf = ipam_conf(data_dir, network=NET, subnet=SUBNET)
    conf["cniVersion"] = "1.0.0"
    conf["type"] = conf["ipam"]["type"] = type_
    return conf


def host_local(data_dir: Path, command: str, cid: str, ifname: str = "eth0") -> dict:
    proc = _exec(HOST_LOCAL, command, _conf(data_dir, "host-local"), cid, ifname)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout) if proc.stdout.strip() else {}


def cni_ipam(data_dir: Path, command: str, cid: str, ifname: str = "eth0", prev: dict | None = None,
             env: dict | None = None, **ipam_extra) -> subprocess.CompletedProcess:
    conf = _conf(data_dir, "cni-ipam")
    conf["ipam"].update(ipam_extra)
    if prev is not None:
        conf["prevResult"] = prev
    return _exec(VENV_BIN / "cni-ipam", command, conf, cid, ifname, env)


def ok(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout) if proc.stdout.strip() else {}


def address(result: dict) -> str:
    return result["ips"][0]["address"].split("/")[0]


def reserved(data_dir: Path) -> list[str]:
    return store_files(data_dir, NET)["reservations"]


# -- 1. host-local -> cni-ipam ------------------------------------------------------------
@needs_host_local
def test_swap_del_frees_what_host_local_reserved(tmp_path):
    a = host_local(tmp_path, "ADD", "pod-a")
    b = host_local(tmp_path, "ADD", "pod-b", "net1")
    assert reserved(tmp_path) == sorted([address(a), address(b)])

    ok(cni_ipam(tmp_path, "DEL", "pod-a"))
    assert reserved(tmp_path) == [address(b)]
    ok(cni_ipam(tmp_path, "DEL", "pod-a"))          # repeated DEL: still fine
    ok(cni_ipam(tmp_path, "DEL", "pod-b", "eth0"))  # another ifname of pod-b: not its address
    assert reserved(tmp_path) == [address(b)]
    ok(cni_ipam(tmp_path, "DEL", "pod-b", "net1"))
    assert reserved(tmp_path) == []


@needs_host_local
def test_swap_check_passes_for_a_live_host_local_pod(tmp_path):
    result = host_local(tmp_path, "ADD", "pod-a")
    ok(cni_ipam(tmp_path, "CHECK", "pod-a", prev=result))
    # and still tells a missing reservation apart
    proc = cni_ipam(tmp_path, "CHECK", "pod-x", prev=result)
    assert proc.returncode == 1 and json.loads(proc.stdout)["code"] == 107, proc.stdout


@needs_host_local
def test_swap_repeated_add_returns_the_host_local_address(tmp_path):
    first = host_local(tmp_path, "ADD", "pod-a")
    again = ok(cni_ipam(tmp_path, "ADD", "pod-a"))
    assert address(again) == address(first)
    assert reserved(tmp_path) == [address(first)]
    ok(cni_ipam(tmp_path, "DEL", "pod-a"))
    assert reserved(tmp_path) == []


@needs_host_local
def test_host_local_writes_after_cni_ipam_used_the_store(tmp_path):
    """A rollback to host-local and back: its new reservations are still found."""
    mine = ok(cni_ipam(tmp_path, "ADD", "pod-a"))
    theirs = host_local(tmp_path, "ADD", "pod-b")
    assert address(theirs) != address(mine)
    ok(cni_ipam(tmp_path, "CHECK", "pod-b", prev=theirs))
    assert address(ok(cni_ipam(tmp_path, "ADD", "pod-b"))) == address(theirs)
    ok(cni_ipam(tmp_path, "DEL", "pod-b"))
    assert reserved(tmp_path) == [address(mine)]
    ok(cni_ipam(tmp_path, "DEL", "pod-a"))
    assert store_files(tmp_path, NET) == {"reservations": [], "owners": [], "temp_files": []}


# -- 2. a repeated ADD that moves the address, SIGKILLed midway -------------------------------
@pytest.mark.parametrize("point", ["ipam.add.owner-recorded", "ipam.add.ip-written"])
@pytest.mark.parametrize("then", ["DEL", "ADD"])
def test_killed_repeated_add_that_moved_leaks_neither_address(tmp_path, point, then):
    first = ok(cni_ipam(tmp_path, "ADD", "pod-a", env={"CNI_ARGS": "IP=10.93.0.40"}))
    assert address(first) == "10.93.0.40"
    proc = cni_ipam(tmp_path, "ADD", "pod-a", env={"CNI_ARGS": "IP=10.93.0.41", **faulty(point)})
    assert proc.returncode == KILLED, (point, proc.returncode, proc.stdout, proc.stderr)

    if then == "DEL":
        ok(cni_ipam(tmp_path, "DEL", "pod-a"))
        assert store_files(tmp_path, NET) == {"reservations": [], "owners": [], "temp_files": []}
    else:
        again = ok(cni_ipam(tmp_path, "ADD", "pod-a", env={"CNI_ARGS": "IP=10.93.0.41"}))
        assert address(again) == "10.93.0.41"
        assert reserved(tmp_path) == ["10.93.0.41"]
        ok(cni_ipam(tmp_path, "DEL", "pod-a"))
        assert reserved(tmp_path) == []
    res = subprocess.run([str(VENV_BIN / "cni-ipam"), "check", "--data-dir", str(tmp_path), "--network", NET],
                         capture_output=True, text=True, env={"PATH": os.environ.get("PATH", "")})
    no_traceback(res)
    assert res.returncode == 0, res.stdout + res.stderr


# -- 3. one network name, two subnets, one dataDir ------------------------------------------
def test_del_and_gc_under_one_config_leave_the_other_configs_reservations(tmp_path):
    other = {"ranges": [[{"subnet": "10.94.0.0/24"}]]}
    a1 = address(ok(cni_ipam(tmp_path, "ADD", "pod-a1")))
    a2 = address(ok(cni_ipam(tmp_path, "ADD", "pod-a2")))
    b1 = address(ok(cni_ipam(tmp_path, "ADD", "pod-b1", **other)))
    b2 = address(ok(cni_ipam(tmp_path, "ADD", "pod-b2", **other)))

    ok(cni_ipam(tmp_path, "DEL", "pod-b2", **other))
    assert reserved(tmp_path) == sorted([a1, a2, b1])
    gc = _conf(tmp_path, "cni-ipam")
    gc["cniVersion"] = "1.1.0"
    gc["ipam"].update(other)
    gc["cni.dev/valid-attachments"] = [{"containerID": "pod-b1", "ifname": "eth0"}]
    ok(_exec(VENV_BIN / "cni-ipam", "GC", gc, ""))
    assert reserved(tmp_path) == sorted([a1, a2, b1])

    # the other config's pods keep working: CHECK, and DEL frees them
    ok(cni_ipam(tmp_path, "CHECK", "pod-a1", prev={"cniVersion": "1.0.0",
                                                    "ips": [{"address": f"{a1}/24"}]}))
    ok(cni_ipam(tmp_path, "DEL", "pod-a1"))
    ok(cni_ipam(tmp_path, "DEL", "pod-a2"))
    assert reserved(tmp_path) == [b1] and b2 not in reserved(tmp_path)


# -- 5. the operator CLI's gc with a --keep that matches nothing ------------------------------
def test_cli_gc_with_a_mistyped_keep_fails_and_frees_nothing(tmp_path):
    pods = {cid: address(ok(cni_ipam(tmp_path, "ADD", cid))) for cid in ("pod-a", "pod-b")}

    def gc(*extra):
        res = subprocess.run([str(VENV_BIN / "cni-ipam"), "gc", "--data-dir", str(tmp_path), "--network", NET,
                              *extra], capture_output=True, text=True, env={"PATH": os.environ.get("PATH", "")})
        no_traceback(res)
        return res

    res = gc("--keep", "pod-a/eth0", "--keep", "pod-bx/eth0")
    assert res.returncode == 2 and "pod-bx/eth0" in res.stderr and "--force" in res.stderr, res.stderr
    assert reserved(tmp_path) == sorted(pods.values())
    res = gc("--keep", "pod-a/eth0", "--keep", "pod-bx/eth0", "--force")
    assert res.returncode == 0, res.stderr
    assert reserved(tmp_path) == [pods["pod-a"]]
