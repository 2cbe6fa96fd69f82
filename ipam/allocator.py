"""Allocation policy over a Store: one address per range set, round-robin.

Pure policy: no files, no clock, no boot ID of its own; all come in as
arguments so tests drive it with a MemoryStore.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

from cni_bridge.faults import point
from cni_bridge.protocol.errors import CNIError, Code
from cni_bridge.protocol.result import IPAddress

from .config import Range, RangeSet
from .store import Owner, Reservation, Store


@dataclass
class RangeUsage:
    set_index: int
    range: Range
    size: int               # addresses ADD may hand out (the gateway excluded)
    used: int = 0           # held in this boot (or by host-local, which records no boot)
    reclaimable: int = 0    # held by an earlier boot's reservation: ADD takes it when needed

    @property
    def free(self) -> int:
        return self.size - self.used


@dataclass(frozen=True)
class Allocation:
    ip: IPAddress
    range: Range


class Allocator:
    def __init__(self, store: Store, range_sets: Sequence[RangeSet], boot_id: str, now: float) -> None:
        self.store = store
        self.range_sets = list(range_sets)
        self.boot_id = boot_id
        self.now = now

    # -- ADD ---------------------------------------------------------------
    def allocate(self, owner: Owner, requested: Sequence[IPAddress] = (), netns: str = "") -> list[Allocation]:
        """Reserve one address per range set for `owner`; repeat calls return the same ones.

        `netns` is recorded with each reservation so `cni-ipam check` can tell
        when the container's namespace is gone. A failed write undoes the others.
        """
        wanted = self._requested_per_set(requested)
        with self.store.locked():
            point("ipam.add.locked")
            held = self.store.owned_by(owner)
            chosen: list[Allocation] = []
            for index, range_set in enumerate(self.range_sets):
                chosen.append(self._choose(index, range_set, owner, held, wanted.get(index)))
            new = [a.ip for a in chosen]
            # A repeated ADD may move to other addresses (another requested IP, changed
            # ranges); it frees the ones it leaves, but only after the new ones are written.
            stale = [ip for ip in held if ip not in new]
            # Intent first: the owner index names the new IPs before their files exist, and
            # keeps the stale ones until they are gone, so a crash anywhere in between is
            # repaired by the retry (which frees the stale ones) or by DEL (which frees all).
            self.store.set_owned(owner, new + stale)
            point("ipam.add.owner-recorded")
            try:
                for index, alloc in enumerate(chosen):
                    self.store.put(Reservation(alloc.ip, owner[0], owner[1], self.boot_id, self.now, netns=netns))
                    point("ipam.add.ip-written")
                    self.store.set_last_reserved(index, alloc.ip)
                self.store.sync()   # the new IP files are on disk before the ADD reports them
            except CNIError:
                self._undo_allocate(owner, held, chosen)
                raise
            if stale:
                with contextlib.suppress(CNIError):
                    for ip in stale:
                        current = self.store.get(ip)
                        if current is not None and current.owner == owner:
                            self.store.delete(ip)
                    self.store.set_owned(owner, new)
            point("ipam.add.cursor-written")
            return chosen

    def _undo_allocate(self, owner: Owner, held: list[IPAddress], chosen: list[Allocation]) -> None:
        """Best effort after a failed write (full or read-only disk): leave the store as it was."""
        for alloc in chosen:
            if alloc.ip in held:
                continue
            with contextlib.suppress(CNIError):
                current = self.store.get(alloc.ip)
                if current is not None and current.owner == owner:
                    self.store.delete(alloc.ip)
        with contextlib.suppress(CNIError):
            self.store.set_owned(owner, held)

    def _requested_per_set(self, requested: Sequence[IPAddress]) -> dict[int, IPAddress]:
        wanted: dict[int, IPAddress] = {}
        for ip in requested:
            index = self._set_of(ip)
            if index is None:
                raise CNIError(
                    Code.ADDRESS_UNAVAILABLE,
                    f"requested IP {ip} is not inside any configured range",
                    "request an address inside one of the ipam ranges",
                )
            if index in wanted:
                raise CNIError(
                    Code.ADDRESS_UNAVAILABLE,
                    f"requested IPs {wanted[index]} and {ip} fall in the same range set",
                    "one address is assigned per range set",
                )
            wanted[index] = ip
        return wanted

    def _set_of(self, ip: IPAddress) -> Optional[int]:
        for index, range_set in enumerate(self.range_sets):
            if any(r.contains(ip) for r in range_set):
                return index
        return None

    def _choose(self, index: int, range_set: RangeSet, owner: Owner,
                held: list[IPAddress], requested: Optional[IPAddress]) -> Allocation:
        mine = [ip for ip in held if any(r.contains(ip) for r in range_set)]
        for ip in mine:
            current = self.store.get(ip)
            if (current is None or current.owner == owner) and (requested is None or ip == requested):
                return Allocation(ip, self._range_of(range_set, ip))
        if requested is not None:
            if requested == self._range_of(range_set, requested).gateway_ip:
                raise CNIError(Code.ADDRESS_UNAVAILABLE, f"requested IP {requested} is the subnet's gateway",
                               "the gateway address belongs to the bridge; request another address")
            if not self._is_free(requested, owner):
                raise CNIError(
                    Code.ADDRESS_UNAVAILABLE,
                    f"requested IP {requested} is already reserved by another container",
                )
            return Allocation(requested, self._range_of(range_set, requested))
        # A never-used address first; an earlier boot's reservation only when none is left.
        for reclaim in (False, True):
            for rng, ip in self._round_robin(index, range_set):
                if ip != rng.gateway_ip and self._is_free(ip, owner, reclaim):
                    return Allocation(ip, rng)
        raise CNIError(
            Code.RANGE_EXHAUSTED,
            f"no IP addresses available in range set {', '.join(r.subnet for r in range_set)}",
            "every address is reserved; free some (cni-ipam list / gc) or widen the range",
        )

    def _is_free(self, ip: IPAddress, owner: Owner, reclaim: bool = True) -> bool:
        current = self.store.get(ip)
        if current is None or current.owner == owner:
            return True
        return reclaim and self._reclaimable(current)

    def _reclaimable(self, reservation: Reservation) -> bool:
        # Reclaim only what an earlier boot left: its netns cannot exist any more.
        return bool(self.boot_id and reservation.boot_id and not reservation.damaged
                    and reservation.boot_id != self.boot_id)

    @staticmethod
    def _range_of(range_set: RangeSet, ip: IPAddress) -> Range:
        return next(r for r in range_set if r.contains(ip))

    def _round_robin(self, index: int, range_set: RangeSet) -> Iterator[tuple[Range, IPAddress]]:
        """Every address of the set once, starting just after the last one handed out."""
        last = self.store.last_reserved(index)
        start_range = 0
        start_ip: Optional[IPAddress] = None
        if last is not None:
            for pos, rng in enumerate(range_set):
                if rng.contains(last):
                    start_range, start_ip = pos, last
                    break
        count = len(range_set)
        for step in range(count + 1):
            rng = range_set[(start_range + step) % count]
            if step == 0 and start_ip is not None:
                if start_ip < rng.end:
                    yield from ((rng, ip) for ip in rng.addresses_from(start_ip + 1))
            elif step == count:
                # Wrapped back to the first range: cover its head up to `last`.
                if start_ip is not None:
                    for ip in rng.addresses_from(rng.start):
                        if ip > start_ip:
                            break
                        yield rng, ip
            else:
                yield from ((rng, ip) for ip in rng.addresses_from(rng.start))

    # -- DEL / CHECK / GC ----------------------------------------------------
    def release(self, owner: Owner) -> list[IPAddress]:
        """Free what `owner` holds; a reservation reclaimed by someone else is left alone.

        With nothing held, the container's records from an older host-local (which name
        no ifname) are freed instead, as host-local's own DEL does.
        """
        with self.store.locked():
            point("ipam.del.locked")
            released = self._release(owner)
            if not released and owner[1]:
                released = self._release(_legacy(owner))
            point("ipam.del.owner-removed")
            return released

    def _release(self, owner: Owner) -> list[IPAddress]:
        released = []
        for ip in self.store.owned_by(owner):
            current = self.store.get(ip)
            if current is not None and current.owner == owner:
                self.store.delete(ip)
                released.append(ip)
                point("ipam.del.ip-removed")
        self.store.set_owned(owner, [])
        return released

    def held_by(self, owner: Owner) -> list[IPAddress]:
        """What `owner` holds (failing that, its container's legacy host-local records)."""
        with self.store.locked():
            for who in (owner, _legacy(owner)):
                held = [ip for ip in self.store.owned_by(who)
                        if (r := self.store.get(ip)) is not None and r.owner == who]
                if held:
                    return held
            return []

    def gc(self, live: set[Owner]) -> list[Reservation]:
        """Drop every reservation in this config's ranges whose owner is not in `live`.

        Addresses outside the ranges are left alone: another config with the same network
        name (and dataDir) but other subnets shares this store, and `live` lists only its
        own attachments. Owner records lose only the addresses dropped here or no longer held.
        """
        live_cids = {cid for cid, _ in live}

        def alive(owner: Owner) -> bool:
            # a legacy host-local record (no ifname) lives while any attachment of its container does
            return owner in live or (not owner[1] and owner[0] in live_cids)

        with self.store.locked():
            dropped = [r for r in self.store.reservations()
                       if not r.damaged and not alive(r.owner) and self._set_of(r.ip) is not None]
            for reservation in dropped:
                self.store.delete(reservation.ip)
            for owner in self.store.owners():
                if alive(owner):
                    continue
                held = self.store.owned_by(owner)
                kept = [ip for ip in held if self._set_of(ip) is None
                        and (r := self.store.get(ip)) is not None and r.owner == owner]
                if kept != held or not kept:   # (a damaged record reads as empty)
                    self.store.set_owned(owner, kept)
            return dropped

    def free_count(self, index: int) -> int:
        """How many addresses of a range set ADD could hand out (gateway excluded): an earlier
        boot's reservation counts as free, since ADD reclaims it when nothing else is left."""
        return sum(u.free for u in self.usage() if u.set_index == index)

    def usage(self) -> list["RangeUsage"]:
        """Per range of every set: addresses ADD can hand out, held, and held by an earlier
        boot (counted as free: ADD reclaims them). Reads the store once; takes no lock."""
        per_range: dict[tuple[int, int], RangeUsage] = {}
        gateways: dict[int, set[IPAddress]] = {}
        for index, range_set in enumerate(self.range_sets):
            gateways[index] = {r.gateway_ip for r in range_set if r.contains(r.gateway_ip)}
            for position, rng in enumerate(range_set):
                inside = sum(1 for gw in gateways[index] if rng.contains(gw))
                per_range[(index, position)] = RangeUsage(index, rng, rng.size() - inside)
        for reservation in self.store.reservations():
            index = self._set_of(reservation.ip)
            if index is None or reservation.ip in gateways[index]:
                continue
            position = next(p for p, r in enumerate(self.range_sets[index]) if r.contains(reservation.ip))
            usage = per_range[(index, position)]
            if self._reclaimable(reservation):
                usage.reclaimable += 1
            else:
                usage.used += 1
        return list(per_range.values())


def _legacy(owner: Owner) -> Owner:
    """The owner an older host-local's id-only record reads as (see FileStore._decode)."""
    return (owner[0], "")
