#!/usr/bin/env python3
"""Reliability figures: the largest parallel burst held, and the fault points exercised.

  .venv/bin/python scripts/reliability_bench.py [--max 160] [--json]

1. Bursts of N pods (10, 20, 40, 80, ... up to --max) on one fresh bridge and
   one range: N concurrent cni-bridge ADDs (racing to create the bridge and its
   gateway address, ipMasq on), then N concurrent DELs. A burst is held when
   every call succeeds, all addresses are distinct, and nothing is left
   (no veth, reservation, owner record, temp file or masquerade chain). It
   stops at the first burst that is not held.
2. Every fault point in cni_bridge/faults.py: the plugin is SIGKILLed there,
   then the runtime's DEL runs (a killed DEL is followed by a second DEL). A
   point counts as exercised when the kill happened at it, and as survived
   when nothing leaked afterwards.

Everything runs in scratch network namespaces made and removed here. Needs
root. Figures, not assertions: the tests never time anything.
"""
from __future__ import annotations

import argparse
import datetime
import ipaddress
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cni_bridge.faults import POINTS  # noqa: E402
from tests.support.netns import CniHost, Netns, can_use_netns, make_cni_path, unique  # noqa: E402
from tests.support.reliability import (KILLED, bridge_conf, faulty, leftovers,  # noqa: E402
                                       wait_until)


def burst(cni_host: CniHost, size: int, index: int) -> dict:
    network = f"burst{index}"
    subnet = f"10.{100 + index}.0.0/16"
    conf = bridge_conf(cni_host.data_dir, unique("br"), network=network, subnet=subnet)
    pods = [Netns("p") for _ in range(size)]
    try:
        started = time.monotonic()
        with ThreadPoolExecutor(max_workers=size) as pool:
            added = list(pool.map(lambda i: cni_host.run(
                "cni-bridge", "ADD", conf, container_id=f"pod{i}", netns=pods[i].path, timeout=300), range(size)))
        add_seconds = time.monotonic() - started
        failures = [r.stdout.strip() or r.stderr.strip() for r in added if r.rc != 0]
        addresses = [r.json["ips"][0]["address"] for r in added if r.rc == 0]
        duplicates = len(addresses) - len(set(addresses))
        started = time.monotonic()
        with ThreadPoolExecutor(max_workers=size) as pool:
            deleted = list(pool.map(lambda i: cni_host.run(
                "cni-bridge", "DEL", conf, container_id=f"pod{i}", netns=pods[i].path, timeout=300), range(size)))
        del_seconds = time.monotonic() - started
        failures += [r.stdout.strip() or r.stderr.strip() for r in deleted if r.rc != 0]
        left = leftovers(cni_host, network)
        in_range = all(ipaddress.ip_interface(a).ip in ipaddress.ip_network(subnet) for a in addresses)
        return {"size": size, "held": not failures and not duplicates and not left and in_range,
                "failures": len(failures), "firstFailure": failures[0][:300] if failures else "",
                "duplicates": duplicates, "leftovers": left,
                "addSeconds": round(add_seconds, 2), "delSeconds": round(del_seconds, 2)}
    finally:
        for pod in pods:
            pod.delete()


def fault_point(cni_host: CniHost, point, index: int) -> dict:
    network = f"fault{index}"
    conf = bridge_conf(cni_host.data_dir, unique("br"), network=network, subnet=f"10.{200 + index % 50}.0.0/24")
    pod = Netns("p")
    try:
        if point.verb == "DEL":
            assert cni_host.run("cni-bridge", "ADD", conf, container_id="c1", netns=pod.path).rc == 0
        killed = cni_host.run("cni-bridge", point.verb, conf, container_id="c1", netns=pod.path,
                              env=faulty(point.name)).rc == KILLED
        recovered = cni_host.run("cni-bridge", "DEL", conf, container_id="c1", netns=pod.path).rc == 0
        # A kill inside a store write may leave one temp file: not a reservation, removed by GC.
        tolerate_temp = point.name == "ipam.store.temp-written"
        clean = wait_until(lambda: leftovers(cni_host, network, temp_files=not tolerate_temp) == {}, 5)
        return {"point": point.name, "verb": point.verb, "exercised": killed, "survived": killed and recovered and clean}
    finally:
        pod.delete()


def machine() -> dict:
    mem = ""
    try:
        with open("/proc/meminfo") as f:
            mem = f"{int(f.readline().split()[1]) // 1024} MiB"
    except OSError:
        pass
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "kernel": platform.release(), "cpus": os.cpu_count(), "memory": mem,
            "python": platform.python_version()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max", type=int, default=160, help="largest burst to try (default 160)")
    parser.add_argument("--start", type=int, default=10, help="first burst size (default 10; doubled each time)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    reason = can_use_netns()
    if reason:
        print(f"reliability_bench: {reason}", file=sys.stderr)
        return 2

    work = Path(tempfile.mkdtemp(prefix="cni-rel-bench-"))
    host = Netns("h")
    cni_host = CniHost(netns=host, cni_path=make_cni_path(work / "bin"), data_dir=work / "ipam")
    bursts, points = [], []
    try:
        size, index = args.start, 0
        while size <= args.max:
            result = burst(cni_host, size, index)
            bursts.append(result)
            if not args.json:
                print(f"burst {size:4d}: {'held' if result['held'] else 'FAILED'}  "
                      f"ADD {result['addSeconds']:.1f}s  DEL {result['delSeconds']:.1f}s"
                      + (f"  failures={result['failures']} {result['firstFailure']}" if result["failures"] else "")
                      + (f"  leftovers={result['leftovers']}" if result["leftovers"] else ""), flush=True)
            if not result["held"]:
                break
            size, index = size * 2, index + 1
        for index, point in enumerate(POINTS):
            points.append(fault_point(cni_host, point, index))
    finally:
        host.delete()
        shutil.rmtree(work, ignore_errors=True)

    held = [b["size"] for b in bursts if b["held"]]
    figures = {
        "machine": machine(),
        "largestBurstHeld": max(held) if held else 0,
        "burstCeiling": args.max,
        "bursts": bursts,
        "faultPointsRegistered": len(POINTS),
        "faultPointsExercised": sum(p["exercised"] for p in points),
        "faultPointsSurvived": sum(p["survived"] for p in points),
        "faultPoints": points,
    }
    if args.json:
        json.dump(figures, sys.stdout, indent=2)
        print()
    else:
        m = figures["machine"]
        print(f"\n{m['date']}, Linux {m['kernel']}, {m['cpus']} CPUs, {m['memory']}, Python {m['python']}")
        limit = "" if len(held) < len(bursts) else f" (the ceiling tried, --max {args.max})"
        print(f"largest parallel burst held with no failure: {figures['largestBurstHeld']} pods{limit}")
        print(f"fault points: {figures['faultPointsRegistered']} registered, "
              f"{figures['faultPointsExercised']} exercised (killed there), "
              f"{figures['faultPointsSurvived']} survived (nothing leaked after DEL)")
        for p in points:
            if not p["survived"]:
                print(f"  NOT survived: {p['point']} ({p['verb']}), exercised={p['exercised']}")
    ok = held and figures["faultPointsSurvived"] == len(POINTS)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
