"""After a reboot: earlier-boot reservations are reclaimed when needed, never a live one.

A reboot is simulated by writing store records with a boot ID that is not this
machine's (/proc/sys/kernel/random/boot_id), as the store of a node that
rebooted holds them. The same runs on a dataDir on tmpfs.
"""
from __future__ import annotations

import ipaddress
import json

import pytest

from ipam.filestore import FileStore, current_boot_id
from ipam.store import Reservation
from tests.support.netns import unique
from tests.support.reliability import (bridge_conf, cni_error, ipam_cli, ipam_conf, leftovers, store_files,
                                       tmpfs)

NET = "reboot"
EARLIER_BOOT = "00000000-0000-4000-8000-000000000001"
IP = ipaddress.ip_address


@pytest.fixture(params=["disk", "tmpfs"])
def data_dir(request, tmp_path):
    if request.param == "disk":
        yield tmp_path / "ipam"
        return
    with tmpfs("1m") as mountpoint:
        yield mountpoint


def reserve(data_dir, ip: str, cid: str, boot: str, netns: str = "") -> None:
    """Write a record as cni-ipam does (reservation file and owner index)."""
    store = FileStore(str(data_dir), NET)
    with store.locked():
        store.put(Reservation(IP(ip), cid, "eth0", boot, 1_700_000_000.0, netns=netns))
        store.set_owned((cid, "eth0"), [IP(ip)])


def owner_of(data_dir, ip: str) -> str:
    return json.loads((data_dir / NET / ip).read_text())["containerID"]


def test_earlier_boot_reclaimed_only_when_needed_never_live(cni_host, data_dir):
    cni_host.data_dir = data_dir
    # 10.93.0.2-.6: five addresses (.1 is the gateway).
    conf = ipam_conf(data_dir, network=NET, subnet="10.93.0.0/29")
    for n, ip in enumerate(("10.93.0.2", "10.93.0.3", "10.93.0.4")):
        reserve(data_dir, ip, f"old{n}", EARLIER_BOOT)
    reserve(data_dir, "10.93.0.5", "live", current_boot_id())

    def add(cid):
        return cni_host.run("cni-ipam", "ADD", conf, container_id=cid, netns="/none")

    # A free address exists: the earlier-boot ones are left alone.
    res = add("new0")
    assert res.rc == 0 and res.json["ips"][0]["address"] == "10.93.0.6/29", res.stdout
    assert [owner_of(data_dir, ip) for ip in ("10.93.0.2", "10.93.0.3", "10.93.0.4")] == ["old0", "old1", "old2"]

    # The range is full: the earlier-boot reservations are reclaimed, one per ADD.
    got = []
    for cid in ("new1", "new2", "new3"):
        res = add(cid)
        assert res.rc == 0, res.stdout
        got.append(res.json["ips"][0]["address"].split("/")[0])
        assert owner_of(data_dir, got[-1]) == cid
    assert sorted(got) == ["10.93.0.2", "10.93.0.3", "10.93.0.4"]

    # Only live reservations remain: exhausted, and the live one was never touched.
    error = cni_error(add("new4"))
    assert error["code"] == 100
    assert owner_of(data_dir, "10.93.0.5") == "live"

    # A late DEL of an earlier-boot owner must not free the address its successor holds.
    assert cni_host.run("cni-ipam", "DEL", conf, container_id="old0").rc == 0
    assert sorted(store_files(data_dir, NET)["reservations"]) == [f"10.93.0.{n}" for n in range(2, 7)]


def test_check_and_list_show_earlier_boot(cni_host, data_dir):
    reserve(data_dir, "10.93.0.2", "old0", EARLIER_BOOT)
    reserve(data_dir, "10.93.0.3", "live", current_boot_id())
    res = ipam_cli(cni_host, "list", "--data-dir", str(data_dir), "--json")
    assert res.rc == 0, res.stderr
    boots = {r["ip"]: r["boot"] for r in json.loads(res.stdout)}
    assert boots == {"10.93.0.2": "earlier", "10.93.0.3": "current"}
    res = ipam_cli(cni_host, "check", "--data-dir", str(data_dir), "--json")
    assert res.rc == 1
    assert [(f["kind"], f["ip"]) for f in json.loads(res.stdout)] == [("earlier-boot", "10.93.0.2")]


def test_bridge_add_on_a_range_full_of_earlier_boot_reservations(cni_host, make_netns, data_dir):
    cni_host.data_dir = data_dir
    conf = bridge_conf(data_dir, unique("br"), network=NET, subnet="10.94.0.0/29")
    for n in range(2, 7):
        reserve(data_dir, f"10.94.0.{n}", f"old{n}", EARLIER_BOOT, netns="/var/run/netns/gone")
    pod = make_netns("p")
    res = cni_host.run("cni-bridge", "ADD", conf, container_id="fresh", netns=pod.path)
    assert res.rc == 0, res.stdout
    ip = res.json["ips"][0]["address"].split("/")[0]
    assert owner_of(data_dir, ip) == "fresh"
    assert cni_host.run("cni-bridge", "DEL", conf, container_id="fresh", netns=pod.path).rc == 0
    assert ip not in store_files(data_dir, NET)["reservations"]
    assert leftovers(cni_host, NET, temp_files=True).get("veths") is None


def test_tmpfs_store_wiped_by_reboot_starts_afresh(cni_host):
    conf_for = lambda d: ipam_conf(d, network=NET, subnet="10.95.0.0/28")  # noqa: E731
    with tmpfs("256k") as data_dir:
        res = cni_host.run("cni-ipam", "ADD", conf_for(data_dir), container_id="c1", netns="/none")
        assert res.rc == 0 and res.json["ips"][0]["address"] == "10.95.0.2/28", res.stdout
        assert store_files(data_dir, NET)["reservations"] == ["10.95.0.2"]
    # The "reboot": a new, empty tmpfs at a new place; the network directory is recreated.
    with tmpfs("256k") as data_dir:
        res = cni_host.run("cni-ipam", "ADD", conf_for(data_dir), container_id="c2", netns="/none")
        assert res.rc == 0 and res.json["ips"][0]["address"] == "10.95.0.2/28", res.stdout
        assert cni_host.run("cni-ipam", "DEL", conf_for(data_dir), container_id="c2").rc == 0
        assert store_files(data_dir, NET)["reservations"] == []
