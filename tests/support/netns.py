"""Scratch network namespaces and plugin invocation for integration tests.

Every name is unique per test and process; everything made is removed even
when a test fails. Tests run the plugins inside a scratch "host" netns, so
bridges, veths, sysctls and iptables rules never touch the machine's own.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
REFERENCE_DIR = Path("/usr/lib/cni")
NETNS_DIR = Path("/var/run/netns")


def unique(prefix: str) -> str:
    """A short unique name (fits in 15 characters for interface names)."""
    return f"{prefix}{uuid.uuid4().hex[:8]}"


def can_use_netns() -> Optional[str]:
    """None when real namespaces work here, else the reason they do not."""
    if os.geteuid() != 0:
        return "needs root (CAP_NET_ADMIN) for network namespaces"
    if shutil.which("ip") is None:
        return "needs iproute2's ip command"
    return None


class Netns:
    """A named network namespace that deletes itself."""

    def __init__(self, prefix: str = "t") -> None:
        self.name = unique(prefix)
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        self.path = str(NETNS_DIR / self.name)
        self.exec("ip", "link", "set", "lo", "up")

    def exec(self, *argv: str, check: bool = True, input: Optional[str] = None,
             timeout: float = 30, env: Optional[dict] = None) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", self.name, *argv], check=check, text=True,
                              capture_output=True, input=input, timeout=timeout, env=env)

    def links(self) -> list[str]:
        out = self.exec("ip", "-o", "link", "show").stdout
        return [line.split(": ")[1].split("@")[0] for line in out.splitlines()]

    def nat_rules(self, binary: str = "iptables") -> list[str]:
        if shutil.which(binary) is None:
            return []
        return self.exec(binary, "-t", "nat", "-S").stdout.splitlines()

    def delete(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], check=False, capture_output=True)


@dataclass
class PluginResult:
    rc: int
    stdout: str
    stderr: str

    @property
    def json(self) -> Any:
        return json.loads(self.stdout) if self.stdout.strip() else None


@dataclass
class CniHost:
    """A scratch host netns with a CNI_PATH holding our plugins and the reference ones."""

    netns: Netns
    cni_path: Path
    data_dir: Path
    extra_env: dict = field(default_factory=dict)

    def run(self, plugin: str, command: str, config: dict | bytes | str, *,
            container_id: str = "", netns: str = "", ifname: str = "eth0",
            cni_args: str = "", timeout: float = 60, env: Optional[dict] = None) -> PluginResult:
        """Exec `plugin` (a name in CNI_PATH) inside the host netns, like a runtime would."""
        if isinstance(config, dict):
            stdin = json.dumps(config)
        elif isinstance(config, bytes):
            stdin = config.decode("utf-8", "surrogateescape")
        else:
            stdin = config
        call_env = {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "CNI_COMMAND": command,
            "CNI_PATH": str(self.cni_path),
        }
        for key, value in (("CNI_CONTAINERID", container_id), ("CNI_NETNS", netns),
                           ("CNI_IFNAME", ifname), ("CNI_ARGS", cni_args)):
            if value:
                call_env[key] = value
        call_env.update(self.extra_env)
        call_env.update(env or {})
        proc = self.netns.exec(str(self.cni_path / plugin), check=False, input=stdin,
                               timeout=timeout, env=call_env)
        return PluginResult(proc.returncode, proc.stdout, proc.stderr)


def make_cni_path(directory: Path, front_end: Optional[Path] = None) -> Path:
    """A CNI_PATH dir: our two executables plus every reference plugin Debian ships.

    With `front_end` (the static front end, build/shim/cni-bridge), cni-bridge is
    that program and the Python one sits beside it as cni-bridge-python, as
    installed on a node that runs the daemon.
    """
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("cni-bridge", "cni-ipam"):
        os.symlink(VENV_BIN / name, directory / name)
    if front_end is not None:
        os.rename(directory / "cni-bridge", directory / "cni-bridge-python")
        shutil.copy2(front_end, directory / "cni-bridge")
    if REFERENCE_DIR.is_dir():
        for plugin in REFERENCE_DIR.iterdir():
            os.symlink(plugin, directory / plugin.name)
    return directory
