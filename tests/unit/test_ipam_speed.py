"""The cheap paths of in-process IPAM: what they skip, and that they stay correct."""
from __future__ import annotations

import ipaddress
import os

import pytest

from ipam.filestore import FileStore

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
