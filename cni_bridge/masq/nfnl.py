"""Set elements through nf_tables netlink (NETLINK_NETFILTER), without an `nft` process.

The nftables backend's per-pod steps are one element added on ADD and one deleted
on DEL. Run through `nft`, each costs a process start, nft's own cache reads and,
on DEL, ~13 ms of the kernel releasing nft's netlink socket. Here they are one
batch on a socket this process keeps (per process and network namespace):

    NFNL_MSG_BATCH_BEGIN
    NFT_MSG_NEWSETELEM / NFT_MSG_DELSETELEM   table, set, elements [key, userdata]
    NFNL_MSG_BATCH_END

The kernel applies a batch as one transaction, all or nothing, and answers every
message while the send is still in progress. The element comment is the userdata
nftables writes (a type-length-value record, libnftnl's NFTNL_UDATA_SET_ELEM_COMMENT),
so `nft list set` shows it as a comment exactly as if nft had added the element.

The codec (attributes, errors with the kernel's extended ack text) is the rtnetlink
client's: `cni_bridge.rtnl`. Layouts from linux/netfilter/nfnetlink.h and nf_tables.h.
"""
from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
import threading
from typing import Callable, Iterable, Optional, Sequence, TypeVar, Union

from .. import rtnl
from ..rtnl import (F_ACK, F_CREATE, F_EXCL, F_REQUEST, NLMSG_ERROR, NetlinkError, as_str, attr, attr_nested,
                    attr_str, attrs, each_attr, refusal_in)

NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 16, 17           # NLMSG_MIN_TYPE, +1
NFT_MSG_GETRULE = 7
NFT_MSG_NEWSETELEM, NFT_MSG_GETSETELEM, NFT_MSG_DELSETELEM = 12, 13, 14
NFPROTO_UNSPEC, NFPROTO_INET = 0, 1
NFNETLINK_V0 = 0

# enum nft_set_elem_list_attributes, nft_set_elem_attributes, nft_data_attributes, nft_list_attributes
NFTA_SET_ELEM_LIST_TABLE, NFTA_SET_ELEM_LIST_SET, NFTA_SET_ELEM_LIST_ELEMENTS = 1, 2, 3
NFTA_SET_ELEM_KEY, NFTA_SET_ELEM_FLAGS, NFTA_SET_ELEM_USERDATA, NFTA_SET_ELEM_KEY_END = 1, 3, 6, 10
NFT_SET_ELEM_INTERVAL_END = 0x1
NFTA_RULE_TABLE, NFTA_RULE_CHAIN = 1, 2
NFTA_DATA_VALUE = 1
NFTA_LIST_ELEM = 1

# libnftnl udata: records of (u8 type, u8 length, value); a comment is NUL-terminated.
NFTNL_UDATA_SET_ELEM_COMMENT = 0
NFT_USERDATA_MAXLEN = 256

_HEADER = struct.Struct("=IHHII")      # struct nlmsghdr
_NFGEN = struct.Struct("=BBH")         # struct nfgenmsg (res_id is big-endian: packed by hand)

T = TypeVar("T")
Address = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]


class Unexpected(Exception):
    """The kernel's answer did not look like what was asked (missing ACKs, a short
    message): the caller should fall back to `nft` rather than trust it."""


# -- message bodies ----------------------------------------------------------------------------

def _nfgen(family: int, res_id: int = 0) -> bytes:
    return _NFGEN.pack(family, NFNETLINK_V0, socket.htons(res_id))


def comment_udata(comment: str) -> bytes:
    """A comment as nftables stores it in an element's userdata."""
    value = comment.encode() + b"\0"
    if len(value) > 255 or len(value) + 2 > NFT_USERDATA_MAXLEN:
        raise ValueError(f"comment too long for an nftables element: {comment!r}")
    return bytes((NFTNL_UDATA_SET_ELEM_COMMENT, len(value))) + value


def udata_comment(udata: Optional[bytes]) -> str:
    """The comment record of an element's userdata ('' if none)."""
    offset = 0
    while udata and offset + 2 <= len(udata):
        kind, size = udata[offset], udata[offset + 1]
        if kind == NFTNL_UDATA_SET_ELEM_COMMENT:
            return as_str(udata[offset + 2:offset + 2 + size])
        offset += 2 + size
    return ""


def _element(address: Address, comment: Optional[str]) -> bytes:
    parts = [attr_nested(NFTA_SET_ELEM_KEY, attr(NFTA_DATA_VALUE, address.packed))]
    if comment is not None:
        parts.append(attr(NFTA_SET_ELEM_USERDATA, comment_udata(comment)))
    return attr_nested(NFTA_LIST_ELEM, *parts)


def setelem_body(table: str, set_name: str, elements: Iterable[tuple[Address, Optional[str]]]) -> bytes:
    return (_nfgen(NFPROTO_INET) + attr_str(NFTA_SET_ELEM_LIST_TABLE, table)
            + attr_str(NFTA_SET_ELEM_LIST_SET, set_name)
            + attr_nested(NFTA_SET_ELEM_LIST_ELEMENTS, *(_element(a, c) for a, c in elements)))


# One step of a batch: (message type, extra header flags, body).
Step = tuple[int, int, bytes]


def add_step(table: str, set_name: str, elements: Sequence[tuple[Address, str]], exclusive: bool) -> Step:
    """NEWSETELEM: `create element` when exclusive (EEXIST if present), else `add element`."""
    return NFT_MSG_NEWSETELEM, F_CREATE | (F_EXCL if exclusive else 0), setelem_body(table, set_name, elements)


def delete_step(table: str, set_name: str, addresses: Sequence[Address]) -> Step:
    return NFT_MSG_DELSETELEM, 0, setelem_body(table, set_name, ((a, None) for a in addresses))


# -- the socket ----------------------------------------------------------------------------------

class Socket(rtnl.Socket):
    """One NETLINK_NETFILTER socket, on the rtnetlink client's request and dump plumbing;
    `batch` sends one transaction and reads its answers."""

    def __init__(self) -> None:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER)
        sock.bind((0, 0))
        super().__init__(sock)

    def batch(self, steps: Sequence[Step]) -> None:
        """Apply the steps as one transaction. A refusal raises NetlinkError (the first
        failing step's errno and the kernel's text); nothing of the batch is applied."""
        self._drain()   # answers to an abandoned earlier call, if any
        begin = self.next_seq()
        messages = [_HEADER.pack(_HEADER.size + _NFGEN.size, NFNL_MSG_BATCH_BEGIN, F_REQUEST, begin, 0)
                    + _nfgen(NFPROTO_UNSPEC, NFNL_SUBSYS_NFTABLES)]
        waiting: set[int] = set()
        for kind, flags, body in steps:
            seq = self.next_seq()
            waiting.add(seq)
            messages.append(_HEADER.pack(_HEADER.size + len(body), (NFNL_SUBSYS_NFTABLES << 8) | kind,
                                         F_REQUEST | F_ACK | flags, seq, 0) + body)
        end = self.next_seq()
        messages.append(_HEADER.pack(_HEADER.size + _NFGEN.size, NFNL_MSG_BATCH_END, F_REQUEST, end, 0)
                        + _nfgen(NFPROTO_UNSPEC, NFNL_SUBSYS_NFTABLES))
        self.sock.send(b"".join(messages))
        # nfnetlink runs the whole batch inside that send: every answer is queued now.
        # Success: one ACK per step. Failure: an error for the failing step, and the
        # steps before it are answered too (ACKs or, after an abort, nothing more).
        failure: Optional[NetlinkError] = None
        while waiting and failure is None:
            try:
                size = self.sock.recv_into(self._buffer, 0, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            for seq, error in self._errors(bytes(self._buffer[:size])):
                waiting.discard(seq)
                if error is not None and failure is None:
                    failure = error
        if failure is not None:
            self._drain()
            raise failure
        if waiting:
            raise Unexpected(f"nf_tables answered {len(steps) - len(waiting)} of {len(steps)} batch messages")

    def dump_nft(self, kind: int, body: bytes) -> list[bytes]:
        """The bodies (after the nfgenmsg) of every message an nf_tables GET dump answers."""
        return [message.body[_NFGEN.size:] for message in self.dump((NFNL_SUBSYS_NFTABLES << 8) | kind, body)]

    def _drain(self) -> None:
        while True:
            try:
                self.sock.recv_into(self._buffer, 0, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return

    @staticmethod
    def _errors(data: bytes) -> list[tuple[int, Optional[NetlinkError]]]:
        """(seq, None for an ACK or the refusal) of each NLMSG_ERROR in data."""
        found = []
        offset = 0
        while offset + _HEADER.size <= len(data):
            length, kind, flags, seq, _ = _HEADER.unpack_from(data, offset)
            if length < _HEADER.size or offset + length > len(data):
                raise Unexpected("a truncated netlink message")
            if kind == NLMSG_ERROR:
                found.append((seq, refusal_in(flags, data[offset + _HEADER.size:offset + length])))
            offset += (length + 3) & ~3
        return found


# -- reads -----------------------------------------------------------------------------------------

def rule_count(sock: Socket, table: str, chain: str) -> int:
    """How many rules the chain holds (0 when it or its table does not exist)."""
    body = _nfgen(NFPROTO_INET) + attr_str(NFTA_RULE_TABLE, table) + attr_str(NFTA_RULE_CHAIN, chain)
    try:
        return len(sock.dump_nft(NFT_MSG_GETRULE, body))
    except NetlinkError as err:
        if err.errno == errno.ENOENT:
            return 0
        raise


def intervals(sock: Socket, table: str, set_name: str) -> Optional[list[tuple[int, int, int]]]:
    """(key length, first, last) of each address range an interval set holds, adjacent
    ranges merged; None when the set or its table does not exist."""
    body = _nfgen(NFPROTO_INET) + attr_str(NFTA_SET_ELEM_LIST_TABLE, table) + attr_str(NFTA_SET_ELEM_LIST_SET, set_name)
    try:
        replies = sock.dump_nft(NFT_MSG_GETSETELEM, body)
    except NetlinkError as err:
        if err.errno == errno.ENOENT:
            return None
        raise
    points: list[tuple[int, int, int]] = []   # (value, 0 = an end / 1 = a start, key length)
    ranges: list[tuple[int, int, int]] = []
    for reply in replies:
        listed = attrs(reply).get(NFTA_SET_ELEM_LIST_ELEMENTS, b"")
        for element in _each(listed):
            found = attrs(element)
            key = attrs(found.get(NFTA_SET_ELEM_KEY, b"")).get(NFTA_DATA_VALUE)
            if not key:
                continue
            flags = struct.unpack(">I", found[NFTA_SET_ELEM_FLAGS])[0] if NFTA_SET_ELEM_FLAGS in found else 0
            key_end = attrs(found.get(NFTA_SET_ELEM_KEY_END, b"")).get(NFTA_DATA_VALUE)
            value = int.from_bytes(key, "big")
            if key_end:                      # a range in one element (pipapo sets)
                ranges.append((len(key), value, int.from_bytes(key_end, "big")))
            else:                            # rbtree sets: a start and an end element
                points.append((value, 0 if flags & NFT_SET_ELEM_INTERVAL_END else 1, len(key)))
    start: Optional[tuple[int, int]] = None
    for value, is_start, size in sorted(points):
        if is_start and start is None:
            start = (value, size)
        elif not is_start and start is not None:
            ranges.append((size, start[0], value - 1))   # the end element is the first value after
            start = None
    if start is not None:
        ranges.append((start[1], start[0], (1 << (8 * start[1])) - 1))
    merged: list[tuple[int, int, int]] = []
    for size, first, last in sorted(ranges, key=lambda r: (r[0], r[1])):
        if merged and merged[-1][0] == size and first <= merged[-1][2] + 1:
            merged[-1] = (size, merged[-1][1], max(last, merged[-1][2]))
        else:
            merged.append((size, first, last))
    return merged


def _each(nested: bytes) -> Iterable[bytes]:
    """The payloads of a list of attributes (NFTA_LIST_ELEM ...), in order."""
    return (payload for _, payload in each_attr(nested))


# One socket per process, for one network namespace: daemon workers are long-lived
# forks, so keeping it saves the socket's setup and (costly, after a delete) release
# per call. A fork or a setns elsewhere (setns moves only the calling thread) makes a
# new one instead of sharing a parent's socket or talking to the wrong namespace; the
# old one is closed then, so a kept socket pins at most one namespace.
_lock = threading.Lock()
_cached: dict[tuple[int, int, int], Socket] = {}


def _where() -> tuple[int, int, int]:
    st = os.stat("/proc/thread-self/ns/net")
    return os.getpid(), st.st_dev, st.st_ino


def run(steps: Sequence[Step]) -> None:
    """`Socket.batch` on this process's socket for the calling thread's network namespace."""
    use(lambda sock: sock.batch(steps))


def use(call: Callable[[Socket], T]) -> T:
    """call(socket) with this process's socket for the calling thread's network namespace."""
    key = _where()
    with _lock:
        sock = _cached.get(key)
        if sock is None:
            _close_all()
            sock = _cached[key] = Socket()
        try:
            return call(sock)
        except (NetlinkError, Unexpected):
            raise
        except OSError:
            # The socket itself failed (not a refusal): forget it; the next call makes another.
            _cached.pop(key, None)
            sock.close()
            raise


def _close_all() -> None:
    # A parent's socket inherited over fork is closed too: the fd is this process's copy.
    while _cached:
        _cached.popitem()[1].close()


def close() -> None:
    """Close the kept socket (tests; a process that leaves does not need to)."""
    with _lock:
        _close_all()


def present(err: NetlinkError) -> bool:
    return err.errno == errno.EEXIST


def absent(err: NetlinkError) -> bool:
    return err.errno == errno.ENOENT
