"""A damaged store: bad files, foreign files, wrong permissions, read-only or full disk.

Every case ends in a result or a clear CNI error (code 5 for I/O), never a
traceback, and leaves no temp file or half-made reservation behind.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from cni_bridge.protocol.errors import CNIError
from ipam.allocator import Allocator
from ipam.config import Range
from ipam.filestore import FileStore, current_boot_id
from tests.support.netns import VENV_BIN, PluginResult, unique
from tests.support.reliability import (bridge_conf, cni_error, ipam_cli, ipam_conf, leftovers, no_traceback,
                                       remount, store_files, tmpfs)

NET = "damaged"
SUBNET = "10.96.0.0/28"   # .2 .. .14, gateway .1
CLEAN = {"reservations": [], "owners": [], "temp_files": []}


def _add(cni_host, conf, cid="c1"):
    return cni_host.run("cni-ipam", "ADD", conf, container_id=cid, netns="/none")


def _del(cni_host, conf, cid="c1"):
    return cni_host.run("cni-ipam", "DEL", conf, container_id=cid)


def _address(res) -> str:
    return res.json["ips"][0]["address"].split("/")[0]


DAMAGE = {
    "truncated": lambda p: p.write_text('{"containerID": "abc", "ifn'),
    "empty": lambda p: p.write_bytes(b""),
    "garbage": lambda p: p.write_bytes(bytes(range(256)) * 3),
    "wrong-json": lambda p: p.write_text('["a list", "not a record"]'),
    "directory": lambda p: p.mkdir(),
}


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_damaged_record_blocks_only_its_address(cni_host, kind):
    conf = ipam_conf(cni_host.data_dir, network=NET, subnet=SUBNET)
    store = cni_host.data_dir / NET
    store.mkdir(parents=True)
    DAMAGE[kind](store / "10.96.0.2")

    res = _add(cni_host, conf)
    no_traceback(res)
    assert res.rc == 0, res.stdout
    assert _address(res) == "10.96.0.3"       # skipped, not reused, not a crash
    assert "damaged" in res.stderr             # the skip is logged (stderr: no logFile here)
    assert _del(cni_host, conf).rc == 0

    listed = ipam_cli(cni_host, "list", "--data-dir", str(cni_host.data_dir), "--json")
    assert listed.rc == 0, listed.stderr
    assert [(r["ip"], r["boot"]) for r in json.loads(listed.stdout)] == [("10.96.0.2", "damaged")]
    check = ipam_cli(cni_host, "check", "--data-dir", str(cni_host.data_dir), "--json")
    assert check.rc == 1 and [f["kind"] for f in json.loads(check.stdout)] == ["damaged"]
    if kind != "directory":
        res = ipam_cli(cni_host, "release", "--data-dir", str(cni_host.data_dir), "--network", NET,
                       "--ip", "10.96.0.2")
        assert res.rc == 0, res.stderr
        assert store_files(cni_host.data_dir, NET)["reservations"] == []


def test_foreign_files_are_ignored(cni_host):
    conf = ipam_conf(cni_host.data_dir, network=NET, subnet=SUBNET)
    store = cni_host.data_dir / NET
    (store / "owners" / "junk").mkdir(parents=True)
    (store / "README").write_text("notes an operator left\n")
    (store / "10.96.0.2.bak").write_text("old copy")
    (store / "last_reserved_ip.0").write_text("not an ip")
    (store / "owners" / "c1:eth0").write_text("{broken")
    (store / "owners" / "nocolon").write_text("[]")
    (store / "backup").mkdir()

    res = _add(cni_host, conf)
    no_traceback(res)
    assert res.rc == 0 and _address(res) == "10.96.0.2", res.stdout
    assert _del(cni_host, conf).rc == 0
    assert store_files(cni_host.data_dir, NET)["reservations"] == []
    assert (store / "README").exists() and (store / "backup").is_dir()   # not ours: untouched
    assert ipam_cli(cni_host, "list", "--data-dir", str(cni_host.data_dir)).rc == 0


def test_legacy_host_local_record_is_read(cni_host):
    conf = ipam_conf(cni_host.data_dir, network=NET, subnet=SUBNET)
    store = cni_host.data_dir / NET
    store.mkdir(parents=True)
    (store / "10.96.0.2").write_bytes(b"oldcid\r\neth0")
    res = _add(cni_host, conf)
    assert res.rc == 0 and _address(res) == "10.96.0.3", res.stdout
    listed = json.loads(ipam_cli(cni_host, "list", "--data-dir", str(cni_host.data_dir), "--json").stdout)
    assert {r["ip"]: (r["containerID"], r["boot"]) for r in listed}["10.96.0.2"] == ("oldcid", "unknown")


def test_reservation_outside_all_ranges(cni_host):
    conf = ipam_conf(cni_host.data_dir, network=NET, subnet=SUBNET)
    assert _add(cni_host, conf, "c1").rc == 0
    # c1's record for an address no range holds (the config's range was changed since).
    store = FileStore(str(cni_host.data_dir), NET)
    from ipaddress import ip_address
    from ipam.store import Reservation
    with store.locked():
        store.put(Reservation(ip_address("192.168.77.7"), "c1", "eth0", current_boot_id(), 0.0))
        store.set_owned(("c1", "eth0"), store.owned_by(("c1", "eth0")) + [ip_address("192.168.77.7")])
        store.put(Reservation(ip_address("192.168.77.8"), "gone", "eth0", current_boot_id(), 0.0))

    res = _add(cni_host, conf, "c2")
    assert res.rc == 0 and _address(res) == "10.96.0.3", res.stdout
    assert _del(cni_host, conf, "c1").rc == 0          # DEL frees it with the rest
    assert "192.168.77.7" not in store_files(cni_host.data_dir, NET)["reservations"]
    gc = {**conf, "cni.dev/valid-attachments": [{"containerID": "c2", "ifname": "eth0"}]}
    # GC leaves the one nobody owns: outside this config's ranges, it may belong to another
    # config with the same network name and another subnet. The operator CLI frees it.
    assert cni_host.run("cni-ipam", "GC", gc).rc == 0
    assert store_files(cni_host.data_dir, NET)["reservations"] == ["10.96.0.3", "192.168.77.8"]
    assert ipam_cli(cni_host, "gc", "--data-dir", str(cni_host.data_dir), "--network", NET,
                    "--keep", "c2/eth0").rc == 0
    assert store_files(cni_host.data_dir, NET)["reservations"] == ["10.96.0.3"]


def _as_nobody(cni_host, command, conf, cid="c1"):
    """cni-ipam run as an unprivileged user (root's CAP_DAC_OVERRIDE would hide permission errors)."""
    env = {"PATH": os.environ["PATH"], "CNI_COMMAND": command, "CNI_CONTAINERID": cid,
           "CNI_IFNAME": "eth0", "CNI_NETNS": "/none", "CNI_PATH": str(cni_host.cni_path)}
    proc = cni_host.netns.exec("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                               str(VENV_BIN / "cni-ipam"), check=False, env=env, input=json.dumps(conf))
    return PluginResult(proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture
def shared_dir():
    """A temp dir an unprivileged user can reach (pytest's tmp_path parents are 0700)."""
    path = Path(tempfile.mkdtemp(prefix="cni-perm-"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs util-linux setpriv")
def test_wrong_permissions_are_a_clear_io_error(cni_host, shared_dir):
    conf = ipam_conf(shared_dir, network=NET, subnet=SUBNET)
    store = shared_dir / NET
    store.mkdir(mode=0o700)   # root's, not the plugin user's
    error = cni_error(_as_nobody(cni_host, "ADD", conf))
    assert error["code"] == 5 and "permission denied" in error["msg"]

    # A store the user may write, holding one file it may not read.
    os.chown(store, 65534, 65534)
    (store / "10.96.0.2").write_text('{"containerID": "x", "ifname": "eth0"}')
    os.chmod(store / "10.96.0.2", 0o600)
    error = cni_error(_as_nobody(cni_host, "ADD", conf))
    assert error["code"] == 5 and "10.96.0.2" in error["msg"]
    assert store_files(shared_dir, NET)["owners"] == []
    assert store_files(shared_dir, NET)["temp_files"] == []

    # Root ignores a record's odd mode: a 0000 file is still read, the next address is used.
    os.chmod(store / "10.96.0.2", 0)
    res = _add(cni_host, conf, "c9")
    assert res.rc == 0 and _address(res) == "10.96.0.3", res.stdout


def test_read_only_store(cni_host, make_netns):
    with tmpfs("256k") as data_dir:
        conf = ipam_conf(data_dir, network=NET, subnet=SUBNET)
        assert _add(cni_host, conf, "c1").rc == 0
        remount(data_dir, "ro")
        try:
            error = cni_error(_add(cni_host, conf, "c2"))
            assert error["code"] == 5 and "read-only" in error["msg"]
            error = cni_error(_del(cni_host, conf, "c1"))     # DEL cannot free it either: the runtime retries
            assert error["code"] == 5 and "read-only" in error["msg"]
            # The whole plugin: a clear error and no veth, no rule left behind.
            pod = make_netns("p")
            bconf = bridge_conf(data_dir, unique("br"), network=NET, subnet=SUBNET)
            error = cni_error(cni_host.run("cni-bridge", "ADD", bconf, container_id="c3", netns=pod.path))
            assert error["code"] == 5
            assert leftovers(cni_host, NET) == {} and "eth0" not in pod.links()
            # The operator can still look.
            listed = ipam_cli(cni_host, "list", "--data-dir", str(data_dir), "--json")
            assert listed.rc == 0 and [r["containerID"] for r in json.loads(listed.stdout)] == ["c1"]
        finally:
            remount(data_dir, "rw")
        assert _del(cni_host, conf, "c1").rc == 0
        assert store_files(data_dir, NET) == CLEAN


def _fill(directory: Path, leave_pages: int) -> None:
    """Fill a tmpfs until only `leave_pages` 4 KiB pages are free."""
    stat = os.statvfs(directory)
    free = stat.f_bavail * stat.f_frsize
    with open(directory / "filler", "wb") as f:
        f.write(b"\0" * max(0, free - leave_pages * 4096))


def test_full_store(cni_host):
    with tmpfs("128k") as data_dir:
        conf = ipam_conf(data_dir, network=NET, subnet=SUBNET)
        assert _add(cni_host, conf, "c1").rc == 0
        _fill(data_dir, 0)
        error = cni_error(_add(cni_host, conf, "c2"))
        assert error["code"] == 5 and "full" in error["msg"]
        files = store_files(data_dir, NET)
        assert files["temp_files"] == [] and files["owners"] == ["owners/c1:eth0"]
        assert len(files["reservations"]) == 1
        # Freeing needs no space: DEL works on a full disk.
        assert _del(cni_host, conf, "c1").rc == 0
        assert store_files(data_dir, NET) == CLEAN


def test_full_store_mid_write_rolls_back(cni_host):
    """Room for the owner record but not the IP file: the record is taken back."""
    with tmpfs("128k") as data_dir:
        conf = ipam_conf(data_dir, network=NET, subnet=SUBNET)
        assert _add(cni_host, conf, "c1").rc == 0 and _del(cni_host, conf, "c1").rc == 0
        _fill(data_dir, 1)
        error = cni_error(_add(cni_host, conf, "c2"))
        assert error["code"] == 5 and "full" in error["msg"]
        assert "/owners/" not in error["msg"]    # the owner record was written, the IP file was not
        assert store_files(data_dir, NET) == CLEAN
        os.unlink(data_dir / "filler")
        assert _add(cni_host, conf, "c2").rc == 0


class FailingStore(FileStore):
    """Fails the n-th write with ENOSPC, as a full disk would."""

    def __init__(self, *args, fail_at: int) -> None:
        super().__init__(*args)
        self.writes, self.fail_at = 0, fail_at

    def _count(self) -> None:
        self.writes += 1
        if self.writes == self.fail_at:
            raise CNIError(5, "cannot write: the filesystem is full")

    def put(self, reservation):
        self._count()
        super().put(reservation)

    def set_owned(self, owner, ips):
        if ips:
            self._count()
        super().set_owned(owner, ips)

    def set_last_reserved(self, set_index, ip):
        self._count()
        super().set_last_reserved(set_index, ip)


@pytest.mark.parametrize("fail_at", [1, 2, 3, 4, 5])
def test_any_failed_write_of_a_dual_stack_allocate_leaves_the_store_as_it_was(tmp_path, fail_at):
    """In-process, no kernel objects: every write of a two-range-set ADD failing in turn."""
    range_sets = [[Range(subnet="10.97.0.0/29")], [Range(subnet="fd97::/125")]]
    store = FailingStore(str(tmp_path), NET, fail_at=fail_at)
    allocator = Allocator(store, range_sets, current_boot_id(), 1.0)
    with pytest.raises(CNIError) as err:
        allocator.allocate(("c1", "eth0"))
    assert err.value.code == 5
    assert store_files(tmp_path, NET) == CLEAN
    store.fail_at = 0
    assert len(allocator.allocate(("c1", "eth0"))) == 2
