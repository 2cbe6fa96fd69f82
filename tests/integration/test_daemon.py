"""The node daemon end to end: the real `cni-bridge daemon`, real namespaces, the exec'd client.

The daemon runs inside the scratch host netns (as it must run in the host netns
on a node), on a socket under tmp_path, so nothing here touches
/run/cni-bridge. Each test stops (or kills) its daemon at teardown.
"""
from __future__ import annotations

import functools
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

import pytest

from cni_bridge import daemon_client as wire
from tests.support import waiting
from tests.support.netns import VENV_BIN, CniHost, make_cni_path, unique
from tests.support.waiting import unix_socket_listening

WAIT = 60.0          # bound on waiting for a state change; never asserted as a duration
wait_for = functools.partial(waiting.wait_for, timeout=WAIT)
NOBODY = 65534
MAC = re.compile(r'"mac": "[0-9a-f:]{17}"')


@pytest.fixture(params=["python-front-end", "static-front-end"])
def cni_host(request, make_netns, tmp_path) -> CniHost:
    """Each test runs twice: cni-bridge exec'd as the Python program, and as the
    static front end (packaging/shim) with the Python program beside it."""
    front_end = request.getfixturevalue("shim_bin") if request.param == "static-front-end" else None
    return CniHost(netns=make_netns("h"), cni_path=make_cni_path(tmp_path / "bin", front_end),
                   data_dir=tmp_path / "ipam")


class RunningDaemon:
    """`cni-bridge daemon` started in the host netns, logging every call (DEBUG) to a file."""

    def __init__(self, host: CniHost, socket_path: Path, log: Path, env: Optional[dict] = None) -> None:
        self.socket, self.log = socket_path, log
        argv = ["ip", "netns", "exec", host.netns.name, str(VENV_BIN / "cni-bridge"), "daemon",
                "--socket", str(socket_path), "--workers", "2", "--log-level", "DEBUG"]
        full_env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), **(env or {})}
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(argv, env=full_env, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                         start_new_session=True)
        wait_for(lambda: unix_socket_listening(socket_path) or self.proc.poll() is not None, "the daemon to listen")
        assert self.proc.poll() is None, self.log_text()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def served(self, command: str, cid: str) -> int:
        """How many times the daemon answered `command` for container `cid`."""
        return len(re.findall(rf" {command} cid={re.escape(cid)} if=", self.log_text()))

    def kill(self) -> None:
        """SIGKILL the supervisor, its workers and anything they run."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(WAIT)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(WAIT)
            except subprocess.TimeoutExpired:
                pass
        self.kill()


@pytest.fixture
def start_daemon(cni_host, tmp_path):
    started: list[RunningDaemon] = []

    def start(socket_path: Optional[Path] = None, env: Optional[dict] = None) -> RunningDaemon:
        daemon = RunningDaemon(cni_host, socket_path or tmp_path / "run" / "daemon.sock",
                               tmp_path / f"daemon{len(started)}.log", env)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.stop()


def config(cni_host: CniHost, daemon_socket: str, bridge: str, data_dir: Optional[Path] = None, **extra) -> dict:
    conf = {
        "cniVersion": "1.0.0", "name": "dtest", "type": "cni-bridge", "bridge": bridge, "isGateway": True,
        "daemonSocket": daemon_socket,
        "ipam": {"type": "cni-ipam", "dataDir": str(data_dir or cni_host.data_dir),
                 "ranges": [[{"subnet": "10.124.0.0/24"}]], "routes": [{"dst": "0.0.0.0/0"}]},
    }
    conf.update(extra)
    return conf


def reservations(data_dir: Path, network: str = "dtest") -> list[str]:
    store = data_dir / network
    return sorted(p.name for p in store.iterdir() if p.name[0].isdigit()) if store.is_dir() else []


def our_nat_lines(cni_host: CniHost) -> list[str]:
    return [line for line in cni_host.netns.nat_rules() if "CBR-" in line]


def start_client(cni_host: CniHost, command: str, conf: dict, cid: str, netns: str,
                 env: Optional[dict] = None) -> subprocess.Popen:
    """An exec'd plugin run we can act on while it waits (CniHost.run waits for it)."""
    call_env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "CNI_COMMAND": command,
                "CNI_PATH": str(cni_host.cni_path), "CNI_CONTAINERID": cid, "CNI_NETNS": netns,
                "CNI_IFNAME": "eth0", **(env or {})}
    proc = subprocess.Popen(["ip", "netns", "exec", cni_host.netns.name, str(cni_host.cni_path / "cni-bridge")],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=call_env)
    proc.stdin.write(json.dumps(conf))
    proc.stdin.close()
    proc.stdin = None
    return proc


def gated_iptables_restore(tmp_path: Path) -> tuple[Path, Path]:
    """A PATH directory whose iptables-restore waits for a gate file: it holds the daemon
    inside ADD after the veth and addresses are made, just before the masquerade rules."""
    real = shutil.which("iptables-restore")
    if real is None:
        pytest.skip("needs iptables-restore")
    bin_dir, gate = tmp_path / "gated-bin", tmp_path / "gate"
    bin_dir.mkdir()
    script = bin_dir / "iptables-restore"
    script.write_text(f'#!/bin/sh\ntouch "{gate}.entered"\nwhile [ ! -e "{gate}" ]; do sleep 0.05; done\n'
                      f'exec {real} "$@"\n')
    script.chmod(0o755)
    return bin_dir, gate


def start_gated_daemon(start_daemon, tmp_path: Path):
    """A daemon whose masquerade step waits on a gate file: (daemon, gate)."""
    gated_bin, gate = gated_iptables_restore(tmp_path)
    daemon = start_daemon(env={"PATH": f"{gated_bin}:{os.environ.get('PATH', '/usr/sbin:/usr/bin')}"})
    return daemon, gate


# -- same answers as in-process ----------------------------------------------------------

def test_add_check_del_answers_match_in_process(cni_host, start_daemon, make_netns, tmp_path):
    daemon = start_daemon()
    pod, bridge = make_netns("p"), unique("br")
    outputs = {}
    for label, sock, data in (("daemon", str(daemon.socket), tmp_path / "a"), ("in-process", "", tmp_path / "b")):
        conf = config(cni_host, sock, bridge, data)
        add = cni_host.run("cni-bridge", "ADD", conf, container_id="same", netns=pod.path)
        assert add.rc == 0, add.stdout + add.stderr
        with_prev = dict(conf, prevResult=add.json)
        check = cni_host.run("cni-bridge", "CHECK", with_prev, container_id="same", netns=pod.path)
        delete = cni_host.run("cni-bridge", "DEL", with_prev, container_id="same", netns=pod.path)
        outputs[label] = [(add.rc, MAC.sub('"mac": "-"', add.stdout), add.stderr),
                          (check.rc, check.stdout, check.stderr), (delete.rc, delete.stdout, delete.stderr)]
    assert outputs["daemon"] == outputs["in-process"]
    assert [daemon.served(c, "same") for c in ("ADD", "CHECK", "DEL")] == [1, 1, 1]
    assert "eth0" not in pod.links()


def test_error_objects_match_in_process(cni_host, start_daemon, make_netns, tmp_path):
    daemon = start_daemon()
    pod, bridge = make_netns("p"), unique("br")
    cases = [
        ("no-ipam", "ADD", {"ipam": None}, {}),
        ("old-version", "ADD", {"cniVersion": "0.2.0"}, {}),
        ("check-gate", "CHECK", {"cniVersion": "0.3.1"}, {}),
        ("bad-mtu", "ADD", {"mtu": 12}, {}),
        ("long-ifname", "ADD", {}, {"ifname": "a-very-long-interface-name"}),
        ("unknown-args", "ADD", {}, {"cni_args": "FOO=bar"}),
        ("no-netns", "ADD", {}, {"netns": "/var/run/netns/does-not-exist"}),
    ]
    for cid, command, changes, kw in cases:
        answers = []
        for sock in (str(daemon.socket), ""):
            conf = {k: v for k, v in {**config(cni_host, sock, bridge), **changes}.items() if v is not None}
            res = cni_host.run("cni-bridge", command, conf, container_id=cid, **{"netns": pod.path, **kw})
            answers.append((res.rc, res.stdout, res.stderr))
        assert answers[0] == answers[1], cid
        assert answers[0][0] == 1 and json.loads(answers[0][1])["code"] in (1, 4, 7), answers[0]
        assert daemon.served(command, cid) == 1, cid
    # A second ADD of the same attachment: the same "already exists" error both ways.
    dup = []
    for sock, data in ((str(daemon.socket), tmp_path / "a"), ("", tmp_path / "b")):
        conf = config(cni_host, sock, bridge, data)
        target = make_netns("p")
        assert cni_host.run("cni-bridge", "ADD", conf, container_id="dup", netns=target.path).rc == 0
        again = cni_host.run("cni-bridge", "ADD", conf, container_id="dup", netns=target.path)
        dup.append((again.rc, again.stdout.replace(target.path, "<netns>"), again.stderr.replace(target.path, "<netns>")))
        assert cni_host.run("cni-bridge", "DEL", conf, container_id="dup", netns=target.path).rc == 0
    assert dup[0] == dup[1] and dup[0][0] == 1


# -- falling back to in-process ------------------------------------------------------------

def test_falls_back_when_the_socket_is_missing(cni_host, make_netns, tmp_path):
    pod = make_netns("p")
    conf = config(cni_host, str(tmp_path / "no-such" / "daemon.sock"), unique("br"))
    assert cni_host.run("cni-bridge", "ADD", conf, container_id="c1", netns=pod.path).rc == 0
    assert cni_host.run("cni-bridge", "DEL", conf, container_id="c1", netns=pod.path).rc == 0
    assert reservations(cni_host.data_dir) == []


def test_falls_back_when_nobody_listens(cni_host, make_netns, tmp_path):
    path = tmp_path / "run" / "daemon.sock"
    path.parent.mkdir(mode=0o700)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stale:
        stale.bind(str(path))   # a socket file left by a daemon that is gone
    pod = make_netns("p")
    conf = config(cni_host, str(path), unique("br"))
    add = cni_host.run("cni-bridge", "ADD", conf, container_id="c1", netns=pod.path)
    assert add.rc == 0, add.stdout
    assert cni_host.run("cni-bridge", "DEL", conf, container_id="c1", netns=pod.path).rc == 0


def test_falls_back_when_the_daemon_dies_in_the_middle_of_an_add(cni_host, start_daemon, make_netns, tmp_path):
    daemon, gate = start_gated_daemon(start_daemon, tmp_path)
    pod = make_netns("p")
    conf = config(cni_host, str(daemon.socket), unique("br"), ipMasq=True)
    client = start_client(cni_host, "ADD", conf, "c1", pod.path)
    try:
        wait_for(Path(f"{gate}.entered").exists, "the daemon to reach the masquerade step")
        assert "eth0" in pod.links()                      # the daemon made the interface ...
        assert len(reservations(cni_host.data_dir)) == 1  # ... and reserved an address
        daemon.kill()                                     # ... and dies before answering
        out, err = client.communicate(timeout=WAIT * 2)
    finally:
        gate.touch()
        if client.poll() is None:
            client.kill()
    assert client.returncode == 0, out + err
    result = json.loads(out)
    address = result["ips"][0]["address"].split("/")[0]
    # Redone in-process over the leftovers: one interface, one address, one set of rules.
    assert pod.links().count("eth0") == 1
    assert reservations(cni_host.data_dir) == [address]
    assert len([line for line in our_nat_lines(cni_host) if line.startswith("-A POSTROUTING")]) == 1
    assert len([v for v in cni_host.netns.links() if v.startswith("veth")]) == 1
    # The daemon is gone (its socket file stays): DEL runs in-process and cleans up.
    delete = cni_host.run("cni-bridge", "DEL", conf, container_id="c1", netns=pod.path)
    assert delete.rc == 0, delete.stdout
    assert reservations(cni_host.data_dir) == []
    assert our_nat_lines(cni_host) == []
    assert [v for v in cni_host.netns.links() if v.startswith("veth")] == []


def test_a_worker_killed_mid_call_is_isolated(cni_host, start_daemon, make_netns):
    """A call that kills its worker (test fault hook) is redone in-process; the daemon serves on."""
    daemon = start_daemon()
    bridge = unique("br")
    conf = config(cni_host, str(daemon.socket), bridge)
    first, second = make_netns("p"), make_netns("p")
    res = cni_host.run("cni-bridge", "ADD", conf, container_id="c1", netns=first.path,
                       env={"CNI_BRIDGE_FAULT": "add.addresses-set"})
    assert res.rc == 0, res.stdout + res.stderr
    assert daemon.served("ADD", "c1") == 0                 # the worker died without answering
    assert first.links().count("eth0") == 1
    res = cni_host.run("cni-bridge", "ADD", conf, container_id="c2", netns=second.path)
    assert res.rc == 0 and daemon.served("ADD", "c2") == 1
    for cid, pod in (("c1", first), ("c2", second)):
        assert cni_host.run("cni-bridge", "DEL", conf, container_id=cid, netns=pod.path).rc == 0
    assert reservations(cni_host.data_dir) == []
    assert daemon.proc.poll() is None


def test_sigterm_finishes_the_call_in_flight(cni_host, start_daemon, make_netns, tmp_path):
    daemon, gate = start_gated_daemon(start_daemon, tmp_path)
    pod = make_netns("p")
    conf = config(cni_host, str(daemon.socket), unique("br"), ipMasq=True)
    client = start_client(cni_host, "ADD", conf, "c1", pod.path)
    try:
        wait_for(Path(f"{gate}.entered").exists, "the call to start")
        daemon.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: not daemon.socket.exists(), "the socket to be removed")
        gate.touch()
        out, err = client.communicate(timeout=WAIT * 2)
    finally:
        gate.touch()
        if client.poll() is None:
            client.kill()
    assert client.returncode == 0, out + err
    assert daemon.proc.wait(WAIT) == 0
    assert daemon.served("ADD", "c1") == 1          # answered by the daemon, not redone
    conf["daemonSocket"] = ""
    assert cni_host.run("cni-bridge", "DEL", conf, container_id="c1", netns=pod.path).rc == 0
    assert our_nat_lines(cni_host) == []


# -- security and limits ---------------------------------------------------------------------

def _as_nobody(path: Path, request: bytes) -> str:
    """Connect as uid nobody in a forked child; return what happened."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        outcome = "?"
        try:
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(30)
                sock.connect(str(path))
                try:
                    sock.sendall(request)
                except BrokenPipeError:
                    pass   # refused before the request was read; the refusal is still there to read
                outcome = wire.decode_reply(wire.recv_frame(sock, 1 << 20)).reason
        except PermissionError:
            outcome = "permission denied"
        except BaseException as exc:   # report anything else to the parent
            outcome = f"error: {exc!r}"
        finally:
            os.write(write_end, outcome.encode())
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        outcome = pipe.read().decode()
    os.waitpid(pid, 0)
    return outcome


def test_socket_is_root_only_and_other_uids_are_refused(cni_host, start_daemon):
    # A directory others may traverse, so that only the socket's own mode and the
    # daemon's peer check stand in the way.
    base = Path(tempfile.mkdtemp(prefix="cbd-", dir="/tmp"))
    try:
        base.chmod(0o755)
        daemon = start_daemon(socket_path=base / "run" / "daemon.sock")
        assert stat.S_IMODE(os.stat(daemon.socket).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(daemon.socket.parent).st_mode) == 0o700
        request = wire.encode_request({"CNI_COMMAND": "STATUS"}, b"{}")
        assert _as_nobody(daemon.socket, request) == "permission denied"
        daemon.socket.parent.chmod(0o755)
        assert _as_nobody(daemon.socket, request) == "permission denied"   # the socket's 0600
        daemon.socket.chmod(0o666)   # loosened by mistake: the peer check still refuses
        assert _as_nobody(daemon.socket, request) == f"refused: uid {NOBODY} may not use this daemon"
        assert "refused a connection" in daemon.log_text()
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_oversized_requests_are_not_run_by_the_daemon(cni_host, start_daemon, make_netns):
    daemon = start_daemon()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(WAIT)
        sock.connect(str(daemon.socket))
        sock.sendall((64 << 20).to_bytes(4, "big"))
        answer = json.loads(wire.recv_frame(sock, 1 << 20))
    assert "exceeds the limit" in answer["refused"]
    # A config too big to forward runs in-process; the daemon keeps serving the rest.
    pod, bridge = make_netns("p"), unique("br")
    big = config(cni_host, str(daemon.socket), bridge, padding="x" * (wire.MAX_REQUEST_BYTES + 1))
    assert cni_host.run("cni-bridge", "ADD", big, container_id="big", netns=pod.path).rc == 0
    assert daemon.served("ADD", "big") == 0
    assert cni_host.run("cni-bridge", "DEL", config(cni_host, str(daemon.socket), bridge),
                        container_id="big", netns=pod.path).rc == 0
    assert daemon.served("DEL", "big") == 1
