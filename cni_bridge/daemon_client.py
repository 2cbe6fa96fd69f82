"""The exec'd plugin's side of the node daemon: forward one CNI call over a unix socket.

Standard library only, and only its cheapest parts: `_socket` (the C module;
`socket` would cost ~4 ms of enum building per exec), `binascii`, `json`.
Nothing here imports pydantic, pyroute2 or the plugin code: when the daemon
answers, the exec'd process never pays for them.

Wire format (both directions): a 4-byte big-endian length, then that many
bytes of UTF-8 JSON.

    request   {"v": 1, "env": {"CNI_COMMAND": ..., ...}, "stdin": "<base64 of stdin>",
               "netns": "<dev>:<inode> of the plugin's network namespace"}
    response  {"v": 1, "stdout": "...", "stderr": "...", "exit": 0}
          or  {"v": 1, "refused": "<reason>"}     (the daemon did not run the call)

`forward()` says what happened, so the caller can fall back to in-process
execution: UNAVAILABLE (nothing ran: no socket, refused, too big, ...) or LOST
(the request was handed over and the daemon closed the connection without an
answer: its worker died, part of the call may be done, none of it will go on).
TIMED_OUT is the one case where the caller must not redo the call: no answer
came within ANSWER_TIMEOUT and the daemon may still be running it. The client
closes the connection (the daemon then stops or undoes the call) and reports
CNI error 11, so the runtime retries through its own DEL/ADD.
"""
from __future__ import annotations

import binascii
import json
import os
import time

import _socket

VERSION = 1
DEFAULT_SOCKET = "/run/cni-bridge/daemon.sock"
CONFIG_KEY = "daemonSocket"
ENV_PREFIX = "CNI_"               # the only environment a request carries
MAX_REQUEST_BYTES = 1 << 20       # the daemon refuses anything larger
MAX_RESPONSE_BYTES = 16 << 20
CONNECT_TIMEOUT = 10.0            # connect + send; a full backlog means an overloaded daemon
# Below kubelet's default runtime-request-timeout (120 s), so the plugin answers
# before the runtime gives up on it; above the daemon's own hard limit (its
# --request-timeout is capped so), so the daemon's answer or its worker's death
# comes first.
ANSWER_TIMEOUT = 100.0
REFUSAL_READ_TIMEOUT = 0.5       # a refusal is written before the close, so it is already there

ANSWERED, UNAVAILABLE, LOST, TIMED_OUT = "answered", "unavailable", "lost", "timed-out"
NETNS_PATH = "/proc/thread-self/ns/net"


class Reply:
    __slots__ = ("state", "stdout", "stderr", "exit", "reason")

    def __init__(self, state: str, stdout: str = "", stderr: str = "", exit: int = 0,
                 reason: str = "") -> None:
        self.state, self.stdout, self.stderr, self.exit, self.reason = state, stdout, stderr, exit, reason

    def __repr__(self) -> str:
        return f"Reply({self.state!r}, exit={self.exit}, reason={self.reason!r})"


def socket_path(config: object) -> str | None:
    """The daemon socket this config asks for: `daemonSocket`, else the default if it exists.

    `"daemonSocket": ""` turns the daemon off for this network. A value that is
    not a string is left to the in-process config validation to report.
    """
    if not isinstance(config, dict):
        return None
    path = config.get(CONFIG_KEY)
    if path is None:
        return DEFAULT_SOCKET if os.path.exists(DEFAULT_SOCKET) else None
    return path if isinstance(path, str) and path else None


def trusted_socket(path: str) -> bool:
    """A socket owned by root (or by us): never hand a CNI call to anyone else's listener."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    return (st.st_mode & 0o170000) == 0o140000 and st.st_uid in (0, os.geteuid())


def netns_id() -> str | None:
    """Identity of the calling thread's network namespace; the daemon runs calls only from its own."""
    try:
        st = os.stat(NETNS_PATH)
    except OSError:
        return None
    return f"{st.st_dev}:{st.st_ino}"


def encode_request(env: dict, stdin: bytes) -> bytes:
    request = {
        "v": VERSION,
        "env": {k: v for k, v in env.items() if k.startswith(ENV_PREFIX)},
        "stdin": binascii.b2a_base64(stdin, newline=False).decode("ascii"),
    }
    netns = netns_id()
    if netns is not None:
        request["netns"] = netns
    body = json.dumps(request).encode()
    return len(body).to_bytes(4, "big") + body


def recv_exact(sock, count: int, deadline: float | None = None) -> bytes:
    """`count` bytes; with `deadline` (time.monotonic()), all of them by then, however they trickle in."""
    chunks, left = [], count
    while left:
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{left} of {count} bytes did not arrive in time")
            sock.settimeout(remaining)
        chunk = sock.recv(min(left, 1 << 16))
        if not chunk:
            raise EOFError(f"connection closed with {left} of {count} bytes missing")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def recv_frame(sock, limit: int) -> bytes:
    size = int.from_bytes(recv_exact(sock, 4), "big")
    if size > limit:
        raise ValueError(f"frame of {size} bytes exceeds the limit of {limit}")
    return recv_exact(sock, size)


def decode_reply(data: bytes) -> Reply:
    try:
        msg = json.loads(data)
    except ValueError:
        return Reply(LOST, reason="the daemon's answer is not JSON")
    if not isinstance(msg, dict):
        return Reply(LOST, reason="the daemon's answer is not a JSON object")
    if isinstance(msg.get("refused"), str):
        return Reply(UNAVAILABLE, reason=f"refused: {msg['refused']}")
    out, err, code = msg.get("stdout"), msg.get("stderr", ""), msg.get("exit")
    if isinstance(out, str) and isinstance(err, str) and type(code) is int:
        return Reply(ANSWERED, out, err, code)
    return Reply(LOST, reason="the daemon's answer lacks stdout or exit")


def _refusal_left_behind(sock) -> str | None:
    """The reason a daemon gave before closing on a request it would not read.

    A daemon that refuses a peer (wrong uid, oversized request) answers and
    closes at once, so the client's send can break with EPIPE while the
    refusal still waits unread in the socket.
    """
    try:
        sock.settimeout(REFUSAL_READ_TIMEOUT)
        reply = decode_reply(recv_frame(sock, MAX_RESPONSE_BYTES))
    except (OSError, EOFError, ValueError):
        return None
    return reply.reason if reply.state == UNAVAILABLE and reply.reason.startswith("refused") else None


def forward(env, stdin: bytes, config: object = None) -> Reply:
    """Hand one CNI call to the daemon named by the config; never raises.

    `config` is the decoded stdin when the caller already has it.
    """
    if config is None:
        try:
            config = json.loads(stdin)
        except (ValueError, UnicodeDecodeError, RecursionError):   # the runner reports it (code 6)
            return Reply(UNAVAILABLE, reason="stdin is not JSON")
    path = socket_path(config)
    if path is None:
        return Reply(UNAVAILABLE, reason="no daemon socket configured or present")
    if not trusted_socket(path):
        return Reply(UNAVAILABLE, reason=f"{path} is not a socket owned by root")
    frame = encode_request(env, stdin)
    if len(frame) - 4 > MAX_REQUEST_BYTES:
        return Reply(UNAVAILABLE, reason="request too large for the daemon")
    try:
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    except OSError as exc:
        return Reply(UNAVAILABLE, reason=f"socket: {exc}")
    try:
        try:
            sock.settimeout(CONNECT_TIMEOUT)
            sock.connect(path)
            sock.sendall(frame)
        except OSError as exc:
            # Not all of the request reached the daemon, so it cannot have run it.
            return Reply(UNAVAILABLE, reason=_refusal_left_behind(sock) or f"connect/send: {exc}")
        try:
            sock.settimeout(ANSWER_TIMEOUT)
            data = recv_frame(sock, MAX_RESPONSE_BYTES)
        except TimeoutError:
            return Reply(TIMED_OUT, reason=f"no answer within {ANSWER_TIMEOUT:g}s")
        except (OSError, EOFError, ValueError) as exc:
            return Reply(LOST, reason=f"no answer: {exc}")
        return decode_reply(data)
    finally:
        sock.close()
