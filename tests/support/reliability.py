"""Helpers for the reliability tests and scripts/reliability_bench.py.

Configs for one scratch network, and `leftovers()`: everything an attachment
can leave behind (host veths, reservation files, owner records, temp files,
masquerade chains and nftables set elements), so "nothing leaks" is one assertion.
"""
from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator, Optional

from cni_bridge.faults import ENV_VAR
from tests.support.netns import CniHost, Netns, PluginResult

CNI_VERSION = "1.1.0"
KILLED = -9   # returncode of a process that SIGKILLed itself (ip netns exec execs the plugin)


def bridge_conf(data_dir: Path, bridge: str, network: str = "rel", subnet: str = "10.77.0.0/24",
                masq: bool = True, **ipam_extra) -> dict:
    return {
        "cniVersion": CNI_VERSION, "name": network, "type": "cni-bridge", "bridge": bridge,
        "isGateway": True, "ipMasq": masq,
        "ipam": {"type": "cni-ipam", "dataDir": str(data_dir),
                 "ranges": [[{"subnet": subnet}]], **ipam_extra},
    }


def ipam_conf(data_dir: Path, network: str = "rel", subnet: str = "10.78.0.0/24", **ipam_extra) -> dict:
    return {
        "cniVersion": CNI_VERSION, "name": network, "type": "cni-ipam",
        "ipam": {"type": "cni-ipam", "dataDir": str(data_dir),
                 "ranges": [[{"subnet": subnet}]], **ipam_extra},
    }


def gc_conf(conf: dict, keep: list[tuple[str, str]]) -> dict:
    listed = [{"containerID": cid, "ifname": ifname} for cid, ifname in keep]
    return {**conf, "cni.dev/valid-attachments": listed, "cni.dev/attachments": listed}


def faulty(point: str) -> dict:
    return {ENV_VAR: point}


def store_files(data_dir: Path, network: str) -> dict[str, list[str]]:
    """Reservation files, owner records and temp files of one network's store."""
    base = Path(data_dir) / network
    found: dict[str, list[str]] = {"reservations": [], "owners": [], "temp_files": []}
    if not base.is_dir():
        return found
    for path in sorted(base.iterdir()):
        if path.name.startswith(".tmp-"):
            found["temp_files"].append(path.name)
        elif is_ip(path.name):
            found["reservations"].append(path.name)
    owners = base / "owners"
    if owners.is_dir():
        for path in sorted(owners.iterdir()):
            key = "temp_files" if path.name.startswith(".tmp-") else "owners"
            found[key].append(f"owners/{path.name}")
    return found


def is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def host_veths(host: Netns) -> list[str]:
    return [name for name in host.links() if name.startswith("veth")]


def masq_chains(host: Netns) -> list[str]:
    return sorted({line.split()[1] for line in host.nat_rules() if line.startswith("-N CBR-")})


def masq_elements(host: Netns) -> list[str]:
    """`<set> <address> <comment>` of every pod address in cni-bridge's nftables table."""
    proc = host.exec("nft", "-j", "list", "table", "inet", "cni_bridge", check=False)
    if proc.returncode != 0:
        return []   # no table (or no nft): no elements
    found = []
    for obj in json.loads(proc.stdout)["nftables"]:
        nft_set = obj.get("set", {})
        if not nft_set.get("name", "").startswith("pods"):
            continue
        for elem in nft_set.get("elem", []):
            value = elem["elem"] if isinstance(elem, dict) and "elem" in elem else {"val": elem}
            found.append(f"{nft_set['name']} {value['val']} {value.get('comment', '')}")
    return sorted(found)


def leftovers(cni_host: CniHost, network: str, *, temp_files: bool = True) -> dict[str, list[str]]:
    """Everything left behind; empty when nothing leaked."""
    found = dict(store_files(cni_host.data_dir, network))
    if not temp_files:
        found.pop("temp_files")
    found["veths"] = host_veths(cni_host.netns)
    found["chains"] = masq_chains(cni_host.netns)
    found["nft_elements"] = masq_elements(cni_host.netns)
    return {key: value for key, value in found.items() if value}


def wait_until(predicate, timeout: float = 10.0) -> bool:
    """Poll for asynchronous kernel clean-up (a deleted netns takes its veth with it later)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def ipam_cli(cni_host: CniHost, *args: str) -> PluginResult:
    """The operator CLI (`cni-ipam` without CNI_COMMAND), run in the scratch host netns."""
    env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")}
    proc = cni_host.netns.exec(str(cni_host.cni_path / "cni-ipam"), *args, check=False, env=env)
    return PluginResult(proc.returncode, proc.stdout, proc.stderr)


def no_traceback(res: PluginResult) -> None:
    assert "Traceback" not in res.stdout + res.stderr, res.stdout + res.stderr


def cni_error(res: PluginResult) -> dict:
    """The CNI error object of a failed call (and the checks every failure must pass)."""
    no_traceback(res)
    assert res.rc == 1, (res.rc, res.stdout, res.stderr)
    error = json.loads(res.stdout)
    assert isinstance(error["code"], int) and error["msg"], error
    return error


@contextlib.contextmanager
def tmpfs(size: str = "1m", parent: Optional[str] = None) -> Iterator[Path]:
    """A small tmpfs mounted on a fresh temp dir; unmounted and removed even on failure."""
    mountpoint = Path(tempfile.mkdtemp(prefix="cni-tmpfs-", dir=parent))
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(mountpoint)],
                   check=True)
    try:
        yield mountpoint
    finally:
        if subprocess.run(["umount", str(mountpoint)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True)
        with contextlib.suppress(OSError):
            mountpoint.rmdir()


def remount(mountpoint: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(mountpoint)], check=True)
