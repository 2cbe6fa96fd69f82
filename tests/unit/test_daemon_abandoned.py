"""Calls the daemon must not run or finish: the client gave up, or the time ran out.

A runtime that kills the plugin (or a client that stops waiting) has moved on:
it will send DEL, or ADD again. A late run of the old call would undo or
redo that work behind its back (a DEL followed by the stale ADD leaves a live
interface with no reservation). So the daemon never starts a call whose
client hung up, stops an ADD at its next step once the client is gone, and
undoes an ADD that finished for nobody. The time limit is cooperative: it
stops a call only between steps, never inside one (a setns and its way back).
"""
from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cni_bridge import daemon as daemon_mod
from cni_bridge import daemon_client as wire
from cni_bridge import oplog
from cni_bridge.daemon import Daemon, DaemonError, Options
from tests.support.waiting import wait_for
from tests.unit.test_daemon_server import WAIT, FakePlugin, env_for, fake_execute, start_daemon  # noqa: F401


def hang_up_after_sending(path: Path, cid: str, config: dict, started: Path | None = None) -> None:
    """A client that hands a call over and stops waiting for the answer (once `started` exists)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(path))
        sock.sendall(wire.encode_request(env_for(cid), json.dumps(config).encode()))
        if started is not None:
            wait_for(started.exists, "the call to start")


def test_a_queued_call_whose_client_gave_up_is_never_started(start_daemon, tmp_path):
    daemon = start_daemon(workers=1)
    gate, marker = tmp_path / "gate", tmp_path / "late-add"
    busy = threading.Thread(target=daemon.call, args=("gate",), kwargs={"gate": str(gate)})
    busy.start()
    wait_for(gate.with_suffix(".entered").exists, "the one worker to be busy")
    hang_up_after_sending(daemon.path, "late", daemon.config(marker=str(marker)))
    gate.touch()
    busy.join(WAIT)
    # The one worker serves calls in order: once this one is answered, the
    # abandoned call has been taken from the queue and dropped.
    assert daemon.call("ok").state == wire.ANSWERED
    assert not marker.exists(), "the daemon ran a call whose client had hung up"
    assert not Path(str(marker) + ".del").exists()


def test_an_add_is_stopped_at_its_next_step_once_the_client_is_gone(start_daemon, tmp_path):
    daemon = start_daemon(workers=1)
    gate, marker = tmp_path / "gate", tmp_path / "add"
    client = threading.Thread(target=hang_up_after_sending, args=(
        daemon.path, "gate", daemon.config(gate=str(gate), marker=str(marker), step=True),
        gate.with_suffix(".entered")))
    client.start()
    wait_for(gate.with_suffix(".entered").exists, "the call to start")
    client.join(WAIT)        # the client has closed its socket
    gate.touch()
    assert daemon.call("ok").state == wire.ANSWERED
    assert not marker.exists(), "the ADD went on past a step after its client hung up"


def test_an_add_finished_for_nobody_is_undone(start_daemon, tmp_path):
    daemon = start_daemon(workers=1)
    gate, marker = tmp_path / "gate", tmp_path / "add"
    client = threading.Thread(target=hang_up_after_sending, args=(
        daemon.path, "gate", daemon.config(gate=str(gate), marker=str(marker)), gate.with_suffix(".entered")))
    client.start()
    wait_for(gate.with_suffix(".entered").exists, "the call to start")
    client.join(WAIT)
    gate.touch()             # no step point after the gate: the ADD completes
    assert daemon.call("ok").state == wire.ANSWERED
    assert marker.exists() and Path(str(marker) + ".del").exists(), \
        "an ADD whose answer nobody read must be undone with a DEL"


def test_the_time_limit_never_interrupts_a_step(start_daemon, tmp_path):
    daemon = start_daemon(request_timeout=0.5)
    marker = tmp_path / "critical"
    reply = daemon.call("critical", marker=str(marker))
    assert reply.state == wire.ANSWERED and reply.exit == 1
    assert json.loads(reply.stdout)["code"] == 11
    assert Path(str(marker) + ".start").exists() and Path(str(marker) + ".end").exists(), \
        "the time limit cut a step in half"


def test_a_worker_left_in_another_netns_is_replaced(start_daemon):
    daemon = start_daemon(workers=1)
    home = str(os.stat("/proc/thread-self/ns/net").st_ino)
    if os.geteuid() != 0:
        pytest.skip("needs root to make a network namespace")
    assert daemon.call("stray").state == wire.ANSWERED
    for _ in range(3):
        reply = daemon.call("whereami")
        assert reply.state == wire.ANSWERED and reply.stdout == home


def test_a_client_in_another_netns_is_refused(start_daemon):
    if os.geteuid() != 0:
        pytest.skip("needs root to make a network namespace")
    daemon = start_daemon()
    code = (f"import json, sys; sys.path.insert(0, {str(Path.cwd())!r}); "
            "from tests.unit.test_daemon_abandoned import call_from_here; call_from_here(sys.argv[1])")
    proc = subprocess.run(["unshare", "--net", sys.executable, "-c", code, str(daemon.path)],
                          capture_output=True, text=True, timeout=WAIT)
    assert proc.returncode == 0, proc.stderr
    state, reason = json.loads(proc.stdout)
    assert state == wire.UNAVAILABLE and "network namespace" in reason
    assert daemon.call("ok").state == wire.ANSWERED


def call_from_here(path: str) -> None:
    config = {"cniVersion": "1.0.0", "name": "fake", "type": "cni-bridge", "daemonSocket": path}
    reply = wire.forward(env_for("ok"), json.dumps(config).encode())
    print(json.dumps([reply.state, reply.reason]))


def test_a_peer_without_cap_net_admin_is_refused(start_daemon):
    if os.geteuid() != 0:
        pytest.skip("needs root")
    daemon = start_daemon()
    code = (f"import sys; sys.path.insert(0, {str(Path.cwd())!r}); "
            "from tests.unit.test_daemon_abandoned import call_from_here; call_from_here(sys.argv[1])")
    proc = subprocess.run(["setpriv", "--inh-caps=-net_admin", "--bounding-set=-net_admin",
                           sys.executable, "-c", code, str(daemon.path)],
                          capture_output=True, text=True, timeout=WAIT)
    assert proc.returncode == 0, proc.stderr
    state, reason = json.loads(proc.stdout)
    assert state == wire.UNAVAILABLE and "CAP_NET_ADMIN" in reason


def test_a_request_trickled_in_is_dropped_when_its_time_is_up(start_daemon):
    daemon = start_daemon(read_timeout=1.0)
    body = wire.encode_request(env_for("ok"), b"{}")
    sent = 0
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(daemon.path))
        sock.settimeout(WAIT)
        try:
            for byte in body[:40]:   # one byte every 0.2 s: each recv is quick, the request is not
                sock.sendall(bytes([byte]))
                sent += 1
                time.sleep(0.2)
            closed = sock.recv(1) == b""
        except OSError:
            closed = True
    assert closed and sent < 40, "the daemon kept reading a request long past its time limit"


def test_the_socket_directory_must_be_owned_by_root(tmp_path):
    other = tmp_path / "others"
    other.mkdir(mode=0o700)
    os.chown(other, 4242, 4242)
    if os.stat(other).st_uid != 4242:
        pytest.skip("cannot chown here")
    with pytest.raises(DaemonError, match="owned by uid 4242"):
        Daemon(Options(socket_path=str(other / "d.sock")), fake_execute, prepare=lambda: None).run()


def test_request_timeout_is_capped_below_the_clients_patience():
    options = daemon_mod.parse_options(["--socket", "/tmp/x.sock", "--request-timeout", "600"])
    assert options.request_timeout + daemon_mod.HARD_LIMIT_GRACE < wire.ANSWER_TIMEOUT
    assert wire.ANSWER_TIMEOUT < 120, "the client must give up before kubelet's runtime-request-timeout"


def logged_execute(env, stdin, stdout, stderr) -> int:
    return oplog.run_logged("cni-bridge", FakePlugin, env, stdin, stdout, oplog.BRIDGE_LOG_KEYS, stderr)


def test_log_file_gets_a_line_for_every_call_through_one_worker(start_daemon, tmp_path):
    daemon = start_daemon(execute=logged_execute, workers=1)
    log_file = tmp_path / "calls.log"
    for cid in ("one", "two", "three"):
        reply = daemon.call(cid, logFile=str(log_file))
        assert reply.state == wire.ANSWERED and reply.exit == 0, reply
    lines = [line for line in log_file.read_text().splitlines() if "ADD net=fake" in line]
    assert len(lines) == 3 and all("-> ok" in line for line in lines), lines


def test_a_plugin_warning_reaches_the_calls_stderr(start_daemon):
    daemon = start_daemon(execute=logged_execute, workers=1)
    reply = daemon.call("warn")
    assert reply.state == wire.ANSWERED and reply.exit == 0
    assert "careful with warn" in reply.stderr


def test_the_python_front_end_answers_11_and_never_redoes_a_call_still_running(start_daemon, tmp_path,
                                                                                monkeypatch, capsys):
    from cni_bridge import main as front_end

    daemon = start_daemon(workers=1)
    gate, marker = tmp_path / "gate", tmp_path / "add"
    ran_here = []
    monkeypatch.setattr(wire, "ANSWER_TIMEOUT", 1.0)
    monkeypatch.setattr(front_end, "run_in_process", lambda *args: ran_here.append(args) or 0)
    for key, value in env_for("gate").items():
        monkeypatch.setenv(key, value)
    stdin = json.dumps(daemon.config(gate=str(gate), marker=str(marker), step=True)).encode()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    assert front_end.main() == 1
    error = json.loads(capsys.readouterr().out)
    assert error["code"] == 11 and "gave no answer" in error["msg"]
    assert ran_here == [], "the call was redone in-process while the daemon still held it"
    gate.touch()
    assert daemon.call("ok").state == wire.ANSWERED
    assert not marker.exists(), "the daemon went on with a call whose plugin had given up"
