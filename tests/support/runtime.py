"""Driving the plugins through real runtimes: the libcni cnitool harness and podman.

Helpers shared by tests/integration/test_runtime_*.py:

- `build_cnitool()` / `build_shim()` build tests/harness/cnitool into build/cnitool and
  the static front end into build/shim/cni-bridge.
- `adapt_conflist()` turns one of conf/*.conflist into a per-test copy (own
  bridge, dataDir in tmp, own subnet) so nothing collides.
- `Cnitool` runs `cnitool add|check|del` inside a scratch "host" netns, with an
  isolated libcni cache dir, the way containerd or podman would exec plugins.
- `install_spy()` puts a logging wrapper in front of a plugin in a CNI_PATH dir,
  to see what the runtime actually sent (verb order, CNI_ARGS, stdin).
- `TcpServer` / `tcp_get()` make real TCP traffic inside scratch namespaces.
"""
from __future__ import annotations

import copy
import ipaddress
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from tests.support.netns import REPO, Netns

CONF_DIR = REPO / "conf"
HARNESS = REPO / "tests" / "harness"
CNITOOL = REPO / "build" / "cnitool"
GOCODE_LIBCNI = Path("/usr/share/gocode/src/github.com/containernetworking/cni/libcni")
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


# --------------------------------------------------------------------- Go builds
SHIM = REPO / "build" / "shim" / "cni-bridge"


def _go_build(script: Path, out: Path, what: str, needs: dict[str, Callable[[], bool]]) -> tuple[Optional[Path], str]:
    """Run a build script that installs its own Go tools with apt when missing.

    Returns (path, "") or (None, why not). Only when a tool in `needs` (name ->
    a check, made after the run) is still missing do we report a reason the caller
    skips on; a build failure with the tools present is a real failure, reported
    with a reason starting "BUILD FAILED".
    """
    proc = subprocess.run(["sh", str(script), str(out)], capture_output=True, text=True, timeout=600)
    if proc.returncode == 0 and out.is_file():
        return out, ""
    log = (proc.stdout + proc.stderr).strip()[-2000:]
    missing = [name for name, present in needs.items() if not present()]
    if missing:
        return None, f"cannot install {' and '.join(missing)} to build {what}:\n{log}"
    return None, f"BUILD FAILED: {script.relative_to(REPO)} exited {proc.returncode}:\n{log}"


def _have_go() -> bool:
    return shutil.which("go") is not None


def build_shim(out: Path = SHIM) -> tuple[Optional[Path], str]:
    """Build (or reuse) the static front end."""
    return _go_build(REPO / "scripts" / "build_shim.sh", out, "the static front end",
                     {"go (golang-go)": _have_go})


def build_cnitool(out: Path = CNITOOL) -> tuple[Optional[Path], str]:
    """Build (or reuse an up-to-date) cnitool on Debian's libcni."""
    return _go_build(HARNESS / "build_cnitool.sh", out, "the cnitool harness",
                     {"go (golang-go)": _have_go, "libcni source (golang-github-appc-cni-dev)": GOCODE_LIBCNI.is_dir})

# ------------------------------------------------------------------------ conflists
def load_conflist(filename: str) -> dict:
    return json.loads((CONF_DIR / filename).read_text())


def main_plugin(conflist: dict) -> dict:
    return conflist["plugins"][0]


def adapt_conflist(filename: str, *, name: str, bridge: str, data_dir: Path,
                   version: Optional[str] = None, subnets: Optional[list[str]] = None) -> dict:
    """A copy of conf/<filename> safe to use in a test: its own name, bridge and dataDir.

    `subnets` replaces the IPAM ranges (one range set per subnet); `version`
    replaces cniVersion (libcni 1.1.2 cannot parse 1.1.0 results).
    """
    conf = copy.deepcopy(load_conflist(filename))
    conf["name"] = name
    if version is not None:
        conf["cniVersion"] = version
    plugin = main_plugin(conf)
    plugin["bridge"] = bridge
    plugin["ipam"]["dataDir"] = str(data_dir)
    if subnets is not None:
        plugin["ipam"]["ranges"] = [[{"subnet": s}] for s in subnets]
    return conf


def plugin_types(conflist: dict) -> list[str]:
    return [p["type"] for p in conflist["plugins"]]


def subnets_of(conflist: dict) -> list[ipaddress._BaseNetwork]:
    ipam = main_plugin(conflist)["ipam"]
    return [ipaddress.ip_network(r["subnet"]) for rs in ipam["ranges"] for r in rs]


# ------------------------------------------------------------------------- cnitool
@dataclass
class Cnitool:
    """Runs the cnitool harness in a scratch host netns against a private NETCONFPATH.

    Every call runs `ip netns exec <host> cnitool VERB NET NETNS` with
    CNI_PATH, NETCONFPATH and CNI_CACHE_DIR pointing into the test's tmp dir.
    """

    binary: Path
    host: Netns
    cni_path: Path
    netconf_dir: Path
    cache_dir: Path

    def write_conflist(self, conf: dict) -> Path:
        self.netconf_dir.mkdir(parents=True, exist_ok=True)
        path = self.netconf_dir / f"{conf['name']}.conflist"
        path.write_text(json.dumps(conf, indent=2))
        return path

    def env(self, *, container_id: str, ifname: str = "eth0", cap_args: Optional[dict] = None,
            cni_args: str = "", extra: Optional[dict] = None) -> dict[str, str]:
        env = {
            "PATH": SYSTEM_PATH,
            "NETCONFPATH": str(self.netconf_dir),
            "CNI_PATH": str(self.cni_path),
            "CNI_CACHE_DIR": str(self.cache_dir),
            "CNI_CONTAINERID": container_id,
            "CNI_IFNAME": ifname,
        }
        if cap_args is not None:
            env["CAP_ARGS"] = json.dumps(cap_args)
        if cni_args:
            env["CNI_ARGS"] = cni_args
        env.update(extra or {})
        return env

    def argv(self, verb: str, net: str, netns_path: str) -> list[str]:
        return ["ip", "netns", "exec", self.host.name, str(self.binary), verb, net, netns_path]

    def run(self, verb: str, net: str, netns_path: str, *, timeout: float = 60,
            **env_kw: Any) -> subprocess.CompletedProcess:
        proc = subprocess.run(self.argv(verb, net, netns_path), env=self.env(**env_kw), capture_output=True, text=True,
                              timeout=timeout)
        assert "Traceback" not in proc.stdout + proc.stderr, \
            f"cnitool {verb}: a plugin leaked a Python traceback:\n{proc.stdout}\n{proc.stderr}"
        return proc

    def popen(self, verb: str, net: str, netns_path: str, **env_kw: Any) -> subprocess.Popen:
        return subprocess.Popen(self.argv(verb, net, netns_path), env=self.env(**env_kw),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def ok(self, verb: str, net: str, netns_path: str, **env_kw: Any) -> subprocess.CompletedProcess:
        proc = self.run(verb, net, netns_path, **env_kw)
        assert proc.returncode == 0, (f"cnitool {verb} {net} failed (rc {proc.returncode}):\n"
                                      f"stdout: {proc.stdout}\nstderr: {proc.stderr}")
        return proc

    def add(self, net: str, netns_path: str, **env_kw: Any) -> dict:
        return json.loads(self.ok("add", net, netns_path, **env_kw).stdout)

    def cache_file(self, net: str, container_id: str, ifname: str = "eth0") -> Path:
        return self.cache_dir / "results" / f"{net}-{container_id}-{ifname}"


# ---------------------------------------------------------------- kernel/disk probes
def link_names(ns: Netns) -> set[str]:
    return set(ns.links())


UPLINK = "uplink0"


def add_uplink(run: Callable[..., Any], address: str) -> str:
    """Give a scratch host an uplink carrying a node address, as a real node has.

    `run(*argv)` runs a command in that host netns (Netns.exec, PodmanEnv.host_run).
    A veth pair with both ends in the host ns: not every kernel has the dummy driver.
    """
    run("ip", "link", "add", UPLINK, "type", "veth", "peer", "name", UPLINK + "p")
    run("ip", "addr", "add", address, "dev", UPLINK)
    for dev in (UPLINK, UPLINK + "p"):
        run("ip", "link", "set", dev, "up")
    return address.split("/")[0]


def veths(ns: Netns | Callable[..., Any]) -> list[str]:
    """The veths in a netns (a Netns, or a runner like PodmanEnv.host_run), minus the uplink."""
    run = ns.exec if isinstance(ns, Netns) else ns
    out = run("ip", "-o", "link", "show", "type", "veth").stdout
    names = [line.split(": ")[1].split("@")[0] for line in out.splitlines()]
    return [n for n in names if n not in (UPLINK, UPLINK + "p")]


def addresses(ns: Netns, dev: str) -> list[str]:
    out = ns.exec("ip", "-j", "addr", "show", "dev", dev).stdout
    return [f"{a['local']}/{a['prefixlen']}" for link in json.loads(out) for a in link["addr_info"]
            if a.get("scope") == "global"]


def nat_rules(ns: Netns | Callable[..., Any], family: int = 4) -> list[str]:
    tool = "iptables" if family == 4 else "ip6tables"
    if shutil.which(tool) is None:
        return []
    run = ns.exec if isinstance(ns, Netns) else ns
    return run(tool, "-w", "-t", "nat", "-S").stdout.splitlines()


def per_attachment_nat(ns: Netns | Callable[..., Any], container_id: str = "") -> list[str]:
    """nat rules/chains that belong to one attachment: portmap's CNI-DN-*, our CBR-* masq
    chains, and any rule naming the container ID. The shared CNI-HOSTPORT-* chains portmap
    keeps for all attachments are not counted."""
    found = []
    for family in (4, 6):
        for line in nat_rules(ns, family):
            if "CNI-DN-" in line or "CBR-" in line or (container_id and container_id in line):
                found.append(line)
    return found


def reservations(data_dir: Path, network: str) -> dict[str, Path]:
    """IP -> file, for every IP reserved on disk under <dataDir>/<network>/ (cni-ipam and
    host-local both name a reservation file after its IP)."""
    net_dir = data_dir / network
    out = {}
    if net_dir.is_dir():
        for entry in net_dir.iterdir():
            try:
                ipaddress.ip_address(entry.name)
            except ValueError:
                continue
            out[entry.name] = entry
    return out


def owner_index(data_dir: Path, network: str) -> list[str]:
    owners = data_dir / network / "owners"
    return sorted(p.name for p in owners.iterdir()) if owners.is_dir() else []


def result_ips(result: dict, family: int = 4) -> list[str]:
    return [ip["address"].split("/")[0] for ip in result.get("ips", [])
            if ipaddress.ip_interface(ip["address"]).version == family]


# --------------------------------------------------------------------------- spies
SPY_TEMPLATE = '''\
#!{python}
# Logging wrapper written by tests/support/runtime.py: record what the runtime
# sent, then run the real plugin with the same env and stdin.
import fcntl, json, os, subprocess, sys, time
data = sys.stdin.buffer.read()
rec = {{"t": time.time(), "pid": os.getpid(),
       "env": {{k: v for k, v in os.environ.items() if k.startswith("CNI_")}},
       "stdin": data.decode("utf-8", "replace")}}
proc = subprocess.run([{real!r}], input=data, stdout=subprocess.PIPE)
rec["rc"] = proc.returncode
rec["stdout"] = proc.stdout.decode("utf-8", "replace")
with open({log!r}, "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    f.write(json.dumps(rec) + "\\n")
sys.stdout.buffer.write(proc.stdout)
sys.exit(proc.returncode)
'''


def install_spy(cni_dir: Path, plugin: str, log: Path) -> Path:
    """Replace cni_dir/plugin (a symlink to the real one) by a logging wrapper."""
    target = cni_dir / plugin
    real = os.path.realpath(target)
    target.unlink()
    target.write_text(SPY_TEMPLATE.format(python=sys.executable, real=real, log=str(log)))
    target.chmod(0o755)
    return target


@dataclass
class SpyCall:
    command: str
    env: dict
    stdin: dict
    rc: int
    stdout: str


def spy_calls(log: Path) -> list[SpyCall]:
    if not log.exists():
        return []
    calls = []
    for line in log.read_text().splitlines():
        rec = json.loads(line)
        try:
            stdin = json.loads(rec["stdin"]) if rec["stdin"].strip() else {}
        except ValueError:
            stdin = {"_raw": rec["stdin"]}
        calls.append((rec["t"], SpyCall(rec["env"].get("CNI_COMMAND", ""), rec["env"], stdin,
                                        rec["rc"], rec["stdout"])))
    return [c for _, c in sorted(calls, key=lambda tc: tc[0])]


# ----------------------------------------------------------------------- traffic
_SERVER = r'''
import socket, sys
token, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET6 if ":" in sys.argv[3] else socket.AF_INET)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[3], port))
s.listen(16)
print("ready", flush=True)
while True:
    c, peer = s.accept()
    c.sendall(f"{token} from {peer[0]}\n".encode())
    c.close()
'''

_CLIENT = r'''
import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])) as c:
    c.settimeout(float(sys.argv[3]))
    data = b""
    while chunk := c.recv(4096):
        data += chunk
sys.stdout.write(data.decode())
'''


class TcpServer:
    """A TCP server inside a netns that answers every connection with `<token> from <peer>`.

    Started with `ip netns exec`; stopped (by its own pid) in close() / on exit.
    """

    def __init__(self, ns: Netns, port: int, token: str, bind: str = "0.0.0.0") -> None:
        self.token = token
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns.name, sys.executable, "-c", _SERVER, token, str(port), bind],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if line.strip() != "ready":
            self.close()
            raise RuntimeError(f"TCP server in {ns.name} did not start: {line!r} "
                               f"{self.proc.stderr.read() if self.proc.stderr else ''}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream:
                stream.close()

    def __enter__(self) -> "TcpServer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def tcp_get(ns: Netns, address: str, port: int, timeout: float = 3.0) -> subprocess.CompletedProcess:
    """Connect from inside `ns` and read until the server closes; the reply is on stdout."""
    return ns.exec(sys.executable, "-c", _CLIENT, address, str(port), str(timeout), check=False,
                   timeout=timeout + 10)


def wait_for(predicate, timeout: float = 5.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
