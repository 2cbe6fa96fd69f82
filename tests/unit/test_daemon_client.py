"""The exec'd plugin's daemon client: socket choice, wire format, outcomes, and its lean imports."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from cni_bridge import daemon_client as wire

REPO = Path(__file__).resolve().parents[2]
ENV = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_NETNS": "/var/run/netns/x",
       "CNI_IFNAME": "eth0", "CNI_PATH": "/opt/cni/bin"}


# -- which socket ---------------------------------------------------------------------

def test_socket_from_config():
    assert wire.socket_path({"daemonSocket": "/run/x.sock"}) == "/run/x.sock"


def test_empty_daemon_socket_turns_the_daemon_off(monkeypatch, tmp_path):
    default = tmp_path / "default.sock"
    default.touch()
    monkeypatch.setattr(wire, "DEFAULT_SOCKET", str(default))
    assert wire.socket_path({"daemonSocket": ""}) is None


def test_non_string_is_left_to_config_validation():
    assert wire.socket_path({"daemonSocket": 5}) is None
    assert wire.socket_path(["not", "a", "dict"]) is None


def test_default_socket_only_when_present(monkeypatch, tmp_path):
    default = tmp_path / "daemon.sock"
    monkeypatch.setattr(wire, "DEFAULT_SOCKET", str(default))
    assert wire.socket_path({"name": "n"}) is None
    default.touch()
    assert wire.socket_path({"name": "n"}) == str(default)
    assert wire.socket_path({"name": "n", "daemonSocket": None}) == str(default)


def test_only_a_socket_owned_by_root_or_us_is_trusted(tmp_path):
    plain = tmp_path / "plain"
    plain.touch()
    assert not wire.trusted_socket(str(plain))
    assert not wire.trusted_socket(str(tmp_path / "missing"))
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(tmp_path / "s.sock"))
        assert wire.trusted_socket(str(tmp_path / "s.sock"))


# -- wire format ---------------------------------------------------------------------

def test_request_carries_only_cni_variables_and_exact_stdin():
    stdin = b'{"cniVersion": "1.0.0"}\n\xff'
    frame = wire.encode_request({**ENV, "HOME": "/root", "PATH": "/bin"}, stdin)
    size = int.from_bytes(frame[:4], "big")
    assert size == len(frame) - 4
    msg = json.loads(frame[4:])
    assert msg["env"] == ENV
    import binascii
    assert binascii.a2b_base64(msg["stdin"]) == stdin


@pytest.mark.parametrize("answer, state", [
    ({"v": 1, "stdout": "{}\n", "stderr": "", "exit": 0}, wire.ANSWERED),
    ({"v": 1, "refused": "busy"}, wire.UNAVAILABLE),
    ({"v": 1, "stdout": "{}"}, wire.LOST),
    ({"v": 1, "stdout": 3, "exit": 0}, wire.LOST),
    ([1, 2], wire.LOST),
])
def test_decode_reply(answer, state):
    assert wire.decode_reply(json.dumps(answer).encode()).state == state


def test_garbage_reply_is_lost():
    assert wire.decode_reply(b"\x00not json").state == wire.LOST


# -- outcomes against fake servers ------------------------------------------------------

class FakeServer:
    """Accepts one connection, reads one request, then does `behaviour`."""

    def __init__(self, path: Path, behaviour: str) -> None:
        self.path, self.behaviour, self.request = path, behaviour, None
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(1)
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        conn, _ = self.sock.accept()
        with conn:
            if self.behaviour == "refuse-unread":   # as the daemon does with a peer of the wrong uid
                body = json.dumps({"v": 1, "refused": "uid 1000 may not use this daemon"}).encode()
                conn.sendall(len(body).to_bytes(4, "big") + body)
                return
            self.request = json.loads(wire.recv_frame(conn, 1 << 20))
            if self.behaviour == "answer":
                body = json.dumps({"v": 1, "stdout": '{"from": "daemon"}\n', "stderr": "warn\n",
                                   "exit": 0}).encode()
                conn.sendall(len(body).to_bytes(4, "big") + body)
            elif self.behaviour == "half":
                conn.sendall((1000).to_bytes(4, "big") + b"{")
            # "die": close without a word

    def close(self) -> None:
        self.thread.join(10)
        self.sock.close()


def forward_to(path: Path) -> wire.Reply:
    return wire.forward(ENV, json.dumps({"cniVersion": "1.0.0", "daemonSocket": str(path)}).encode())


def test_no_socket_is_unavailable(tmp_path):
    assert forward_to(tmp_path / "missing.sock").state == wire.UNAVAILABLE


def test_nobody_listening_is_unavailable(tmp_path):
    path = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(path))
    assert forward_to(path).state == wire.UNAVAILABLE


def test_stdin_that_is_not_json_is_unavailable():
    assert wire.forward(ENV, b"not json").state == wire.UNAVAILABLE


@pytest.mark.parametrize("behaviour", ["die", "half"])
def test_daemon_gone_after_taking_the_call_is_lost(tmp_path, behaviour):
    server = FakeServer(tmp_path / "d.sock", behaviour)
    try:
        reply = forward_to(server.path)
    finally:
        server.close()
    assert reply.state == wire.LOST
    assert server.request["env"] == ENV


def test_refusal_sent_before_reading_reaches_the_client_despite_the_broken_pipe(tmp_path):
    server = FakeServer(tmp_path / "d.sock", "refuse-unread")
    # Larger than a socket buffer, so the send is still going when the server closes.
    stdin = json.dumps({"cniVersion": "1.0.0", "daemonSocket": str(server.path), "pad": "x" * 600_000})
    try:
        reply = wire.forward(ENV, stdin.encode())
    finally:
        server.close()
    assert reply.state == wire.UNAVAILABLE
    assert reply.reason == "refused: uid 1000 may not use this daemon"


def test_answer_is_passed_through(tmp_path):
    server = FakeServer(tmp_path / "d.sock", "answer")
    try:
        reply = forward_to(server.path)
    finally:
        server.close()
    assert (reply.state, reply.stdout, reply.stderr, reply.exit) == (wire.ANSWERED, '{"from": "daemon"}\n',
                                                                     "warn\n", 0)


# -- the exec'd path stays lean ------------------------------------------------------------

def _imported(stderr: str) -> set[str]:
    return {line.rsplit("|", 1)[1].strip() for line in stderr.splitlines() if line.startswith("import time:")}


def test_client_module_imports_only_the_standard_library():
    code = ("import sys, json; before = set(sys.modules); import cni_bridge.daemon_client; "
            "print(json.dumps(sorted(set(sys.modules) - before)))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    new = set(json.loads(proc.stdout)) - {"cni_bridge", "cni_bridge.daemon_client"}
    assert {m for m in new if m.split(".")[0] not in sys.stdlib_module_names} == set()


def test_exec_path_to_the_daemon_prints_its_answer_and_imports_nothing_heavy(tmp_path):
    server = FakeServer(tmp_path / "d.sock", "answer")
    stdin = json.dumps({"cniVersion": "1.0.0", "name": "n", "type": "cni-bridge",
                        "daemonSocket": str(server.path)})
    try:
        proc = subprocess.run(
            [sys.executable, "-X", "importtime", "-c", "import sys; from cni_bridge.main import main; sys.exit(main())"],
            input=stdin, capture_output=True, text=True, cwd=REPO, env={**ENV, "PATH": os.environ["PATH"]})
    finally:
        server.close()
    assert proc.returncode == 0
    assert proc.stdout == '{"from": "daemon"}\n'
    assert "warn\n" in proc.stderr
    modules = _imported(proc.stderr)
    assert not {m for m in modules if m.split(".")[0] in ("pydantic", "pyroute2", "ipam")}
    assert {m for m in modules if m.startswith("cni_bridge.")} == {"cni_bridge.main", "cni_bridge.daemon_client"}
