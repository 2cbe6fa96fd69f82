"""The reservation store interface, and an in-memory store for tests and tools.

The allocator (policy) talks only to this interface; `filestore.FileStore` is
the on-disk implementation.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import ContextManager, Iterator, Optional, Protocol

from cni_bridge.protocol.result import IPAddress

Owner = tuple[str, str]  # (container ID, ifname)


@dataclass(frozen=True)
class Reservation:
    ip: IPAddress
    container_id: str
    ifname: str
    boot_id: str = ""
    created: float = 0.0
    # True when the record on disk could not be read; it still blocks the IP.
    damaged: bool = False
    # CNI_NETNS at ADD time ("" when unknown), for operator leak checks.
    netns: str = ""

    @property
    def owner(self) -> Owner:
        return (self.container_id, self.ifname)


class Store(Protocol):
    def locked(self) -> ContextManager[None]: ...
    def get(self, ip: IPAddress) -> Optional[Reservation]: ...
    def put(self, reservation: Reservation) -> None: ...
    def sync(self) -> None: ...   # every put so far is durable when it returns
    def delete(self, ip: IPAddress) -> None: ...
    def last_reserved(self, set_index: int) -> Optional[IPAddress]: ...
    def set_last_reserved(self, set_index: int, ip: IPAddress) -> None: ...
    def owned_by(self, owner: Owner) -> list[IPAddress]: ...
    def set_owned(self, owner: Owner, ips: list[IPAddress]) -> None: ...
    def owners(self) -> list[Owner]: ...
    def reservations(self) -> Iterator[Reservation]: ...


class MemoryStore:
    """Dict-backed store with the same semantics as the file store."""

    def __init__(self) -> None:
        self.by_ip: dict[IPAddress, Reservation] = {}
        self.last: dict[int, IPAddress] = {}
        self.index: dict[Owner, list[IPAddress]] = {}

    def locked(self) -> ContextManager[None]:
        return contextlib.nullcontext()

    def get(self, ip: IPAddress) -> Optional[Reservation]:
        return self.by_ip.get(ip)

    def put(self, reservation: Reservation) -> None:
        self.by_ip[reservation.ip] = reservation

    def sync(self) -> None:
        pass

    def delete(self, ip: IPAddress) -> None:
        self.by_ip.pop(ip, None)

    def last_reserved(self, set_index: int) -> Optional[IPAddress]:
        return self.last.get(set_index)

    def set_last_reserved(self, set_index: int, ip: IPAddress) -> None:
        self.last[set_index] = ip

    def owned_by(self, owner: Owner) -> list[IPAddress]:
        return list(self.index.get(owner, []))

    def set_owned(self, owner: Owner, ips: list[IPAddress]) -> None:
        if ips:
            self.index[owner] = list(ips)
        else:
            self.index.pop(owner, None)

    def owners(self) -> list[Owner]:
        return list(self.index)

    def reservations(self) -> Iterator[Reservation]:
        return iter(list(self.by_ip.values()))
