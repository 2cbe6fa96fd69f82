"""The on-disk store: one file per reserved IP under <dataDir>/<network>/.

Layout (records go to a temp file, fsync, then rename, so none is ever torn):
  lock                       flock(LOCK_EX) around every read-modify-write; its content
                             notes the directory's state when cni-ipam last let go
  <ip>                       JSON {containerID, ifname, boot, created}
  last_reserved_ip.<set>     the last address handed out from range set <set> (a hint:
                             overwritten in place, never synced)
  owners/<cid>:<ifname>      JSON list of the IPs that attachment holds (the index
                             that keeps DEL and repeated ADD O(1) in store size)

host-local (same dataDir and network name) writes `<ip>` files holding
"<cid>\r\n<ifname>" (older versions: the container ID alone) and never touches
owners/; `locked()` adds such records to the index before anything reads it.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import ipaddress
import json
import logging
import os
import re
import time
from typing import Iterator, Optional

from cni_bridge.faults import point
from cni_bridge.protocol.errors import CNIError, Code
from cni_bridge.protocol.result import IPAddress

from .store import Owner, Reservation

log = logging.getLogger(__name__)

LOCK_FILE = "lock"
LAST_PREFIX = "last_reserved_ip."
OWNERS_DIR = "owners"
_TMP_PREFIX = ".tmp-"
# A CNI container ID (the spec's rule): what an old host-local's id-only file holds.
_CONTAINER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"


_boot_id: Optional[str] = None


def current_boot_id(path: str = BOOT_ID_PATH) -> str:
    """This boot's ID ("" when unreadable). The machine's is read once per process:
    no process outlives the boot it started in, and a daemon worker asks on every ADD."""
    global _boot_id
    if path == BOOT_ID_PATH and _boot_id:
        return _boot_id
    try:
        with open(path) as f:
            found = f.read().strip()
    except OSError:
        return ""
    if path == BOOT_ID_PATH:
        _boot_id = found
    return found


def io_error(action: str, path: str, exc: OSError) -> CNIError:
    hint = {
        errno.EROFS: "the filesystem is read-only",
        errno.ENOSPC: "the filesystem is full",
        errno.EACCES: "permission denied",
        errno.EPERM: "permission denied",
    }.get(exc.errno or 0, exc.strerror or str(exc))
    return CNIError(Code.IO_FAILURE, f"cannot {action} {path}: {hint}", "check the ipam dataDir")


def write_atomic(path: str, data: bytes, mode: int = 0o600, sync_dir: bool = True) -> None:
    """Write `data` to `path` durably, so a reader sees the old or the new file, never a torn one.

    `sync_dir=False` leaves the rename's directory fsync to the caller, who batches it.
    """
    directory = os.path.dirname(path)
    tmp = os.path.join(directory, f"{_TMP_PREFIX}{os.path.basename(path)}.{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        point("ipam.store.temp-written")
        os.replace(tmp, path)
        if sync_dir:
            fsync_dir(directory)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise io_error("write", path, exc) from None


def write_hint(path: str, data: bytes, mode: int = 0o644) -> None:
    """Overwrite a small hint file in place: no temp file, no rename, no fsync.

    pwrite then shrink, never truncate to zero first (that too makes ext4 write
    the file back on close). Readers and writers hold the store lock.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, mode)
        try:
            os.pwrite(fd, data, 0)
            os.ftruncate(fd, len(data))
        finally:
            os.close(fd)
    except OSError as exc:
        raise io_error("write", path, exc) from None


def fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _dir_state(directory: str) -> str:
    st = os.stat(directory)
    return f"{st.st_ino}:{st.st_mtime_ns}"


def _write_note(lock_fd: int, state: str) -> bool:
    # No fsync: a lost or torn note only costs the next holder one scan.
    try:
        os.pwrite(lock_fd, state.encode(), 0)
        os.ftruncate(lock_fd, len(state))
        return True
    except OSError:
        return False


def _parse_ip(name: str) -> Optional[IPAddress]:
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return None


class FileStore:
    def __init__(self, data_dir: str, network: str, lock_timeout: float = 30.0,
                 index_unindexed: bool = True) -> None:
        self.dir = os.path.join(data_dir, network)
        self.owners_dir = os.path.join(self.dir, OWNERS_DIR)
        self.lock_timeout = lock_timeout
        # False for callers that promise to change nothing (`cni-ipam gc --dry-run`).
        self.index_unindexed = index_unindexed
        self._lock_depth = 0
        self._lock_fd: Optional[int] = None
        # An IP file was renamed into self.dir under the lock and the directory is not
        # fsynced yet (see put and sync).
        self._unsynced = False

    # -- locking -------------------------------------------------------------
    def ensure_dirs(self) -> None:
        try:
            os.makedirs(self.owners_dir, mode=0o755, exist_ok=True)
        except OSError as exc:
            raise io_error("create", self.owners_dir, exc) from None

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive flock, re-entrant within one process, bounded wait (code 11)."""
        if self._lock_depth:
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
            return
        self.ensure_dirs()
        path = os.path.join(self.dir, LOCK_FILE)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise io_error("open lock file", path, exc) from None
        try:
            self._acquire(fd, path)
            self._lock_fd, self._lock_depth = fd, 1
            noted: Optional[str] = None
            try:
                if self.index_unindexed:
                    noted = self._index_unindexed(fd)
                yield
                self.sync()   # durable before the lock is let go, whoever forgot to sync
            finally:
                if self._unsynced:   # leaving on an error: what was written still goes to disk
                    with contextlib.suppress(CNIError):
                        self.sync()
                    self._unsynced = False
                if noted is not None:
                    self._note_dir_state(fd, noted)
                self._lock_depth, self._lock_fd = 0, None
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def _acquire(self, fd: int, path: str) -> None:
        deadline = time.monotonic() + self.lock_timeout
        # Poll often: a lock is held for a few ms, and a waiter that backs off to
        # 50 ms sleeps through many hand-overs (it halved a 40-pod burst's throughput).
        delay = 0.001
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise CNIError(
                        Code.TRY_AGAIN_LATER,
                        f"timed out after {self.lock_timeout:g}s waiting for the IPAM lock {path}",
                        "another cni-ipam holds it; retry",
                    ) from None
                time.sleep(delay)
                delay = min(delay * 2, 0.002)

    # -- records nobody indexed (host-local's) ------------------------------------
    def _index_unindexed(self, lock_fd: int) -> Optional[str]:
        """Add every record missing from its owner's index there; return the directory
        state the lock file notes, or None when something could not be read or written
        (the next caller tries again).

        Every writer, host-local included, holds the lock, and cni-ipam notes the
        directory's mtime in the lock file as it lets go: the same mtime at the next
        acquire means nobody else wrote, so the directory is read only after host-local
        (or a cni-ipam killed mid-call) changed it. Best effort: the verb itself still
        meets and reports any unreadable file it needs.
        """
        try:
            state = _dir_state(self.dir)
            if os.pread(lock_fd, 64, 0).decode("ascii", "replace").strip() == state:
                return state
            names = sorted(os.listdir(self.dir))
        except OSError:
            return None
        complete = True
        index: dict[Owner, list[IPAddress]] = {}
        grown: set[Owner] = set()
        for name in names:
            ip = _parse_ip(name)
            if ip is None:
                continue
            try:
                data = self._read(os.path.join(self.dir, name))
                if data is None:
                    continue
                record = self._decode(ip, data)
                if record.damaged:
                    continue
                if record.owner not in index:
                    index[record.owner] = self.owned_by(record.owner)
                held = index[record.owner]
                if ip not in held:
                    held.append(ip)
                    grown.add(record.owner)
            except CNIError:
                complete = False
        for owner in sorted(grown):
            try:
                self.set_owned(owner, index[owner])
            except CNIError:
                complete = False
        return state if complete and _write_note(lock_fd, state) else None

    def _note_dir_state(self, lock_fd: int, noted: str) -> None:
        """On letting go: note the changes this holder made, so the next one skips the scan."""
        try:
            state = _dir_state(self.dir)
        except OSError:
            return
        if state != noted:
            _write_note(lock_fd, state)

    # -- reservations ----------------------------------------------------------
    def _ip_path(self, ip: IPAddress) -> str:
        return os.path.join(self.dir, str(ip))

    def _read(self, path: str) -> Optional[bytes]:
        try:
            with open(path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None
        except IsADirectoryError:
            return b""  # a foreign directory with a store name: read as a damaged record
        except OSError as exc:
            raise io_error("read", path, exc) from None

    def get(self, ip: IPAddress) -> Optional[Reservation]:
        data = self._read(self._ip_path(ip))
        return None if data is None else self._decode(ip, data)

    def _decode(self, ip: IPAddress, data: bytes) -> Reservation:
        try:
            record = json.loads(data)
            return Reservation(
                ip=ip,
                container_id=str(record["containerID"]),
                ifname=str(record["ifname"]),
                boot_id=str(record.get("boot", "")),
                created=float(record.get("created", 0.0)),
                netns=str(record.get("netns", "")),
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            pass
        # host-local's format: "<cid>\r\n<ifname>" (so a migrated dataDir still reads).
        text = data.decode("utf-8", "replace")
        cid, sep, ifname = text.partition("\r\n")
        if sep and cid.strip() and "\n" not in ifname:
            return Reservation(ip=ip, container_id=cid.strip(), ifname=ifname.strip())
        # An older host-local's: the container ID alone. Its owner is (cid, ""): it names
        # no ifname, and the allocator treats it as host-local does (any ifname of the cid).
        if not sep and _CONTAINER_ID.match(text.strip()):
            return Reservation(ip=ip, container_id=text.strip(), ifname="")
        log.warning("reservation file for %s in %s is damaged; the address stays blocked", ip, self.dir)
        return Reservation(ip=ip, container_id="", ifname="", damaged=True)

    def put(self, reservation: Reservation) -> None:
        record = {
            "containerID": reservation.container_id,
            "ifname": reservation.ifname,
            "boot": reservation.boot_id,
            "created": reservation.created,
        }
        if reservation.netns:
            record["netns"] = reservation.netns
        # Under the lock the directory fsync waits for sync(): one for all of an ADD's IP
        # files (dual-stack writes two). The owner record is synced at once instead, so it
        # is on disk before any IP file it names, as the allocator's intent-first order needs.
        deferred = self._lock_depth > 0
        write_atomic(self._ip_path(reservation.ip), json.dumps(record).encode(), sync_dir=not deferred)
        self._unsynced = self._unsynced or deferred

    def sync(self) -> None:
        """Make the IP files put since the last sync durable: one fsync of their directory."""
        if not self._unsynced:
            return
        try:
            fsync_dir(self.dir)
        except OSError as exc:
            raise io_error("sync", self.dir, exc) from None
        self._unsynced = False

    def delete(self, ip: IPAddress) -> None:
        self._unlink(self._ip_path(ip))

    def _unlink(self, path: str) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise io_error("remove", path, exc) from None

    def reservations(self) -> Iterator[Reservation]:
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise io_error("list", self.dir, exc) from None
        for name in sorted(names):
            ip = _parse_ip(name)
            if ip is None:
                continue  # lock, last_reserved_ip.*, owners/, temp or foreign files
            data = self._read(os.path.join(self.dir, name))
            if data is not None:
                yield self._decode(ip, data)

    def sweep_temp_files(self) -> list[str]:
        """Remove temp files a killed writer left; call with the lock held (every writer holds it)."""
        removed = []
        for directory in (self.dir, self.owners_dir):
            try:
                names = os.listdir(directory)
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise io_error("list", directory, exc) from None
            for name in names:
                if name.startswith(_TMP_PREFIX):
                    self._unlink(os.path.join(directory, name))
                    removed.append(os.path.join(directory, name))
        return removed

    # -- round-robin cursor ----------------------------------------------------
    def last_reserved(self, set_index: int) -> Optional[IPAddress]:
        data = self._read(os.path.join(self.dir, f"{LAST_PREFIX}{set_index}"))
        return _parse_ip(data.decode("ascii", "replace").strip()) if data else None

    def set_last_reserved(self, set_index: int, ip: IPAddress) -> None:
        # Only where the round-robin search starts, so overwritten in place: a temp file
        # renamed over it made ext4 start writing it back (auto_da_alloc), ~0.3 ms an ADD.
        # A torn or lost cursor (a kill, a power cut) only moves where the next search starts.
        write_hint(os.path.join(self.dir, f"{LAST_PREFIX}{set_index}"), str(ip).encode())

    # -- owner index ------------------------------------------------------------
    def _owner_path(self, owner: Owner) -> str:
        # Container IDs and ifnames can never contain ':' or '/', so the name is unique.
        return os.path.join(self.owners_dir, f"{owner[0]}:{owner[1]}")

    def owned_by(self, owner: Owner) -> list[IPAddress]:
        data = self._read(self._owner_path(owner))
        if data is None:
            return []
        try:
            return [ip for ip in map(_parse_ip, json.loads(data)) if ip is not None]
        except (ValueError, TypeError):
            log.warning("owner record %s is damaged; ignoring it", self._owner_path(owner))
            return []

    def set_owned(self, owner: Owner, ips: list[IPAddress]) -> None:
        path = self._owner_path(owner)
        if ips:
            write_atomic(path, json.dumps([str(ip) for ip in ips]).encode())
        else:
            self._unlink(path)

    def owners(self) -> list[Owner]:
        try:
            names = os.listdir(self.owners_dir)
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise io_error("list", self.owners_dir, exc) from None
        found = []
        for name in names:
            cid, sep, ifname = name.partition(":")
            if sep and not name.startswith(_TMP_PREFIX):
                found.append((cid, ifname))
        return found
