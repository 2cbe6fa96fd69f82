"""`cni-bridge daemon --socket PATH`: the node daemon the exec'd plugin hands its calls to.

An exec'd Python plugin pays ~15 ms to start and ~150 ms more to import
pydantic and pyroute2 on every call. The daemon pays that once: it imports
and warms everything, then forks a small pool of workers that serve CNI calls
from a unix socket. Each worker runs exactly the code an exec'd plugin runs
(`cni_bridge.main.run_in_process`: the same runner, result encoding, error
objects, log lines), so an answer through the daemon is byte for byte what
in-process execution prints.

Why pre-forked processes and not threads:
- the GIL would put all pods of a burst on one core; workers use them all;
- a request that crashes the interpreter, leaks, or hangs in C code takes
  down one worker, which the supervisor replaces; the daemon keeps serving;
- setns(2) and pyroute2's sockets need no thread-safety thought.

The daemon must run in the host network namespace (and the host PID and mount
namespaces, so that CNI_NETNS paths resolve): bridge, host veth, gateway
address, forwarding sysctl and masquerade rules are made in the namespace the
worker runs in, exactly as an exec'd plugin makes them in the namespace the
runtime started it in.

Security: the socket is 0600 in a root-owned directory the daemon creates
0700; every connection's SO_PEERCRED uid must be root and the peer must hold
CAP_NET_ADMIN (what the call would need in-process), and it must run in the
daemon's own network namespace (a plugin elsewhere would get its host objects
made in the wrong one). Requests are limited in size (1 MiB) and time: the
whole request must arrive within a few seconds.

Calls nobody waits for: a runtime that killed the plugin, or a client that
stopped waiting, has moved on (it will send DEL, or ADD again), so a late run
of the old call would work behind its back. A worker never starts a call
whose client hung up, stops an ADD at its next step once the client is gone
(the ADD's rollback runs), and undoes with a DEL an ADD that finished for
nobody. The time limit (--request-timeout, CNI error 11) is cooperative too:
it is checked between the steps of an ADD (the fault points), never inside a
step such as a setns into the pod and back; a worker that is still busy 15 s
past it (stuck in the kernel or a child process) is killed, its client sees
the connection close and redoes the call in-process with a DEL first. The
limits nest below kubelet's 120 s runtime-request-timeout: the client waits
at most daemon_client.ANSWER_TIMEOUT, and the daemon's limit plus the grace
is capped below that.
"""
from __future__ import annotations

import argparse
import binascii
import gc
import io
import json
import logging
import mmap
import os
import select
import signal
import socket
import stat
import struct
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, TextIO

from . import daemon_client as wire
from . import faults
from . import metrics as daemon_metrics
from .protocol.errors import CNIError, Code
from .protocol.runner import write_error

log = logging.getLogger("cni-bridge.daemon")

# Much of a call is spent asleep in the kernel (a veth's deletion waits ~15-20 ms for RCU, fsyncs),
# not on a CPU: with 8 workers a 40-pod burst of DELs still queued behind sleeping ones. Each
# worker costs ~5-7 MiB of private memory once warm (no pyroute2 on the plugin's path since
# cni_bridge/rtnl.py), so 16 hold ~105-125 MiB PSS in all; hence the cap (docs/performance.md).
DEFAULT_WORKERS = max(8, min(16, 8 * (os.cpu_count() or 1)))
REQUEST_TIMEOUT = 60.0      # seconds a call may run before it fails with code 11
HARD_LIMIT_GRACE = 15.0     # after that, the supervisor kills a worker that is still busy
# The client must learn the outcome (an answer, or a killed worker's closed
# socket) before it stops waiting: keep a margin for the queue and the answer.
MAX_REQUEST_TIMEOUT = wire.ANSWER_TIMEOUT - HARD_LIMIT_GRACE - 10.0
READ_TIMEOUT = 5.0          # to receive a whole request once connected
CAP_NET_ADMIN = 12          # capability bit the peer must hold
MAX_REQUESTS_PER_WORKER = 1000   # then the worker is replaced (bounds any slow leak)
BACKLOG = 256               # a burst of pods queues here while the workers are busy
ALLOWED_UIDS = frozenset({0})
DEFAULT_CONF_DIR = "/etc/cni/net.d"
_SLOT = struct.Struct("d")  # per-worker start time of the call in progress, 0 when idle
_PR_SET_PDEATHSIG = 1
_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}

# execute(env, stdin, stdout, stderr) -> exit status; one CNI call, in this process.
Executor = Callable[[dict, bytes, TextIO, TextIO], int]


class RequestTimeout(CNIError):
    def __init__(self, limit: float) -> None:
        super().__init__(Code.TRY_AGAIN_LATER, f"the cni-bridge daemon's time limit of {limit:g}s ran out",
                         "the call was stopped and rolled back; try again")


class ClientGone(CNIError):
    def __init__(self) -> None:
        super().__init__(Code.TRY_AGAIN_LATER, "the plugin that asked for this call has gone",
                         "the call was stopped and rolled back")


class Refused(Exception):
    """A request the daemon will not run; the client falls back to in-process execution."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind   # the metrics label of the fallback


class StatusAsked(Exception):
    """The request is `cni-bridge inspect` asking how the daemon is, not a CNI call."""


@dataclass
class Options:
    socket_path: str
    workers: int = DEFAULT_WORKERS
    request_timeout: float = REQUEST_TIMEOUT
    max_request_bytes: int = wire.MAX_REQUEST_BYTES
    max_requests_per_worker: int = MAX_REQUESTS_PER_WORKER
    allowed_uids: frozenset = field(default_factory=lambda: ALLOWED_UIDS)
    read_timeout: float = READ_TIMEOUT
    required_capability: Optional[int] = CAP_NET_ADMIN
    metrics_address: Optional[str] = None   # HOST:PORT of the Prometheus endpoint; off when None
    conf_dir: str = DEFAULT_CONF_DIR         # the conflists whose IPAM pools the metrics report


# -- entry point ------------------------------------------------------------------

def main(argv: list[str]) -> int:
    options, log_level, requested_timeout = _parse(argv)
    # The daemon's own log has its own handler; the root logger stays free for
    # the calls, whose warnings go to each call's stderr as in-process.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s cni-bridge-daemon[%(process)d] %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(log_level)
    log.propagate = False
    if os.geteuid() != 0:
        log.warning("not running as root: only root may connect, and the calls will lack CAP_NET_ADMIN")
    if options.request_timeout < requested_timeout:
        log.warning("--request-timeout capped at %gs: a client gives up after %gs, and a call must end "
                    "(or its worker be killed, %gs later) before that", options.request_timeout,
                    wire.ANSWER_TIMEOUT, HARD_LIMIT_GRACE)
    from .main import run_in_process

    try:
        return Daemon(options, run_in_process).run()
    except DaemonError as exc:
        log.error("%s", exc)
        return 1


def parse_options(argv: list[str]) -> Options:
    return _parse(argv)[0]


def _parse(argv: list[str]) -> tuple[Options, str, float]:
    """Options, log level, and the --request-timeout asked for (before the cap)."""
    parser = argparse.ArgumentParser(
        prog="cni-bridge daemon",
        description="Serve cni-bridge CNI calls from a unix socket (run it in the host network namespace).")
    parser.add_argument("--socket", default=wire.DEFAULT_SOCKET,
                        help=f"socket path (default {wire.DEFAULT_SOCKET}, the path plugins try by default)")
    parser.add_argument("--workers", type=int, default=DEFAULT_WORKERS,
                        help=f"worker processes, i.e. calls served at once (default {DEFAULT_WORKERS})")
    parser.add_argument("--request-timeout", type=float, default=REQUEST_TIMEOUT,
                        help=f"seconds a call may run before it fails with code 11 (default {REQUEST_TIMEOUT:g}, "
                             f"at most {MAX_REQUEST_TIMEOUT:g})")
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    parser.add_argument("--metrics-address", metavar="HOST:PORT",
                        help="serve Prometheus metrics over HTTP there (off by default; e.g. 127.0.0.1:9153)")
    parser.add_argument("--conf-dir", default=DEFAULT_CONF_DIR,
                        help=f"conflists whose IPAM pool usage the metrics report (default {DEFAULT_CONF_DIR})")
    args = parser.parse_args(argv)
    if args.workers < 1 or args.request_timeout <= 0:
        parser.error("--workers and --request-timeout must be positive")
    if args.metrics_address:
        try:
            daemon_metrics.parse_address(args.metrics_address)
        except ValueError as exc:
            parser.error(f"--metrics-address: {exc}")
    options = Options(socket_path=args.socket, workers=args.workers,
                      request_timeout=min(args.request_timeout, MAX_REQUEST_TIMEOUT),
                      metrics_address=args.metrics_address, conf_dir=args.conf_dir)
    return options, args.log_level, args.request_timeout


class DaemonError(Exception):
    pass


def warm_up() -> None:
    """Import and exercise everything a call needs, once, before the workers fork."""
    from ipam.config import IPAMNetConf
    from ipam.plugin import IpamPlugin  # noqa: F401

    from . import check, masq, oplog, plugin  # noqa: F401
    from .masq import nfnl  # noqa: F401   (imported by the first nftables masquerade step)
    from .confbase import load
    from .config import BridgeConf
    from .netlink import Netlink

    sample = {"cniVersion": "1.0.0", "name": "warm-up", "type": "cni-bridge",
              "ipam": {"type": "cni-ipam", "ranges": [[{"subnet": "10.0.0.0/24"}]],
                       "routes": [{"dst": "0.0.0.0/0"}]}}
    load(BridgeConf, sample)
    load(IPAMNetConf, sample)
    Netlink(None).close()


# -- the supervisor ---------------------------------------------------------------

class Daemon:
    def __init__(self, options: Options, execute: Executor,
                 prepare: Callable[[], None] = warm_up) -> None:
        self.options = options
        self.execute = execute
        self.prepare = prepare
        self.listener: Optional[socket.socket] = None
        self.socket_ino: Optional[tuple[int, int]] = None
        self.workers: dict[int, int] = {}   # pid -> slot
        self.slots: Optional[mmap.mmap] = None
        self.stopping = False
        self.wake_fds: tuple[int, ...] = ()
        self._spawn_times: list[float] = []
        self.netns = wire.netns_id()   # the network namespace every call must be made in
        self.started = time.time()
        self.metrics: daemon_metrics.NoMetrics = daemon_metrics.NoMetrics()

    def run(self) -> int:
        # Warm up before the socket exists: until then plugins run in-process
        # instead of queueing behind a daemon that is not ready.
        self.prepare()
        gc.collect()
        gc.freeze()   # workers share the warm heap instead of copying it on the first GC
        self.listener = self._listen()
        try:
            self._start_metrics()
            self.slots = mmap.mmap(-1, _SLOT.size * self.options.workers)
            wake_r, wake_w = self.wake_fds = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            signal.set_wakeup_fd(wake_w)
            for signum in (signal.SIGTERM, signal.SIGINT):
                signal.signal(signum, self._on_stop)
            signal.signal(signal.SIGCHLD, lambda *_: None)   # only to wake the loop
            signal.signal(signal.SIGPIPE, signal.SIG_IGN)
            for slot in range(self.options.workers):
                self._spawn(slot)
            log.info("serving on %s with %d workers (pid %d)", self.options.socket_path,
                     self.options.workers, os.getpid())
            scrapes = [fd for fd in (self.metrics.fileno(),) if fd is not None]
            while not self.stopping:
                try:
                    ready, _, _ = select.select([wake_r] + scrapes, [], [], 1.0)
                    if scrapes and scrapes[0] in ready:
                        self.metrics.serve_one()
                    os.read(wake_r, 512)
                except (BlockingIOError, InterruptedError):
                    pass
                self._reap(respawn=True)
                self._enforce_hard_limit()
            return self._shut_down()
        finally:
            self._remove_socket()
            self.metrics.close()
            if self.listener is not None:
                self.listener.close()

    def _start_metrics(self) -> None:
        address = self.options.metrics_address
        if not address:
            return
        try:
            self.metrics = daemon_metrics.start(address, os.path.dirname(os.path.abspath(self.options.socket_path)),
                                                self.options.conf_dir, self.options.workers)
        except OSError as exc:
            raise DaemonError(f"cannot serve metrics on {address}: {exc.strerror or exc}") from None
        log.info("metrics on http://%s:%d/metrics", *self.metrics.address)

    def status(self) -> dict:
        """What `cni-bridge inspect` shows of the daemon (answered by a worker, a fork of the supervisor)."""
        supervisor = os.getppid()
        address = self.metrics.address
        return {"pid": supervisor, "workers": self.options.workers, "workerPids": _children(supervisor),
                "uptimeSeconds": round(time.time() - self.started, 1),
                "metrics": f"{address[0]}:{address[1]}" if address else None}

    def _on_stop(self, signum: int, frame: object) -> None:
        self.stopping = True

    # socket ----------------------------------------------------------------
    def _listen(self) -> socket.socket:
        path = self.options.socket_path
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            os.makedirs(directory, mode=0o700, exist_ok=True)
        st = os.stat(directory)
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise DaemonError(f"{directory} is writable by others; put the socket in a private directory")
        if st.st_uid not in (0, os.geteuid()):
            # Its owner could swap the socket for one of their own.
            raise DaemonError(f"{directory} is owned by uid {st.st_uid}; put the socket in a directory "
                              "owned by root")
        self._clear_stale(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old_umask = os.umask(0o177)   # the socket is born 0600: no window where others may connect
        try:
            sock.bind(path)
        finally:
            os.umask(old_umask)
        os.chmod(path, 0o600)
        sock.listen(BACKLOG)
        sock.setblocking(False)
        st = os.stat(path)
        self.socket_ino = (st.st_dev, st.st_ino)
        return sock

    @staticmethod
    def _clear_stale(path: str) -> None:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise DaemonError(f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)   # nobody listens: left by a daemon that died
            return
        finally:
            probe.close()
        raise DaemonError(f"another daemon is already serving {path}")

    def _remove_socket(self) -> None:
        """Unlink the socket path if it is still ours (a successor may have replaced it)."""
        path = self.options.socket_path
        try:
            st = os.lstat(path)
            if (st.st_dev, st.st_ino) == self.socket_ino:
                os.unlink(path)
        except OSError:
            pass

    # workers ---------------------------------------------------------------
    def _spawn(self, slot: int) -> None:
        now = time.monotonic()
        self._spawn_times = [t for t in self._spawn_times if now - t < 10.0] + [now]
        if len(self._spawn_times) > 4 * self.options.workers:
            log.error("workers keep dying; pausing 1s before starting another")
            time.sleep(1.0)
        self._set_slot(slot, 0.0)
        # The child must not run the supervisor's signal handlers before it has its own.
        signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            pid = os.fork()
            if pid == 0:
                code = 70
                try:
                    code = Worker(self, slot).run()
                except BaseException:   # never return into the supervisor's loop in a child
                    log.exception("worker crashed")
                finally:
                    os._exit(code)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
        self.workers[pid] = slot

    def _set_slot(self, slot: int, value: float) -> None:
        assert self.slots is not None
        _SLOT.pack_into(self.slots, slot * _SLOT.size, value)

    def _slot(self, slot: int) -> float:
        assert self.slots is not None
        return _SLOT.unpack_from(self.slots, slot * _SLOT.size)[0]

    def _reap(self, respawn: bool) -> None:
        while self.workers:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            slot = self.workers.pop(pid, None)
            if slot is None:
                continue
            busy = self._slot(slot)
            if os.WIFSIGNALED(status) or os.WEXITSTATUS(status) != 0:
                log.warning("worker %d died (%s)%s", pid, _describe_status(status),
                            "; its call was lost and the plugin falls back to in-process" if busy else "")
            how = "signal" if os.WIFSIGNALED(status) else "error" if os.WEXITSTATUS(status) else "recycled"
            self.metrics.worker_exited(pid, how, restarted=respawn and not self.stopping, lost_call=bool(busy))
            if respawn and not self.stopping:
                self._spawn(slot)

    def _enforce_hard_limit(self) -> None:
        limit = self.options.request_timeout + HARD_LIMIT_GRACE
        now = time.monotonic()
        for pid, slot in list(self.workers.items()):
            started = self._slot(slot)
            if started and now - started > limit:
                log.error("worker %d is %.0fs into one call; killing it", pid, now - started)
                _kill(pid, signal.SIGKILL)

    def _shut_down(self) -> int:
        """Stop taking calls, let the workers finish the ones in flight, then go."""
        log.info("stopping: finishing %d call(s) in flight",
                 sum(1 for slot in self.workers.values() if self._slot(slot)))
        self._remove_socket()   # new plugin runs find no socket and run in-process
        for pid in self.workers:
            _kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + self.options.request_timeout + HARD_LIMIT_GRACE
        while self.workers and time.monotonic() < deadline:
            self._reap(respawn=False)
            if self.workers:
                time.sleep(0.05)
        for pid in self.workers:
            _kill(pid, signal.SIGKILL)
        self._reap(respawn=False)
        log.info("stopped")
        return 0


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return sorted(int(p) for p in f.read().split())
    except (OSError, ValueError):
        return []


def _kill(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"signal {os.WTERMSIG(status)}"
    return f"exit status {os.WEXITSTATUS(status)}"


# -- a worker ---------------------------------------------------------------------

class Worker:
    """One forked process: accept, check, run the call, answer; until told to stop."""

    def __init__(self, daemon: Daemon, slot: int) -> None:
        self.daemon = daemon
        self.options = daemon.options
        self.slot = slot
        self.listener = daemon.listener
        self.stopping = False

    def run(self) -> int:
        """Runs in the forked child, with SIGTERM and SIGINT blocked on entry."""
        assert self.listener is not None
        for fd in self.daemon.wake_fds:
            os.close(fd)
        self.daemon.metrics.close_inherited()
        parent = os.getppid()
        _set_parent_death_signal(signal.SIGTERM)
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)   # subprocess (iptables, IPAM plugins) reaps its own
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
        if os.getppid() != parent:   # the supervisor died before the death signal was armed
            return 0
        # EPOLLEXCLUSIVE: a connection wakes one idle worker, not all of them (with
        # select, every worker woke for every call and all but one found nothing).
        poller = select.epoll()
        poller.register(self.listener, select.EPOLLIN | select.EPOLLEXCLUSIVE)
        poller.register(wake_r, select.EPOLLIN)
        served = 0
        while not self.stopping and served < self.options.max_requests_per_worker:
            try:
                ready = {fd for fd, _ in poller.poll()}
            except InterruptedError:
                continue
            if wake_r in ready:
                _drain(wake_r)
                continue
            try:
                conn, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                continue   # another worker took it
            served += 1
            self._serve(conn)
            if wire.netns_id() != self.daemon.netns:
                # A call left this process in another namespace (a bug): the
                # next call would make host objects there. Start afresh.
                log.error("worker %d is no longer in the daemon's network namespace; replacing it", os.getpid())
                return 70
        if self.stopping:
            self._refuse_backlog()
        return 0

    def _on_stop(self, signum: int, frame: object) -> None:
        self.stopping = True   # a call in flight finishes first

    def _refuse_backlog(self) -> None:
        """Calls that connected before the socket was removed: tell them to run in-process."""
        assert self.listener is not None
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(1.0)
                _send(conn, {"v": wire.VERSION, "refused": "the daemon is stopping"})
                self.daemon.metrics.fallback("stopping")

    # one connection ------------------------------------------------------------
    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.setblocking(True)
            try:
                env, stdin = self._read_request(conn)
            except Refused as why:
                _send(conn, {"v": wire.VERSION, "refused": str(why)})
                self.daemon.metrics.fallback(why.kind)
                return
            except StatusAsked:
                _send(conn, {"v": wire.VERSION, "status": self.daemon.status()})
                return
            except (OSError, EOFError) as exc:
                log.info("dropped a connection: %s", exc)
                return
            if _hung_up(conn):
                log.warning("%s: the client hung up before the call started; not running it", _describe(env))
                return
            started = time.monotonic()
            answer = self._call(env, stdin, conn)
            if _hung_up(conn):
                self._abandoned(env, stdin, answer)
                return
            if log.isEnabledFor(logging.DEBUG):   # before the answer: a client that reads the log sees its call
                log.debug("%s cid=%s if=%s -> exit %d (%.1f ms)", env.get("CNI_COMMAND", "?"),
                          env.get("CNI_CONTAINERID", "-"), env.get("CNI_IFNAME", "-"), answer["exit"],
                          (time.monotonic() - started) * 1000)
            conn.settimeout(self.options.read_timeout)
            _send(conn, answer)

    def _abandoned(self, env: dict, stdin: bytes, answer: dict) -> None:
        """The client went away during the call: nobody will read the answer."""
        if env.get("CNI_COMMAND") == "ADD" and answer["exit"] == 0:
            # The runtime never learnt of this attachment and has moved on; it
            # must not outlive its caller (a DEL it already sent would be undone).
            undo = self._call({**env, "CNI_COMMAND": "DEL"}, stdin, None)
            log.warning("%s: the client hung up before the answer; undone with DEL (exit %d)",
                        _describe(env), undo["exit"])
        else:
            log.warning("%s: the client hung up before the answer (exit %d)", _describe(env), answer["exit"])

    def _read_request(self, conn: socket.socket) -> tuple[dict, bytes]:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, gid = struct.unpack("3i", creds)
        if uid not in self.options.allowed_uids:
            log.warning("refused a connection from pid %d uid %d", pid, uid)
            raise Refused(f"uid {uid} may not use this daemon", "uid")
        capability = self.options.required_capability
        if capability is not None and not _has_capability(pid, capability):
            # In-process the call would lack it too: let it fail there, the same way.
            log.warning("refused a connection from pid %d without CAP_NET_ADMIN", pid)
            raise Refused("the caller lacks CAP_NET_ADMIN", "capability")
        deadline = time.monotonic() + self.options.read_timeout   # for the whole request, not per read
        size = int.from_bytes(wire.recv_exact(conn, 4, deadline), "big")
        if size > self.options.max_request_bytes:
            raise Refused(f"request of {size} bytes exceeds the limit of {self.options.max_request_bytes}",
                          "too-large")
        try:
            msg = json.loads(wire.recv_exact(conn, size, deadline))
            if isinstance(msg, dict) and msg.get("status") is True and msg.get("v") == wire.VERSION:
                raise StatusAsked()
            env, stdin = msg["env"], binascii.a2b_base64(msg["stdin"])
        except (ValueError, KeyError, TypeError, binascii.Error):
            raise Refused("malformed request", "malformed") from None
        if msg.get("v") != wire.VERSION:   # a plugin from another release: let it run in-process
            raise Refused(f"protocol version {msg.get('v')!r} is not {wire.VERSION}", "version")
        netns = msg.get("netns")
        if netns is not None and netns != self.daemon.netns:
            raise Refused("the plugin runs in another network namespace than the daemon", "netns")
        if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
            raise Refused("malformed request: env must map strings to strings", "malformed")
        return {k: v for k, v in env.items() if k.startswith(wire.ENV_PREFIX)}, stdin

    def _call(self, env: dict, stdin: bytes, conn: Optional[socket.socket]) -> dict:
        """Run one call; `conn` is the client's connection, watched for a hang-up (None: nobody waits)."""
        out, err = io.StringIO(), io.StringIO()
        root = logging.getLogger()
        handlers, level, last_resort = list(root.handlers), root.level, logging.lastResort
        # Logging as in a process of its own: no handlers but the call's
        # `logFile`, and warnings without one go to the call's stderr.
        for handler in handlers:
            root.removeHandler(handler)
        logging.lastResort = logging.StreamHandler(err)
        logging.lastResort.setLevel(logging.WARNING)
        started = time.monotonic()
        self.daemon._set_slot(self.slot, started)
        faults.set_step_check(self._step_check(started + self.options.request_timeout, conn))
        verb = env.get("CNI_COMMAND", "")
        code = 1
        try:
            self.daemon.metrics.call_started(verb)
            code = self.daemon.execute(env, stdin, out, err)
        except BaseException as exc:   # isolate anything the runner did not turn into a CNI error
            if not isinstance(exc, CNIError):
                log.exception("call crashed outside the runner")
                exc = CNIError(Code.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")
            out, code = io.StringIO(), 1
            write_error(out, exc, stdin)
            err.write(f"{exc}\n")
        finally:
            self.daemon.metrics.call_finished(verb, daemon_metrics.call_result(code, out.getvalue()),
                                              time.monotonic() - started)
            faults.set_step_check(None)
            self.daemon._set_slot(self.slot, 0.0)
            _restore_logging(root, handlers, level)
            logging.lastResort = last_resort
            faults.arm(None)
        return {"v": wire.VERSION, "stdout": out.getvalue(), "stderr": err.getvalue(), "exit": code}

    def _step_check(self, deadline: float, conn: Optional[socket.socket]) -> Callable[[str], None]:
        """Stops an ADD between two steps (inside the rollback's reach) when it must not go on.

        Only cni-bridge's own ADD steps: IPAM's run under the store lock and
        DEL always finishes (it is idempotent, and half a DEL helps nobody).
        """
        limit = self.options.request_timeout

        def check(step: str) -> None:
            if not step.startswith("add."):
                return
            if time.monotonic() > deadline:
                raise RequestTimeout(limit)
            if conn is not None and _hung_up(conn):
                raise ClientGone()
        return check


def _restore_logging(root: logging.Logger, keep: list, level: int) -> None:
    """Close what a call's `logFile` opened (and forget it: the next call opens it again)."""
    oplog = sys.modules.get("cni_bridge.oplog")
    if oplog is not None:
        oplog.close_logs()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    for handler in keep:
        root.addHandler(handler)
    root.setLevel(level)


def _hung_up(conn: socket.socket) -> bool:
    """The client closed its end (it sends nothing after its request, so anything readable is EOF)."""
    poller = select.poll()
    poller.register(conn, select.POLLIN | select.POLLRDHUP)
    return bool(poller.poll(0))


def _has_capability(pid: int, capability: int) -> bool:
    """Whether process `pid` holds `capability` in its effective set (pid 0: not visible from here)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> capability & 1)
    except (OSError, ValueError, IndexError):
        pass
    return False


def _describe(env: dict) -> str:
    return "{}({}/{})".format(env.get("CNI_COMMAND", "?"), env.get("CNI_CONTAINERID", "-"),
                              env.get("CNI_IFNAME", "-"))


def _send(conn: socket.socket, msg: dict) -> None:
    body = json.dumps(msg).encode()
    try:
        conn.sendall(len(body).to_bytes(4, "big") + body)
    except OSError as exc:
        log.info("could not answer a client: %s", exc)


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 512):
            pass
    except (BlockingIOError, InterruptedError):
        pass


def _set_parent_death_signal(signum: int) -> None:
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0)
    except (OSError, AttributeError):
        pass


__all__ = ["Daemon", "Options", "main", "warm_up", "RequestTimeout"]
