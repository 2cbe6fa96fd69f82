#!/usr/bin/env python3
"""`make bench`: cni-bridge against the reference Go plugins, side by side, in one run.

Everything runs inside scratch network namespaces made (and removed) here: one
"host" namespace the plugins and the daemon run in, and one namespace per pod.
Prints, as tables:

  1. the median ADD+DEL cycle (ipMasq off and on) and a 40-pod parallel burst
     (ADD all, then DEL all) for cni-bridge exec'd standalone, cni-bridge with
     the node daemon, and the reference bridge + host-local from /usr/lib/cni,
     each with its ratio to the reference (cniVersion 1.0.0 for all);
  2. the import budget of each verb (`python -X importtime`);
  3. peak RSS of one exec'd front end and of the daemon;
  4. IPAM ADD+DEL cost with 10 and with 5,000 reservations in the store;
  5. RunPodSandbox and Stop+Remove through a private containerd (scripts/bench_cri.py);
  6. where one daemon cycle spends its time, step by step (the plugin's fault
     points, timed in-process, plus the front end and socket hop);
  7. the scale table: with ipMasq on, the cycle of one more pod with 0, 100,
     500 and 1,000 pods already attached (a /21), ours (daemon, nftables
     backend) beside the reference, and the time to attach them all in parallel;
  8. the soak: 10,000 ADD+DEL cycles through the daemon, its memory (RSS, PSS)
     and open files after the first 100 and at the end, and the slowest cycle.

Our plugins are measured as `pip install .` lays them out (console scripts,
no editable-install finder), in a throwaway environment built from this
checkout and the dev venv's dependencies; the dev venv's editable install
costs ~10 ms more per exec and is reported separately.

Runs as root (it makes namespaces). Never used as a timed assertion in tests.
"""
from __future__ import annotations

import argparse
import compileall
import ctypes
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

REPO = Path(__file__).resolve().parents[1]
REFERENCE = Path("/usr/lib/cni")
CNI_VERSION = "1.0.0"
CLONE_NEWNET = 0x40000000
# pip's console-script template (what `pip install .` writes into bin/).
CONSOLE_SCRIPT = """#!{python}
# -*- coding: utf-8 -*-
import re
import sys
from {module} import {func}
if __name__ == '__main__':
    sys.argv[0] = re.sub(r'(-script\\.pyw|\\.exe)?$', '', sys.argv[0])
    sys.exit({func}())
"""
# Issue 11: the daemon + static front end at most 1.0x the reference (ipMasq off: cycle and burst).
TARGETS = {"standalone": 16.0, "daemon": 1.5, "front end": 1.0}
GNU_TIME = Path("/usr/bin/time")


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- namespaces ---------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@contextmanager
def inside_netns(path: str) -> Iterator[None]:
    """Move this process (and every child it starts) into the namespace at `path`."""
    home = os.open("/proc/self/ns/net", os.O_RDONLY)
    target = os.open(path, os.O_RDONLY)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(target)
        os.close(home)


class Namespaces:
    """Scratch named namespaces, all deleted on exit (pass or fail)."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.tag = uuid.uuid4().hex[:6]

    def add(self, role: str) -> str:
        name = f"bench-{self.tag}-{role}"
        subprocess.run(["ip", "netns", "add", name], check=True)
        self.names.append(name)
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True)
        return f"/var/run/netns/{name}"

    def close(self) -> None:
        for name in reversed(self.names):
            subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)


# -- a production-style install -----------------------------------------------------

def build_install(root: Path) -> Path:
    """A venv with this checkout installed as `pip install .` would: returns its bin dir."""
    base = getattr(sys, "_base_executable", sys.executable)
    venv = root / "venv"
    subprocess.run([base, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = Path(subprocess.run([str(venv / "bin" / "python"), "-c",
                                "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    deps = Path(subprocess.run([sys.executable, "-c",
                                "import pydantic, os; print(os.path.dirname(os.path.dirname(pydantic.__file__)))"],
                               check=True, capture_output=True, text=True).stdout.strip())
    # A plain path entry: the dependencies, without the dev venv's own .pth hooks.
    (site / "bench-deps.pth").write_text(f"{deps}\n")
    for package in ("cni_bridge", "ipam"):
        shutil.copytree(REPO / package, site / package, ignore=shutil.ignore_patterns("__pycache__"))
    compileall.compile_dir(str(site / "cni_bridge"), quiet=1)
    compileall.compile_dir(str(site / "ipam"), quiet=1)
    for name, module in (("cni-bridge", "cni_bridge.main"), ("cni-ipam", "ipam.main")):
        script = venv / "bin" / name
        script.write_text(CONSOLE_SCRIPT.format(python=venv / "bin" / "python", module=module, func="main"))
        script.chmod(0o755)
    return venv / "bin"


def build_front_end() -> Optional[Path]:
    """The static front end (scripts/build_shim.sh), or None when it cannot be built here."""
    out = REPO / "build" / "shim" / "cni-bridge"
    proc = subprocess.run(["sh", str(REPO / "scripts" / "build_shim.sh"), str(out)], capture_output=True, text=True)
    if proc.returncode != 0:
        log(f"no static front end (build failed): {(proc.stdout + proc.stderr).strip()[-500:]}")
        return None
    return out


def make_cni_path(directory: Path, ours: Path, front_end: Optional[Path]) -> Path:
    """Our plugins as installed, plus `cni-bridge-fe`: the static front end, with the
    Python program beside it as cni-bridge-python (where the front end looks for it)."""
    directory.mkdir(parents=True)
    for name in ("cni-bridge", "cni-ipam"):
        os.symlink(ours / name, directory / name)
    if front_end is not None:
        shutil.copy2(front_end, directory / "cni-bridge-fe")
        os.symlink(ours / "cni-bridge", directory / "cni-bridge-python")
    for plugin in REFERENCE.iterdir():
        os.symlink(plugin, directory / plugin.name)
    return directory


# -- running plugins ----------------------------------------------------------------

@dataclass
class Call:
    rc: int
    stdout: str
    stderr: str
    seconds: float


@dataclass
class Bench:
    cni_path: Path
    work: Path
    pods: list[str]
    env_extra: dict = field(default_factory=dict)

    def env(self, command: str, cid: str, netns: str, ifname: str = "eth0") -> dict:
        env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
               "CNI_COMMAND": command, "CNI_PATH": str(self.cni_path), "CNI_IFNAME": ifname}
        if cid:
            env["CNI_CONTAINERID"] = cid
        if netns:
            env["CNI_NETNS"] = netns
        env.update(self.env_extra)
        return env

    def start(self, plugin: str, command: str, conf: dict, cid: str = "", netns: str = "",
              extra_env: Optional[dict] = None) -> subprocess.Popen:
        env = self.env(command, cid, netns)
        env.update(extra_env or {})
        proc = subprocess.Popen([str(self.cni_path / plugin)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=env)
        proc.stdin.write(json.dumps(conf).encode())
        proc.stdin.close()
        proc.stdin = None
        return proc

    def peak_rss_kb(self, plugin: str, command: str, conf: dict, cid: str, netns: str) -> Optional[int]:
        """Peak RSS of one exec'd plugin, via GNU time. (wait4 on our own child would report
        at least this script's RSS: a vfork'd child carries its parent's high-water mark.)"""
        if not GNU_TIME.exists():
            return None
        out = self.work / "rss.txt"
        env = self.env(command, cid, netns)
        subprocess.run([str(GNU_TIME), "-f", "%M", "-o", str(out), str(self.cni_path / plugin)],
                       input=json.dumps(conf).encode(), env=env, capture_output=True, check=True)
        return int(out.read_text().split()[-1])

    def call(self, plugin: str, command: str, conf: dict, cid: str = "", netns: str = "",
             extra_env: Optional[dict] = None, check: bool = True) -> Call:
        started = time.perf_counter()
        proc = self.start(plugin, command, conf, cid, netns, extra_env)
        out, err = proc.stdout.read(), proc.stderr.read()
        proc.wait()
        seconds = time.perf_counter() - started
        result = Call(proc.returncode, out.decode(), err.decode(), seconds)
        if check and result.rc != 0:
            raise RuntimeError(f"{plugin} {command} {cid} failed ({result.rc}): {result.stdout} {result.stderr[-2000:]}")
        return result


@dataclass
class Variant:
    key: str
    label: str
    plugin: str
    make_conf: Callable[[bool], dict]


def bridge_conf(name: str, bridge: str, subnet: str, data_dir: Path, masq: bool, daemon_socket: str,
                masq_backend: str = "") -> dict:
    conf = {"cniVersion": CNI_VERSION, "name": name, "type": "cni-bridge", "bridge": bridge,
            "isGateway": True, "ipMasq": masq, "daemonSocket": daemon_socket,
            "ipam": {"type": "cni-ipam", "dataDir": str(data_dir), "ranges": [[{"subnet": subnet}]]}}
    if masq_backend:
        conf["ipMasqBackend"] = masq_backend
    return conf


def reference_conf(name: str, bridge: str, subnet: str, data_dir: Path, masq: bool) -> dict:
    return {"cniVersion": CNI_VERSION, "name": name, "type": "bridge", "bridge": bridge,
            "isGateway": True, "ipMasq": masq,
            "ipam": {"type": "host-local", "dataDir": str(data_dir), "ranges": [[{"subnet": subnet}]]}}


def cycle(bench: Bench, variant: Variant, masq: bool, index: int,
          split: Optional[list[tuple[float, float]]] = None) -> float:
    """One ADD then DEL; their two times are appended to `split` when given."""
    conf = variant.make_conf(masq)
    cid = f"{variant.key}-{'m' if masq else 'n'}-{index}"
    started = time.perf_counter()
    bench.call(variant.plugin, "ADD", conf, cid, bench.pods[0])
    added = time.perf_counter()
    bench.call(variant.plugin, "DEL", conf, cid, bench.pods[0])
    ended = time.perf_counter()
    if split is not None:
        split.append((added - started, ended - added))
    return ended - started


def burst(bench: Bench, variant: Variant, count: int, round_: int) -> tuple[float, float]:
    conf = variant.make_conf(False)
    pods = bench.pods[1:count + 1]
    times = []
    for command in ("ADD", "DEL"):
        started = time.perf_counter()
        procs = [bench.start(variant.plugin, command, conf, f"{variant.key}-b{round_}-{i}", pod)
                 for i, pod in enumerate(pods)]
        failures = []
        for proc in procs:
            out, err = proc.communicate()
            if proc.returncode != 0:
                failures.append(out.decode() + err.decode()[-500:])
        times.append(time.perf_counter() - started)
        if failures:
            raise RuntimeError(f"{variant.label} burst {command}: {len(failures)} failed: {failures[0]}")
    return times[0], times[1]


# -- the daemon ---------------------------------------------------------------------

class DaemonProcess:
    def __init__(self, bin_dir: Path, socket_path: Path, workers: Optional[int]) -> None:
        argv = [str(bin_dir / "cni-bridge"), "daemon", "--socket", str(socket_path), "--log-level", "WARNING"]
        if workers:
            argv += ["--workers", str(workers)]
        env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
        self.socket_path = socket_path
        self.proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 60
        while not socket_path.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the daemon did not start")
            time.sleep(0.05)

    def pids(self) -> list[int]:
        children = []
        for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
            text = (task / "children").read_text().split()
            children += [int(p) for p in text]
        return [self.proc.pid] + children

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()


def proc_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def pss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


# -- import budget ------------------------------------------------------------------

_IMPORT_LINE = re.compile(r"^import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)$")


@dataclass
class ImportProfile:
    total_ms: float
    modules: int
    names: set
    top: list


def parse_importtime(stderr: str) -> ImportProfile:
    total, names, top = 0, set(), []
    for line in stderr.splitlines():
        match = _IMPORT_LINE.match(line)
        if not match:
            continue
        cumulative, indent, name = int(match.group(2)), len(match.group(3)), match.group(4)
        names.add(name)
        if indent == 1:   # top-level imports: their cumulative times add up to the whole
            total += cumulative
            top.append((cumulative, name))
    top.sort(reverse=True)
    return ImportProfile(total / 1000, len(names), names, top[:3])


def has(profile: ImportProfile, package: str) -> bool:
    return any(n == package or n.startswith(package + ".") for n in profile.names)


# -- IPAM store pre-fill --------------------------------------------------------------

def prefill_cni_ipam(data_dir: Path, network: str, subnet_prefix: str, count: int) -> None:
    """Write `count` reservations in cni-ipam's file format (one file per IP + owner index)."""
    from ipam.filestore import LAST_PREFIX, OWNERS_DIR, current_boot_id

    store = data_dir / network
    (store / OWNERS_DIR).mkdir(parents=True, exist_ok=True)
    boot, now, last = current_boot_id(), time.time(), ""
    for i in range(count):
        ip = f"{subnet_prefix}.{2 + i // 250}.{1 + i % 250}"
        cid = f"filler{i}"
        (store / ip).write_text(json.dumps({"containerID": cid, "ifname": "eth0", "boot": boot, "created": now}))
        (store / OWNERS_DIR / f"{cid}:eth0").write_text(json.dumps([ip]))
        last = ip
    (store / f"{LAST_PREFIX}0").write_text(last)


def prefill_host_local(data_dir: Path, network: str, subnet_prefix: str, count: int) -> None:
    store = data_dir / network
    store.mkdir(parents=True, exist_ok=True)
    last = ""
    for i in range(count):
        ip = f"{subnet_prefix}.{2 + i // 250}.{1 + i % 250}"
        (store / ip).write_text(f"filler{i}\r\neth0")
        last = ip
    (store / "last_reserved_ip.0").write_text(last)


# -- the run --------------------------------------------------------------------------

def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 10 else f"{seconds:.1f} s"


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [headers] + rows) for i in range(len(headers))]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = ["| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    return "\n".join([line, sep] + body)


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = proc_kb_meminfo()
    return (f"{os.cpu_count()} cores ({model}), {mem // 1024} MiB RAM, Linux {platform.release()}, "
            f"Python {platform.python_version()}")


def proc_kb_meminfo() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1])
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=20, help="ADD+DEL cycles per variant and ipMasq setting")
    parser.add_argument("--standalone-cycles", type=int, default=8, help="cycles for the (slow) standalone variant")
    parser.add_argument("--pods", type=int, default=40, help="pods in the parallel burst")
    parser.add_argument("--bursts", type=int, default=3, help="bursts per variant (median; standalone runs 1)")
    parser.add_argument("--workers", type=int, default=0, help="daemon workers (default: the daemon's default)")
    parser.add_argument("--reservations", type=int, default=5000)
    parser.add_argument("--cri-pods", type=int, default=10, help="pods per variant through containerd's CRI (0: skip it)")
    parser.add_argument("--steps", type=int, default=20, help="in-process cycles for the per-step breakdown")
    parser.add_argument("--scale", default="0,100,500,1000",
                        help="pods attached for the scale table (comma-separated; empty: skip it)")
    parser.add_argument("--scale-cycles", type=int, default=10, help="cycles per level of the scale table")
    parser.add_argument("--scale-window", type=int, default=40, help="ADDs in flight while attaching")
    parser.add_argument("--scale-settle", type=float, default=5.0,
                        help="seconds to wait after attaching before the level's cycles (a burst of new "
                             "links keeps the kernel busy for a while: IPv6 DAD, MLD, router solicitations)")
    parser.add_argument("--soak", type=int, default=10000, help="ADD+DEL cycles of the soak (0: skip it)")
    parser.add_argument("--json", type=Path, help="also write the numbers to this file")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench: needs root (it makes network namespaces)", file=sys.stderr)
        return 2
    for need in ("bridge", "host-local"):
        if not (REFERENCE / need).exists():
            print(f"bench: {REFERENCE / need} missing (apt-get install containernetworking-plugins)", file=sys.stderr)
            return 2
    sys.path.insert(0, str(REPO))
    began = time.monotonic()
    load_before = os.getloadavg()[0]
    results: dict = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "machine": machine()}
    with ExitStack() as stack:
        work = Path(tempfile.mkdtemp(prefix="cni-bench-"))
        stack.callback(shutil.rmtree, work, True)
        log(f"building a production-style install in {work}")
        bin_dir = build_install(work / "install")
        front_end = build_front_end()
        cni_path = make_cni_path(work / "cni-bin", bin_dir, front_end)
        namespaces = Namespaces()
        stack.callback(namespaces.close)
        host = namespaces.add("host")
        pods = [namespaces.add(f"p{i}") for i in range(args.pods + 1)]
        stack.enter_context(inside_netns(host))
        bench = Bench(cni_path=cni_path, work=work, pods=pods)
        socket_path = work / "run" / "daemon.sock"
        daemon = DaemonProcess(bin_dir, socket_path, args.workers or None)
        stack.callback(daemon.stop)

        variants = [
            Variant("sa", "cni-bridge standalone", "cni-bridge",
                    lambda m: bridge_conf("bench-sa", "brsa", "10.202.0.0/16", work / "ipam", m, "")),
            Variant("dm", "cni-bridge + daemon, Python front end", "cni-bridge",
                    lambda m: bridge_conf("bench-dm", "brdm", "10.203.0.0/16", work / "ipam", m, str(socket_path))),
            Variant("ref", "reference bridge + host-local", "bridge",
                    lambda m: reference_conf("bench-ref", "brref", "10.201.0.0/16", work / "ipam", m)),
        ]
        if front_end is not None:
            variants.insert(2, Variant(
                "fe", "cni-bridge + daemon, static front end", "cni-bridge-fe",
                lambda m: bridge_conf("bench-fe", "brfe", "10.207.0.0/16", work / "ipam", m, str(socket_path))))
        by_key = {v.key: v for v in variants}

        # Warm every path once (page cache, first bridge creation) before measuring.
        for variant in variants:
            for masq in (False, True):
                cycle(bench, variant, masq, -1)

        # 1. cycles, interleaved so that background noise hits every variant alike.
        log("ADD+DEL cycles")
        cycles: dict[tuple[str, bool], list[float]] = {}
        splits: dict[tuple[str, bool], list[tuple[float, float]]] = {}
        for masq in (False, True):
            for i in range(args.cycles):
                for variant in variants:
                    if variant.key == "sa" and i >= args.standalone_cycles:
                        continue
                    cycles.setdefault((variant.key, masq), []).append(
                        cycle(bench, variant, masq, i, splits.setdefault((variant.key, masq), [])))
        # 2. bursts
        log(f"{args.pods}-pod bursts")
        bursts: dict[str, list[tuple[float, float]]] = {}
        for round_ in range(args.bursts):
            for variant in variants:
                if variant.key == "sa" and round_ > 0:
                    continue
                bursts.setdefault(variant.key, []).append(burst(bench, variant, args.pods, round_))

        def med(values: list[float]) -> float:
            return statistics.median(values)

        ref_cycle = {m: med(cycles[("ref", m)]) for m in (False, True)}
        ref_burst = med([a + d for a, d in bursts["ref"]])
        rows, perf = [], {}
        for variant in variants:
            c_off, c_on = med(cycles[(variant.key, False)]), med(cycles[(variant.key, True)])
            b_add = med([a for a, _ in bursts[variant.key]])
            b_del = med([d for _, d in bursts[variant.key]])
            b_all = med([a + d for a, d in bursts[variant.key]])
            r_off, r_on, r_b = c_off / ref_cycle[False], c_on / ref_cycle[True], b_all / ref_burst
            perf[variant.key] = {"cycle_off_s": c_off, "cycle_on_s": c_on,
                                 "cycle_off_add_s": med([a for a, _ in splits[(variant.key, False)]]),
                                 "cycle_off_del_s": med([d for _, d in splits[(variant.key, False)]]),
                                 "burst_add_s": b_add,
                                 "burst_del_s": b_del, "burst_s": b_all, "ratio_cycle_off": r_off,
                                 "ratio_cycle_on": r_on, "ratio_burst": r_b}
            target = TARGETS.get({"sa": "standalone", "dm": "daemon", "fe": "front end"}.get(variant.key, ""), None)
            verdict = "-"
            if target is not None:
                checks = [r_off <= target, r_on <= target] + ([r_b <= target] if variant.key != "sa" else [])
                if variant.key == "fe":   # issue 11's target names ipMasq off (ipMasq on: the scale table)
                    checks = [r_off <= target, r_b <= target]
                verdict = f"<= {target:g}x: " + ("met" if all(checks) else "NOT met")
            rows.append([variant.label, fmt_ms(c_off), f"{r_off:.2f}x", fmt_ms(c_on), f"{r_on:.2f}x",
                         f"{fmt_ms(b_all)} ({fmt_ms(b_add)} + {fmt_ms(b_del)})", f"{r_b:.2f}x", verdict])
        results["performance"] = perf

        # The floor the 16x comes from: a bare interpreter that imports pyroute2 and
        # pydantic, twice per cycle (ADD, DEL), against this run's reference cycle. Since the
        # plugin speaks rtnetlink itself (cni_bridge/rtnl.py), its own floor is the interpreter
        # and pydantic alone; both are printed.
        def import_time(code: str) -> float:
            runs = []
            for _ in range(9):
                started = time.perf_counter()
                subprocess.run([str(bin_dir / "python"), "-c", code], check=True, capture_output=True)
                runs.append(time.perf_counter() - started)
            return med(runs)

        floor = import_time("import pyroute2, pydantic; pydantic.BaseModel")
        own_floor = import_time("import pydantic; pydantic.BaseModel")
        results["import_floor_s"] = floor
        results["import_floor_without_pyroute2_s"] = own_floor
        floor_line = (f"Floor: an interpreter importing pyroute2 and pydantic takes {fmt_ms(floor)} here; "
                      f"two of them (ADD and DEL) are {2 * floor / ref_cycle[False]:.1f}x the reference cycle "
                      f"before any work. The plugin no longer imports pyroute2: its own floor, an interpreter "
                      f"importing pydantic, takes {fmt_ms(own_floor)}. ")
        beyond = perf["sa"]["cycle_off_s"] - 2 * own_floor
        floor_line += (f"cni-bridge standalone spends {fmt_ms(beyond)} per cycle beyond its own floor and "
                       f"{fmt_ms(2 * (floor - own_floor) - beyond)} less than the old one."
                       if beyond >= 0 else
                       f"cni-bridge standalone takes {fmt_ms(-beyond)} less than its own floor per cycle.")
        perf_table = table(["variant", "cycle, ipMasq off", "ratio", "cycle, ipMasq on", "ratio",
                            f"{args.pods}-pod burst (ADD + DEL)", "ratio", "target"], rows)
        floor_line = ("Cycle, ipMasq off, split (median ADD / median DEL): " + "; ".join(
            f"{variant.label} {perf[variant.key]['cycle_off_add_s'] * 1000:.1f} / "
            f"{perf[variant.key]['cycle_off_del_s'] * 1000:.1f} ms" for variant in variants) + "\n\n" + floor_line)

        # 3. import budget per verb, and peak RSS of one exec'd front end.
        log("import budget")
        pod = pods[0]
        sa_conf, dm_conf = by_key["sa"].make_conf(False), by_key["dm"].make_conf(False)
        status_conf = dict(sa_conf, cniVersion="1.1.0")
        ipam_conf = {"cniVersion": CNI_VERSION, "name": "bench-ipam", "type": "cni-ipam",
                     "ipam": {"type": "cni-ipam", "dataDir": str(work / "ipam"),
                              "ranges": [[{"subnet": "10.204.0.0/16"}]]}}
        ipam_gc = dict(ipam_conf, cniVersion="1.1.0", **{"cni.dev/valid-attachments": []})
        prof_env = {"PYTHONPROFILEIMPORTTIME": "1"}
        steps = [
            ("cni-bridge VERSION", "cni-bridge", "VERSION", sa_conf, "", ""),
            ("cni-bridge ADD, standalone", "cni-bridge", "ADD", sa_conf, "imp", pod),
            ("cni-bridge DEL, standalone", "cni-bridge", "DEL", sa_conf, "imp", pod),
            ("cni-bridge STATUS, standalone", "cni-bridge", "STATUS", status_conf, "", ""),
            ("cni-bridge ADD, via daemon (client)", "cni-bridge", "ADD", dm_conf, "imd", pod),
            ("cni-bridge DEL, via daemon (client)", "cni-bridge", "DEL", dm_conf, "imd", pod),
            ("cni-ipam VERSION", "cni-ipam", "VERSION", ipam_conf, "", ""),
            ("cni-ipam ADD", "cni-ipam", "ADD", ipam_conf, "ipm", pod),
            ("cni-ipam CHECK", "cni-ipam", "CHECK", ipam_conf, "ipm", pod),
            ("cni-ipam DEL", "cni-ipam", "DEL", ipam_conf, "ipm", pod),
            ("cni-ipam STATUS", "cni-ipam", "STATUS", dict(ipam_conf, cniVersion="1.1.0"), "", ""),
            ("cni-ipam GC", "cni-ipam", "GC", ipam_gc, "", ""),
        ]
        budget_rows, budget = [], {}
        for label, plugin, command, conf, cid, netns in steps:
            plain = [bench.call(plugin, command, conf, cid, netns) if command in ("VERSION", "STATUS", "GC")
                     else None for _ in range(5)]
            profiled = bench.call(plugin, command, conf, cid, netns, extra_env=prof_env)
            profile = parse_importtime(profiled.stderr)
            wall = med([c.seconds for c in plain]) if plain[0] is not None else profiled.seconds
            budget[label] = {"imports_ms": profile.total_ms, "modules": profile.modules,
                             "pyroute2": has(profile, "pyroute2"), "pydantic": has(profile, "pydantic")}
            top = ", ".join(f"{name} {us / 1000:.0f}" for us, name in profile.top)
            budget_rows.append([label, f"{profile.total_ms:.0f} ms", str(profile.modules),
                                "yes" if has(profile, "pyroute2") else "no",
                                "yes" if has(profile, "pydantic") else "no",
                                f"{wall * 1000:.0f} ms" + ("" if plain[0] is not None else " (profiled)"), top])
        results["imports"] = budget
        budget_table = table(["verb", "imports (-X importtime)", "modules", "pyroute2", "pydantic",
                              "wall", "heaviest top-level imports (ms)"], budget_rows)
        bad = [label for label, b in budget.items()
               if b["pyroute2"] and ("VERSION" in label or "STATUS" in label or "cni-ipam" in label
                                     or "daemon" in label)]

        dev = REPO / ".venv" / "bin" / "cni-bridge"
        dev_version = []
        if dev.exists():
            for _ in range(7):
                started = time.perf_counter()
                subprocess.run([str(dev)], env={"CNI_COMMAND": "VERSION"}, input=b"{}", capture_output=True)
                dev_version.append(time.perf_counter() - started)
        sa_version = med([bench.call("cni-bridge", "VERSION", sa_conf).seconds for _ in range(7)])

        # Peak RSS.
        log("memory")
        rss_rows = []
        rss_steps = [("cni-bridge ADD, standalone", "cni-bridge", sa_conf),
                     ("cni-bridge ADD, via daemon (Python front end)", "cni-bridge", dm_conf)]
        if front_end is not None:
            rss_steps.append(("cni-bridge ADD, via daemon (static front end)", "cni-bridge-fe", dm_conf))
        for label, plugin, conf in (*rss_steps,
                                    ("reference bridge ADD (+ host-local)", "bridge",
                                     by_key["ref"].make_conf(False))):
            peak = bench.peak_rss_kb(plugin, "ADD", conf, "rss", pod)
            bench.call(plugin, "DEL", conf, "rss", pod)
            rss_rows.append([label, f"{peak / 1024:.1f} MiB" if peak else "n/a (needs GNU time)",
                             "max RSS of the exec'd process (GNU time)"])
        pids = daemon.pids()
        supervisor_hwm = proc_kb(pids[0], "VmHWM")
        worker_hwm = max((proc_kb(p, "VmHWM") for p in pids[1:]), default=0)
        total_pss = sum(pss_kb(p) for p in pids)
        rss_rows.append(["daemon supervisor", f"{supervisor_hwm / 1024:.1f} MiB", "VmHWM"])
        rss_rows.append([f"daemon worker (largest of {len(pids) - 1})", f"{worker_hwm / 1024:.1f} MiB", "VmHWM"])
        rss_rows.append(["daemon, all processes", f"{total_pss / 1024:.1f} MiB",
                         "PSS (shared pages counted once)"])
        results["memory_kb"] = {"rows": rss_rows}
        rss_table = table(["process", "peak RSS", "how"], rss_rows)

        # 4. IPAM cost against store size.
        log("IPAM store size")
        ipam_rows = []
        ipam_cycles = max(5, args.cycles // 2)
        sizes = (10, args.reservations)
        confs = {}
        for count in sizes:
            data = work / f"ipam-{count}"
            prefill_cni_ipam(data, "bench-fill", "10.205", count)
            prefill_host_local(data, "bench-fill-ref", "10.206", count)
            confs[count] = (
                {"cniVersion": CNI_VERSION, "name": "bench-fill", "type": "cni-ipam",
                 "ipam": {"type": "cni-ipam", "dataDir": str(data), "ranges": [[{"subnet": "10.205.0.0/16"}]]}},
                {"cniVersion": CNI_VERSION, "name": "bench-fill-ref", "type": "host-local",
                 "ipam": {"type": "host-local", "dataDir": str(data), "ranges": [[{"subnet": "10.206.0.0/16"}]]}})
        samples: dict[tuple[int, str], list[float]] = {}
        for i in range(ipam_cycles):   # both store sizes interleaved, so noise hits them alike
            for count in sizes:
                conf, ref = confs[count]
                for plugin, c, key in (("cni-ipam", conf, "cni_ipam_exec_s"), ("host-local", ref, "host_local_exec_s")):
                    started = time.perf_counter()
                    bench.call(plugin, "ADD", c, f"probe{i}", pod)
                    bench.call(plugin, "DEL", c, f"probe{i}", pod)
                    samples.setdefault((count, key), []).append(time.perf_counter() - started)
        for _ in range(4):
            for count in sizes:
                samples.setdefault((count, "cni_ipam_in_process_s"), []).append(
                    ipam_in_process(confs[count][0], pod, ipam_cycles))
        ipam_results = {count: {key: med(samples[(count, key)])
                                for key in ("cni_ipam_exec_s", "cni_ipam_in_process_s", "host_local_exec_s")}
                        for count in sizes}
        small, large = ipam_results[10], ipam_results[args.reservations]
        for key, label in (("cni_ipam_in_process_s", "cni-ipam ADD+DEL, in-process (store work only)"),
                           ("cni_ipam_exec_s", "cni-ipam ADD+DEL, exec'd"),
                           ("host_local_exec_s", "host-local ADD+DEL, exec'd (reference)")):
            ratio = large[key] / small[key]
            ipam_rows.append([label, f"{small[key] * 1000:.1f} ms", f"{large[key] * 1000:.1f} ms", f"{ratio:.2f}x"])
        results["ipam"] = ipam_results
        ipam_table = table(["measure", "10 reservations", f"{args.reservations:,} reservations", "ratio"], ipam_rows)

        # 5. Kubelet's path: the same plugins under containerd's CRI (scripts/bench_cri.py).
        cri_table = None
        if args.cri_pods > 0:
            import bench_cri
            cri_rows, results["cri"] = bench_cri.measure(work / "cri", bin_dir, front_end, args.cri_pods, log)
            cri_table = table(["variant", "RunPodSandbox", "ratio", "Stop+Remove", "ratio"], cri_rows)
        # 6. per-step breakdown of one daemon cycle.
        log("per-step breakdown")
        steps_conf = lambda m: bridge_conf("bench-steps", "brst", "10.208.0.0/16", work / "ipam", m, "",
                                           "nftables")
        beside = None
        if "fe" in by_key:
            beside = lambda i: cycle(bench, by_key["fe"], False, 1000 + i)
        steps_off, inproc_off, via_fe = step_breakdown(steps_conf(False), pod, args.steps, beside)
        steps_on, inproc_on, _ = step_breakdown(steps_conf(True), pod, args.steps)
        hop = via_fe - inproc_off if via_fe is not None else None
        results["steps"] = {"off": steps_off, "on": steps_on, "cycle_off_s": inproc_off,
                            "cycle_on_s": inproc_on, "hop_s": hop}
        steps_table = breakdown_table(steps_off, steps_on, inproc_off, inproc_on, hop)

        # 7. scale: ipMasq on, pods already attached.
        levels = sorted({int(level) for level in args.scale.split(",") if level.strip()})
        scale_out = None
        if levels:
            log(f"scale table: {levels}")
            front = "cni-bridge-fe" if front_end is not None else "cni-bridge"
            runs = scale_runs(bench, namespaces, stack, [
                (f"cni-bridge + daemon{', static front end' if front_end else ''}, nftables", front,
                 bridge_conf("bench-scale", "brsc", "10.210.0.0/21", work / "ipam-scale", True, "", "nftables")),
                ("reference bridge + host-local (iptables)", "bridge",
                 reference_conf("bench-scale-ref", "brsr", "10.211.0.0/21", work / "ipam-scale", True)),
            ], levels, args.scale_cycles, args.scale_window, bin_dir, args.scale_settle)
            results["scale"] = runs
            scale_out = scale_table(runs, levels, args.scale_window)

        # 8. soak: memory and fds of the daemon over many cycles.
        soak_out = None
        if args.soak:
            log(f"soak: {args.soak} cycles")
            front = "cni-bridge-fe" if front_end is not None else "cni-bridge"
            soak_result = soak(bench, daemon, front, by_key["fe" if front_end is not None else "dm"].make_conf(False),
                               pod, args.soak)
            results["soak"] = soak_result
            soak_out = soak_table(soak_result)

    elapsed = time.monotonic() - began
    print(f"# cni-bridge benchmark, {results['date']}")
    print(f"Machine: {results['machine']}")
    print(f"cniVersion {CNI_VERSION}; medians of {args.cycles} cycles ({args.standalone_cycles} standalone), "
          f"{args.bursts} bursts (1 standalone); daemon workers: "
          f"{args.workers or 'default'}; run took {elapsed:.0f} s; load average {load_before:.1f} at the start, "
          f"{os.getloadavg()[0]:.1f} at the end (other work on the machine skews absolute times; "
          f"the variants are interleaved so that it skews the ratios less)\n")
    print("## ADD+DEL cycle and parallel burst (ratio = variant / reference)\n")
    print(perf_table)
    print("\n" + floor_line)
    print("\n## Import budget per verb (one exec each; times are inflated by -X importtime)\n")
    print(budget_table)
    print(f"\nVERSION exec, wall: {sa_version * 1000:.1f} ms as installed by `pip install .`"
          + (f"; {med(dev_version) * 1000:.1f} ms from the dev venv's editable install" if dev_version else ""))
    print("pyroute2 on a path that must not import it: " + (", ".join(bad) if bad else "none"))
    print("\n## Peak memory\n")
    print(rss_table)
    print("\n## IPAM cost against reservations held\n")
    print(ipam_table)
    if cri_table is not None:
        print(f"\n## Through containerd's CRI (kubelet's path), medians of {args.cri_pods} pods\n")
        print(cri_table)
    print("\n## One daemon cycle, step by step (medians; in-process as a worker runs it)\n")
    print(steps_table)
    if scale_out is not None:
        print(f"\n## Scale: ipMasq on, the cycle of one more pod with pods already attached (a /21)\n")
        print(scale_out[0])
        print("\n" + "\n".join(scale_out[1]))
    if soak_out is not None:
        print(f"\n## Soak: daemon memory and files over {args.soak:,} ADD+DEL cycles (static front end)\n")
        print(soak_out[0])
        print("\n" + "\n".join(soak_out[1]))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return 1 if bad else 0


# -- 5. where a daemon cycle spends its time ------------------------------------------------

def step_breakdown(conf: dict, netns: str, count: int,
                   beside: Optional[Callable[[int], float]] = None) -> tuple[dict[str, float], float, Optional[float]]:
    """Median time of each step of an ADD+DEL cycle, run in-process exactly as a daemon
    worker runs it, cut at the plugin's fault points (cni_bridge/faults.py); and the
    median whole cycle. A step's time is from the previous point (or the call's start).
    `beside(i)`, run after each in-process cycle, times the same cycle another way (through
    the daemon): its median comes back third, so the difference is measured under one load."""
    import io

    from cni_bridge import faults
    from cni_bridge.main import run_in_process

    marks: list[tuple[str, float]] = []
    faults.set_step_check(lambda name: marks.append((name, time.perf_counter())))
    stdin = json.dumps(conf).encode()
    steps: dict[str, list[float]] = {}
    cycles, others = [], []
    try:
        for i in range(-3, count):   # three untimed rounds first
            began = time.perf_counter()
            for command in ("ADD", "DEL"):
                marks.clear()
                env = {"CNI_COMMAND": command, "CNI_CONTAINERID": f"steps{i}", "CNI_NETNS": netns,
                       "CNI_IFNAME": "eth0", "CNI_PATH": "/nonexistent",
                       "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
                start = time.perf_counter()
                out = io.StringIO()
                if run_in_process(env, stdin, out, io.StringIO()) != 0:
                    raise RuntimeError(f"in-process {command} failed: {out.getvalue()}")
                previous = start
                for name, at in marks + [(f"{command.lower()}.result-written", time.perf_counter())]:
                    if i >= 0:
                        steps.setdefault(name, []).append(at - previous)
                    previous = at
            if i >= 0:
                cycles.append(time.perf_counter() - began)
            if beside is not None:
                faults.set_step_check(None)
                other = beside(i)
                faults.set_step_check(lambda name: marks.append((name, time.perf_counter())))
                if i >= 0:
                    others.append(other)
    finally:
        faults.set_step_check(None)
    return ({name: statistics.median(values) for name, values in steps.items()}, statistics.median(cycles),
            statistics.median(others) if others else None)


def breakdown_table(off: dict[str, float], on: dict[str, float], cycle_off: float, cycle_on: float,
                    hop: Optional[float]) -> str:
    from cni_bridge.faults import POINTS

    where = {p.name: p.where for p in POINTS}
    where.update({"add.result-written": "the result JSON is written", "del.result-written": "DEL returns"})
    rows = []
    for name in list(dict.fromkeys(list(on) + list(off))):   # ipMasq on passes every point
        rows.append([name, where.get(name, ""), f"{off[name] * 1000:.2f}" if name in off else "-",
                     f"{on[name] * 1000:.2f}" if name in on else "-"])
    rows.append(["= cycle in-process", "ADD + DEL in a worker, no socket", f"{cycle_off * 1000:.1f}",
                 f"{cycle_on * 1000:.1f}"])
    if hop is not None:
        rows.append(["+ front end and socket", "static front end exec, socket hop, worker hand-off (2 calls)",
                     f"{hop * 1000:.1f}", "-"])
    return table(["step (ends at the fault point)", "what is done by then", "ms, ipMasq off",
                  "ms, ipMasq on (nftables)"], rows)


# -- 6. the scale table -------------------------------------------------------------------

def run_window(bench: Bench, plugin: str, command: str, conf: dict, calls: list[tuple[str, str, str]],
               window: int) -> float:
    """Run (cid, netns, ifname) calls with at most `window` in flight; the wall time taken."""
    started = time.perf_counter()
    pending = list(calls)
    running: list[subprocess.Popen] = []
    failures = []
    while pending or running:
        while pending and len(running) < window:
            cid, netns, ifname = pending.pop(0)
            env = bench.env(command, cid, netns, ifname)
            proc = subprocess.Popen([str(bench.cni_path / plugin)], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
            proc.stdin.write(json.dumps(conf).encode())
            proc.stdin.close()
            proc.stdin = None
            running.append(proc)
        proc = running.pop(0)
        out, err = proc.communicate()
        if proc.returncode != 0:
            failures.append((out + err).decode()[-500:])
    if failures:
        raise RuntimeError(f"{plugin} {command}: {len(failures)} of {len(calls)} failed: {failures[0]}")
    return time.perf_counter() - started


class ScaleNode:
    """One scratch host netns (with its own daemon for our plugin) holding `attached` pods,
    and a pod namespace of its own for the measured cycle."""

    def __init__(self, bench: Bench, namespaces: Namespaces, stack: ExitStack, plugin: str, conf: dict,
                 daemon_bin: Optional[Path]) -> None:
        role = "s" + uuid.uuid4().hex[:4]
        self.bench, self.plugin, self.conf = bench, plugin, conf
        self.host = namespaces.add(role)
        self.probe = namespaces.add(f"{role}probe")   # the measured pod has a namespace to itself
        self.fillers = [namespaces.add(f"{role}p{i}") for i in range(10)]   # 100 ifnames each, at most
        self.attached = 0
        if daemon_bin is not None:
            sock = bench.work / f"run-{role}" / "daemon.sock"
            with inside_netns(self.host):
                daemon = DaemonProcess(daemon_bin, sock, None)
            stack.callback(daemon.stop)
            self.conf = dict(conf, daemonSocket=str(sock))

    def attach_up_to(self, level: int, window: int) -> float:
        calls = [(f"fill{i}", self.fillers[i % len(self.fillers)], f"f{i // len(self.fillers)}")
                 for i in range(self.attached, level)]
        self.attached = level
        if not calls:
            return 0.0
        with inside_netns(self.host):
            return run_window(self.bench, self.plugin, "ADD", self.conf, calls, window)

    def cycle(self, tag: str) -> float:
        with inside_netns(self.host):
            started = time.perf_counter()
            self.bench.call(self.plugin, "ADD", self.conf, tag, self.probe)
            self.bench.call(self.plugin, "DEL", self.conf, tag, self.probe)
            return time.perf_counter() - started


def scale_runs(bench: Bench, namespaces: Namespaces, stack: ExitStack, variants: list[tuple[str, str, dict]],
               levels: list[int], cycles: int, window: int, daemon_bin: Path, settle: float = 0.0) -> list[dict]:
    """Per variant, a node that fills up level by level and an empty node beside it. At each
    level the cycles of all of them are interleaved, so machine load hits them alike: the
    ratio to the empty node is the cost of the pods present, not of the minute measured."""
    nodes = []
    for label, plugin, conf in variants:
        ours = plugin != "bridge"
        nodes.append({"label": label,
                      "full": ScaleNode(bench, namespaces, stack, plugin, conf, daemon_bin if ours else None),
                      "empty": ScaleNode(bench, namespaces, stack, plugin, conf, daemon_bin if ours else None),
                      "levels": {}, "empty_levels": {}, "attach_s": 0.0})
    for level in levels:
        for node in nodes:
            node["attach_s"] += node["full"].attach_up_to(level, window)
        time.sleep(settle)   # the same for every variant: the steady state is what is measured
        samples: dict[tuple[int, str], list[float]] = {}
        for i in range(-1, cycles):
            for n, node in enumerate(nodes):
                for which in ("full", "empty"):
                    took = node[which].cycle(f"one{level}-{which}-{i}")
                    if i >= 0:
                        samples.setdefault((n, which), []).append(took)
        for n, node in enumerate(nodes):
            node["levels"][level] = statistics.median(samples[(n, "full")])
            node["empty_levels"][level] = statistics.median(samples[(n, "empty")])
            log(f"scale: {node['label']}: {level} pods attached, cycle {fmt_ms(node['levels'][level])} "
                f"(empty node beside it: {fmt_ms(node['empty_levels'][level])})")
    return [{key: node[key] for key in ("label", "levels", "empty_levels", "attach_s")} for node in nodes]


def scale_table(runs: list[dict], levels: list[int], window: int) -> tuple[str, list[str]]:
    ref = runs[-1]
    rows = []
    for run in runs:
        cells = [run["label"]]
        for level in levels:
            value = run["levels"][level]
            vs_empty = value / run["empty_levels"][level]
            vs_ref = "" if run is ref else f", {value / ref['levels'][level]:.2f}x ref"
            cells.append(f"{fmt_ms(value)} ({vs_empty:.2f}x empty{vs_ref})")
        cells.append(fmt_ms(run["attach_s"]))
        rows.append(cells)
    headers = (["variant"] + [f"cycle, {level:,} attached" for level in levels]
               + [f"attach {levels[-1]:,} ({window} in flight)"])
    verdicts = []
    ours = runs[0]
    top = levels[-1]
    flat = ours["levels"][top] / ours["empty_levels"][top]
    target = f" (target <= 1.2x: {'met' if flat <= 1.2 else 'NOT met'})" if top == 1000 else ""
    verdicts.append(f"{top:,} attached vs an empty node measured alongside, ours: {flat:.2f}x{target}; "
                    f"vs its own 0-attached column: {ours['levels'][top] / ours['levels'][levels[0]]:.2f}x")
    if 500 in ours["levels"]:
        half = ours["levels"][500] / ref["levels"][500]
        verdicts.append(f"500 attached, ours vs the reference: {half:.2f}x (target <= 0.5x: "
                        f"{'met' if half <= 0.5 else 'NOT met'})")
    return table(headers, rows), verdicts


# -- 7. the soak ----------------------------------------------------------------------------

def daemon_footprint(daemon: "DaemonProcess") -> dict:
    pids = daemon.pids()
    fds = 0
    for pid in pids:
        try:
            fds += len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            pass
    return {"processes": len(pids), "rss_kb": sum(proc_kb(p, "VmRSS") for p in pids),
            "pss_kb": sum(pss_kb(p) for p in pids), "fds": fds,
            "supervisor_fds": len(os.listdir(f"/proc/{pids[0]}/fd"))}


def soak(bench: Bench, daemon: "DaemonProcess", plugin: str, conf: dict, netns: str, count: int) -> dict:
    """`count` ADD+DEL cycles through the daemon, one after another, exec'd as a runtime would."""
    times = []
    samples: dict[int, dict] = {}

    def sample() -> dict:
        time.sleep(0.5)   # let the worker that answered close the connection first
        return daemon_footprint(daemon)

    # A worker is replaced after MAX_REQUESTS_PER_WORKER calls: the cycles during which the
    # set of workers changed show what a replacement costs the call that meets it.
    workers = set(daemon.pids()[1:])
    replaced_during: list[int] = []
    for i in range(count):
        started = time.perf_counter()
        bench.call(plugin, "ADD", conf, f"soak{i}", netns)
        bench.call(plugin, "DEL", conf, f"soak{i}", netns)
        times.append(time.perf_counter() - started)
        now = set(daemon.pids()[1:])
        if now != workers:
            replaced_during.append(i)
            workers = now
        if i + 1 in (min(100, count), 1000, count // 2) and i + 1 < count:
            samples[i + 1] = sample()
        if (i + 1) % 1000 == 0:
            log(f"soak: {i + 1} cycles")
    samples[count] = sample()
    early, late = samples[min(100, count)], samples[count]
    ordered = sorted(times)
    # The cycle a replacement was seen after, and the one after it (a respawn can finish late).
    near = sorted({j for i in replaced_during for j in (i, i + 1) if j < count})
    return {"cycles": count, "early": early, "late": late, "samples": samples, "median_s": statistics.median(times),
            "p99_s": ordered[int(0.99 * (len(ordered) - 1))], "max_s": ordered[-1],
            "slowest_at": times.index(ordered[-1]) + 1, "replacements": len(replaced_during),
            "near_replacement_median_s": statistics.median([times[j] for j in near]) if near else None,
            "near_replacement_max_s": max((times[j] for j in near), default=None)}


def soak_table(result: dict) -> tuple[str, list[str]]:
    from cni_bridge.daemon import MAX_REQUESTS_PER_WORKER

    early, late = result["early"], result["late"]
    points = sorted(result["samples"])
    rows = [
        ["daemon RSS, all processes"] + [f"{result['samples'][n]['rss_kb'] / 1024:.1f} MiB" for n in points]
        + [f"{late['rss_kb'] / early['rss_kb']:.2f}x"],
        ["daemon PSS, all processes"] + [f"{result['samples'][n]['pss_kb'] / 1024:.1f} MiB" for n in points]
        + [f"{late['pss_kb'] / early['pss_kb']:.2f}x"],
        ["open file descriptors, all processes"] + [str(result["samples"][n]["fds"]) for n in points]
        + [f"{late['fds'] - early['fds']:+d}"],
        ["processes (supervisor + workers)"] + [str(result["samples"][n]["processes"]) for n in points] + [""],
    ]
    memory_ok = late["rss_kb"] <= 1.1 * early["rss_kb"] and late["pss_kb"] <= 1.1 * early["pss_kb"]
    verdicts = [
        f"cycles: {result['cycles']:,}; median {result['median_s'] * 1000:.1f} ms, 99th percentile "
        f"{result['p99_s'] * 1000:.1f} ms, slowest {result['max_s'] * 1000:.1f} ms (cycle {result['slowest_at']:,})",
        f"memory at most 10% above after the first 100 cycles (RSS {late['rss_kb'] / early['rss_kb']:.2f}x, "
        f"PSS {late['pss_kb'] / early['pss_kb']:.2f}x; below 1x it fell): {'met' if memory_ok else 'NOT met'}; "
        f"no fd growth: {'met' if late['fds'] <= early['fds'] else 'NOT met'}",
    ]
    if result.get("replacements"):
        # Judged on the median: the slowest of a few dozen cycles is a tail sample either way.
        near_median, near_max = result["near_replacement_median_s"], result["near_replacement_max_s"]
        ratio = near_median / result["median_s"]
        verdicts.append(
            f"workers replaced (each after {MAX_REQUESTS_PER_WORKER:,} calls): {result['replacements']}; the cycles "
            f"next to a replacement: median {near_median * 1000:.1f} ms ({ratio:.2f}x the median of all), slowest "
            f"{near_max * 1000:.1f} ms (99th percentile of all: {result['p99_s'] * 1000:.1f} ms); "
            + ("no visible spike" if ratio <= 1.1 else "a visible spike"))
    else:
        verdicts.append("workers replaced: none during the soak")
    return table(["measure"] + [f"after {n:,} cycles" for n in points] + ["end vs 100"], rows), verdicts


def ipam_in_process(conf: dict, netns: str, count: int) -> float:
    """Median ADD+DEL through the IPAM plugin object: the store's cost without interpreter start."""
    from cni_bridge.protocol.env import parse_env
    from cni_bridge.protocol.runner import Request
    from ipam.plugin import IpamPlugin

    plugin = IpamPlugin()
    stdin = json.dumps(conf).encode()
    times = []
    for i in range(-3, count):   # three untimed rounds first (imports, page cache)
        env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": f"inproc{i}", "CNI_NETNS": netns,
               "CNI_IFNAME": "eth0", "CNI_PATH": "/nonexistent"}
        add = Request(cmd=parse_env(env), config=conf, stdin=stdin, version=CNI_VERSION)
        delete = Request(cmd=parse_env(dict(env, CNI_COMMAND="DEL")), config=conf, stdin=stdin, version=CNI_VERSION)
        started = time.perf_counter()
        plugin.add(add)
        plugin.delete(delete)
        if i >= 0:
            times.append(time.perf_counter() - started)
    return statistics.median(times)


if __name__ == "__main__":
    sys.exit(main())
