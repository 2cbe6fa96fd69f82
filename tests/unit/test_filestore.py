"""FileStore on a real directory under tmp_path: layout, atomicity, locking, damaged files, I/O errors."""
from __future__ import annotations

import fcntl
import ipaddress
import json
import os
import time

import pytest

from cni_bridge.protocol.errors import CNIError
from ipam.allocator import Allocator
from ipam.config import Range
from ipam.filestore import FileStore, current_boot_id
from ipam.store import Reservation

ip = ipaddress.ip_address
NET = "pods"


@pytest.fixture
def store(tmp_path) -> FileStore:
    return FileStore(str(tmp_path / "data"), NET, lock_timeout=0.2)


def net_dir(tmp_path):
    return tmp_path / "data" / NET


def allocator(store, subnet="10.0.0.0/29", boot="boot-1"):
    return Allocator(store, [[Range(subnet=subnet)]], boot, 1234.5)


def test_layout_one_file_per_ip_owner_index_and_cursor(store, tmp_path):
    a = Allocator(store, [[Range(subnet="10.0.0.0/29")], [Range(subnet="fd00::/120")]], "boot-1", 1234.5)
    a.allocate(("c1", "eth0"), netns="/var/run/netns/p1")
    d = net_dir(tmp_path)
    assert sorted(os.listdir(d)) == ["10.0.0.2", "fd00::2", "last_reserved_ip.0", "last_reserved_ip.1",
                                     "lock", "owners"]
    record = json.loads((d / "10.0.0.2").read_text())
    assert record == {"containerID": "c1", "ifname": "eth0", "boot": "boot-1", "created": 1234.5,
                      "netns": "/var/run/netns/p1"}
    assert (d / "last_reserved_ip.0").read_text() == "10.0.0.2"
    assert (d / "last_reserved_ip.1").read_text() == "fd00::2"
    assert json.loads((d / "owners" / "c1:eth0").read_text()) == ["10.0.0.2", "fd00::2"]
    assert (d / "10.0.0.2").stat().st_mode & 0o777 == 0o600


def test_round_trip_through_the_files(store):
    store.ensure_dirs()
    r = Reservation(ip("10.0.0.3"), "c9", "net1", "boot-x", 5.0, netns="/proc/1/ns/net")
    store.put(r)
    assert store.get(ip("10.0.0.3")) == r
    assert list(store.reservations()) == [r]
    store.delete(ip("10.0.0.3"))
    store.delete(ip("10.0.0.3"))  # absent is fine
    assert store.get(ip("10.0.0.3")) is None


def test_release_removes_the_files_and_the_owner_record(store, tmp_path):
    a = allocator(store)
    a.allocate(("c1", "eth0"))
    a.allocate(("c2", "eth0"))
    a.release(("c1", "eth0"))
    d = net_dir(tmp_path)
    assert not (d / "10.0.0.2").exists() and (d / "10.0.0.3").exists()
    assert os.listdir(d / "owners") == ["c2:eth0"]


def test_atomic_writes_leave_no_temp_files(store, tmp_path):
    a = allocator(store, "10.0.0.0/28")
    for i in range(6):
        a.allocate((f"c{i}", "eth0"))
    a.release(("c2", "eth0"))
    names = os.listdir(net_dir(tmp_path)) + os.listdir(net_dir(tmp_path) / "owners")
    assert not [n for n in names if n.startswith(".tmp")]


def test_reservation_and_owner_record_are_synced_the_cursor_is_not(store, tmp_path, monkeypatch):
    synced: list[str] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")),
                                                 real_fsync(fd)))
    allocator(store).allocate(("c1", "eth0"))
    d = net_dir(tmp_path)
    names = [os.path.basename(p) for p in synced]
    assert any(n.startswith(".tmp-10.0.0.2") for n in names)            # the reservation, before its rename
    assert any(n.startswith(".tmp-c1:eth0") for n in names)             # the owner record
    assert str(d) in synced and str(d / "owners") in synced             # the renames themselves
    assert not any("last_reserved" in n for n in names)                 # the cursor is only a hint


def test_sweep_removes_temp_files_left_by_a_killed_writer(store, tmp_path):
    store.ensure_dirs()
    left = net_dir(tmp_path) / ".tmp-10.0.0.2.4242"
    left.write_text("{")
    with store.locked():
        removed = store.sweep_temp_files()
    assert removed == [str(left)] and not left.exists()
    assert store.get(ip("10.0.0.2")) is None   # the temp file was never a reservation


def hold_flock(path):
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def flock_is_free(path) -> bool:
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def test_lock_is_reentrant_and_really_held(store, tmp_path):
    lock = net_dir(tmp_path) / "lock"
    with store.locked():
        assert not flock_is_free(lock)
        with store.locked():
            with store.locked():
                assert not flock_is_free(lock)
        assert not flock_is_free(lock)   # inner exits keep the outer lock
    assert flock_is_free(lock)


def test_lock_released_after_an_exception(store, tmp_path):
    with pytest.raises(RuntimeError):
        with store.locked():
            raise RuntimeError("x")
    assert flock_is_free(net_dir(tmp_path) / "lock")


def test_lock_timeout_is_code_11(store, tmp_path):
    store.ensure_dirs()
    fd = hold_flock(net_dir(tmp_path) / "lock")
    try:
        started = time.monotonic()
        with pytest.raises(CNIError) as info:
            allocator(store).allocate(("c1", "eth0"))
        assert info.value.code == 11
        assert "lock" in info.value.msg and "retry" in info.value.details
        assert time.monotonic() - started < 2
    finally:
        os.close(fd)
    assert list(store.reservations()) == []
    assert [str(x.ip) for x in allocator(store).allocate(("c1", "eth0"))] == ["10.0.0.2"]


def test_lock_waits_for_a_short_holder(store, tmp_path):
    import threading

    store.ensure_dirs()
    fd = hold_flock(net_dir(tmp_path) / "lock")
    timer = threading.Timer(0.1, os.close, (fd,))
    started = time.monotonic()
    timer.start()
    try:
        with FileStore(str(tmp_path / "data"), NET, lock_timeout=5).locked():
            waited = time.monotonic() - started
            assert not flock_is_free(net_dir(tmp_path) / "lock")
    finally:
        timer.join()
    assert 0.09 <= waited < 4


@pytest.mark.parametrize("content", [b"", b"garbage\x00\xff", b"{\"containerID\": 5", b"[1, 2]",
                                     b"{\"ifname\": \"eth0\"}", b"not an id\n"])
def test_damaged_files_are_held_and_flagged(store, tmp_path, content):
    store.ensure_dirs()
    (net_dir(tmp_path) / "10.0.0.2").write_bytes(content)
    r = store.get(ip("10.0.0.2"))
    assert r is not None and r.damaged and r.ip == ip("10.0.0.2")
    assert [x.damaged for x in store.reservations()] == [True]
    # the allocator steps over it and never reclaims it
    a = allocator(store)
    assert [str(x.ip) for x in a.allocate(("c1", "eth0"))] == ["10.0.0.3"]
    assert a.gc(set()) and (net_dir(tmp_path) / "10.0.0.2").read_bytes() == content


def test_directory_with_an_ip_name_reads_as_damaged(store, tmp_path):
    store.ensure_dirs()
    (net_dir(tmp_path) / "10.0.0.2").mkdir()
    assert store.get(ip("10.0.0.2")).damaged


def test_host_local_format_is_readable(store, tmp_path):
    store.ensure_dirs()
    (net_dir(tmp_path) / "10.0.0.2").write_bytes(b"a1b2c3\r\neth0")
    (net_dir(tmp_path) / "10.0.0.3").write_bytes(b"d4e5f6\r\nnet1")
    r = store.get(ip("10.0.0.2"))
    assert (r.container_id, r.ifname, r.damaged, r.boot_id) == ("a1b2c3", "eth0", False, "")
    assert store.get(ip("10.0.0.3")).owner == ("d4e5f6", "net1")
    # host-local's last_reserved_ip.0 continues the round-robin
    (net_dir(tmp_path) / "last_reserved_ip.0").write_text("10.0.0.4")
    assert [str(x.ip) for x in allocator(store).allocate(("c1", "eth0"))] == ["10.0.0.5"]


def test_foreign_files_are_ignored(store, tmp_path):
    store.ensure_dirs()
    d = net_dir(tmp_path)
    for name in ("README", "10.0.0.2.bak", "last_reserved_ip.0", ".tmp-10.0.0.3.1", "lock"):
        (d / name).write_text("x")
    (d / "subdir").mkdir()
    assert list(store.reservations()) == []
    assert store.last_reserved(0) is None   # "x" is not an address
    (d / "owners" / "not-an-owner").write_text("[]")
    assert store.owners() == []


def test_damaged_owner_record_is_ignored(store, tmp_path):
    store.ensure_dirs()
    (net_dir(tmp_path) / "owners" / "c1:eth0").write_text("{nope")
    assert store.owned_by(("c1", "eth0")) == []
    assert [str(x.ip) for x in allocator(store).allocate(("c1", "eth0"))] == ["10.0.0.2"]


def test_data_dir_that_is_a_file_is_code_5(tmp_path):
    blocker = tmp_path / "data"
    blocker.write_text("not a directory")
    store = FileStore(str(blocker), NET)
    with pytest.raises(CNIError) as info:
        allocator(store).allocate(("c1", "eth0"))
    assert info.value.code == 5
    assert str(blocker) in info.value.msg and "dataDir" in info.value.details


def permissions_enforced(tmp_path) -> bool:
    """False for root with CAP_DAC_OVERRIDE, which writes into a read-only directory anyway."""
    probe = tmp_path / "perm-probe"
    probe.mkdir(mode=0o500)
    try:
        (probe / "x").touch()
    except PermissionError:
        return True
    finally:
        probe.chmod(0o700)
    return False


def test_read_only_directory_is_code_5(store, tmp_path):
    if not permissions_enforced(tmp_path):
        pytest.skip("this process bypasses directory permissions (root); see test_data_dir_that_is_a_file")
    store.ensure_dirs()
    d = net_dir(tmp_path)
    os.chmod(d, 0o500)
    try:
        with pytest.raises(CNIError) as info:
            allocator(store).allocate(("c1", "eth0"))
        assert info.value.code == 5 and "permission denied" in info.value.msg
    finally:
        os.chmod(d, 0o755)


def test_failed_write_mid_add_undoes_the_reservation(store, tmp_path):
    # A real write failure that works as root too: the cursor's path is a directory,
    # so renaming the new cursor onto it fails after the IP file was written.
    store.ensure_dirs()
    (net_dir(tmp_path) / "last_reserved_ip.0").mkdir()
    with pytest.raises(CNIError) as info:
        allocator(store).allocate(("c1", "eth0"))
    assert info.value.code == 5 and "last_reserved_ip.0" in info.value.msg
    assert list(store.reservations()) == [] and store.owners() == []
    names = os.listdir(net_dir(tmp_path))
    assert not [n for n in names if n.startswith(".tmp")]


def test_failed_repeat_add_keeps_what_the_owner_held(store, tmp_path):
    a = allocator(store)
    a.allocate(("c1", "eth0"))
    (net_dir(tmp_path) / "last_reserved_ip.0").unlink()
    (net_dir(tmp_path) / "last_reserved_ip.0").mkdir()
    # the repeat ADD picks the same address and then fails to write the cursor
    with pytest.raises(CNIError):
        a.allocate(("c1", "eth0"))
    assert a.held_by(("c1", "eth0")) == [ip("10.0.0.2")]


def test_current_boot_id(tmp_path):
    f = tmp_path / "boot_id"
    f.write_text("abc-123\n")
    assert current_boot_id(str(f)) == "abc-123"
    assert current_boot_id(str(tmp_path / "missing")) == ""
