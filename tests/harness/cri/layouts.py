"""The CNI bin dir containerd execs from, laid out as each install path makes it, and the
node daemon beside it.

Layouts (`LAYOUTS`), each with Debian's reference plugins (`loopback`, `portmap`, `bridge`,
`host-local`, ...) added for the names the layout does not provide:

- `cni-bridge`: the Python executables as `pip install .` gives them (the dev venv's);
- `cni-bridge+daemon`: `scripts/install_front_end.sh` (what `make install` runs): the static
  front end as cni-bridge, the Python program beside it as cni-bridge-python, and cni-ipam;
- `bundle`: a copy of the PyInstaller bundle `scripts/bundle.sh` builds (`make bundle`);
- `reference`: the reference plugins only.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from tests.support.netns import REFERENCE_DIR, REPO, VENV_BIN
from tests.support.waiting import unix_socket_listening

LAYOUTS = ("cni-bridge", "cni-bridge+daemon", "bundle", "reference")
BUNDLE = REPO / "build" / "test-bundle" / "cni-bin"  # shared with test_bundle.py (rebuilt only on change)
WAIT = 60.0                                          # bound on waiting, never asserted


def _run(argv: list[str], what: str, timeout: float) -> None:
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")


def make_bin_dir(layout: str, bin_dir: Path) -> Path:
    if layout == "bundle":
        _run([str(REPO / "scripts" / "bundle.sh"), str(BUNDLE)], "scripts/bundle.sh", 1500)
        shutil.copytree(BUNDLE, bin_dir, symlinks=True)
    elif layout == "cni-bridge+daemon":
        _run(["sh", str(REPO / "scripts" / "install_front_end.sh"), str(bin_dir)], "scripts/install_front_end.sh",
             900)
    else:
        bin_dir.mkdir(parents=True)
        if layout == "cni-bridge":
            for name in ("cni-bridge", "cni-ipam"):
                os.symlink(VENV_BIN / name, bin_dir / name)
    present = set(os.listdir(bin_dir))
    for plugin in REFERENCE_DIR.iterdir():
        if plugin.name not in present:
            os.symlink(plugin, bin_dir / plugin.name)
    return bin_dir


def python_program(bin_dir: Path) -> Path:
    """The Python cni-bridge of a layout (for `agent` and `daemon`; the front end only forwards CNI calls)."""
    beside = bin_dir / "cni-bridge-python"
    return beside if beside.exists() else bin_dir / "cni-bridge"


@dataclass
class Daemon:
    proc: subprocess.Popen
    socket: Path
    log: Path

    def served(self, command: str, cid: str) -> int:
        """How many `command` calls for container `cid` the daemon answered (its DEBUG log)."""
        return self.log.read_text(errors="replace").count(f" {command} cid={cid} if=")

    def stop(self) -> None:
        """SIGTERM by PID; SIGKILL to its process group (its workers) if it hangs."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(WAIT)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(WAIT)


def start_daemon(host_netns_path: str, program: Path, base: Path) -> Daemon:
    """`cni-bridge daemon` in the host netns and in containerd's mount namespace. (`ip netns
    exec` would give it a private mount namespace, where the pod netns containerd bind-mounts
    later are empty files, and setns() on them fails with EINVAL.)"""
    sock, log = base / "daemon.sock", base / "daemon.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(["nsenter", f"--net={host_netns_path}", str(program), "daemon", "--socket",
                                 str(sock), "--workers", "2", "--log-level", "DEBUG"],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)
    daemon = Daemon(proc, sock, log)
    deadline = time.monotonic() + WAIT
    while not unix_socket_listening(sock):
        if proc.poll() is not None or time.monotonic() > deadline:
            daemon.stop()
            raise RuntimeError(f"the daemon did not start:\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.05)
    return daemon
