#!/usr/bin/env python3
"""How long `cni-bridge inspect` takes on a node with hundreds of pods (printed, never asserted).

Builds the node the plugin would have made, directly and quickly, inside a
scratch "host" namespace: a bridge, N pod namespaces each with a veth pair
named as cni-bridge names them, N reservations in a private store, one
masquerade chain per pod. Then times `inspect` (--json and the table; both read
every pod's MAC inside its namespace). Everything is removed at the end.

    sudo .venv/bin/python scripts/inspect_bench.py [PODS ...]   (default 300)
"""
from __future__ import annotations

import ipaddress
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cni_bridge.plan import host_veth_name, masq_chain_name, masq_comment  # noqa: E402
from ipam.filestore import FileStore, current_boot_id  # noqa: E402
from ipam.store import Reservation  # noqa: E402

VENV_BIN = Path(sys.executable).parent
NETWORK, BRIDGE, SUBNET = "bench", "cbench0", ipaddress.ip_network("10.98.0.0/16")
RUNS = 5


def sh(*argv: str, input: str | None = None) -> str:
    return subprocess.run(argv, input=input, text=True, capture_output=True, check=True).stdout


def build(host: str, pods: list[str], work: Path) -> Path:
    sh("ip", "-n", host, "link", "add", BRIDGE, "type", "bridge")
    sh("ip", "-n", host, "addr", "add", f"{SUBNET[1]}/{SUBNET.prefixlen}", "dev", BRIDGE)
    sh("ip", "-n", host, "link", "set", BRIDGE, "up")
    batch = []
    for pod in pods:
        veth = host_veth_name(pod, "eth0")
        batch += [f"link add {veth} type veth peer name eth0 netns {pod}", f"link set {veth} master {BRIDGE} up"]
    sh("ip", "-n", host, "-batch", "-", input="\n".join(batch) + "\n")
    store, boot = FileStore(str(work / "ipam"), NETWORK), current_boot_id()
    restore = ["*nat"]
    with store.locked():
        for index, pod in enumerate(pods):
            ip = SUBNET[index + 2]
            store.put(Reservation(ip, pod, "eth0", boot, time.time(), netns=f"/var/run/netns/{pod}"))
            store.set_owned((pod, "eth0"), [ip])
            chain, comment = masq_chain_name(NETWORK, pod, "eth0"), f'"{masq_comment(NETWORK, pod, "eth0")}"'
            restore += [f":{chain} - [0:0]", f"-A {chain} -d {SUBNET} -m comment --comment {comment} -j ACCEPT",
                        f"-A {chain} ! -d 224.0.0.0/4 -m comment --comment {comment} -j MASQUERADE",
                        f"-A POSTROUTING -s {ip}/32 -m comment --comment {comment} -j {chain}"]
    sh("ip", "netns", "exec", host, "iptables-restore", "--noflush", input="\n".join(restore + ["COMMIT"]) + "\n")
    sh("ip", "netns", "exec", host, "sysctl", "-qw", "net.ipv4.ip_forward=1")
    conf_dir = work / "net.d"
    conf_dir.mkdir()
    (conf_dir / "10-bench.conflist").write_text(json.dumps({"cniVersion": "1.0.0", "name": NETWORK, "plugins": [
        {"type": "cni-bridge", "bridge": BRIDGE, "isGateway": True, "ipMasq": True,
         "ipam": {"type": "cni-ipam", "dataDir": str(work / "ipam"), "ranges": [[{"subnet": str(SUBNET)}]]}}]}))
    return conf_dir


def timed(host: str, conf_dir: Path, *args: str) -> tuple[float, float, dict | None]:
    argv = ["ip", "netns", "exec", host, str(VENV_BIN / "cni-bridge"), "inspect", "--conf-dir", str(conf_dir),
            "--bin-dir", str(VENV_BIN), "--daemon-socket", "/nonexistent", *args]
    walls, cpus, view = [], [], None
    for _ in range(RUNS):
        used = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.monotonic()
        proc = subprocess.run(argv, capture_output=True, text=True)
        walls.append(time.monotonic() - started)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        # CPU of inspect and its iptables children: what a busy machine's wall time hides
        cpus.append(after.ru_utime - used.ru_utime + after.ru_stime - used.ru_stime)
        if "--json" in args:
            view = json.loads(proc.stdout)
    return statistics.median(walls), statistics.median(cpus), view


def bench(count: int) -> None:
    tag = uuid.uuid4().hex[:6]
    host, pods = f"ib-host-{tag}", [f"ib-{tag}-{i}" for i in range(count)]
    made: list[str] = []
    with tempfile.TemporaryDirectory(prefix="inspect-bench-") as tmp:
        try:
            for ns in [host, *pods]:
                sh("ip", "netns", "add", ns)
                made.append(ns)
            conf_dir = build(host, pods, Path(tmp))
            json_wall, json_cpu, view = timed(host, conf_dir, "--json")
            if view is None or len(view["networks"][0]["attachments"]) != count or \
                    not all(a["mac"] and a["masquerade"] for a in view["networks"][0]["attachments"]):
                raise SystemExit("inspect did not see every pod: the figures would mean nothing")
            table_wall, table_cpu, _ = timed(host, conf_dir)
            print(f"{count:>5} pods   --json {json_wall * 1000:5.0f} ms wall {json_cpu * 1000:5.0f} ms CPU   "
                  f"table {table_wall * 1000:5.0f} ms wall {table_cpu * 1000:5.0f} ms CPU   (medians of {RUNS}; "
                  f"{view['summary']['fail']} failed checks)")
        finally:
            for ns in reversed(made):
                subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def main() -> int:
    if os.geteuid() != 0:
        print("needs root (it creates network namespaces)", file=sys.stderr)
        return 1
    print(f"cni-bridge inspect, wall time per run ({os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f})")
    for count in [int(a) for a in sys.argv[1:]] or [300]:
        bench(count)
    return 0


if __name__ == "__main__":
    sys.exit(main())
