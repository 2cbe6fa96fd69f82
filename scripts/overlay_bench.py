#!/usr/bin/env python3
"""`make bench` (second part): pod-to-pod TCP throughput and round-trip latency across nodes.

One run, side by side, from one client pod:

  same node                  -> a pod on the client's own node (bridge only)
  direct route               -> a pod on a node of the same subnet, `--backend routes`
  VXLAN, same subnet         -> the same pod, `--backend vxlan` (encapsulation is the only change)
  VXLAN, across a router     -> a pod on a node in another subnet (`auto`), through a router namespace

Everything is a scratch network namespace made and removed here (an underlay
router with two subnets, three nodes running `cni-bridge agent` in topology mode
and the conflist it wrote, one pod per node plus a second pod on the client's
node). Throughput: Debian's `iperf3` (TCP, one stream). Latency: a 1-byte TCP
request/response loop (TCP_NODELAY), median of the round trips. Veths have no
wire, so the figures measure CPU cost per packet on this machine, not a network.
Never used as a timed assertion in tests.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent           # the venv with cni-bridge and cni-ipam
IPERF_PORT = 5201
RR_PORT = 5202

RR_SERVER = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(4)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while (b := c.recv(1)):
        c.sendall(b)
    c.close()
"""
RR_CLIENT = """
import socket, statistics, sys, time
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
samples = []
for i in range(int(sys.argv[3]) + 200):
    t = time.perf_counter()
    c.sendall(b"x")
    c.recv(1)
    if i >= 200:                      # warm-up round trips are not counted
        samples.append(time.perf_counter() - t)
print(statistics.median(samples) * 1e6, statistics.quantiles(samples, n=100)[98] * 1e6)
"""


def log(msg: str) -> None:
    print(f"[overlay-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sh(*argv: str, ns: str | None = None, check: bool = True, **kw) -> subprocess.CompletedProcess:
    full = ["ip", "netns", "exec", ns, *argv] if ns else list(argv)
    return subprocess.run(full, check=check, text=True, capture_output=True, **kw)


class Lab:
    """Namespaces and processes made here, removed by close()."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.namespaces: list[str] = []
        self.procs: list[subprocess.Popen] = []

    def netns(self, prefix: str) -> str:
        name = f"ob{prefix}{uuid.uuid4().hex[:6]}"
        sh("ip", "netns", "add", name)
        self.namespaces.append(name)
        sh("ip", "link", "set", "lo", "up", ns=name)
        return name

    def start(self, ns: str, *argv: str) -> subprocess.Popen:
        proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait()
        for ns in reversed(self.namespaces):
            sh("ip", "netns", "del", ns, check=False)


class Node:
    def __init__(self, lab: Lab, name: str, ns: str, ip: str, pod_cidr: str) -> None:
        self.lab, self.name, self.ns, self.ip, self.pod_cidr = lab, name, ns, ip, pod_cidr
        self.base = lab.work / name
        self.bridge = "cbb" + uuid.uuid4().hex[:6]

    def agent(self, topology: Path, backend: str) -> None:
        res = sh(str(BIN / "cni-bridge"), "agent", "--node", self.name, "--topology", str(topology), "--once",
                 "--conf-dir", str(self.base / "net.d"), "--ipam-data-dir", str(self.base / "ipam"),
                 "--bridge", self.bridge, "--no-portmap", "--backend", backend, ns=self.ns, check=False)
        if res.returncode != 0:
            raise SystemExit(f"agent on {self.name} failed: {res.stdout} {res.stderr}")

    def add_pod(self) -> tuple[str, str]:
        """A pod netns attached with the node's conflist; returns (netns, IPv4 address)."""
        pod = self.lab.netns("p")
        conflist = json.loads((self.base / "net.d" / "10-cni-bridge.conflist").read_text())
        conf = dict(conflist["plugins"][0], name=conflist["name"], cniVersion=conflist["cniVersion"])
        env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "CNI_COMMAND": "ADD",
               "CNI_CONTAINERID": pod, "CNI_NETNS": f"/var/run/netns/{pod}", "CNI_IFNAME": "eth0",
               "CNI_PATH": str(BIN)}
        res = sh(str(BIN / "cni-bridge"), ns=self.ns, input=json.dumps(conf), env=env, check=False)
        if res.returncode != 0:
            raise SystemExit(f"ADD on {self.name} failed: {res.stdout} {res.stderr}")
        return pod, json.loads(res.stdout)["ips"][0]["address"].split("/")[0]


def build(lab: Lab) -> tuple[dict[str, Node], Path]:
    """Router with subnets A (n1, n2) and B (n3); the agents' topology file."""
    router = lab.netns("rt")
    sh("sysctl", "-qw", "net.ipv4.ip_forward=1", ns=router)
    segments = {}
    for key, prefix in (("A", "10.254.1"), ("B", "10.254.2")):
        segments[key] = ("sg" + uuid.uuid4().hex[:6], prefix)
        sh("ip", "link", "add", segments[key][0], "type", "bridge", ns=router)
        sh("ip", "addr", "add", f"{prefix}.1/24", "dev", segments[key][0], ns=router)
        sh("ip", "link", "set", segments[key][0], "up", ns=router)
    nodes = {}
    for name, key, host, index in (("n1", "A", 11, 1), ("n2", "A", 12, 2), ("n3", "B", 13, 3)):
        ns = lab.netns("nd")
        segment, prefix = segments[key]
        port = "u" + uuid.uuid4().hex[:8]
        sh("ip", "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns, ns=router)
        sh("ip", "link", "set", port, "master", segment, "up", ns=router)
        sh("ip", "addr", "add", f"{prefix}.{host}/24", "dev", "eth0", ns=ns)
        sh("ip", "link", "set", "eth0", "up", ns=ns)
        sh("ip", "route", "add", "default", "via", f"{prefix}.1", ns=ns)
        nodes[name] = Node(lab, name, ns, f"{prefix}.{host}", f"10.245.{index}.0/24")
    topology = lab.work / "topology.json"
    topology.write_text(json.dumps({"clusterCIDR": "10.245.0.0/16", "nodes": [
        {"name": n.name, "internalIP": n.ip, "podCIDR": n.pod_cidr} for n in nodes.values()]}))
    return nodes, topology


def throughput(lab: Lab, client: str, server: str, address: str, seconds: float) -> float:
    """Gbit/s of one TCP stream, iperf3 client -> server."""
    srv = lab.start(server, "iperf3", "-s", "-1", "-p", str(IPERF_PORT))
    time.sleep(0.3)
    res = sh("iperf3", "-c", address, "-p", str(IPERF_PORT), "-t", str(seconds), "-J", ns=client,
             check=False, timeout=seconds + 30)
    srv.wait(timeout=30)
    if res.returncode != 0:
        raise SystemExit(f"iperf3 to {address} failed: {res.stdout[-400:]} {res.stderr}")
    return json.loads(res.stdout)["end"]["sum_received"]["bits_per_second"] / 1e9


def latency(lab: Lab, client: str, address: str, rounds: int) -> tuple[float, float]:
    """(median, p99) microseconds per 1-byte TCP round trip."""
    res = sh(sys.executable, "-c", RR_CLIENT, address, str(RR_PORT), str(rounds), ns=client, timeout=120)
    median, p99 = res.stdout.split()
    return float(median), float(p99)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5, help="iperf3 run per path (%(default)s)")
    parser.add_argument("--rounds", type=int, default=5000, help="TCP round trips per path (%(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per path, interleaved; median (%(default)s)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("overlay bench: needs root (it makes network namespaces)", file=sys.stderr)
        return 2
    if shutil.which("iperf3") is None:
        print("overlay bench: needs iperf3 (./scripts/setup.sh installs it)", file=sys.stderr)
        return 2
    began = time.monotonic()
    with ExitStack() as stack:
        work = Path(tempfile.mkdtemp(prefix="cni-overlay-bench-"))
        stack.callback(shutil.rmtree, work, True)
        lab = Lab(work)
        stack.callback(lab.close)
        log("three nodes, two subnets, a router")
        nodes, topology = build(lab)
        for node in nodes.values():
            node.agent(topology, "auto")
        client, _ = nodes["n1"].add_pod()
        local, local_ip = nodes["n1"].add_pod()
        peer, peer_ip = nodes["n2"].add_pod()
        remote, remote_ip = nodes["n3"].add_pod()
        for pod in (local, peer, remote):
            srv = lab.start(pod, sys.executable, "-c", RR_SERVER, str(RR_PORT))
            if srv.stdout.readline().strip() != "ready":
                raise SystemExit(f"latency server did not start: {srv.stderr.read()}")
        mtu = json.loads((nodes["n1"].base / "net.d" / "10-cni-bridge.conflist").read_text())["plugins"][0].get("mtu")

        # n1 <-> n2 share subnet A: the backend alone decides how the pair talks. With
        # `routes`, n3 (behind the router) would be unreachable, so that pass leaves it out.
        pair_only = work / "pair.json"
        data = json.loads(topology.read_text())
        pair_only.write_text(json.dumps(dict(data, nodes=[n for n in data["nodes"] if n["name"] != "n3"])))

        def same_pair(backend: str) -> None:
            for name in ("n1", "n2"):
                nodes[name].agent(pair_only if backend == "routes" else topology, backend)

        paths = [
            ("same node", None, local, local_ip),
            ("other node, direct route", "routes", peer, peer_ip),
            ("other node, VXLAN (same subnet)", "vxlan", peer, peer_ip),
            ("other node, VXLAN across a router", None, remote, remote_ip),
        ]
        samples: dict[str, dict[str, list[float]]] = {label: {"gbps": [], "rtt": [], "p99": []}
                                                       for label, *_ in paths}
        for repeat in range(args.repeats):
            for label, backend, server, address in paths:
                log(f"run {repeat + 1}/{args.repeats}: {label}")
                if backend is not None:
                    same_pair(backend)
                samples[label]["gbps"].append(throughput(lab, client, server, address, args.seconds))
                rtt, p99 = latency(lab, client, address, args.rounds)
                samples[label]["rtt"].append(rtt)
                samples[label]["p99"].append(p99)
        same_pair("auto")
    med = statistics.median
    base = samples["same node"]
    rows = []
    for label, *_ in paths:
        s = samples[label]
        rows.append([label, f"{med(s['gbps']):.2f} Gbit/s", f"{med(s['gbps']) / med(base['gbps']):.2f}x",
                     f"{med(s['rtt']):.0f} µs", f"{med(s['p99']):.0f} µs"])
    widths = [max(len(r[i]) for r in rows + [HEADERS]) for i in range(len(HEADERS))]
    print("\n## Pod-to-pod across nodes (scripts/overlay_bench.py)\n")
    print(f"Pod MTU {mtu or 'kernel default'} on every path (pods made while a peer was behind VXLAN); "
          f"medians of {args.repeats} interleaved runs per path; iperf3 {args.seconds:g} s, one TCP stream; "
          f"{args.rounds} 1-byte TCP round trips (Python client and server); run took "
          f"{time.monotonic() - began:.0f} s; load average {os.getloadavg()[0]:.1f}.\n")
    for row in [HEADERS, ["-" * w for w in widths], *rows]:
        print("| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |")
    return 0


HEADERS = ["path (client pod on n1 ->)", "TCP throughput", "vs same node", "round trip, median", "p99"]

if __name__ == "__main__":
    sys.exit(main())
