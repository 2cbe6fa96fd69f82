"""`cni-ipam` without CNI_COMMAND: list, check, release and gc for operators."""
from __future__ import annotations

import fcntl
import ipaddress
import json
import os

import pytest

from ipam.filestore import FileStore, current_boot_id
from ipam.store import Reservation
from tests.support.netns import unique
from tests.support.reliability import (bridge_conf, ipam_cli, no_traceback, store_files, wait_until)

NET = "ops"
EARLIER_BOOT = "00000000-0000-4000-8000-000000000002"
IP = ipaddress.ip_address


@pytest.fixture
def store(cni_host, make_netns):
    """A store with one of everything: live, dead, earlier-boot, damaged, legacy, orphan, temp file."""
    conf = bridge_conf(cni_host.data_dir, unique("br"), network=NET, subnet="10.83.0.0/24", masq=False)
    live, dead = make_netns("p"), make_netns("p")
    for cid, pod in (("live", live), ("dead", dead)):
        assert cni_host.run("cni-bridge", "ADD", conf, container_id=cid, netns=pod.path).rc == 0
    dead.delete()   # no DEL came: its netns and veth are gone, its reservation stays
    assert wait_until(lambda: len([n for n in cni_host.netns.links() if n.startswith("veth")]) == 1)

    fs = FileStore(str(cni_host.data_dir), NET)
    with fs.locked():
        fs.put(Reservation(IP("10.83.0.50"), "old", "eth0", EARLIER_BOOT, 1_700_000_000.0))
        fs.set_owned(("old", "eth0"), [IP("10.83.0.50")])
        fs.set_owned(("orphan", "eth0"), [IP("10.83.0.60")])     # index names an IP it does not hold
    base = cni_host.data_dir / NET
    (base / "10.83.0.70").write_text("{truncated")
    (base / "10.83.0.80").write_bytes(b"legacy\r\neth1")          # host-local format, not indexed
    (base / ".tmp-10.83.0.90.12345").write_text("half")
    return {"conf": conf, "live": live, "dir": str(cni_host.data_dir)}


def cli(cni_host, *args):
    res = ipam_cli(cni_host, *args)
    no_traceback(res)
    return res


def test_list_table_and_json(cni_host, store):
    res = cli(cni_host, "list", "--data-dir", store["dir"])
    assert res.rc == 0, res.stderr
    rows = [line.split() for line in res.stdout.splitlines()]
    assert rows[0] == ["NETWORK", "IP", "CONTAINER", "IFNAME", "BOOT", "AGE"]
    by_ip = {row[1]: row for row in rows[1:]}
    assert by_ip["10.83.0.50"][2:5] == ["old", "eth0", "earlier"]
    assert by_ip["10.83.0.70"][2:5] == ["-", "-", "damaged"]
    assert by_ip["10.83.0.80"][2:5] == ["legacy", "eth1", "unknown"]
    assert sorted(row[2] for row in rows[1:] if row[4] == "current") == ["dead", "live"]

    res = cli(cni_host, "list", "--data-dir", store["dir"], "--network", NET, "--json")
    records = json.loads(res.stdout)
    assert {r["containerID"] for r in records} == {"live", "dead", "old", "", "legacy"}
    live = next(r for r in records if r["containerID"] == "live")
    assert live["netns"] == store["live"].path and live["bootID"] == current_boot_id()
    assert set(live) == {"network", "ip", "containerID", "ifname", "boot", "bootID", "created",
                         "ageSeconds", "netns", "damaged"}


def test_list_errors(cni_host, tmp_path):
    res = cli(cni_host, "list", "--data-dir", str(tmp_path / "nope"))
    assert res.rc == 2 and "does not exist" in res.stderr
    (tmp_path / "d").mkdir()
    res = cli(cni_host, "list", "--data-dir", str(tmp_path / "d"), "--network", "x")
    assert res.rc == 2 and "no network 'x'" in res.stderr
    res = cli(cni_host, "list", "--data-dir", str(tmp_path / "d"))
    assert res.rc == 0 and res.stdout.startswith("no reservations")


def test_check_reports_each_kind(cni_host, store):
    res = cli(cni_host, "check", "--data-dir", store["dir"], "--json")
    assert res.rc == 1
    found = {(f["kind"], f["ip"] or f["containerID"] or "-") for f in json.loads(res.stdout)}
    assert found == {
        ("netns-gone", next(f["ip"] for f in json.loads(res.stdout) if f["containerID"] == "dead")),
        ("earlier-boot", "10.83.0.50"),
        ("damaged", "10.83.0.70"),
        ("not-indexed", "10.83.0.80"),
        ("orphan-owner-record", "orphan"),
        ("temp-file", "-"),
    }
    # Opt-in checks: the legacy record has no recorded netns; the dead pod's veth is gone.
    res = cli(cni_host, "check", "--data-dir", store["dir"], "--json", "--netns-dir", "/var/run/netns",
              "--host-veths")
    extra = {(f["kind"], f["containerID"]) for f in json.loads(res.stdout)} - {
        (f["kind"], f["containerID"]) for f in json.loads(cli(cni_host, "check", "--data-dir", store["dir"],
                                                              "--json").stdout)}
    assert extra == {("no-netns", "legacy"), ("no-host-veth", "dead"), ("no-host-veth", "legacy")}

    table = cli(cni_host, "check", "--data-dir", store["dir"])
    assert table.rc == 1 and table.stdout.splitlines()[0].split() == \
        ["NETWORK", "KIND", "IP", "CONTAINER", "IFNAME", "DETAIL"]


def test_check_clean_store_exits_zero(cni_host, store):
    res = cli(cni_host, "gc", "--data-dir", store["dir"], "--network", NET, "--keep", "live/eth0")
    assert res.rc == 0
    res = cli(cni_host, "release", "--data-dir", store["dir"], "--network", NET, "--ip", "10.83.0.70")
    assert res.rc == 0
    res = cli(cni_host, "check", "--data-dir", store["dir"], "--host-veths")
    assert (res.rc, res.stdout) == (0, "no suspected leaks\n"), res.stdout


def test_release_by_ip_and_by_container(cni_host, store):
    base = ["--data-dir", store["dir"], "--network", NET]
    res = cli(cni_host, "release", *base, "--ip", "10.83.0.50", "--dry-run")
    assert res.rc == 0 and "would release 10.83.0.50" in res.stdout
    assert "10.83.0.50" in store_files(store["dir"], NET)["reservations"]

    res = cli(cni_host, "release", *base, "--ip", "10.83.0.50")
    assert res.rc == 0 and "released 10.83.0.50 (container old ifname eth0)" in res.stdout
    files = store_files(store["dir"], NET)
    assert "10.83.0.50" not in files["reservations"] and "owners/old:eth0" not in files["owners"]

    res = cli(cni_host, "release", *base, "--container-id", "legacy")   # no index: found by scanning
    assert res.rc == 0 and "10.83.0.80" in res.stdout
    res = cli(cni_host, "release", *base, "--container-id", "dead", "--ifname", "eth0")
    assert res.rc == 0
    assert "owners/dead:eth0" not in store_files(store["dir"], NET)["owners"]

    res = cli(cni_host, "release", *base, "--ip", "10.83.0.50")
    assert res.rc == 2 and "not reserved" in res.stderr
    res = cli(cni_host, "release", *base, "--container-id", "nobody")
    assert res.rc == 2 and "nothing is reserved" in res.stderr
    res = cli(cni_host, "release", *base, "--ip", "not-an-ip")
    assert res.rc == 2 and "not an IP address" in res.stderr
    res = cli(cni_host, "release", *base)
    assert res.rc == 2 and "one of the arguments --ip --container-id is required" in res.stderr


def test_gc_needs_an_explicit_list(cni_host, store):
    base = ["--data-dir", store["dir"], "--network", NET]
    before = store_files(store["dir"], NET)
    res = cli(cni_host, "gc", *base)
    assert res.rc == 2 and "refusing" in res.stderr and "--all-dead" in res.stderr
    res = cli(cni_host, "gc", *base, "--keep", "live/eth0", "--dry-run")
    assert res.rc == 0 and "would free 3 reservation(s)" in res.stdout
    assert store_files(store["dir"], NET) == before
    res = cli(cni_host, "gc", *base, "--keep", "bad/")
    assert res.rc == 2 and "is not CID or CID/IFNAME" in res.stderr

    res = cli(cni_host, "gc", *base, "--keep", "live/eth0")
    assert res.rc == 0 and "freed 3 reservation(s)" in res.stdout and "left 1 damaged" in res.stdout
    files = store_files(store["dir"], NET)
    live_ip = [r for r in files["reservations"] if r != "10.83.0.70"]
    assert len(live_ip) == 1 and files["owners"] == ["owners/live:eth0"] and files["temp_files"] == []

    res = cli(cni_host, "gc", *base, "--all-dead")
    assert res.rc == 0 and "freed 1 reservation(s)" in res.stdout
    assert store_files(store["dir"], NET) == {"reservations": ["10.83.0.70"], "owners": [], "temp_files": []}


def test_gc_bare_container_id_keeps_all_its_interfaces(cni_host, store):
    res = cli(cni_host, "gc", "--data-dir", store["dir"], "--network", NET, "--keep", "live",
              "--keep", "legacy")
    assert res.rc == 0
    listed = json.loads(cli(cni_host, "list", "--data-dir", store["dir"], "--json").stdout)
    assert sorted(r["containerID"] for r in listed) == ["", "legacy", "live"]


def test_writes_wait_for_the_lock_then_fail(cni_host, store):
    fd = os.open(os.path.join(store["dir"], NET, "lock"), os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        res = cli(cni_host, "gc", "--data-dir", store["dir"], "--network", NET, "--all-dead",
                  "--lock-timeout", "0.2")
        assert res.rc == 2 and "timed out" in res.stderr
        assert cli(cni_host, "list", "--data-dir", store["dir"]).rc == 0   # reads take no lock
    finally:
        os.close(fd)


def test_help(cni_host):
    res = cli(cni_host, "--help")
    assert res.rc == 0 and "Run without CNI_COMMAND it is a tool for operators" in res.stderr
    res = cli(cni_host)   # like the reference plugins' skeleton: about text and versions, status 0
    assert res.rc == 0 and "cni-ipam list" in res.stderr and "CNI protocol versions supported: 0.3.0" in res.stderr
    for command in ("list", "check", "release", "gc"):
        res = cli(cni_host, command, "--help")
        assert res.rc == 0 and "--data-dir" in res.stdout, command
    assert "earlier-boot" in cli(cni_host, "check", "--help").stdout
    assert "--all-dead" in cli(cni_host, "gc", "--help").stdout
    res = cli(cni_host, "frobnicate")
    assert res.rc == 2 and "invalid choice" in res.stderr
