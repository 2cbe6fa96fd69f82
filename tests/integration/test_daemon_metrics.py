"""The daemon's Prometheus endpoint end to end: a real `cni-bridge daemon --metrics-address` in a
scratch host netns, a burst of exec'd plugin calls, scrapes over HTTP on that netns' loopback.
Also what `cni-bridge inspect` shows of the running daemon.
"""
from __future__ import annotations

import functools
import json
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest

from tests.support import waiting
from tests.support.netns import VENV_BIN, unique
from tests.support.waiting import unix_socket_listening

wait_for = functools.partial(waiting.wait_for, timeout=60.0)
NET = "mtest"
PORT = 9153          # the scratch netns' own loopback: no clash with anything on the machine
BURST = 6
POOL_SIZE = 253

SCRAPE = ("import sys, urllib.request; "
          f"sys.stdout.write(urllib.request.urlopen('http://127.0.0.1:{PORT}/metrics', timeout=10).read().decode())")


class MetricsDaemon:
    def __init__(self, host, tmp: Path, conf_dir: Path, path_env: str = "") -> None:
        self.host, self.socket, self.log = host, tmp / "run" / "daemon.sock", tmp / "daemon.log"
        argv = ["ip", "netns", "exec", host.netns.name, str(VENV_BIN / "cni-bridge"), "daemon",
                "--socket", str(self.socket), "--workers", "2", "--log-level", "DEBUG",
                "--metrics-address", f"127.0.0.1:{PORT}", "--conf-dir", str(conf_dir)]
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                         start_new_session=True,
                                         env={"PATH": path_env or os.environ.get("PATH", "/usr/sbin:/usr/bin:/bin")})
        wait_for(lambda: unix_socket_listening(self.socket) or self.proc.poll() is not None, "the daemon")
        assert self.proc.poll() is None, self.log.read_text()

    def served_by(self, verb: str) -> list[int]:
        """The worker pid of each `verb` call the daemon logged."""
        return [int(pid) for pid in re.findall(rf"cni-bridge-daemon\[(\d+)\] DEBUG {verb} cid=", self.log.read_text())]

    def scrape(self) -> dict[tuple[str, tuple], float]:
        from prometheus_client.parser import text_string_to_metric_families

        text = self.host.netns.exec(str(VENV_BIN / "python"), "-c", SCRAPE).stdout
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(60)


def value(found: dict, name: str, **labels: str) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
def setup(cni_host, tmp_path):
    conf_dir = tmp_path / "net.d"
    conf_dir.mkdir()
    socket_path = tmp_path / "run" / "daemon.sock"
    plugin = {"type": "cni-bridge", "bridge": unique("bm"), "isGateway": True, "daemonSocket": str(socket_path),
              "ipam": {"type": "cni-ipam", "dataDir": str(cni_host.data_dir), "ranges": [[{"subnet": "10.96.0.0/24"}]]}}
    (conf_dir / "10-m.conflist").write_text(json.dumps({"cniVersion": "1.0.0", "name": NET, "plugins": [plugin]}))
    daemon = MetricsDaemon(cni_host, tmp_path, conf_dir)
    yield cni_host, daemon, {**plugin, "cniVersion": "1.0.0", "name": NET}, conf_dir
    daemon.stop()


def burst(cni_host, command: str, conf: dict, cids: list[str], netns: dict[str, str]) -> None:
    """All calls at once, each an exec'd plugin that hands its call to the daemon."""
    procs = []
    for cid in cids:
        env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/bin"), "CNI_COMMAND": command,
               "CNI_PATH": str(cni_host.cni_path), "CNI_CONTAINERID": cid, "CNI_NETNS": netns.get(cid, ""),
               "CNI_IFNAME": "eth0"}
        procs.append(subprocess.Popen(["ip", "netns", "exec", cni_host.netns.name, str(cni_host.cni_path / "cni-bridge")],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, env=env))
    for proc in procs:
        out, err = proc.communicate(json.dumps(conf), timeout=120)
        assert proc.returncode == 0, out + err


def test_counts_histograms_and_pool_usage_over_http(setup, make_netns):
    cni_host, daemon, conf, _ = setup
    pods = {f"m{i}": make_netns("p").path for i in range(BURST)}
    burst(cni_host, "ADD", conf, list(pods), pods)
    assert len(daemon.served_by("ADD")) == BURST   # every call went through the daemon

    found = daemon.scrape()
    assert value(found, "cni_bridge_daemon_calls_total", verb="ADD", result="0") == BURST
    assert value(found, "cni_bridge_daemon_call_duration_seconds_count", verb="ADD") == BURST
    assert value(found, "cni_bridge_daemon_call_duration_seconds_bucket", verb="ADD", le="+Inf") == BURST
    assert value(found, "cni_bridge_daemon_call_duration_seconds_sum", verb="ADD") > 0
    assert value(found, "cni_bridge_daemon_calls_in_flight") == 0
    assert value(found, "cni_bridge_daemon_workers") == 2
    pool = "10.96.0.0/24 [10.96.0.1-10.96.0.254]"
    assert value(found, "cni_bridge_ipam_addresses_used", network=NET, range=pool) == BURST
    assert value(found, "cni_bridge_ipam_addresses_free", network=NET, range=pool) == POOL_SIZE - BURST

    bad = {**conf, "mtu": "big"}
    res = cni_host.run("cni-bridge", "ADD", bad, container_id="bad", netns=make_netns("p").path)
    assert res.rc == 1 and json.loads(res.stdout)["code"] == 7
    burst(cni_host, "DEL", conf, list(pods), pods)

    found = daemon.scrape()
    assert value(found, "cni_bridge_daemon_calls_total", verb="ADD", result="7") == 1
    assert value(found, "cni_bridge_daemon_calls_total", verb="DEL", result="0") == BURST
    assert value(found, "cni_bridge_daemon_call_duration_seconds_count", verb="DEL") == BURST
    assert value(found, "cni_bridge_ipam_addresses_used", network=NET, range=pool) == 0


def test_counts_of_several_workers_sum_across_a_restart(setup, make_netns):
    cni_host, daemon, conf, _ = setup
    pods = {f"r{i}": make_netns("p").path for i in range(4)}
    burst(cni_host, "ADD", conf, list(pods)[:2], pods)
    first = set(daemon.served_by("ADD"))
    for pid in first:                       # idle workers: no call is lost
        os.kill(pid, signal.SIGKILL)
    wait_for(lambda: daemon.log.read_text().count("died (signal 9)") == len(first), "the supervisor to reap")
    burst(cni_host, "ADD", conf, list(pods)[2:], pods)
    served = daemon.served_by("ADD")
    assert len(served) == 4 and len(set(served)) > len(first)   # the counts come from several processes

    found = daemon.scrape()
    assert value(found, "cni_bridge_daemon_calls_total", verb="ADD", result="0") == 4
    assert value(found, "cni_bridge_daemon_call_duration_seconds_count", verb="ADD") == 4
    assert value(found, "cni_bridge_daemon_worker_restarts_total", reason="signal") == len(first)
    assert value(found, "cni_bridge_daemon_fallbacks_total", reason="worker-died") == 0


def test_inspect_shows_the_daemon(setup):
    cni_host, daemon, _, conf_dir = setup
    proc = cni_host.netns.exec(str(VENV_BIN / "cni-bridge"), "inspect", "--conf-dir", str(conf_dir), "--json",
                               "--bin-dir", str(cni_host.cni_path), check=False)
    view = json.loads(proc.stdout)["daemon"]
    assert view["socket"] == str(daemon.socket)    # found through the conflist's daemonSocket
    assert view["reachable"] and view["workers"] == 2 and len(view["workerPids"]) == 2
    assert view["metricsAddress"] == f"127.0.0.1:{PORT}" and view["uptimeSeconds"] >= 0
    assert view["pid"] not in view["workerPids"] and view["pid"] > 0
    daemon_check = next(c for c in json.loads(proc.stdout)["checks"] if c["name"] == "daemon")
    assert daemon_check["verdict"] == "ok"

    daemon.stop()
    proc = cni_host.netns.exec(str(VENV_BIN / "cni-bridge"), "inspect", "--conf-dir", str(conf_dir), "--json",
                               "--bin-dir", str(cni_host.cni_path), check=False)
    assert json.loads(proc.stdout)["daemon"]["reachable"] is False


def test_a_scrape_during_a_call_sees_it_in_flight(cni_host, tmp_path, make_netns):
    """A worker held inside ADD (its iptables-restore waits for a gate) while the supervisor answers scrapes."""
    from tests.integration.test_daemon import gated_iptables_restore

    gated_bin, gate = gated_iptables_restore(tmp_path)
    conf_dir = tmp_path / "net.d"
    conf_dir.mkdir()
    daemon = MetricsDaemon(cni_host, tmp_path, conf_dir, f"{gated_bin}:{os.environ.get('PATH', '/usr/sbin:/usr/bin')}")
    try:
        conf = {"cniVersion": "1.0.0", "name": NET, "type": "cni-bridge", "bridge": unique("bg"), "isGateway": True,
                "ipMasq": True, "daemonSocket": str(daemon.socket),
                "ipam": {"type": "cni-ipam", "dataDir": str(cni_host.data_dir), "ranges": [[{"subnet": "10.97.0.0/24"}]]}}
        env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/bin"), "CNI_COMMAND": "ADD",
               "CNI_PATH": str(cni_host.cni_path), "CNI_CONTAINERID": "held", "CNI_NETNS": make_netns("p").path,
               "CNI_IFNAME": "eth0"}
        client = subprocess.Popen(["ip", "netns", "exec", cni_host.netns.name, str(cni_host.cni_path / "cni-bridge")],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env=env)
        client.stdin.write(json.dumps(conf))
        client.stdin.close()
        wait_for(lambda: Path(f"{gate}.entered").exists(), "the ADD to reach the masquerade step")
        found = daemon.scrape()
        assert value(found, "cni_bridge_daemon_calls_in_flight") == 1
        assert value(found, "cni_bridge_daemon_calls_total", verb="ADD", result="0") == 0
        gate.touch()
        assert client.wait(120) == 0, client.stdout.read() + client.stderr.read()
        found = daemon.scrape()
        assert value(found, "cni_bridge_daemon_calls_in_flight") == 0
        assert value(found, "cni_bridge_daemon_calls_total", verb="ADD", result="0") == 1
    finally:
        gate.touch()
        daemon.stop()
