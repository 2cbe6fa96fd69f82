"""A private Docker engine for the node e2e tests; never the machine's own service.

`dockerd` runs inside a scratch network namespace made here, with its own socket,
exec-root and pid file, the `vfs` storage driver and a data-root under build/
(kept between runs so the imported node image is cached). In that namespace it
makes no iptables rules and no docker0 (`--iptables=false --bridge=none`) and does
not route between its networks (`--ip-forward=false`): the node networks are
plain bridges, and the only way between the two subnets is the router container.
Whatever it does make in its namespace goes when the namespace is deleted at stop.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[3]
CACHE = REPO / "build" / "e2e-nodes"


def missing() -> Optional[str]:
    """None when a private engine can be started here, else why not."""
    if os.geteuid() != 0:
        return "needs root"
    for tool in ("dockerd", "docker", "docker-compose", "debootstrap", "ip"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (WITH_RUNTIMES=1 ./scripts/setup.sh installs it)"
    return None


class PrivateDocker:
    def __init__(self) -> None:
        token = uuid.uuid4().hex[:8]
        self.netns = f"cnie2e{token}"
        self.exec_root = Path(f"/run/cni-e2e-{token}")
        self.socket = self.exec_root / "docker.sock"
        self.data_root = CACHE / "docker"
        self.log = CACHE / "dockerd.log"
        self.proc: Optional[subprocess.Popen] = None
        self._lock_fd: Optional[int] = None

    @property
    def env(self) -> dict:
        return {**os.environ, "DOCKER_HOST": f"unix://{self.socket}"}

    def docker(self, *argv: str, check: bool = True, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
        proc = subprocess.run(["docker", *argv], env=self.env, text=True, capture_output=True, timeout=timeout, **kw)
        if check and proc.returncode != 0:
            raise RuntimeError(f"docker {' '.join(argv)}: {proc.stderr.strip() or proc.stdout.strip()}")
        return proc

    def start(self) -> None:
        CACHE.mkdir(parents=True, exist_ok=True)
        # One engine per data-root at a time (another session waits here).
        self._lock_fd = os.open(CACHE / "docker.lock", os.O_CREAT | os.O_RDWR, 0o644)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        subprocess.run(["ip", "netns", "add", self.netns], check=True)
        subprocess.run(["ip", "netns", "exec", self.netns, "ip", "link", "set", "lo", "up"], check=True)
        self.exec_root.mkdir(mode=0o700)
        config = self.exec_root / "daemon.json"
        # Not /etc/docker/daemon.json; and the engine's trust key (default /etc/docker/key.json)
        # goes to the exec-root, so nothing of the engine stays on the machine.
        config.write_text(json.dumps({"deprecated-key-path": str(self.exec_root / "key.json")}) + "\n")
        # nsenter, not `ip netns exec`: that also remounts /sys, which hides the cgroup mounts dockerd needs.
        argv = ["nsenter", f"--net=/var/run/netns/{self.netns}", "dockerd",
                "--config-file", str(config), "--data-root", str(self.data_root),
                "--exec-root", str(self.exec_root / "exec"), "--pidfile", str(self.exec_root / "dockerd.pid"),
                "--host", f"unix://{self.socket}", "--storage-driver", "vfs",
                "--iptables=false", "--ip-forward=false", "--bridge=none", "--ip-masq=false",
                "--userland-proxy=false", "--log-level=warn"]
        log = open(self.log, "wb")
        self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + 60
        while self.docker("version", check=False, timeout=10).returncode != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = self.log.read_text(errors="replace")[-2000:]
                self.stop()
                raise RuntimeError(f"dockerd did not come up: {tail}")
            time.sleep(0.3)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)    # dockerd stops its containers and its containerd
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        subprocess.run(["ip", "netns", "del", self.netns], check=False, capture_output=True)
        # Container mounts under the exec-root are gone with dockerd; anything left is unmounted lazily.
        if self.exec_root.exists():
            for line in reversed(Path("/proc/self/mounts").read_text().splitlines()):
                target = line.split()[1]
                if target.startswith(str(self.exec_root)):
                    subprocess.run(["umount", "-l", target], check=False, capture_output=True)
            shutil.rmtree(self.exec_root, ignore_errors=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def node_image(engine: PrivateDocker) -> str:
    """The node image in the private engine, built from a cached debootstrap rootfs."""
    script = Path(__file__).with_name("build_node_image.sh")
    import hashlib

    digest = hashlib.sha256(script.read_bytes()).hexdigest()[:12]
    tag = f"cni-bridge-node:{digest}"
    if engine.docker("image", "inspect", tag, check=False).returncode == 0:
        return tag
    rootfs = CACHE / f"rootfs-{digest}.tar"
    if not rootfs.exists():
        subprocess.run(["sh", str(script), str(rootfs)], check=True, timeout=1200)
    engine.docker("import", "--change", 'CMD ["sleep", "infinity"]', str(rootfs), tag, timeout=600)
    return tag
