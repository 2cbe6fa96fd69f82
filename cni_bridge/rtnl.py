"""A small synchronous rtnetlink client: messages packed with `struct`, one socket,
one request at a time. Part of the netlink adapter layer (`netlink.py` drives it).

Why not pyroute2 here: its request path runs an asyncio loop and builds and decodes
every message through generic descriptor classes, about 0.5 ms of Python per request;
an ADD makes a dozen. The messages a pod attachment needs are few and fixed, and
packing them directly costs microseconds. (The agent's overlay code, which is not on
the per-pod path, still uses pyroute2 for VXLAN, FDB and neighbour entries.)
"""
from __future__ import annotations

import errno
import os
import socket
import struct
from dataclasses import dataclass, field
from typing import Iterator, Optional

# Message types and header flags (linux/rtnetlink.h, linux/netlink.h).
NLMSG_ERROR, NLMSG_DONE = 2, 3
RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK, RTM_SETLINK = 16, 17, 18, 19
RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 20, 21, 22
RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE = 24, 25, 26
F_REQUEST, F_MULTI, F_ACK, F_DUMP_INTR = 0x1, 0x2, 0x4, 0x10
F_DUMP = 0x300
F_REPLACE, F_EXCL, F_CREATE = 0x100, 0x200, 0x400
F_ACK_TLVS = 0x200            # on an error message: extended ack attributes follow
NLA_F_NESTED = 0x8000
NLA_TYPE_MASK = 0x3FFF

# Link attributes (linux/if_link.h).
IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU, IFLA_MASTER = 1, 3, 4, 10
IFLA_PROTINFO, IFLA_LINKINFO, IFLA_NET_NS_FD, IFLA_EXT_MASK = 12, 18, 28, 29
IFLA_INFO_KIND, IFLA_INFO_DATA = 1, 2
VETH_INFO_PEER = 1
IFLA_BRPORT_MODE = 4
RTEXT_FILTER_SKIP_STATS = 1 << 3
IFF_UP, IFF_PROMISC = 0x1, 0x100
AF_BRIDGE = 7

# Address and route attributes (linux/if_addr.h, linux/rtnetlink.h).
IFA_ADDRESS, IFA_LOCAL, IFA_BROADCAST = 1, 2, 4
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_TABLE = 1, 4, 5, 15
RT_TABLE_MAIN = 254
RTN_UNICAST = 1
RT_SCOPE_LINK, RT_SCOPE_NOWHERE = 253, 255

_SOL_NETLINK = 270
_NETLINK_CAP_ACK, _NETLINK_EXT_ACK, _NETLINK_GET_STRICT_CHK = 10, 11, 12
_NLMSGERR_ATTR_MSG = 1

_HEADER = struct.Struct("=IHHII")          # struct nlmsghdr
IFINFO = struct.Struct("=BxHiII")          # struct ifinfomsg
IFADDR = struct.Struct("=BBBBI")           # struct ifaddrmsg
RTMSG = struct.Struct("=BBBBBBBBI")        # struct rtmsg
_ATTR = struct.Struct("=HH")               # struct nlattr
_ERRNO = struct.Struct("=i")
_U32 = struct.Struct("=I")
_BUFFER = 1 << 16


class NetlinkError(OSError):
    """The kernel refused a request: `errno` (and `code`, as pyroute2 names it) is the
    positive errno; the message adds the kernel's extended ack text when it sent one."""

    @property
    def code(self) -> int:
        return self.errno or 0


# -- attributes --------------------------------------------------------------------------

def attr(kind: int, payload: bytes) -> bytes:
    """One attribute, padded to 4 bytes."""
    size = _ATTR.size + len(payload)
    return _ATTR.pack(size, kind) + payload + b"\0" * (-size % 4)


def attr_str(kind: int, value: str) -> bytes:
    return attr(kind, value.encode() + b"\0")


def attr_u32(kind: int, value: int) -> bytes:
    return attr(kind, _U32.pack(value))


def attr_nested(kind: int, *children: bytes) -> bytes:
    return attr(kind | NLA_F_NESTED, b"".join(children))


def each_attr(data: bytes, offset: int = 0, end: Optional[int] = None) -> Iterator[tuple[int, bytes]]:
    """(type with flags masked off, payload) of each attribute in data[offset:end], in order."""
    end = len(data) if end is None else end
    while offset + _ATTR.size <= end:
        size, kind = _ATTR.unpack_from(data, offset)
        if size < _ATTR.size or offset + size > end:
            return
        yield kind & NLA_TYPE_MASK, data[offset + _ATTR.size:offset + size]
        offset += (size + 3) & ~3


def attrs(data: bytes, offset: int = 0, end: Optional[int] = None) -> dict[int, bytes]:
    """The attributes in data[offset:end], by type (flags masked off); the last wins."""
    return dict(each_attr(data, offset, end))


def as_str(payload: Optional[bytes]) -> str:
    return payload.split(b"\0", 1)[0].decode(errors="replace") if payload else ""


def as_u32(payload: Optional[bytes]) -> int:
    return _U32.unpack_from(payload)[0] if payload and len(payload) >= 4 else 0


def as_mac(payload: Optional[bytes]) -> str:
    return ":".join(f"{b:02x}" for b in payload) if payload else ""


def mac_bytes(mac: str) -> bytes:
    return bytes(int(part, 16) for part in mac.split(":"))


# -- the socket ----------------------------------------------------------------------------

@dataclass
class Message:
    kind: int
    flags: int
    body: bytes        # everything after the netlink header


@dataclass
class Socket:
    """One netlink socket (NETLINK_ROUTE unless the caller makes another kind; made by the
    caller, so it can live in another netns).

    Not subscribed to any multicast group: it sees only the answers to its own requests."""
    sock: socket.socket
    _seq: int = 0
    _buffer: bytearray = field(default_factory=lambda: bytearray(_BUFFER))

    def __post_init__(self) -> None:
        for option in (_NETLINK_CAP_ACK, _NETLINK_EXT_ACK, _NETLINK_GET_STRICT_CHK):
            try:
                # CAP_ACK: errors do not echo the request back; EXT_ACK: the kernel says why;
                # STRICT_CHK: dumps filtered by the kernel (addresses by link, routes by table).
                self.sock.setsockopt(_SOL_NETLINK, option, 1)
            except OSError:
                pass   # an older kernel: callers filter dumps themselves anyway

    @classmethod
    def here(cls) -> "Socket":
        return cls(socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, 0))

    def close(self) -> None:
        self.sock.close()

    def request(self, kind: int, body: bytes, flags: int = F_ACK) -> Optional[Message]:
        """Send one request and wait for its answer: the reply message for a GET, None for
        an acknowledged change. A refusal raises NetlinkError."""
        seq = self._send(kind, body, flags)
        for message in self._receive(seq):
            if message.kind == NLMSG_ERROR:
                self._raise_unless_ack(message)
                return None
            if message.kind != NLMSG_DONE:
                return message
        return None

    def dump(self, kind: int, body: bytes) -> list[Message]:
        """Every message of a dump. Retried when the kernel marks it interrupted (the
        table changed while it was being read)."""
        for _ in range(5):
            seq = self._send(kind, body, F_DUMP)
            found, interrupted = [], False
            for message in self._receive(seq):
                interrupted |= bool(message.flags & F_DUMP_INTR)
                if message.kind == NLMSG_ERROR:
                    self._raise_unless_ack(message)
                    break
                if message.kind == NLMSG_DONE:
                    break
                found.append(message)
            if not interrupted:
                return found
        raise OSError(errno.EINTR, "the kernel interrupted the dump five times (the table kept changing)")

    def next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        return self._seq

    def _send(self, kind: int, body: bytes, flags: int) -> int:
        seq = self.next_seq()
        self.sock.send(_HEADER.pack(_HEADER.size + len(body), kind, flags | F_REQUEST, seq, 0) + body)
        return seq

    def _receive(self, seq: int) -> Iterator[Message]:
        """The messages answering request `seq`, until its last one (an answer to an
        earlier request abandoned midway is skipped)."""
        while True:
            size = self.sock.recv_into(self._buffer)
            data = bytes(self._buffer[:size])
            offset = 0
            while offset + _HEADER.size <= size:
                length, kind, flags, msg_seq, _ = _HEADER.unpack_from(data, offset)
                if length < _HEADER.size or offset + length > size:
                    raise OSError(errno.EMSGSIZE, "a truncated netlink message")
                if msg_seq == seq:
                    yield Message(kind, flags, data[offset + _HEADER.size:offset + length])
                    if kind in (NLMSG_ERROR, NLMSG_DONE) or not flags & F_MULTI:
                        return
                offset += (length + 3) & ~3

    @staticmethod
    def _raise_unless_ack(message: Message) -> None:
        refusal = refusal_in(message.flags, message.body)
        if refusal is not None:
            raise refusal


def refusal_in(flags: int, body: bytes) -> Optional[NetlinkError]:
    """The refusal an NLMSG_ERROR message (its header flags and body) carries; None for an ACK."""
    (error,) = _ERRNO.unpack_from(body)
    if error == 0:
        return None
    code = -error
    text = os.strerror(code)
    if flags & F_ACK_TLVS:
        # After the error code, the request's header (its payload is not echoed: CAP_ACK).
        said = as_str(attrs(body, _ERRNO.size + _HEADER.size).get(_NLMSGERR_ATTR_MSG))
        if said:
            text = f"{text}: {said}"
    return NetlinkError(code, text)


# -- message bodies ------------------------------------------------------------------------

def ifinfo(index: int = 0, flags: int = 0, change: int = 0, family: int = 0) -> bytes:
    return IFINFO.pack(family, 0, index, flags, change)


@dataclass(frozen=True)
class AddressMessage:
    family: int
    prefixlen: int
    index: int
    address: bytes


def parse_address(message: Message) -> AddressMessage:
    family, prefixlen, _flags, _scope, index = IFADDR.unpack_from(message.body)
    found = attrs(message.body, IFADDR.size)
    # IFA_LOCAL is the interface's own address; IFA_ADDRESS is the peer's on a
    # point-to-point link, and the only one IPv6 sends.
    return AddressMessage(family, prefixlen, index, found.get(IFA_LOCAL) or found.get(IFA_ADDRESS) or b"")


@dataclass(frozen=True)
class RouteMessage:
    family: int
    dst_len: int
    table: int
    protocol: int
    kind: int
    dst: Optional[bytes]
    gateway: Optional[bytes]
    oif: int


def parse_route(message: Message) -> RouteMessage:
    family, dst_len, _src_len, _tos, table, protocol, _scope, kind, _flags = RTMSG.unpack_from(message.body)
    found = attrs(message.body, RTMSG.size)
    if RTA_TABLE in found:
        table = as_u32(found[RTA_TABLE])
    return RouteMessage(family, dst_len, table, protocol, kind, found.get(RTA_DST), found.get(RTA_GATEWAY),
                        as_u32(found.get(RTA_OIF)))
