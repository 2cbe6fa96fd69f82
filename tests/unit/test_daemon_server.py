"""The node daemon's server side, driven with a fake plugin (no root, no netlink).

Each test forks a real daemon (supervisor + pre-forked workers) on a socket in
tmp_path and talks to it with the real client. The fake plugin's behaviour is
picked by the container ID, so one daemon can crash, hang and answer in turn.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import stat
import threading
import time
from pathlib import Path

import pytest

from cni_bridge import daemon_client as wire
from cni_bridge import faults
from cni_bridge.daemon import Daemon, DaemonError, Options
from cni_bridge.protocol.errors import CNIError, Code
from cni_bridge.protocol.result import Result
from cni_bridge.protocol.runner import run
from tests.support.waiting import unix_socket_listening, wait_for

WAIT = 30.0   # bound for waiting on a state change; never asserted as a duration


def _touch(req, suffix: str = "") -> None:
    marker = req.config.get("marker")
    if marker:
        Path(marker + suffix).touch()


class FakePlugin:
    """ADD behaves according to the container ID; DEL succeeds (and leaves a marker when asked)."""

    def add(self, req):
        cid = req.cmd.container_id
        if cid == "steps":         # a long call that passes a step point every 50 ms
            for _ in range(1200):
                time.sleep(0.05)
                faults.point("add.bridge-ready")
        if cid == "critical":      # a long step with no step point inside: nothing may interrupt it
            _touch(req, ".start")
            time.sleep(2.0)
            _touch(req, ".end")
            faults.point("add.result-ready")
        if cid == "warn":
            logging.getLogger("cni_bridge.plugin").warning("careful with %s", cid)
        if cid == "boom":
            raise RuntimeError("kaboom")
        if cid == "die":
            os._exit(3)            # the worker process dies mid-request
        if cid == "slow":
            time.sleep(60)         # the daemon's time limit stops it
        if cid == "gate":
            gate = Path(req.config["gate"])
            gate.with_suffix(".entered").touch()
            deadline = time.monotonic() + WAIT
            while not gate.exists() and time.monotonic() < deadline:
                time.sleep(0.01)
            if req.config.get("step"):
                faults.point("add.veth-created")
        if cid == "cnierr":
            raise CNIError(Code.INVALID_CONFIG, "fake config problem", "details here")
        _touch(req)
        return Result()

    def delete(self, req):
        _touch(req, ".del")

    def check(self, req):
        return None

    gc = status = check


def fake_execute(env, stdin, stdout, stderr) -> int:
    if env.get("CNI_CONTAINERID") == "env":
        stdout.write(json.dumps(sorted(env)))
        return 0
    if env.get("CNI_CONTAINERID") == "whereami":
        stdout.write(str(os.stat("/proc/thread-self/ns/net").st_ino))
        return 0
    if env.get("CNI_CONTAINERID") == "stray":   # a call that leaves the worker in another netns
        import ctypes

        assert ctypes.CDLL(None, use_errno=True).unshare(0x40000000) == 0
        return 0
    if env.get("CNI_CONTAINERID") == "sysexit":
        raise SystemExit("outside the runner")
    return run(FakePlugin, env, stdin, stdout, stderr)


def env_for(cid: str, command: str = "ADD", **extra: str) -> dict:
    return {"CNI_COMMAND": command, "CNI_CONTAINERID": cid, "CNI_NETNS": "/var/run/netns/none",
            "CNI_IFNAME": "eth0", "CNI_PATH": "/opt/cni/bin", **extra}


class Handle:
    def __init__(self, pid: int, path: Path) -> None:
        self.pid, self.path = pid, path

    def config(self, **extra) -> dict:
        return {"cniVersion": "1.0.0", "name": "fake", "type": "cni-bridge",
                "daemonSocket": str(self.path), **extra}

    def call(self, cid: str, command: str = "ADD", env_extra: dict | None = None, **conf) -> wire.Reply:
        config = self.config(**conf)
        return wire.forward(env_for(cid, command, **(env_extra or {})), json.dumps(config).encode())

    def alive(self) -> bool:
        return os.waitpid(self.pid, os.WNOHANG) == (0, 0)


@pytest.fixture
def start_daemon(tmp_path):
    started: list[int] = []

    def start(execute=fake_execute, **overrides) -> Handle:
        path = tmp_path / "run" / "daemon.sock"
        settings = dict(socket_path=str(path), workers=2, allowed_uids=frozenset({os.geteuid()}))
        settings.update(overrides)
        options = Options(**settings)
        pid = os.fork()
        if pid == 0:   # the daemon, in its own process group so teardown can kill it whole
            code = 1
            try:
                os.setsid()
                code = Daemon(options, execute, prepare=lambda: None).run()
            finally:
                os._exit(code)
        started.append(pid)
        handle = Handle(pid, path)
        wait_for(lambda: unix_socket_listening(path) or not handle.alive(), "the daemon's socket")
        assert handle.alive(), "the daemon exited at start"
        return handle

    yield start
    for pid in started:
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass


def test_answers_like_the_runner(start_daemon):
    daemon = start_daemon()
    reply = daemon.call("ok")
    assert reply.state == wire.ANSWERED, reply
    assert reply.exit == 0
    assert json.loads(reply.stdout) == {"cniVersion": "1.0.0", "ips": [], "dns": {}}


def test_error_object_is_the_runners(start_daemon, tmp_path):
    daemon = start_daemon()
    reply = daemon.call("cnierr")
    assert reply.state == wire.ANSWERED and reply.exit == 1
    assert json.loads(reply.stdout) == {"cniVersion": "1.0.0", "code": 7, "msg": "fake config problem",
                                        "details": "details here"}
    assert "fake config problem" in reply.stderr


def test_a_crashing_call_is_isolated(start_daemon):
    daemon = start_daemon()
    reply = daemon.call("boom")
    assert reply.state == wire.ANSWERED and reply.exit == 1
    err = json.loads(reply.stdout)
    assert err["code"] == 999 and "kaboom" in err["msg"]
    assert "Traceback" not in reply.stdout + reply.stderr
    assert daemon.call("ok").exit == 0


def test_an_exception_outside_the_runner_is_an_error_object(start_daemon):
    daemon = start_daemon()
    reply = daemon.call("sysexit")
    assert reply.state == wire.ANSWERED and reply.exit == 1
    assert json.loads(reply.stdout)["code"] == 999
    assert daemon.call("ok").exit == 0


def test_a_dying_worker_is_replaced_and_the_call_reported_lost(start_daemon):
    daemon = start_daemon(workers=1)
    assert daemon.call("die").state == wire.LOST
    for _ in range(3):   # the one worker was replaced: calls keep being served
        assert daemon.call("ok").state == wire.ANSWERED
    assert daemon.alive()


def test_time_limit_gives_code_11(start_daemon):
    daemon = start_daemon(request_timeout=1.0)
    reply = daemon.call("steps")
    assert reply.state == wire.ANSWERED and reply.exit == 1
    err = json.loads(reply.stdout)
    assert err["code"] == 11 and "time limit" in err["msg"]
    assert daemon.call("ok").exit == 0


def test_only_cni_variables_reach_the_call(start_daemon):
    daemon = start_daemon()
    reply = daemon.call("env", env_extra={"HOME": "/root", "LD_PRELOAD": "/evil.so", "CNI_ARGS": "A=b"})
    assert reply.state == wire.ANSWERED
    assert json.loads(reply.stdout) == sorted(["CNI_ARGS", "CNI_COMMAND", "CNI_CONTAINERID", "CNI_IFNAME",
                                               "CNI_NETNS", "CNI_PATH"])


def test_socket_is_private(start_daemon):
    daemon = start_daemon()
    assert stat.S_IMODE(os.stat(daemon.path).st_mode) == 0o600
    assert stat.S_ISSOCK(os.stat(daemon.path).st_mode)
    assert stat.S_IMODE(os.stat(daemon.path.parent).st_mode) == 0o700


def test_peer_with_another_uid_is_refused(start_daemon):
    daemon = start_daemon(allowed_uids=frozenset({os.geteuid() + 4242}))
    reply = daemon.call("ok")
    assert reply.state == wire.UNAVAILABLE
    assert f"uid {os.geteuid()}" in reply.reason


def _raw_exchange(path: Path, payload: bytes) -> dict:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(WAIT)
        sock.connect(str(path))
        sock.sendall(payload)
        return json.loads(wire.recv_frame(sock, 1 << 20))


def test_oversized_request_is_refused(start_daemon):
    daemon = start_daemon(max_request_bytes=4096)
    answer = _raw_exchange(daemon.path, (10 << 20).to_bytes(4, "big"))
    assert "exceeds the limit" in answer["refused"]
    big = daemon.call("ok", padding="x" * 8192)
    assert big.state == wire.UNAVAILABLE and "refused" in big.reason
    assert daemon.call("ok").state == wire.ANSWERED


def test_malformed_request_is_refused(start_daemon):
    daemon = start_daemon()
    body = b"this is not json"
    assert "malformed" in _raw_exchange(daemon.path, len(body).to_bytes(4, "big") + body)["refused"]
    body = json.dumps({"v": 1, "env": {"CNI_COMMAND": 7}, "stdin": ""}).encode()
    assert "malformed" in _raw_exchange(daemon.path, len(body).to_bytes(4, "big") + body)["refused"]
    body = json.dumps({"v": 99, "env": {"CNI_COMMAND": "ADD"}, "stdin": ""}).encode()
    assert "protocol version" in _raw_exchange(daemon.path, len(body).to_bytes(4, "big") + body)["refused"]
    assert daemon.call("ok").state == wire.ANSWERED


def test_workers_are_recycled_after_many_calls(start_daemon):
    daemon = start_daemon(workers=1, max_requests_per_worker=2)
    assert [daemon.call("ok").state for _ in range(5)] == [wire.ANSWERED] * 5


def test_sigterm_finishes_the_call_in_flight_and_removes_the_socket(start_daemon, tmp_path):
    daemon = start_daemon()
    gate = tmp_path / "gate"
    replies: list[wire.Reply] = []
    client = threading.Thread(target=lambda: replies.append(daemon.call("gate", gate=str(gate))))
    client.start()
    wait_for(gate.with_suffix(".entered").exists, "the call to start")
    os.kill(daemon.pid, signal.SIGTERM)
    wait_for(lambda: not daemon.path.exists(), "the socket to be removed")
    # New calls find no socket (and would run in-process); the one in flight goes on.
    assert daemon.call("ok").state == wire.UNAVAILABLE
    gate.touch()
    client.join(WAIT)
    assert replies and replies[0].state == wire.ANSWERED and replies[0].exit == 0
    _, status = os.waitpid(daemon.pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def test_stale_socket_is_replaced_and_a_live_one_is_not(start_daemon, tmp_path):
    path = tmp_path / "run" / "daemon.sock"
    path.parent.mkdir(mode=0o700)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()   # the file stays, nobody listens: a daemon that died
    daemon = start_daemon()
    assert daemon.call("ok").state == wire.ANSWERED
    second = Daemon(Options(socket_path=str(path)), fake_execute, prepare=lambda: None)
    with pytest.raises(DaemonError, match="already serving"):
        second.run()
    assert daemon.call("ok").state == wire.ANSWERED


def test_refuses_a_directory_others_can_write(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(DaemonError, match="writable by others"):
        Daemon(Options(socket_path=str(shared / "d.sock")), fake_execute, prepare=lambda: None).run()
