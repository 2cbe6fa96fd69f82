"""Generated bad input: every run ends in a result or a CNI error object, never a traceback or a hang.

In-process runs drive `protocol.runner.run` with the real plugins over a fake
netlink (no kernel objects), with masquerade and sysctl writes replaced, and
the IPAM store in a temp dir. A smaller number of subprocess runs exec the real
executables in a scratch host netns, with CNI_NETNS never naming a real netns,
so they cannot make kernel objects either.
"""
from __future__ import annotations

import io
import ipaddress
import json
import subprocess
from pathlib import Path
from typing import Any, Optional

import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from cni_bridge import masq, sysctl
from cni_bridge.netlink import KernelRouteInfo, Link
from cni_bridge.plugin import BridgePlugin
from cni_bridge.protocol.env import VERBS
from cni_bridge.protocol.errors import CNIError, Code
from cni_bridge.protocol.runner import run
from cni_bridge.protocol.versions import SUPPORTED_VERSIONS
from ipam.plugin import IpamPlugin

FAKE_NETNS = "/fake/netns/pod1"
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                      HealthCheck.too_slow])


# -- a fake kernel ------------------------------------------------------------------
class FakeKernel:
    """Links per namespace (None = host), enough for BridgePlugin's ADD, DEL and CHECK."""

    def __init__(self) -> None:
        self.links: dict[Optional[str], dict[str, dict]] = {None: {}, FAKE_NETNS: {}}
        self.next_index = 2

    def factory(self, netns: Optional[str]) -> "FakeNetlink":
        if netns not in self.links:
            raise CNIError(Code.INVALID_ENV, f"CNI_NETNS {netns!r} is not a usable network namespace")
        return FakeNetlink(self, netns)


class FakeNetlink:
    def __init__(self, kernel: FakeKernel, netns: Optional[str]) -> None:
        self.kernel, self.ns = kernel, netns

    @property
    def table(self) -> dict[str, dict]:
        return self.kernel.links[self.ns]

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc: Any) -> None:
        pass

    def _new(self, table, name, kind, mtu=None, mac=""):
        index = self.kernel.next_index
        self.kernel.next_index += 1
        table[name] = {"index": index, "kind": kind, "mtu": mtu or 1500, "master": 0, "up": False,
                       "mac": mac or f"02:00:00:00:{index // 256:02x}:{index % 256:02x}",
                       "addrs": [], "routes": [], "peer": None}
        return table[name]

    def link(self, name: str) -> Optional[Link]:
        d = self.table.get(name)
        if d is None:
            return None
        return Link(index=d["index"], name=name, kind=d["kind"], mac=d["mac"], mtu=d["mtu"],
                    master=d["master"], up=d["up"], promisc=False)

    def known_link(self, name: str) -> Optional[Link]:
        return self.link(name)

    def ensure_bridge(self, name, mtu, promisc) -> Link:
        if name not in self.table:
            self._new(self.table, name, "bridge", mtu)
        if self.table[name]["kind"] != "bridge":
            raise CNIError(Code.BRIDGE_CONFLICT, f"interface {name} exists and is not a bridge")
        self.table[name]["up"] = True
        return self.link(name)

    def add_veth(self, name, peer, peer_netns, mtu, peer_mac) -> Link:
        peer_table = self.kernel.links[peer_netns]
        if name in self.table or peer in peer_table:
            raise CNIError(Code.INTERNAL, "fake EEXIST")
        self._new(self.table, name, "veth", mtu)["peer"] = (peer_netns, peer)
        self._new(peer_table, peer, "veth", mtu, peer_mac)["peer"] = (self.ns, name)
        return self.link(name)

    def attach(self, port, bridge, hairpin) -> None:
        self.table[port]["master"] = self.table[bridge]["index"]
        self.table[port]["up"] = True

    def set_up(self, name) -> None:
        self.table[name]["up"] = True

    def set_arp_notify(self, name) -> None:
        pass

    def announce(self, name) -> None:
        pass

    def wait_port_forwarding(self, port, timeout=0.5) -> bool:
        return True

    def delete_link(self, name) -> bool:
        d = self.table.pop(name, None)
        if d is None:
            return False
        if d["peer"] is not None:
            ns, peer = d["peer"]
            self.kernel.links.get(ns, {}).pop(peer, None)
        return True

    def addresses(self, name, version=None):
        return [a for a in self.table[name]["addrs"] if version in (None, a.version)] if name in self.table else []

    def add_address(self, name, address) -> None:
        if address not in self.table[name]["addrs"]:
            self.table[name]["addrs"].append(address)

    def del_address(self, name, address) -> None:
        if name in self.table and address in self.table[name]["addrs"]:
            self.table[name]["addrs"].remove(address)

    def routes(self, family):
        found = []
        for d in self.table.values():
            for dst, gw in d["routes"]:
                if dst.version == family:
                    found.append(KernelRouteInfo(dst=dst, gw=gw, oif=d["index"]))
            for addr in d["addrs"]:
                if addr.version == family:
                    found.append(KernelRouteInfo(dst=addr.network, gw=None, oif=d["index"]))
        return found

    def add_route(self, dst, gw, device) -> None:
        if gw is not None and not any(gw in a.network for a in self.table[device]["addrs"]):
            raise CNIError(Code.INTERNAL, "fake ENETUNREACH")   # the kernel refuses an off-link gateway
        self.table[device]["routes"].append((dst, gw))


@pytest.fixture
def sandbox(monkeypatch, tmp_path):
    """No iptables and no sysctl writes in the machine's own namespace; a temp store."""
    rules: set = set()
    monkeypatch.setattr(masq, "setup", lambda plan: rules.add(plan.chain))
    monkeypatch.setattr(masq, "teardown", lambda *a: None)
    monkeypatch.setattr(masq, "attachments", lambda network: set())
    monkeypatch.setattr(masq, "available", lambda: True)
    monkeypatch.setattr(sysctl, "enable_forwarding", lambda families: None)
    monkeypatch.setattr(sysctl, "refuse_router_advertisements", lambda bridge: None)
    empty = tmp_path / "cni-path"
    empty.mkdir()
    return {"data_dir": str(tmp_path / "ipam"), "cni_path": str(empty)}


# -- strategies -------------------------------------------------------------------------
SAFE_CHARS = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")
junk = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(SAFE_CHARS, max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(SAFE_CHARS, max_size=6), inner, max_size=3),
    max_leaves=6)


def maybe(good: st.SearchStrategy) -> st.SearchStrategy:
    """Mostly a plausible value, sometimes anything JSON can hold."""
    return st.sampled_from(range(12)).flatmap(lambda n: junk if n == 11 else good)


SUBNETS = ["10.60.0.0/24", "10.60.1.0/29", "10.60.2.0/30", "10.60.3.0/31", "10.60.4.5/24", "fd60::/120",
           "fd61::/64", "300.1.1.0/24", "nonsense", "0.0.0.0/0"]
ADDRESSES = ["10.60.0.5", "10.60.0.1", "10.60.0.254", "10.60.1.3", "fd60::5", "10.61.0.1", "x", ""]

ranges = st.lists(st.lists(st.fixed_dictionaries(
    {"subnet": maybe(st.sampled_from(SUBNETS))},
    optional={"rangeStart": maybe(st.sampled_from(ADDRESSES)), "rangeEnd": maybe(st.sampled_from(ADDRESSES)),
              "gateway": maybe(st.sampled_from(ADDRESSES))}), min_size=1, max_size=2), min_size=1, max_size=2)

ipam_section = st.fixed_dictionaries(
    {"type": maybe(st.sampled_from(["cni-ipam"] * 6 + ["host-local", "", "a/b"])), "ranges": maybe(ranges)},
    optional={
        "subnet": maybe(st.sampled_from(SUBNETS)),
        "routes": maybe(st.lists(st.fixed_dictionaries({"dst": maybe(st.sampled_from(
            ["0.0.0.0/0", "::/0", "10.70.0.0/16", "bad"]))}, optional={"gw": maybe(st.sampled_from(ADDRESSES))}),
            max_size=2)),
        "resolvConf": maybe(st.sampled_from(["/nonexistent/resolv.conf", "/etc/resolv.conf"])),
        "lockTimeout": maybe(st.sampled_from([0, 0.5, -1, 5])),
    })

attachments = st.lists(st.fixed_dictionaries({"containerID": maybe(st.sampled_from(["c1", "c2"])),
                                               "ifname": maybe(st.sampled_from(["eth0", "net1"]))}), max_size=2)

bridge_config = st.fixed_dictionaries(
    {"type": st.just("cni-bridge"), "ipam": maybe(ipam_section),
     "cniVersion": maybe(st.sampled_from(["1.1.0"] * 12 + list(SUPPORTED_VERSIONS) + ["0.1.0", "9.9.9"])),
     "name": maybe(st.sampled_from(["net1"] * 6 + ["net-2.x", "bad name", "", "-x"]))},
    optional={
        "bridge": maybe(st.sampled_from(["cbr0", "cbr1", "x" * 16, "", "a/b"])),
        "isGateway": maybe(st.booleans()), "isDefaultGateway": maybe(st.booleans()),
        "ipMasq": maybe(st.booleans()), "forceAddress": maybe(st.booleans()),
        "hairpinMode": maybe(st.booleans()), "promiscMode": maybe(st.booleans()),
        "mtu": maybe(st.sampled_from([1500, 9000, 67, 70000, 0])),
        "dns": maybe(st.fixed_dictionaries({}, optional={
            "nameservers": maybe(st.lists(st.sampled_from(["10.0.0.53", "x"]), max_size=2)),
            "search": maybe(st.lists(st.sampled_from(["a.example", ""]), max_size=2))})),
        "args": maybe(st.fixed_dictionaries({"cni": st.fixed_dictionaries(
            {}, optional={"ips": maybe(st.lists(st.sampled_from(ADDRESSES), max_size=2)),
                          "mac": maybe(st.sampled_from(["0a:58:0a:f4:00:05", "zz"]))})})),
        "runtimeConfig": maybe(st.fixed_dictionaries({}, optional={
            "ips": maybe(st.lists(st.sampled_from(ADDRESSES + ["10.60.0.7/24"]), max_size=2)),
            "mac": maybe(st.sampled_from(["0a:58:0a:f4:00:05", "zz"]))})),
        "prevResult": maybe(st.fixed_dictionaries({"cniVersion": st.just("1.1.0")}, optional={
            "interfaces": maybe(st.lists(st.fixed_dictionaries(
                {"name": st.sampled_from(["eth0", "cbr0"])}, optional={"sandbox": st.just(FAKE_NETNS)}),
                max_size=2)),
            "ips": maybe(st.lists(st.fixed_dictionaries({"address": st.sampled_from(
                ["10.60.0.2/24", "fd60::2/120", "bad"])}, optional={"interface": st.integers(-1, 3)}),
                max_size=2)),
            "routes": maybe(st.lists(st.fixed_dictionaries({"dst": st.sampled_from(["0.0.0.0/0", "x"])}),
                                     max_size=1))})),
        "cni.dev/valid-attachments": maybe(attachments),
    })

VALUE = st.text(SAFE_CHARS, max_size=20)
env_strategy = st.fixed_dictionaries(
    {"CNI_COMMAND": st.one_of(st.sampled_from(VERBS), st.sampled_from(VERBS), st.sampled_from(["", "add", "X"]))},
    optional={
        "CNI_CONTAINERID": st.one_of(st.sampled_from(["c1", "c2"]), VALUE),
        "CNI_IFNAME": st.one_of(st.sampled_from(["eth0", "net1"]), VALUE),
        "CNI_NETNS": st.one_of(st.just(FAKE_NETNS), st.just("/nonexistent/ns"), VALUE),
        "CNI_PATH": st.sampled_from(["CNI_PATH", "", "/nonexistent"]),
        "CNI_ARGS": st.one_of(st.sampled_from(["", "IgnoreUnknown=1;K8S_POD_NAME=x", "IP=10.60.0.5",
                                               "MAC=0a:58:0a:f4:00:09", "junk", "=;="]), VALUE),
    })


good_env = st.fixed_dictionaries({
    "CNI_COMMAND": st.sampled_from(VERBS), "CNI_CONTAINERID": st.sampled_from(["c1", "c2"]),
    "CNI_IFNAME": st.sampled_from(["eth0", "net1"]), "CNI_NETNS": st.just(FAKE_NETNS),
    "CNI_PATH": st.just("CNI_PATH"),
    "CNI_ARGS": st.sampled_from(["", "", "IgnoreUnknown=1;K8S_POD_NAME=x", "IP=10.60.0.5", "IP=fd60::9",
                                 "MAC=0a:58:0a:f4:00:09"]),
})
some_env = st.sampled_from(range(8)).flatmap(lambda n: env_strategy if n == 7 else good_env)


def _fill_env(env: dict, sandbox: dict) -> dict:
    env = dict(env)
    if env.get("CNI_PATH") == "CNI_PATH":
        env["CNI_PATH"] = sandbox["cni_path"]
    return env


def _pin_store(config: Any, data_dir: str) -> Any:
    """Every store goes to the temp dir, whatever the generated config says."""
    if isinstance(config, dict) and isinstance(config.get("ipam"), dict):
        config = {**config, "ipam": {**config["ipam"], "dataDir": data_dir}}
    return config


def _check_outcome(rc: int, out: str, err: str) -> Optional[dict]:
    assert rc in (0, 1), rc
    assert "Traceback" not in out + err, out + err
    if not out.strip():
        assert rc == 0
        return None
    data = json.loads(out)
    assert isinstance(data, dict) and isinstance(data.get("cniVersion"), str), data
    if rc == 1:
        assert isinstance(data["code"], int) and isinstance(data["msg"], str) and data["msg"], data
        assert isinstance(data.get("details", ""), str)
    return data


def _run_in_process(kernel: FakeKernel, env: dict, stdin: bytes) -> tuple[int, str, str]:
    ipam = IpamPlugin()
    bridge = BridgePlugin(netlink_factory=kernel.factory)
    plugin_type = None
    try:
        plugin_type = json.loads(stdin).get("type")
    except Exception:
        pass
    out, err = io.StringIO(), io.StringIO()
    unexpected: list[str] = []
    rc = run(lambda: ipam if plugin_type == "cni-ipam" else bridge, env, stdin, out, err,
             on_error=lambda exc, tb: unexpected.append(tb))
    assert not unexpected, unexpected[0]    # code 999 means a bug: show where
    return rc, out.getvalue(), err.getvalue()


# -- in-process properties ---------------------------------------------------------------
@settings(max_examples=200, **SETTINGS)
@given(env=env_strategy, stdin=st.binary(max_size=300))
def test_any_bytes_and_env_end_in_a_result_or_error(sandbox, env, stdin):
    try:
        decoded = json.loads(stdin)
    except Exception:
        decoded = None
    assume(not (isinstance(decoded, dict) and "ipam" in decoded))   # could name a real dataDir
    rc, out, err = _run_in_process(FakeKernel(), _fill_env(env, sandbox), stdin)
    _check_outcome(rc, out, err)


@settings(max_examples=200, **SETTINGS)
@given(env=some_env, config=bridge_config, as_ipam=st.booleans())
def test_generated_configs_end_in_a_result_or_error(sandbox, env, config, as_ipam):
    if as_ipam:
        config = {**config, "type": "cni-ipam"}
    stdin = json.dumps(_pin_store(config, sandbox["data_dir"])).encode()
    rc, out, err = _run_in_process(FakeKernel(), _fill_env(env, sandbox), stdin)
    data = _check_outcome(rc, out, err)
    event(f"{env['CNI_COMMAND'] or '-'} -> {data.get('code', 'ok') if data else 'ok'}")
    if rc == 0 and env["CNI_COMMAND"] == "ADD":
        assert data and ("ips" in data or "ip4" in data or "ip6" in data), data


valid_bridge = st.fixed_dictionaries({
    "cniVersion": st.sampled_from(["0.3.1", "0.4.0", "1.0.0", "1.1.0"]),
    "name": st.sampled_from(["net1", "net2"]), "type": st.just("cni-bridge"),
    "bridge": st.sampled_from(["cbr0", "cbr1"]),
    "isGateway": st.booleans(), "isDefaultGateway": st.booleans(), "ipMasq": st.booleans(),
    "ipam": st.fixed_dictionaries({"type": st.just("cni-ipam"), "ranges": st.sampled_from([
        [[{"subnet": "10.60.0.0/24"}]], [[{"subnet": "10.60.1.0/29"}], [{"subnet": "fd60::/120"}]],
        [[{"subnet": "10.60.2.0/28", "rangeStart": "10.60.2.5", "rangeEnd": "10.60.2.9"}]]])}),
})


@settings(max_examples=40, **SETTINGS)
@given(config=valid_bridge, ifname=st.sampled_from(["eth0", "net1", "e" * 15]))
def test_add_then_del_of_any_valid_config_leaves_nothing(sandbox, config, ifname):
    kernel = FakeKernel()
    stdin = json.dumps(_pin_store(config, sandbox["data_dir"])).encode()
    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_IFNAME": ifname, "CNI_NETNS": FAKE_NETNS,
           "CNI_PATH": sandbox["cni_path"]}
    rc, out, err = _run_in_process(kernel, env, stdin)
    assert rc == 0, out
    subnets = [ipaddress.ip_network(r[0]["subnet"]) for r in config["ipam"]["ranges"]]
    for ip in json.loads(out).get("ips", []):
        assert any(ipaddress.ip_interface(ip["address"]).ip in net for net in subnets)
    rc, out, err = _run_in_process(kernel, {**env, "CNI_COMMAND": "DEL"}, stdin)
    assert rc == 0, out
    assert [n for n, d in kernel.links[None].items() if d["kind"] == "veth"] == []
    assert kernel.links[FAKE_NETNS] == {}
    store = Path(sandbox["data_dir"]) / config["name"]
    assert [p.name for p in store.iterdir() if p.name[0].isdigit() or ":" in p.name] == []
    assert list((store / "owners").iterdir()) == []


# -- the real executables -----------------------------------------------------------------
def _exec(cni_host, plugin: str, env: dict, stdin: bytes) -> tuple[int, str, str]:
    full_env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", **env}
    proc = subprocess.run(["ip", "netns", "exec", cni_host.netns.name, str(cni_host.cni_path / plugin)],
                          input=stdin, env=full_env, capture_output=True, timeout=60)
    return proc.returncode, proc.stdout.decode("utf-8", "replace"), proc.stderr.decode("utf-8", "replace")


def _subprocess_env(env: dict, cni_host) -> dict:
    env = dict(env)
    if env.get("CNI_PATH") == "CNI_PATH":
        env["CNI_PATH"] = str(cni_host.cni_path)
    if env.get("CNI_NETNS"):
        # Never a real namespace (pyroute2 would resolve a bare name in /var/run/netns): no kernel objects.
        env["CNI_NETNS"] = "/nonexistent/" + env["CNI_NETNS"].lstrip("/")
    return env


@settings(max_examples=12, **SETTINGS)
@given(env=env_strategy, stdin=st.binary(max_size=200), plugin=st.sampled_from(["cni-bridge", "cni-ipam"]))
def test_real_executables_on_any_bytes(cni_host, env, stdin, plugin):
    try:
        decoded = json.loads(stdin)
    except Exception:
        decoded = None
    assume(not (isinstance(decoded, dict) and "ipam" in decoded))
    _check_outcome(*_exec(cni_host, plugin, _subprocess_env(env, cni_host), stdin))


@settings(max_examples=16, **SETTINGS)
@given(env=some_env, config=bridge_config, plugin=st.sampled_from(["cni-bridge", "cni-ipam"]))
def test_real_executables_on_generated_configs(cni_host, env, config, plugin):
    stdin = json.dumps(_pin_store({**config, "type": plugin}, str(cni_host.data_dir))).encode()
    _check_outcome(*_exec(cni_host, plugin, _subprocess_env(env, cni_host), stdin))
