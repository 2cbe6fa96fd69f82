"""Review fixes in cni-ipam: FileStore, allocator, IPAM verbs and the operator CLI, no root."""
from __future__ import annotations

import ipaddress
import os

import pytest

from ipam.allocator import Allocator
from ipam.config import Range
from ipam.filestore import FileStore
from ipam.store import Reservation

ip = ipaddress.ip_address
NET = "pods"
BOOT = "boot-1"


@pytest.fixture
def store(tmp_path) -> FileStore:
    return FileStore(str(tmp_path / "data"), NET, lock_timeout=0.2)


def net_dir(tmp_path):
    return tmp_path / "data" / NET


def allocator(store, subnet="10.0.0.0/29", boot=BOOT) -> Allocator:
    return Allocator(store, [[Range(subnet=subnet)]], boot, 1234.5)


def host_local_file(tmp_path, address: str, content: bytes) -> None:
    """A reservation as the reference host-local writes it (O_EXCL create, no owners/ entry)."""
    path = net_dir(tmp_path) / address
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)


def files(tmp_path) -> list[str]:
    return sorted(n for n in os.listdir(net_dir(tmp_path)) if n[0].isdigit())


# -- 1. host-local's records ----------------------------------------------------------------
def test_host_local_records_are_freed_checked_and_kept_by_repeated_add(store, tmp_path):
    host_local_file(tmp_path, "10.0.0.2", b"hl-a\r\neth0")
    host_local_file(tmp_path, "10.0.0.3", b"hl-b\r\neth0")
    a = allocator(store)
    assert a.held_by(("hl-a", "eth0")) == [ip("10.0.0.2")]                     # CHECK finds it
    assert [str(x.ip) for x in a.allocate(("hl-b", "eth0"))] == ["10.0.0.3"]   # repeated ADD: same IP
    assert a.release(("hl-a", "eth0")) == [ip("10.0.0.2")]                      # DEL frees it
    assert files(tmp_path) == ["10.0.0.3"]
    assert a.release(("hl-b", "eth0")) == [ip("10.0.0.3")]
    assert files(tmp_path) == [] and store.owners() == []


def test_records_written_by_host_local_later_are_found_too(store, tmp_path):
    """host-local writing after cni-ipam used the store (a rollback, then the swap again)."""
    a = allocator(store)
    a.allocate(("mine", "eth0"))                        # 10.0.0.2; the store is indexed now
    host_local_file(tmp_path, "10.0.0.3", b"theirs\r\neth0")
    assert a.release(("theirs", "eth0")) == [ip("10.0.0.3")]
    assert files(tmp_path) == ["10.0.0.2"]


def test_the_directory_is_read_only_when_someone_else_changed_it(store, tmp_path, monkeypatch):
    for n in range(2, 7):
        host_local_file(tmp_path, f"10.0.0.{n}", f"hl{n}\r\neth0".encode())
    a = allocator(store)
    a.release(("hl2", "eth0"))                          # indexes the other four
    decoded = []
    original = FileStore._decode
    monkeypatch.setattr(FileStore, "_decode", lambda self, i, d: decoded.append(i) or original(self, i, d))
    a.release(("hl3", "eth0"))
    a.held_by(("hl4", "eth0"))
    assert decoded == [ip("10.0.0.3"), ip("10.0.0.4")]   # only the records asked about, no scan
    host_local_file(tmp_path, "10.0.0.2", b"hl7\r\neth0")  # host-local again: one scan
    decoded.clear()
    assert a.held_by(("hl7", "eth0")) == [ip("10.0.0.2")]
    assert sorted(decoded) == [ip("10.0.0.2"), ip("10.0.0.2"), ip("10.0.0.4"), ip("10.0.0.5"), ip("10.0.0.6")]


def test_older_host_local_id_only_records(store, tmp_path):
    """Old host-local wrote the container ID alone; its DEL freed them for any ifname of
    that container when nothing matched (cid, ifname) exactly, and so does cni-ipam."""
    host_local_file(tmp_path, "10.0.0.2", b"old-a")
    host_local_file(tmp_path, "10.0.0.3", b"old-b\n")
    a = allocator(store)
    r = store.get(ip("10.0.0.2"))
    assert (r.container_id, r.ifname, r.damaged) == ("old-a", "", False)
    assert a.held_by(("old-a", "eth0")) == [ip("10.0.0.2")]
    assert a.release(("old-a", "eth0")) == [ip("10.0.0.2")]
    assert a.release(("old-a", "eth0")) == []
    # GC keeps one while any attachment of its container is live
    assert a.gc({("old-b", "eth0")}) == [] and files(tmp_path) == ["10.0.0.3"]
    assert [x.ip for x in a.gc({("other", "eth0")})] == [ip("10.0.0.3")]
    assert files(tmp_path) == [] and store.owners() == []


def test_an_unreadable_record_does_not_stop_del_and_is_read_again_next_time(store, tmp_path, monkeypatch):
    from ipam.filestore import io_error

    host_local_file(tmp_path, "10.0.0.2", b"hl-a\r\neth0")
    host_local_file(tmp_path, "10.0.0.3", b"hl-b\r\neth0")
    bad = str(net_dir(tmp_path) / "10.0.0.3")
    original = FileStore._read

    def read(self, path):
        if path == bad:
            raise io_error("read", path, PermissionError(13, "Permission denied"))
        return original(self, path)

    monkeypatch.setattr(FileStore, "_read", read)
    a = allocator(store)
    assert a.release(("hl-a", "eth0")) == [ip("10.0.0.2")]
    monkeypatch.setattr(FileStore, "_read", original)   # readable again: the next caller indexes it
    assert a.release(("hl-b", "eth0")) == [ip("10.0.0.3")]


def cli(*argv: str) -> tuple[int, str, str]:
    import io

    from ipam.cli import main

    out, err = io.StringIO(), io.StringIO()
    rc = main(list(argv), out, err)
    return rc, out.getvalue(), err.getvalue()


def test_cli_gc_keeps_an_id_only_record_of_a_kept_container(store, tmp_path):
    host_local_file(tmp_path, "10.0.0.2", b"old-a")
    host_local_file(tmp_path, "10.0.0.3", b"old-b")
    rc, out, err = cli("gc", "--data-dir", str(tmp_path / "data"), "--network", NET, "--keep", "old-a/eth0")
    assert rc == 0, err
    assert files(tmp_path) == ["10.0.0.2"]


# -- 2. a killed repeated ADD that moved the address ----------------------------------------
class Killed(BaseException):
    """Stands in for SIGKILL at a fault point: no `except CNIError` rollback runs."""


@pytest.mark.parametrize("at", ["ipam.add.owner-recorded", "ipam.add.ip-written"])
@pytest.mark.parametrize("then", ["del", "add"])
def test_killed_repeated_add_that_moved_leaks_neither_address(monkeypatch, at, then):
    import ipam.allocator
    from ipam.store import MemoryStore

    a = allocator(MemoryStore())
    owner = ("c1", "eth0")
    assert [x.ip for x in a.allocate(owner, [ip("10.0.0.4")])] == [ip("10.0.0.4")]

    def point(name):
        if name == at:
            raise Killed(name)

    monkeypatch.setattr(ipam.allocator, "point", point)
    with pytest.raises(Killed):
        a.allocate(owner, [ip("10.0.0.5")])       # the requested IP changed: moves .4 -> .5
    monkeypatch.undo()
    if then == "del":
        a.release(owner)
        assert list(a.store.reservations()) == [] and a.store.owners() == []
    else:                                          # the runtime retries the ADD instead
        assert [x.ip for x in a.allocate(owner, [ip("10.0.0.5")])] == [ip("10.0.0.5")]
        assert [r.ip for r in a.store.reservations()] == [ip("10.0.0.5")]
        assert a.store.owned_by(owner) == [ip("10.0.0.5")]


# -- 3. one network name, two configs with other subnets, one dataDir -----------------------
def test_gc_under_one_config_leaves_the_other_configs_reservations():
    from ipam.store import MemoryStore

    shared = MemoryStore()
    a = Allocator(shared, [[Range(subnet="10.1.0.0/24")]], BOOT, 0.0)
    b = Allocator(shared, [[Range(subnet="10.2.0.0/24")], [Range(subnet="fd02::/64")]], BOOT, 0.0)
    a.allocate(("a1", "eth0"))
    b.allocate(("b1", "eth0"))
    b.allocate(("b-dead", "eth0"))
    dropped = b.gc({("b1", "eth0")})
    assert sorted(str(r.ip) for r in dropped) == ["10.2.0.3", "fd02::3"]
    assert sorted(str(r.ip) for r in shared.reservations()) == ["10.1.0.2", "10.2.0.2", "fd02::2"]
    # a1's owner record survived too, so its DEL under its own config still frees it
    assert a.release(("a1", "eth0")) == [ip("10.1.0.2")]
    assert b.gc(set()) and list(shared.reservations()) == [] and shared.owners() == []


def test_gc_keeps_an_owners_out_of_range_addresses_and_drops_its_in_range_ones():
    """One attachment holding addresses in both configs' ranges (a range changed under it):
    GC under one config frees only that config's part."""
    from ipam.store import MemoryStore

    shared = MemoryStore()
    a = Allocator(shared, [[Range(subnet="10.1.0.0/24")]], BOOT, 0.0)
    b = Allocator(shared, [[Range(subnet="10.2.0.0/24")]], BOOT, 0.0)
    a.allocate(("x", "eth0"))
    shared.put(Reservation(ip("10.2.0.9"), "x", "eth0", BOOT))
    shared.set_owned(("x", "eth0"), [ip("10.1.0.2"), ip("10.2.0.9"), ip("10.2.0.10")])  # .10: orphan
    assert [str(r.ip) for r in b.gc(set())] == ["10.2.0.9"]
    assert shared.owned_by(("x", "eth0")) == [ip("10.1.0.2")]
    assert a.release(("x", "eth0")) == [ip("10.1.0.2")]


# -- 4. STATUS counts what ADD would reclaim as free ----------------------------------------
def test_status_counts_earlier_boot_reservations_as_free(tmp_path, monkeypatch):
    import ipam.plugin
    from cni_bridge.protocol.errors import CNIError
    from ipam.plugin import IpamPlugin

    from .helpers import cni_env, make_request

    monkeypatch.setattr(ipam.plugin, "current_boot_id", lambda: "boot-now")
    config = {"cniVersion": "1.1.0", "name": NET, "type": "cni-ipam",
              "ipam": {"type": "cni-ipam", "dataDir": str(tmp_path / "data"),
                       "ranges": [[{"subnet": "10.0.0.0/29"}]]}}     # .2 .. .6

    def call(verb, cid="new"):
        req = make_request(cni_env(verb, CNI_CONTAINERID=cid), config)
        return getattr(IpamPlugin(), {"ADD": "add", "STATUS": "status"}[verb])(req)

    store = FileStore(str(tmp_path / "data"), NET)
    with store.locked():
        for n in range(2, 7):   # full, but only of an earlier boot's reservations
            store.put(Reservation(ip(f"10.0.0.{n}"), f"old{n}", "eth0", "boot-before", 1.0))
    call("STATUS")                                  # ADD can be served ...
    assert str(call("ADD").ips[0].address.ip) in {f"10.0.0.{n}" for n in range(2, 7)}   # ... and is
    call("STATUS")

    # reservations of this boot, host-local's (no boot) and damaged ones are not free
    with store.locked():
        for n in range(2, 7):
            if store.get(ip(f"10.0.0.{n}")).boot_id == "boot-before":
                store.put(Reservation(ip(f"10.0.0.{n}"), f"hl{n}", "eth0"))
    with pytest.raises(CNIError) as info:
        call("STATUS")
    assert info.value.code == 50


# -- 5. `cni-ipam gc --keep` with IDs that match nothing --------------------------------------
def _three_pods(store):
    a = allocator(store)
    for cid in ("pod-a", "pod-b", "pod-c"):
        a.allocate((cid, "eth0"))


@pytest.mark.parametrize("dry_run", [[], ["--dry-run"]])
def test_cli_gc_refuses_keep_ids_that_match_nothing(store, tmp_path, dry_run):
    _three_pods(store)
    base = ["gc", "--data-dir", str(tmp_path / "data"), "--network", NET, *dry_run]
    rc, out, err = cli(*base, "--keep", "pod-a/eth0", "--keep", "pod-bb/eth0", "--keep", "pod-a/net1",
                       "--keep", "podc")
    assert rc == 2, (out, err)
    assert "pod-bb/eth0, pod-a/net1, podc" in err and "--force" in err
    assert files(tmp_path) == ["10.0.0.2", "10.0.0.3", "10.0.0.4"] and "free" not in out


def test_cli_gc_with_force_frees_the_rest_and_names_the_unmatched(store, tmp_path):
    _three_pods(store)
    base = ["gc", "--data-dir", str(tmp_path / "data"), "--network", NET]
    rc, out, err = cli(*base, "--keep", "pod-a/eth0", "--keep", "pod-bb", "--force")
    assert rc == 0, err
    assert "pod-bb" in out and files(tmp_path) == ["10.0.0.2"]


def test_cli_gc_keep_ids_that_all_match_work_as_before(store, tmp_path):
    _three_pods(store)
    host_local_file(tmp_path, "10.0.0.6", b"old-d")      # an old host-local's record, kept by CID/IFNAME
    base = ["gc", "--data-dir", str(tmp_path / "data"), "--network", NET]
    rc, out, err = cli(*base, "--keep", "pod-a/eth0", "--keep", "pod-b", "--keep", "old-d/eth0")
    assert rc == 0, err
    assert files(tmp_path) == ["10.0.0.2", "10.0.0.3", "10.0.0.6"] and "freed 1 reservation(s)" in out
