#!/usr/bin/env python3
"""Start-up cost of the bundled plugins next to the venv ones (root; scratch namespaces only).

    .venv/bin/python scripts/bundle_timing.py [BUNDLE_DIR] [ROUNDS]

VERSION: the bare process start. ADD/DEL: a full attachment (bridge, veth,
in-process cni-ipam) into a scratch pod netns, inside a scratch host netns.
Prints medians in milliseconds; everything it makes is deleted.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def timed(argv: list[str], env: dict, stdin: str = "") -> float:
    start = time.perf_counter()
    proc = subprocess.run(argv, env=env, input=stdin, capture_output=True, text=True)
    elapsed = (time.perf_counter() - start) * 1000
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed: {proc.stdout} {proc.stderr}")
    return elapsed


def measure(label: str, bindir: Path, rounds: int) -> None:
    tag = uuid.uuid4().hex[:6]
    host, pod = f"bth{tag}", f"btp{tag}"
    subprocess.run(["ip", "netns", "add", host], check=True)
    subprocess.run(["ip", "netns", "add", pod], check=True)
    try:
        with tempfile.TemporaryDirectory() as data:
            conf = json.dumps({
                "cniVersion": "1.0.0", "name": "timing", "type": "cni-bridge", "bridge": f"bt{tag}",
                "isGateway": True,
                "ipam": {"type": "cni-ipam", "ranges": [[{"subnet": "10.79.0.0/24"}]], "dataDir": data},
            })
            base = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "CNI_PATH": str(bindir), "CNI_IFNAME": "eth0",
                    "CNI_CONTAINERID": "timing", "CNI_NETNS": f"/run/netns/{pod}"}
            exe = ["ip", "netns", "exec", host, str(bindir / "cni-bridge")]
            version = [timed([str(bindir / "cni-bridge")], {**base, "CNI_COMMAND": "VERSION"}) for _ in range(rounds)]
            ipam_version = [timed([str(bindir / "cni-ipam")], {**base, "CNI_COMMAND": "VERSION"})
                            for _ in range(rounds)]
            add, delete = [], []
            for _ in range(rounds):
                add.append(timed(exe, {**base, "CNI_COMMAND": "ADD"}, conf))
                delete.append(timed(exe, {**base, "CNI_COMMAND": "DEL"}, conf))
        print(f"{label:8} VERSION {statistics.median(version):6.1f}  cni-ipam VERSION "
              f"{statistics.median(ipam_version):6.1f}  ADD {statistics.median(add):6.1f}  "
              f"DEL {statistics.median(delete):6.1f}  (ms, median of {rounds}; "
              f"`ip netns exec` adds a few ms to ADD/DEL)")
    finally:
        subprocess.run(["ip", "netns", "del", pod], check=False)
        subprocess.run(["ip", "netns", "del", host], check=False)


def main() -> None:
    bundle = Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "dist" / "cni-bin"
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 15
    measure("bundle", bundle.resolve(), rounds)
    measure("venv", Path(sys.executable).parent, rounds)


if __name__ == "__main__":
    main()
