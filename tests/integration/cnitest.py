"""Shared pieces of the integration suite: a checked plugin runner, config builders and
probes that read kernel and disk state with the ordinary tools (ip, iptables, sysfs).

Every plugin call made through `Cni` asserts that no Python traceback reached stdout
or stderr, so that rule holds in every test without each one repeating it.
"""
from __future__ import annotations

import ipaddress
import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from tests.support.netns import CniHost, Netns, PluginResult, unique

NETWORK = "itest"
ERROR_KEYS = {"cniVersion", "code", "msg", "details"}
OUR_CHAIN_PREFIX = "CBR-"


def assert_no_traceback(res: PluginResult, what: str = "") -> None:
    for stream, text in (("stdout", res.stdout), ("stderr", res.stderr)):
        assert "Traceback" not in text, f"{what}: traceback on {stream}:\n{text}"


def assert_cni_error(res: PluginResult, code: Optional[int] = None, *words: str) -> dict:
    """rc 1 and a well-formed CNI error object on stdout (with `code` and `words` in msg/details)."""
    assert res.rc == 1, f"expected exit status 1, got {res.rc}: stdout={res.stdout!r} stderr={res.stderr!r}"
    try:
        err = json.loads(res.stdout)
    except ValueError:
        raise AssertionError(f"stdout is not a JSON error object: {res.stdout!r}") from None
    assert isinstance(err, dict) and set(err) == ERROR_KEYS, err
    assert isinstance(err["code"], int) and isinstance(err["msg"], str) and err["msg"], err
    assert isinstance(err["details"], str) and isinstance(err["cniVersion"], str), err
    if code is not None:
        assert err["code"] == code, f"expected code {code}, got {err}"
    text = (err["msg"] + " " + err["details"]).lower()
    for word in words:
        assert word.lower() in text, f"{word!r} not mentioned in {err}"
    return err


@dataclass
class Cni:
    """Runs plugins in a scratch host netns (through CniHost.run) and checks every answer."""

    host: CniHost
    tmp: Path

    @property
    def ns(self) -> Netns:
        return self.host.netns

    @property
    def data_dir(self) -> Path:
        return self.host.data_dir

    def run(self, plugin: str, command: str, config: Any, **kw: Any) -> PluginResult:
        res = self.host.run(plugin, command, config, **kw)
        assert_no_traceback(res, f"{plugin} {command}")
        return res

    def ok(self, plugin: str, command: str, config: Any, **kw: Any) -> PluginResult:
        res = self.run(plugin, command, config, **kw)
        assert res.rc == 0, f"{plugin} {command} failed (rc {res.rc}): {res.stdout} {res.stderr}"
        return res

    def fails(self, code: Optional[int], plugin: str, command: str, config: Any, *words: str,
              **kw: Any) -> dict:
        return assert_cni_error(self.run(plugin, command, config, **kw), code, *words)

    def run_bytes(self, plugin: str, stdin: bytes, env: dict[str, str]) -> PluginResult:
        """Like CniHost.run but with raw stdin bytes (CniHost.run sends text)."""
        call_env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
                    "CNI_PATH": str(self.host.cni_path), **env}
        proc = subprocess.run(["ip", "netns", "exec", self.ns.name, str(self.host.cni_path / plugin)],
                              input=stdin, env=call_env, capture_output=True, timeout=60)
        res = PluginResult(proc.returncode, proc.stdout.decode("utf-8", "replace"),
                           proc.stderr.decode("utf-8", "replace"))
        assert_no_traceback(res, f"{plugin} (raw stdin)")
        return res

    # -- the usual calls --------------------------------------------------------
    def add(self, conf: dict, cid: str, pod: Netns, ifname: str = "eth0", plugin: str = "cni-bridge",
            **kw: Any) -> dict:
        return self.ok(plugin, "ADD", conf, container_id=cid, netns=pod.path, ifname=ifname, **kw).json

    def delete(self, conf: dict, cid: str, netns: str = "", ifname: str = "eth0",
               plugin: str = "cni-bridge", **kw: Any) -> None:
        res = self.ok(plugin, "DEL", conf, container_id=cid, netns=netns, ifname=ifname, **kw)
        assert res.stdout.strip() == "", f"DEL printed {res.stdout!r}"

    def check(self, conf: dict, prev: dict, cid: str, pod: Netns, ifname: str = "eth0",
              plugin: str = "cni-bridge") -> PluginResult:
        return self.run(plugin, "CHECK", with_prev(conf, prev), container_id=cid, netns=pod.path,
                        ifname=ifname)


# -- configs ------------------------------------------------------------------------
def ipam_conf(cni: Cni, *subnets: str, type_: str = "cni-ipam", **extra: Any) -> dict:
    conf: dict[str, Any] = {"type": type_, "dataDir": str(cni.data_dir),
                            "ranges": [[{"subnet": s}] for s in subnets or ("10.77.0.0/24",)]}
    conf.update(extra)
    return conf


def bridge_conf(cni: Cni, *subnets: str, version: str = "1.0.0", bridge: Optional[str] = None,
                ipam: Optional[dict] = None, **extra: Any) -> dict:
    conf: dict[str, Any] = {
        "cniVersion": version, "name": NETWORK, "type": "cni-bridge",
        "bridge": bridge or unique("br"),
        "ipam": ipam if ipam is not None else ipam_conf(cni, *subnets),
    }
    conf.update(extra)
    return conf


def with_prev(conf: dict, prev: dict) -> dict:
    return {**conf, "prevResult": prev}


def addr_of(result: dict, family: int = 4) -> str:
    """The first pod address of `family` in a result, without its prefix length."""
    for ip in result["ips"]:
        iface = ipaddress.ip_interface(ip["address"])
        if iface.version == family:
            return str(iface.ip)
    raise AssertionError(f"no IPv{family} address in {result}")


# -- state probes -----------------------------------------------------------------
def ip_json(ns: Netns, *argv: str) -> list[dict]:
    out = ns.exec("ip", "-j", *argv).stdout
    return json.loads(out) if out.strip() else []


def link(ns: Netns, name: str) -> Optional[dict]:
    res = ns.exec("ip", "-j", "-d", "link", "show", "dev", name, check=False)
    if res.returncode != 0:
        return None
    found = json.loads(res.stdout)
    return found[0] if found else None


def link_kind(info: dict) -> str:
    return (info.get("linkinfo") or {}).get("info_kind", "")


def links(ns: Netns) -> dict[str, dict]:
    return {l["ifname"]: l for l in ip_json(ns, "-d", "link", "show")}


def veths(ns: Netns) -> list[str]:
    return sorted(name for name, info in links(ns).items() if link_kind(info) == "veth")


def addresses(ns: Netns, dev: str, family: int = 0) -> list[str]:
    """'ip/prefix' of every global address on `dev` (link-local ones are left out)."""
    argv = (["-4"] if family == 4 else ["-6"] if family == 6 else []) + ["addr", "show", "dev", dev]
    found = []
    for entry in ip_json(ns, *argv):
        for a in entry.get("addr_info", []):
            if a.get("scope") == "global":
                found.append(f"{a['local']}/{a['prefixlen']}")
    return found


def routes(ns: Netns, family: int = 4) -> list[dict]:
    return ip_json(ns, f"-{family}", "route", "show")


def default_route(ns: Netns, family: int = 4) -> Optional[dict]:
    return next((r for r in routes(ns, family) if r["dst"] == "default"), None)


def sysfs(ns: Netns, path: str) -> str:
    """Read a /proc or /sys file as seen from inside `ns` (ip netns exec remounts /sys)."""
    return ns.exec("cat", path).stdout.strip()


def reservations(cni: Cni, network: str = NETWORK) -> dict[str, str]:
    """IP -> file text of every reservation file in the network's dataDir."""
    directory = cni.data_dir / network
    found = {}
    if directory.is_dir():
        for entry in directory.iterdir():
            try:
                ipaddress.ip_address(entry.name)
            except ValueError:
                continue
            found[entry.name] = entry.read_bytes().decode("utf-8", "replace")
    return found


def reserved_ips(cni: Cni, network: str = NETWORK) -> set[str]:
    return set(reservations(cni, network))


def nat_rules(ns: Netns) -> list[str]:
    """Every nat-table rule of both families (`-S` lines), prefixed with the tool name."""
    lines = []
    for tool in ("iptables", "ip6tables"):
        res = ns.exec(tool, "-w", "5", "-t", "nat", "-S", check=False)
        lines += [f"{tool} {line}" for line in res.stdout.splitlines()]
    return lines


def our_chains(ns: Netns) -> list[str]:
    return sorted(line.split()[2] for line in nat_rules(ns) if line.split()[1:2] == ["-N"]
                  and line.split()[2].startswith(OUR_CHAIN_PREFIX))


def our_masq_rules(ns: Netns) -> list[str]:
    """Every nat rule that belongs to cni-bridge (its chains and the POSTROUTING jumps into them)."""
    return [line for line in nat_rules(ns) if OUR_CHAIN_PREFIX in line]


def assert_nothing_left(cni: Cni, host_links_before: Optional[set[str]] = None) -> None:
    """No veth in the host ns, no reservation file, no masquerade chain or rule of ours."""
    assert veths(cni.ns) == [], f"veths left in the host ns: {veths(cni.ns)}"
    assert reservations(cni) == {}, f"reservations left: {reservations(cni)}"
    assert our_masq_rules(cni.ns) == [], f"masquerade rules left: {our_masq_rules(cni.ns)}"
    if host_links_before is not None:
        assert set(links(cni.ns)) == host_links_before, \
            f"host links changed: {sorted(set(links(cni.ns)) ^ host_links_before)}"


def ping(src: Netns, dst: str, family: int = 4, wait: int = 3) -> subprocess.CompletedProcess:
    tool = "ping" if family == 4 else "ping6"
    return src.exec("busybox", tool, "-c", "1", "-W", str(wait), dst, check=False, timeout=15)


def tcp_exchange(server: Netns, client: Netns, server_addr: str, port: int = 5555,
                 connect_port: Optional[int] = None) -> str:
    """A TCP round trip with busybox nc: the server upper-cases what the client sends.

    The server listens on `port`; the client connects to `connect_port` (default: the same),
    which differs when a port mapping sits in between."""
    srv = subprocess.Popen(["ip", "netns", "exec", server.name, "busybox", "nc", "-l", "-p", str(port),
                            "-e", "busybox", "tr", "a-z", "A-Z"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        reply = ""
        for _ in range(50):  # the listener needs a moment to bind
            res = client.exec("busybox", "nc", "-w", "3", server_addr, str(connect_port or port),
                              input="ping over tcp\n", check=False, timeout=15)
            reply = res.stdout
            if reply:
                break
            if srv.poll() is not None:
                break
            subprocess.run(["sleep", "0.05"])
        return reply
    finally:
        if srv.poll() is None:
            srv.kill()
        srv.communicate(timeout=10)
