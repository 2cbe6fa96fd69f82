"""`make bench`, kubelet's path: RunPodSandbox and StopPodSandbox + RemovePodSandbox through a
private containerd (tests/harness/cri), ours beside the reference plugins in the same run.

One containerd per variant, each in its own scratch "host" netns with the same conflist shape
(main plugin with isDefaultGateway, then portmap). The variants take turns, cycle by cycle, so
background noise hits them alike. The times include containerd's own work (sandbox container,
netns, the loopback plugin), so the ratios are smaller than those of the bare ADD+DEL cycle.
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from tests.harness.cri.client import CriClient, PodSpec
from tests.harness.cri.containerd import SANDBOX_IMAGE, Containerd, containerd_unavailable_reason
from tests.harness.cri.pause_image import build_pause_image

REFERENCE = Path("/usr/lib/cni")
SUBNET = "10.208.0.0/16"


@dataclass
class CriVariant:
    key: str
    label: str
    main_type: str
    ipam_type: str
    front_end: bool = False   # the static front end as cni-bridge, with the daemon running


VARIANTS = [
    CriVariant("sa", "cni-bridge standalone", "cni-bridge", "cni-ipam"),
    CriVariant("fe", "cni-bridge + daemon, static front end", "cni-bridge", "cni-ipam", front_end=True),
    CriVariant("ref", "reference bridge + host-local", "bridge", "host-local"),
]


class CriNode:
    """A host netns, a bin dir laid out for the variant, its daemon if any, and containerd."""

    def __init__(self, variant: CriVariant, work: Path, ours_bin: Path, front_end: Optional[Path],
                 pause_tar: Path) -> None:
        self.variant, self.base = variant, work / variant.key
        self.netns = f"cribench-{uuid.uuid4().hex[:6]}-{variant.key}"
        self.daemon: Optional[subprocess.Popen] = None
        self.containerd: Optional[Containerd] = None
        self.cri: Optional[CriClient] = None
        subprocess.run(["ip", "netns", "add", self.netns], check=True)
        subprocess.run(["ip", "netns", "exec", self.netns, "ip", "link", "set", "lo", "up"], check=True)
        bin_dir = self._bin_dir(ours_bin, front_end)
        socket = self.base / "daemon.sock"
        if variant.front_end:
            self.daemon = subprocess.Popen(
                ["nsenter", f"--net=/run/netns/{self.netns}", str(ours_bin / "cni-bridge"), "daemon",
                 "--socket", str(socket), "--log-level", "WARNING"],
                stdin=subprocess.DEVNULL, start_new_session=True)
            deadline = time.monotonic() + 60
            while not socket.exists():
                if self.daemon.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the daemon did not start")
                time.sleep(0.05)
        conf_dir = self.base / "net.d"
        conf_dir.mkdir(parents=True)
        main = {"type": variant.main_type, "bridge": f"brcri{variant.key}", "isDefaultGateway": True,
                "ipam": {"type": variant.ipam_type, "dataDir": str(self.base / "ipam"),
                         "ranges": [[{"subnet": SUBNET}]]}}
        if variant.front_end:
            main["daemonSocket"] = str(socket)
        network = f"bench-cri-{variant.key}"
        (conf_dir / "10-bench.conflist").write_text(json.dumps({"cniVersion": "1.0.0", "name": network, "plugins": [
            main, {"type": "portmap", "capabilities": {"portMappings": True}}]}))
        self.containerd = Containerd(self.base / "containerd", bin_dir, conf_dir, self.netns)
        self.containerd.networks.add(network)
        self.containerd.start()
        self.cri = CriClient(str(self.containerd.socket))
        self.containerd.import_image(pause_tar)
        deadline = time.monotonic() + 60
        while not self.cri.network_ready():
            if time.monotonic() > deadline:
                raise RuntimeError(f"containerd ({variant.key}) never reported NetworkReady")
            time.sleep(0.1)

    def _bin_dir(self, ours_bin: Path, front_end: Optional[Path]) -> Path:
        bin_dir = self.base / "bin"
        bin_dir.mkdir(parents=True)
        if self.variant.main_type == "cni-bridge":
            os.symlink(ours_bin / "cni-ipam", bin_dir / "cni-ipam")
            if self.variant.front_end:
                shutil.copy2(front_end, bin_dir / "cni-bridge")
                os.symlink(ours_bin / "cni-bridge", bin_dir / "cni-bridge-python")
            else:
                os.symlink(ours_bin / "cni-bridge", bin_dir / "cni-bridge")
        for plugin in REFERENCE.iterdir():
            if not (bin_dir / plugin.name).exists():
                os.symlink(plugin, bin_dir / plugin.name)
        return bin_dir

    def cycle(self, index: int) -> tuple[float, float]:
        """(RunPodSandbox seconds, StopPodSandbox + RemovePodSandbox seconds) for one pod."""
        pod = PodSpec(name=f"bench-{index}", namespace="bench", uid=str(uuid.uuid4()))
        started = time.perf_counter()
        sandbox = self.cri.run_pod_sandbox(pod, cgroup_parent=self.containerd.cgroup_parent)
        ran = time.perf_counter()
        self.cri.stop_pod_sandbox(sandbox)
        self.cri.remove_pod_sandbox(sandbox)
        return ran - started, time.perf_counter() - ran

    def close(self) -> list[str]:
        problems = self.containerd.cleanup(self.cri) if self.containerd else []
        if self.cri:
            self.cri.close()
        if self.daemon and self.daemon.poll() is None:
            self.daemon.terminate()
            try:
                self.daemon.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.daemon.pid, 9)
                self.daemon.wait()
        subprocess.run(["ip", "netns", "del", self.netns], capture_output=True)
        return problems


def measure(work: Path, ours_bin: Path, front_end: Optional[Path], cycles: int,
            log: Callable[[str], None]) -> tuple[list[list[str]], dict]:
    """Rows [variant, RunPodSandbox, ratio, Stop+Remove, ratio] and the raw medians (seconds)."""
    reason = containerd_unavailable_reason()
    if reason:
        return [[f"not measured: {reason}", "", "", "", ""]], {}
    variants = [v for v in VARIANTS if front_end is not None or not v.front_end]
    log(f"RunPodSandbox / Stop+Remove through containerd, {cycles} pods per variant")
    pause_tar = build_pause_image(work / "pause.tar", SANDBOX_IMAGE)
    nodes: list[CriNode] = []
    samples: dict[str, list[tuple[float, float]]] = {v.key: [] for v in variants}
    try:
        for variant in variants:
            nodes.append(CriNode(variant, work, ours_bin, front_end, pause_tar))
        for node in nodes:
            node.cycle(-1)   # warm: first bridge, page cache
        for i in range(cycles):
            for node in nodes:
                samples[node.variant.key].append(node.cycle(i))
    finally:
        problems = [p for node in nodes for p in node.close()]
        if problems:
            log(f"containerd clean-up left: {problems}")
    medians = {key: (statistics.median(r for r, _ in s), statistics.median(d for _, d in s))
               for key, s in samples.items()}
    ref_run, ref_del = medians["ref"]
    rows = [[v.label, f"{medians[v.key][0] * 1000:.0f} ms", f"{medians[v.key][0] / ref_run:.2f}x",
             f"{medians[v.key][1] * 1000:.0f} ms", f"{medians[v.key][1] / ref_del:.2f}x"] for v in variants]
    return rows, {key: {"run_pod_sandbox_s": r, "stop_remove_s": d} for key, (r, d) in medians.items()}
