"""The daemon's metrics without root: multi-process sums, the HTTP endpoint, IPAM gauges, labels.

prometheus_client picks its multiprocess mode at its first import, so each
scenario runs in a fresh interpreter (no state shared with other tests).
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cni_bridge import metrics

ROOT = Path(__file__).resolve().parents[2]

# Three forked "workers" serve 2, 3 and 4 ADDs; each then leaves a DEL in flight
# and exits. The supervisor scrapes over HTTP before and after reaping them.
SCENARIO = """
import ipaddress, json, os, select, sys, threading, urllib.request
from cni_bridge.metrics import start
from ipam.filestore import FileStore, current_boot_id
from ipam.store import Reservation

run_dir, conf_dir, data_dir = sys.argv[1:4]
stale = os.path.join(run_dir, "cni-bridge-metrics-left-by-a-killed-daemon")
os.makedirs(stale)
m = start("127.0.0.1:0", run_dir, conf_dir, 3)
store = FileStore(data_dir, "mnet")
with store.locked():
    for last in (10, 11, 12):
        store.put(Reservation(ipaddress.ip_address(f"10.61.0.{last}"), f"c{last}", "eth0", current_boot_id(), 1.0))

def scrape():
    got = {}
    thread = threading.Thread(target=lambda: got.update(
        body=urllib.request.urlopen("http://%s:%d/metrics" % m.address, timeout=10).read().decode()))
    thread.start()
    while thread.is_alive():
        if select.select([m.fileno()], [], [], 0.1)[0]:
            m.serve_one()
    return got["body"]

pids = []
for worker in range(3):
    pid = os.fork()
    if pid == 0:
        for i in range(worker + 2):
            m.call_started("ADD")
            m.call_finished("ADD", "0", 0.004 * (i + 1))
        m.call_started("ADD")
        m.call_finished("ADD", "7", 0.001)
        m.call_started("DEL")   # still in flight when the worker dies
        os._exit(0)
    pids.append(pid)
for pid in pids:
    os.waitpid(pid, 0)
before = scrape()
for pid in pids:
    m.worker_exited(pid, "signal", restarted=True, lost_call=True)
m.fallback("uid")
m.call_started("WHATEVER")
m.call_finished("WHATEVER", "4", 0.002)
after = scrape()
directory = m.directory
m.close()
print(json.dumps({"before": before, "after": after, "dir_left": os.path.exists(directory),
                  "stale_left": os.path.exists(stale)}))
"""


def samples(text: str) -> dict[tuple[str, tuple], float]:
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.fixture(scope="module")
def scraped(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("metrics")
    conf_dir, data_dir = tmp / "net.d", tmp / "ipam"
    conf_dir.mkdir()
    (conf_dir / "10-m.conflist").write_text(json.dumps({"cniVersion": "1.0.0", "name": "mnet", "plugins": [
        {"type": "cni-bridge", "bridge": "m0",
         "ipam": {"type": "cni-ipam", "dataDir": str(data_dir),
                  "ranges": [[{"subnet": "10.61.0.0/24"}], [{"subnet": "fd61::/120"}]]}}]}))
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(SCENARIO), str(tmp), str(conf_dir), str(data_dir)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    return {"before": samples(out["before"]), "after": samples(out["after"]), "dir_left": out["dir_left"],
            "stale_left": out["stale_left"]}


def value(found: dict, name: str, **labels: str) -> float:
    return found[(name, tuple(sorted(labels.items())))]


def test_counts_from_several_workers_add_up(scraped):
    before = scraped["before"]
    assert value(before, "cni_bridge_daemon_calls_total", verb="ADD", result="0") == 2 + 3 + 4
    assert value(before, "cni_bridge_daemon_calls_total", verb="ADD", result="7") == 3
    assert value(before, "cni_bridge_daemon_call_duration_seconds_count", verb="ADD") == 12
    # Successes took 4, 8, 12 and 16 ms (three, three, two and one of them), the three errors 1 ms.
    assert value(before, "cni_bridge_daemon_call_duration_seconds_bucket", verb="ADD", le="0.005") == 3 + 3
    assert value(before, "cni_bridge_daemon_call_duration_seconds_bucket", verb="ADD", le="0.01") == 3 + 3 + 3
    assert value(before, "cni_bridge_daemon_call_duration_seconds_bucket", verb="ADD", le="0.025") == 12
    assert value(before, "cni_bridge_daemon_call_duration_seconds_bucket", verb="ADD", le="+Inf") == 12
    assert value(before, "cni_bridge_daemon_call_duration_seconds_sum", verb="ADD") == pytest.approx(
        0.004 * (1 + 2 + 1 + 2 + 3 + 1 + 2 + 3 + 4) + 0.003)
    assert value(before, "cni_bridge_daemon_calls_in_flight") == 3


def test_a_dead_workers_counts_stay_and_its_in_flight_call_goes(scraped):
    after = scraped["after"]
    assert value(after, "cni_bridge_daemon_calls_total", verb="ADD", result="0") == 9
    assert value(after, "cni_bridge_daemon_calls_in_flight") == 0
    assert value(after, "cni_bridge_daemon_fallbacks_total", reason="worker-died") == 3
    assert value(after, "cni_bridge_daemon_fallbacks_total", reason="uid") == 1
    assert value(after, "cni_bridge_daemon_worker_restarts_total", reason="signal") == 3
    assert value(after, "cni_bridge_daemon_calls_total", verb="other", result="4") == 1   # no label per junk verb
    assert value(after, "cni_bridge_daemon_workers") == 3
    assert scraped["dir_left"] is False        # removed when the daemon stops
    assert scraped["stale_left"] is False      # and a killed daemon's is removed at the next start


def test_ipam_usage_per_network_and_range(scraped):
    after = scraped["after"]
    v4, v6 = "10.61.0.0/24 [10.61.0.1-10.61.0.254]", "fd61::/120 [fd61::1-fd61::ff]"
    assert value(after, "cni_bridge_ipam_addresses_used", network="mnet", range=v4) == 3
    assert value(after, "cni_bridge_ipam_addresses_free", network="mnet", range=v4) == 253 - 3
    assert value(after, "cni_bridge_ipam_addresses_used", network="mnet", range=v6) == 0
    assert value(after, "cni_bridge_ipam_addresses_free", network="mnet", range=v6) == 255 - 1


@pytest.mark.parametrize("text, expected", [
    ("127.0.0.1:9153", ("127.0.0.1", 9153)), ("[::1]:9153", ("::1", 9153)), ("localhost:1", ("localhost", 1)),
])
def test_parse_address(text, expected):
    assert metrics.parse_address(text) == expected


@pytest.mark.parametrize("text", ["9153", "127.0.0.1", ":9153", "127.0.0.1:70000", "h:x"])
def test_parse_address_rejects(text):
    with pytest.raises(ValueError):
        metrics.parse_address(text)


def test_call_result_label():
    assert metrics.call_result(0, "") == "0"
    assert metrics.call_result(1, '{"cniVersion": "1.0.0", "code": 7, "msg": "x"}') == "7"
    assert metrics.call_result(1, "not json") == "unknown"
