"""The cheap paths of in-process IPAM: what they skip, and that they stay correct."""
from __future__ import annotations

import copy
import errno
import ipaddress
import os

import pytest

from cni_bridge.confbase import load
from cni_bridge.protocol.errors import CNIError
from ipam.allocator import Allocator
from ipam.config import IPAMNetConf, Range
from ipam import filestore
from ipam.filestore import FileStore
from ipam.plugin import _CONF_CACHE_SIZE, _load_conf_json, load_conf
from ipam.store import Reservation

ip = ipaddress.ip_address
NET = "pods"


@pytest.fixture
def store(tmp_path) -> FileStore:
    s = FileStore(str(tmp_path / "data"), NET, lock_timeout=0.2)
    s.ensure_dirs()
    return s


def test_cursor_is_overwritten_in_place_and_shrinks(store, tmp_path):
    cursor = tmp_path / "data" / NET / "last_reserved_ip.0"
    store.set_last_reserved(0, ip("10.0.0.123"))
    inode = cursor.stat().st_ino
    store.set_last_reserved(0, ip("10.0.0.9"))
    assert cursor.read_text() == "10.0.0.9" and store.last_reserved(0) == ip("10.0.0.9")
    assert cursor.stat().st_ino == inode                     # no temp file renamed over it
    assert not [n for n in os.listdir(cursor.parent) if n.startswith(".tmp")]


# -- the validated-config cache (ipam.plugin.load_conf) ---------------------------

def conf(subnet: str = "10.0.0.0/24", **ipam) -> dict:
    return {"cniVersion": "1.0.0", "name": "pods", "type": "cni-bridge",
            "ipam": {"type": "cni-ipam", "ranges": [[{"subnet": subnet}]], **ipam}}


@pytest.fixture
def empty_cache():
    _load_conf_json.cache_clear()
    yield
    _load_conf_json.cache_clear()


def test_same_config_in_any_key_order_is_validated_once(empty_cache):
    first = load_conf(conf())
    reordered = dict(reversed(list(copy.deepcopy(conf()).items())))
    assert load_conf(reordered) is first
    assert _load_conf_json.cache_info().misses == 1


def test_a_changed_config_gets_a_fresh_model(empty_cache):
    raw = conf()
    assert load_conf(raw).ipam.range_sets[0][0].network == ipaddress.ip_network("10.0.0.0/24")
    raw["ipam"]["ranges"][0][0]["subnet"] = "10.9.0.0/24"     # the caller's dict changes in place
    assert load_conf(raw).ipam.range_sets[0][0].network == ipaddress.ip_network("10.9.0.0/24")
    assert load_conf(conf(dataDir="/elsewhere")).ipam.data_dir == "/elsewhere"
    with_args = {**conf(), "args": {"cni": {"ips": ["10.0.0.7"]}}}
    assert load_conf(with_args).requested_ips({}) == [ip("10.0.0.7")]
    assert load_conf(conf()).requested_ips({}) == []


def test_the_cache_is_bounded(empty_cache):
    for n in range(_CONF_CACHE_SIZE * 3):
        assert load_conf(conf(f"10.{n}.0.0/24")).ipam.range_sets[0][0].subnet == f"10.{n}.0.0/24"
    assert _load_conf_json.cache_info().currsize == _CONF_CACHE_SIZE


def test_a_bad_config_is_error_7_every_time_and_never_cached(empty_cache):
    for _ in range(2):
        with pytest.raises(CNIError) as info:
            load_conf(conf("10.0.0.1/24"))          # host bits set
        assert info.value.code == 7
    assert _load_conf_json.cache_info().currsize == 0


def test_cached_range_properties_keep_the_model_plain():
    a, b = load(IPAMNetConf, conf()), load(IPAMNetConf, conf())
    rng = a.ipam.range_sets[0][0]
    assert (rng.start, rng.end, rng.gateway_ip) == (ip("10.0.0.1"), ip("10.0.0.254"), ip("10.0.0.1"))
    assert a == b                                            # cached values do not count in equality
    assert set(rng.model_dump()) == {"subnet", "range_start", "range_end", "gateway"}


def test_the_machines_boot_id_is_read_once(monkeypatch):
    monkeypatch.setattr(filestore, "_boot_id", None)
    first = filestore.current_boot_id()
    assert first == open(filestore.BOOT_ID_PATH).read().strip()
    monkeypatch.setattr(filestore, "open", lambda *a: pytest.fail("read again"), raising=False)
    assert filestore.current_boot_id() == first


# -- one directory fsync for all of an ADD's IP files --------------------------------

def record_syncs(monkeypatch, store: FileStore, fail_dir: str = "") -> list[tuple[str, list[str]]]:
    """Each fsync as (path, the store directory's names at that moment)."""
    synced: list[tuple[str, list[str]]] = []
    real_fsync = os.fsync

    def fsync(fd):
        path = os.readlink(f"/proc/self/fd/{fd}")
        if path == fail_dir:
            raise OSError(errno.EIO, "I/O error")
        synced.append((path, sorted(os.listdir(store.dir))))
        real_fsync(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    return synced


def dual_stack(store: FileStore) -> Allocator:
    return Allocator(store, [[Range(subnet="10.0.0.0/29")], [Range(subnet="fd00::/120")]], "boot-1", 1.0)


def test_dual_stack_add_syncs_the_owner_record_first_and_the_ip_files_together(store, monkeypatch):
    synced = record_syncs(monkeypatch, store)
    dual_stack(store).allocate(("c1", "eth0"))
    paths = [p for p, _ in synced]
    assert paths.count(store.dir) == 1 and paths.count(store.owners_dir) == 1
    assert len(paths) == 5          # owner record, owners/, two IP files, their one directory
    # intent first: owners/ is on disk before any IP file is even written
    first_ip = next(i for i, p in enumerate(paths) if os.path.basename(p).startswith(".tmp-10.0.0."))
    assert paths.index(store.owners_dir) < first_ip
    # the one directory fsync comes after both renames
    names = dict(synced)[store.dir]
    assert "10.0.0.2" in names and "fd00::2" in names


def test_a_failed_directory_sync_undoes_the_add(store, monkeypatch):
    record_syncs(monkeypatch, store, fail_dir=store.dir)
    with pytest.raises(CNIError) as info:
        dual_stack(store).allocate(("c1", "eth0"))
    assert info.value.code == 5
    monkeypatch.undo()
    assert list(store.reservations()) == [] and store.owners() == []


def test_put_outside_the_lock_syncs_at_once_and_inside_by_the_release(store, monkeypatch):
    synced = record_syncs(monkeypatch, store)
    store.put(Reservation(ip("10.0.0.2"), "c1", "eth0"))
    assert synced[-1][0] == store.dir
    synced.clear()
    with store.locked():
        store.put(Reservation(ip("10.0.0.3"), "c2", "eth0"))
        assert store.dir not in [p for p, _ in synced]
    assert [p for p, _ in synced].count(store.dir) == 1
