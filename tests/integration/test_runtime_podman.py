"""The plugins under podman 4 with its CNI backend (tests/harness/podman_env.py).

One private podman for the module: its own storage and config, run inside its
own scratch netns (the "host" of these tests), with a CNI_PATH holding our
executables, Debian's reference plugins, and a logging wrapper in front of
cni-bridge so we can see what podman sent. The network is conf/10-cni-bridge.conflist
(cni-bridge + cni-ipam + portmap) with its own bridge, subnet and dataDir.
"""
from __future__ import annotations

import ipaddress
import json
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.harness.podman_env import PodmanEnv, podman_unavailable_reason
from tests.support.netns import make_cni_path, unique
from tests.support.runtime import (
    _CLIENT,
    SpyCall,
    adapt_conflist,
    add_uplink,
    install_spy,
    owner_index,
    per_attachment_nat,
    reservations,
    spy_calls,
    veths,
    wait_for,
)

SUBNET = ipaddress.ip_network("10.89.0.0/24")
NODE_IP = "192.0.2.1"
LIBCNI_RESULTS = Path("/var/lib/cni/results")   # podman's libcni keeps its cache here


@dataclass
class Podman:
    env: PodmanEnv
    net: str
    data_dir: Path
    spy_log: Path
    image: str

    def run(self, *args, **kw):
        return self.env.run(*args, **kw)

    def calls(self) -> list[SpyCall]:
        return spy_calls(self.spy_log)

    def container_id(self, name: str) -> str:
        """The CNI_CONTAINERID podman used for the container named `name` (from its ADD)."""
        ids = {c.env["CNI_CONTAINERID"] for c in self.calls()
               if c.command == "ADD" and f"K8S_POD_NAME={name}" in c.env.get("CNI_ARGS", "").split(";")}
        assert len(ids) == 1, f"expected one ADD for {name}, saw {ids}"
        return ids.pop()

    def tcp_from_host(self, address: str, port: int) -> str:
        """Connect from podman's host netns and return what the server said ('' on failure)."""
        got = self.env.host_run(sys.executable, "-c", _CLIENT, address, str(port), "2", check=False)
        return got.stdout if got.returncode == 0 else ""


@pytest.fixture(scope="module")
def podman():
    reason = podman_unavailable_reason()
    if reason:
        pytest.skip(f"podman cannot run here: {reason}")
    # A short base dir on purpose: podman 4.3 refuses a runroot longer than 50 characters
    # ("the specified runroot is longer than 50 characters") in the `podman container
    # cleanup` that conmon runs when a container exits. Under pytest's tmp_path that
    # cleanup fails: no CNI DEL on exit, and every `podman run --rm` waits ~20 s for it.
    base = Path(tempfile.mkdtemp(prefix="pm-", dir="/tmp"))
    cni_dir = make_cni_path(base / "bin")
    spy_log = base / "cni-bridge.calls"
    install_spy(cni_dir, "cni-bridge", spy_log)
    try:
        env = PodmanEnv(base / "p", cni_dir, base / "net.d")
        assert len(str(env.runroot)) <= 50, env.runroot
    except BaseException:
        shutil.rmtree(base, ignore_errors=True)
        raise
    try:
        image = env.ensure_busybox_image()
        conf = adapt_conflist("10-cni-bridge.conflist", name=unique("pmnet"), bridge=unique("br"),
                              data_dir=base / "ipam", subnets=[str(SUBNET)])
        env.add_network(conf)
        add_uplink(env.host_run, f"{NODE_IP}/24")
        yield Podman(env, conf["name"], base / "ipam", spy_log, image)
    finally:
        problems = env.cleanup()
        shutil.rmtree(base, ignore_errors=True)
    assert not problems, f"PodmanEnv.cleanup() left: {problems}"


def assert_nothing_left(podman: Podman, *container_ids: str) -> None:
    """After the containers are gone: no veth, no reservation, no per-container rule,
    no libcni cache entry, in podman's host netns and our dataDir."""
    host = podman.env.host_run
    assert veths(host) == [], "host-side veth left behind"
    assert reservations(podman.data_dir, podman.net) == {}, "IP reservation left behind"
    assert owner_index(podman.data_dir, podman.net) == [], "owner index entry left behind"
    for cid in container_ids:
        assert per_attachment_nat(host, cid) == [], f"nat rules of {cid} left behind"
        assert not (LIBCNI_RESULTS / f"{podman.net}-{cid}-eth0").exists(), "libcni cache left behind"
    assert per_attachment_nat(host) == [], "a CNI-DN-*/CBR-* chain left behind"


def address_in(output: str) -> ipaddress.IPv4Interface:
    match = re.search(r"inet (\d+\.\d+\.\d+\.\d+/\d+)", output)
    assert match, output
    return ipaddress.ip_interface(match[1])


def test_run_gets_an_address_from_cni_ipam(podman):
    before = len(podman.calls())
    name = unique("c-")
    out = podman.run("run", "--rm", "--name", name, "--network", podman.net, podman.image,
                     "sh", "-c", "ip -4 -o addr show dev eth0; ip -4 route show default").stdout
    seen = address_in(out)
    assert seen.network == SUBNET and seen.ip != SUBNET[1]
    assert f"default via {SUBNET[1]} dev eth0" in out

    calls = podman.calls()[before:]
    verbs = [c.command for c in calls]
    assert verbs[0] == "VERSION" and "ADD" in verbs, verbs   # podman asks VERSION first
    add = calls[verbs.index("ADD")]
    args = add.env["CNI_ARGS"].split(";")
    assert "IgnoreUnknown=1" in args and f"K8S_POD_NAME={name}" in args, args
    result = json.loads(add.stdout)
    assert [ip["address"] for ip in result["ips"]] == [str(seen)]     # cni-ipam's address
    dels = [c for c in calls if c.command == "DEL"]
    assert dels and dels[-1].env["CNI_CONTAINERID"] == add.env["CNI_CONTAINERID"]
    assert dels[-1].stdin["prevResult"]["ips"] == result["ips"]
    assert_nothing_left(podman, add.env["CNI_CONTAINERID"])


def test_two_containers_talk_over_tcp(podman):
    server, client = unique("srv-"), unique("cli-")
    podman.run("run", "-d", "--name", server, "--network", podman.net, podman.image,
               "nc", "-ll", "-p", "8080", "-e", "echo", f"hello-from-{server}")
    try:
        ip = podman.run("inspect", server, "--format",
                        f'{{{{(index .NetworkSettings.Networks "{podman.net}").IPAddress}}}}').stdout.strip()
        assert ipaddress.ip_address(ip) in SUBNET
        # Retry while the server starts listening.
        script = f"for i in $(seq 25); do nc -w 2 {ip} 8080 && exit 0; sleep 0.2; done; exit 1"
        got = podman.run("run", "--rm", "--name", client, "--network", podman.net, podman.image,
                         "sh", "-c", script)
        assert f"hello-from-{server}" in got.stdout
    finally:
        podman.run("rm", "-f", "-t", "0", server)
    assert_nothing_left(podman, podman.container_id(server), podman.container_id(client))


def test_published_port_reaches_the_container_from_the_host(podman):
    name = unique("web-")
    podman.run("run", "-d", "--name", name, "-p", "18081:8080", "--network", podman.net, podman.image,
               "nc", "-ll", "-p", "8080", "-e", "echo", f"published-{name}")
    try:
        cid = podman.container_id(name)
        assert any("CNI-DN-" in rule for rule in per_attachment_nat(podman.env.host_run))
        # Through the chained portmap: to the host's own address, and to localhost.
        for address in (NODE_IP, "127.0.0.1"):
            assert wait_for(lambda: podman.tcp_from_host(address, 18081).startswith(f"published-{name}"),
                            timeout=10), f"no answer on {address}:18081"
    finally:
        podman.run("rm", "-f", "-t", "0", name)
    assert_nothing_left(podman, cid)


def test_container_exit_releases_everything_before_removal(podman):
    """The network is torn down when the container exits (conmon's cleanup), not only on rm."""
    name = unique("exit-")
    podman.run("run", "-d", "--name", name, "-p", "18082:8080", "--network", podman.net, podman.image,
               "sleep", "0.3")
    try:
        cid = podman.container_id(name)
        podman.run("wait", name)
        assert wait_for(lambda: any(c.command == "DEL" and c.env["CNI_CONTAINERID"] == cid
                                    for c in podman.calls()), timeout=15), "no DEL after exit"
        state = podman.run("inspect", name, "--format", "{{.State.Status}}").stdout.strip()
        assert state in ("exited", "stopped"), state
        assert_nothing_left(podman, cid)
    finally:
        podman.run("rm", "-f", "-t", "0", name)
    assert_nothing_left(podman, cid)
    # Removal after the exit's DEL may DEL again (that must succeed too): never a failed DEL.
    assert all(c.rc == 0 for c in podman.calls() if c.env.get("CNI_CONTAINERID") == cid)
