"""A private containerd (Debian's 1.6 with its CRI plugin) for integration tests.

Everything lives under `base_dir`: config.toml, root/, state/, the gRPC socket, runc's
state, the pod netns mounts (netns_mounts_under_state_dir), tmp and the log. containerd runs
in a scratch "host" netns (nsenter --net, so the mount namespace stays ours and its mounts
can be inspected and undone), which is where the CNI plugins it execs make the bridge,
veths and iptables rules; deleting that netns at the end removes them all.

Settings these machines need (measured): `restrict_oom_score_adj = true`, cgroupfs (no
systemd), a CNI bin dir that holds `loopback`. Sandboxes get a cgroup parent of our own so
their cgroups are easy to find and remove.

Outside base_dir, and cleaned by `cleanup()`: the shims' sockets in /run/containerd/s
(containerd has no setting for that directory), libcni's result cache entries in
/var/lib/cni/results for our networks, and the cgroup parent. The system's
/etc/containerd, /run/containerd/containerd.sock and any systemd unit are never used.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Optional

CRI = 'plugins."io.containerd.grpc.v1.cri"'
SHIM_SOCKETS = Path("/run/containerd/s")
LIBCNI_CACHE = Path("/var/lib/cni/results")
CGROUP_ROOT = Path("/sys/fs/cgroup")
K8S_NAMESPACE = "k8s.io"
SANDBOX_IMAGE = "localhost/cni-test-pause:1"
START_TIMEOUT = 60.0     # bounds on waiting, never asserted as durations
STOP_TIMEOUT = 30.0


def containerd_unavailable_reason() -> Optional[str]:
    if os.geteuid() != 0:
        return "containerd tests need root"
    for tool in ("containerd", "ctr", "containerd-shim-runc-v2", "runc", "nsenter"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (scripts/setup.sh with WITH_RUNTIMES=1 installs containerd)"
    return None


def _toml(value) -> str:
    return json.dumps(value)   # JSON strings and booleans are valid TOML


class Containerd:
    """One private containerd. Use `start()`, `restart()`, `cleanup()` (never raises)."""

    def __init__(self, base_dir: Path, bin_dir: Path, conf_dir: Path, host_netns: str) -> None:
        self.base_dir = Path(base_dir).resolve()
        self.bin_dir, self.conf_dir = Path(bin_dir).resolve(), Path(conf_dir).resolve()
        self.host_netns = host_netns
        self.root, self.state = self.base_dir / "root", self.base_dir / "state"
        self.socket = self.base_dir / "containerd.sock"
        self.config = self.base_dir / "config.toml"
        self.log = self.base_dir / "containerd.log"
        self.cgroup_parent = f"/cnicri-{secrets.token_hex(4)}"
        self.proc: Optional[subprocess.Popen] = None
        self.networks: set[str] = set()   # CNI network names used, for the libcni cache clean-up
        self._shim_sockets_before = set(os.listdir(SHIM_SOCKETS)) if SHIM_SOCKETS.is_dir() else set()
        self._made_dirs = [d for d in (SHIM_SOCKETS.parent, SHIM_SOCKETS, LIBCNI_CACHE.parent, LIBCNI_CACHE)
                           if not d.exists()]
        for d in (self.root, self.state, self.conf_dir, self.base_dir / "tmp"):
            d.mkdir(parents=True, exist_ok=True)
        self.config.write_text(self._config_text())

    def _config_text(self) -> str:
        b = self.base_dir
        return "\n".join([
            "# Written by tests/harness/cri/containerd.py: a private containerd for the tests.",
            "version = 2",
            f"root = {_toml(str(self.root))}",
            f"state = {_toml(str(self.state))}",
            # Snapshotters we never use stay off (btrfs/zfs/devmapper probe the disk).
            'disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",'
            ' "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",'
            ' "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]',
            "[grpc]",
            f"  address = {_toml(str(self.socket))}",
            "[ttrpc]",
            f"  address = {_toml(str(self.socket) + '.ttrpc')}",
            "[debug]",
            '  level = "info"',
            '[plugins."io.containerd.internal.v1.opt"]',
            f"  path = {_toml(str(b / 'opt'))}",   # default /opt/containerd
            f"[{CRI}]",
            f"  sandbox_image = {_toml(SANDBOX_IMAGE)}",
            "  restrict_oom_score_adj = true",
            "  netns_mounts_under_state_dir = true",   # pod netns under state/, not /var/run/netns
            '  stream_server_address = "127.0.0.1"',
            '  stream_server_port = "0"',
            "  enable_selinux = false",
            "  disable_apparmor = true",
            f"[{CRI}.containerd]",
            # native: plain copies, no overlay mount (these VMs' /tmp may not take one)
            '  snapshotter = "native"',
            '  default_runtime_name = "runc"',
            f"[{CRI}.containerd.runtimes.runc]",
            '  runtime_type = "io.containerd.runc.v2"',
            f"[{CRI}.containerd.runtimes.runc.options]",
            "  SystemdCgroup = false",
            f"  Root = {_toml(str(b / 'runc'))}",
            f"[{CRI}.cni]",
            f"  bin_dir = {_toml(str(self.bin_dir))}",
            f"  conf_dir = {_toml(str(self.conf_dir))}",
            "  max_conf_num = 1",
            "",
        ])

    # ------------------------------------------------------------------ lifecycle
    def argv(self) -> list[str]:
        return ["nsenter", f"--net=/run/netns/{self.host_netns}", "containerd", "--config", str(self.config)]

    def start(self) -> None:
        env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
               "TMPDIR": str(self.base_dir / "tmp")}
        with open(self.log, "ab") as out:
            # nsenter execs containerd: self.proc.pid is containerd's PID.
            self.proc = subprocess.Popen(self.argv(), env=env, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=out, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        while not self._cri_serving():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"containerd did not start (exit {self.proc.poll()}):\n{self.log_tail()}")
            time.sleep(0.1)

    def _cri_serving(self) -> bool:
        if not self.socket.exists():
            return False
        with socket.socket(socket.AF_UNIX) as probe:
            try:
                probe.connect(str(self.socket))
            except OSError:
                return False
        # The socket answers before the CRI plugin has loaded; ask it.
        from tests.harness.cri.client import CriClient
        client = CriClient(str(self.socket))
        try:
            client.version()
            return True
        except Exception:
            return False
        finally:
            client.close()

    def stop(self) -> None:
        """SIGTERM containerd by its PID (SIGKILL if it hangs). Shims and sandboxes live on."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(STOP_TIMEOUT)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    # ---------------------------------------------------------------------- tools
    def ctr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(["ctr", "--address", str(self.socket), "--namespace", K8S_NAMESPACE, *args],
                              capture_output=True, text=True, timeout=timeout, check=True)

    def import_image(self, tar: Path) -> None:
        self.ctr("images", "import", "--snapshotter", "native", str(tar))

    def shim_pids(self) -> list[int]:
        """PIDs of the shims this containerd started (their command line names our socket)."""
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if cmdline and cmdline[0].endswith(b"containerd-shim-runc-v2") and \
                    str(self.socket).encode() in cmdline:
                pids.append(int(entry.name))
        return pids

    # -------------------------------------------------------------------- clean-up
    def cleanup(self, client=None) -> list[str]:
        """Remove every sandbox, stop containerd and undo what it made. Never raises;
        returns what could not be cleaned (empty when clean)."""
        problems: list[str] = []
        if client is not None and self.proc is not None and self.proc.poll() is None:
            try:
                for sandbox_id, _, _ in client.list_pod_sandbox():
                    client.stop_pod_sandbox(sandbox_id)
                    client.remove_pod_sandbox(sandbox_id)
            except Exception as exc:   # containerd may be the thing that failed
                problems.append(f"removing sandboxes through CRI: {exc}")
        self.stop()
        self._force_remove_containers(problems)
        self._end_shims(problems)
        self._umount_under(self.base_dir, problems)
        self._remove_cgroups(problems)
        self._remove_shim_sockets()
        for net in self.networks:
            for entry in LIBCNI_CACHE.glob(f"{glob_escape(net)}-*") if LIBCNI_CACHE.is_dir() else []:
                entry.unlink(missing_ok=True)
        self._remove_made_dirs()
        shutil.rmtree(self.base_dir, onerror=lambda f, p, e: problems.append(f"rm {p}: {e[1]}"))
        return problems

    def _end_shims(self, problems: list[str]) -> None:
        """Wait for our shims to exit (they do once their sandbox is removed), SIGKILL those
        still there, and wait until they are gone: a dying shim may still hold its socket."""
        grace = time.monotonic() + 5
        while self.shim_pids() and time.monotonic() < grace:
            time.sleep(0.05)
        for pid in self.shim_pids():
            _kill(pid, problems)
        deadline = time.monotonic() + STOP_TIMEOUT
        while self.shim_pids():
            if time.monotonic() > deadline:
                problems.append(f"shims still running: {self.shim_pids()}")
                return
            time.sleep(0.05)

    def _force_remove_containers(self, problems: list[str]) -> None:
        """Sandboxes containerd did not remove (it failed or was killed): runc kill + delete."""
        runc_root = self.base_dir / "runc" / K8S_NAMESPACE
        if not runc_root.is_dir():
            return
        for container in [p.name for p in runc_root.iterdir() if p.is_dir()]:
            subprocess.run(["runc", "--root", str(runc_root), "kill", container, "KILL"], capture_output=True)
            proc = subprocess.run(["runc", "--root", str(runc_root), "delete", "--force", container],
                                  capture_output=True, text=True)
            if proc.returncode != 0 and (runc_root / container).exists():
                problems.append(f"runc delete {container}: {proc.stderr.strip()}")

    @staticmethod
    def _umount_under(root: Path, problems: list[str]) -> None:
        """Lazily unmount everything below root, deepest first (rootfs, shm, pod netns)."""
        with open("/proc/self/mountinfo") as f:
            points = [re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), line.split()[4]) for line in f]
        for point in sorted({p for p in points if Path(p).is_relative_to(root)}, reverse=True):
            proc = subprocess.run(["umount", "-l", point], capture_output=True, text=True)
            if proc.returncode != 0:
                problems.append(f"umount {point}: {proc.stderr.strip()}")

    def _remove_cgroups(self, problems: list[str]) -> None:
        for hierarchy in CGROUP_ROOT.iterdir() if CGROUP_ROOT.is_dir() else []:
            parent = hierarchy / self.cgroup_parent.lstrip("/")
            if not parent.is_dir():
                continue
            for d in sorted((p for p in parent.rglob("*") if p.is_dir()), key=lambda p: len(p.parts),
                            reverse=True) + [parent]:
                try:
                    d.rmdir()
                except OSError as exc:
                    problems.append(f"rmdir {d}: {exc}")

    def _remove_shim_sockets(self) -> None:
        """Shim sockets that appeared while we ran and that nobody listens on any more."""
        if SHIM_SOCKETS.is_dir():
            for name in set(os.listdir(SHIM_SOCKETS)) - self._shim_sockets_before:
                path = SHIM_SOCKETS / name
                with socket.socket(socket.AF_UNIX) as probe:
                    try:
                        probe.connect(str(path))
                        continue   # alive: not ours to remove
                    except OSError:
                        pass
                path.unlink(missing_ok=True)

    def _remove_made_dirs(self) -> None:
        """/run/containerd/s, /var/lib/cni/results and their parents, if we made them and they are empty."""
        for d in reversed(self._made_dirs):   # deepest first
            try:
                d.rmdir()
            except OSError:
                pass


def glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


def _kill(pid: int, problems: list[str]) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    except OSError as exc:
        problems.append(f"kill {pid}: {exc}")
