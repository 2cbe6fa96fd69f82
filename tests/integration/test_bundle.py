"""The PyInstaller bundle (dist/cni-bin) runs where there is no Python at all.

The bundle is built by scripts/bundle.sh into build/test-bundle/cni-bin and
rebuilt only when its sources change (hash in .bundle-hash). Each test runs
the bundled executables in a chroot that holds the bundle under /opt/cni/bin
and the C libraries `ldd` says it links from the system (glibc, the dynamic
loader, zlib for the bootloader), nothing else: no shell, no Python, no
iptables. /proc and the netns dir are bind-mounted into the chroot inside a
private mount namespace, so the mounts vanish with the process.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.netns import NETNS_DIR, REPO, Netns, unique

BUNDLE = REPO / "build" / "test-bundle" / "cni-bin"
LIBDIR = "cni-bridge-lib"
BIN = "/opt/cni/bin"
RUN_IN_CHROOT = (
    'root=$1; shift; '
    'mount --rbind /proc "$root/proc" && '
    f'mount --rbind {os.path.realpath(NETNS_DIR)} "$root/run/netns" && '
    'exec chroot "$root" "$@"'
)


def _build_bundle() -> Path:
    missing = [tool for tool in ("ldd", "unshare", "chroot", "mount") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"the chroot test needs {', '.join(missing)}")
    proc = subprocess.run([str(REPO / "scripts" / "bundle.sh"), str(BUNDLE)], cwd=REPO,
                          capture_output=True, text=True, timeout=1200)
    if proc.returncode != 0:
        log = (proc.stdout + proc.stderr)[-3000:]
        if "pip install" in log or "No matching distribution" in log or "Could not find a version" in log:
            pytest.skip(f"cannot install PyInstaller to build the bundle here:\n{log}")
        pytest.fail(f"scripts/bundle.sh failed:\n{log}", pytrace=False)
    return BUNDLE


def system_libraries(bundle: Path) -> tuple[set[Path], list[str]]:
    """Libraries the bundle loads from the system: everything the bootloader executable
    links, plus what bundled libraries and extension modules link and the bundle lacks."""
    provided = {p.name for p in (bundle / LIBDIR).rglob("*.so*")}
    needed: set[Path] = set()
    unresolved: list[str] = []
    elves = [bundle / "cni-bridge-python"] + [p for p in (bundle / LIBDIR).rglob("*.so*") if p.is_file()]
    for elf in elves:
        out = subprocess.run(["ldd", str(elf)], capture_output=True, text=True).stdout
        for line in out.splitlines():
            parts = line.split()
            if "=>" in parts:
                soname = parts[0]
                target = parts[parts.index("=>") + 1] if len(parts) > parts.index("=>") + 1 else ""
                if elf.name != "cni-bridge-python" and soname in provided:
                    continue
                if target.startswith("/"):
                    needed.add(Path(target))
                elif target == "not":
                    unresolved.append(f"{elf.name}: {soname}")
            elif parts and parts[0].startswith("/"):
                needed.add(Path(parts[0]))   # the dynamic loader
    return needed, unresolved


@pytest.fixture(scope="module")
def bundle() -> Path:
    return _build_bundle()


@pytest.fixture(scope="module")
def chroot(bundle, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("chroot")
    (root / BIN.lstrip("/")).parent.mkdir(parents=True)
    subprocess.run(["cp", "-a", str(bundle), str(root / BIN.lstrip("/"))], check=True)  # keeps the hard link
    libs, unresolved = system_libraries(bundle)
    assert not unresolved, f"libraries neither bundled nor on this system: {unresolved}"
    for lib in libs:
        dest = root / str(lib).lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(lib, dest)                  # follows symlinks: the chroot gets real files
    for directory in ("proc", "run/netns", "var/lib/cni", "tmp"):
        (root / directory).mkdir(parents=True, exist_ok=True)
    return root


def chroot_argv(root: Path, host: Netns, argv: list[str]) -> list[str]:
    """argv (paths inside the chroot) run in the scratch host netns, in a private mount namespace.
    Every step execs the next, so the returned command's pid ends up being argv's process."""
    return ["ip", "netns", "exec", host.name, "unshare", "--mount", "--propagation", "private",
            "sh", "-c", RUN_IN_CHROOT, "sh", str(root), *argv]


def run_in_chroot(root: Path, host: Netns, argv: list[str], env: dict, stdin: str = "") -> subprocess.CompletedProcess:
    full_env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", **env}
    return subprocess.run(chroot_argv(root, host, argv), input=stdin, capture_output=True, text=True,
                          env=full_env, timeout=60)


def cni_env(command: str, container_id: str = "", netns: str = "") -> dict:
    env = {"CNI_COMMAND": command, "CNI_PATH": BIN, "CNI_IFNAME": "eth0"}
    if container_id:
        env["CNI_CONTAINERID"] = container_id
    if netns:
        env["CNI_NETNS"] = f"/run/netns/{netns}"
    return env


def bridge_conf(bridge: str) -> dict:
    return {
        "cniVersion": "1.0.0", "name": "bundled", "type": "cni-bridge", "bridge": bridge,
        "isGateway": True, "isDefaultGateway": True, "ipMasq": False,
        "ipam": {"type": "cni-ipam", "ranges": [[{"subnet": "10.77.0.0/24"}]], "dataDir": "/var/lib/cni/networks"},
    }


def test_chroot_holds_no_python(chroot):
    outside_bundle = [p for p in chroot.rglob("*") if p.is_file() and BIN.lstrip("/") not in str(p)]
    names = sorted(p.name for p in outside_bundle)
    assert not any("python" in n for n in names), names
    assert all(".so" in n for n in names), names     # C libraries only
    assert os.path.samefile(chroot / "opt/cni/bin/cni-bridge-python", chroot / "opt/cni/bin/cni-ipam")


def test_front_end_is_static(bundle):
    """The front end links nothing, so it starts in a millisecond or two on any node."""
    out = subprocess.run(["ldd", str(bundle / "cni-bridge")], capture_output=True, text=True)
    assert "not a dynamic executable" in out.stdout + out.stderr


def test_version_from_every_executable(chroot, make_netns):
    host = make_netns("bh")
    for exe in ("cni-bridge", "cni-bridge-python", "cni-ipam"):
        proc = run_in_chroot(chroot, host, [f"{BIN}/{exe}"], {"CNI_COMMAND": "VERSION"}, '{"cniVersion": "1.0.0"}')
        assert proc.returncode == 0, proc.stderr
        answer = json.loads(proc.stdout)
        assert answer["cniVersion"] == "1.0.0" and "1.1.0" in answer["supportedVersions"]


def test_bridge_add_and_del_against_a_real_netns(chroot, make_netns):
    host, pod = make_netns("bh"), make_netns("bp")
    conf = json.dumps(bridge_conf(unique("bb")))
    add = run_in_chroot(chroot, host, [f"{BIN}/cni-bridge"], cni_env("ADD", "ctr1", pod.name), conf)
    assert add.returncode == 0, add.stdout + add.stderr
    result = json.loads(add.stdout)
    address = result["ips"][0]["address"]
    assert address.startswith("10.77.0.")
    assert address.split("/")[0] in pod.exec("ip", "-4", "addr", "show", "dev", "eth0").stdout
    assert "default via 10.77.0.1" in pod.exec("ip", "route").stdout
    ping = pod.exec("busybox", "ping", "-c", "1", "-W", "2", "10.77.0.1", check=False)
    assert ping.returncode == 0, ping.stdout + ping.stderr
    reservations = chroot / "var/lib/cni/networks/bundled"
    assert (reservations / address.split("/")[0]).exists()

    delete = run_in_chroot(chroot, host, [f"{BIN}/cni-bridge"], cni_env("DEL", "ctr1", pod.name), conf)
    assert delete.returncode == 0, delete.stdout + delete.stderr
    assert "eth0" not in pod.links()
    assert [link for link in host.links() if link.startswith("veth")] == []
    assert not (reservations / address.split("/")[0]).exists()


def test_cni_ipam_add_and_del(chroot, make_netns):
    host = make_netns("bh")
    conf = json.dumps({"cniVersion": "1.0.0", "name": "bundled-ipam", "type": "cni-bridge",
                       "ipam": {"type": "cni-ipam", "ranges": [[{"subnet": "10.78.0.0/24"}]],
                                "dataDir": "/var/lib/cni/networks"}})
    add = run_in_chroot(chroot, host, [f"{BIN}/cni-ipam"], cni_env("ADD", "ctr2", "none"), conf)
    assert add.returncode == 0, add.stdout + add.stderr
    assert json.loads(add.stdout)["ips"][0]["address"] == "10.78.0.2/24"
    delete = run_in_chroot(chroot, host, [f"{BIN}/cni-ipam"], cni_env("DEL", "ctr2", "none"), conf)
    assert delete.returncode == 0, delete.stdout + delete.stderr
    assert not (chroot / "var/lib/cni/networks/bundled-ipam/10.78.0.2").exists()


def test_daemon_fast_path_from_the_bundle(chroot, make_netns, tmp_path):
    """`cni-bridge daemon` from the bundle serves the bundled plugin's ADD and DEL."""
    host, pod = make_netns("bh"), make_netns("bp")
    sock = "/run/cni-bridge/bundle-test.sock"
    log = tmp_path / "daemon.log"
    argv = [f"{BIN}/cni-bridge", "daemon", "--socket", sock, "--workers", "1", "--log-level", "DEBUG"]
    with open(log, "w") as err:
        daemon = subprocess.Popen(chroot_argv(chroot, host, argv), stdout=subprocess.DEVNULL, stderr=err,
                                  env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
    try:
        deadline = time.monotonic() + 30
        while not (chroot / sock.lstrip("/")).exists():
            assert daemon.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        conf = json.dumps({**bridge_conf(unique("bd")), "daemonSocket": sock})
        for verb in ("ADD", "DEL"):
            res = run_in_chroot(chroot, host, [f"{BIN}/cni-bridge"], cni_env(verb, "ctrd", pod.name), conf)
            assert res.returncode == 0, res.stdout + res.stderr
            deadline = time.monotonic() + 10
            while f"{verb} cid=ctrd" not in log.read_text():
                assert time.monotonic() < deadline, f"the daemon did not serve {verb}:\n{log.read_text()}"
                time.sleep(0.1)
        assert "eth0" not in pod.links()
    finally:
        daemon.terminate()
        try:
            daemon.wait(timeout=20)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()


def test_agent_subcommand_has_the_kubernetes_client(chroot, make_netns):
    host = make_netns("bh")
    proc = run_in_chroot(chroot, host, [f"{BIN}/cni-bridge", "agent", "--node", "n1",
                                        "--cluster-cidr", "10.244.0.0/16", "--kubeconfig", "/nonexistent"], {})
    assert proc.returncode == 1
    assert "cannot load Kubernetes credentials" in proc.stderr, proc.stderr   # the client imported fine
    assert "Traceback" not in proc.stderr


def test_install_cni_swaps_versions_without_breaking_the_plugins(bundle, tmp_path):
    """conf/image/install-cni.sh (the DaemonSet's init container) into a scratch CNI bin dir."""
    dest = tmp_path / "opt-cni-bin"
    script = REPO / "conf" / "image" / "install-cni.sh"

    def install(src: Path) -> None:
        proc = subprocess.run(["sh", str(script)], env={"PATH": os.environ["PATH"], "SRC": str(src),
                                                        "CNI_BIN_DIR": str(dest)},
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        answer = subprocess.run([str(dest / "cni-ipam")], env={"CNI_COMMAND": "VERSION"},
                                capture_output=True, text=True, timeout=30)
        assert answer.returncode == 0 and "supportedVersions" in answer.stdout, answer.stderr

    install(bundle)
    install(bundle)                                     # again: same version, nothing moves
    first = os.readlink(dest / LIBDIR)
    assert os.path.samefile(dest / "cni-bridge-python", dest / "cni-ipam")
    for n in (2, 3):                                    # two upgrades: the previous version stays
        newer = tmp_path / f"src{n}"
        subprocess.run(["cp", "-a", str(bundle), str(newer)], check=True)
        (newer / ".bundle-hash").write_text(f"{n}" * 64 + "\n")
        install(newer)
    assert os.readlink(dest / LIBDIR) == f"{LIBDIR}-{'3' * 12}"
    kept = sorted(p.name for p in dest.iterdir() if p.name.startswith(f"{LIBDIR}-"))
    assert kept == [f"{LIBDIR}-{'2' * 12}", f"{LIBDIR}-{'3' * 12}"] and first not in kept
    assert sorted(p.name for p in dest.iterdir() if not p.name.startswith(f"{LIBDIR}-")) == \
        sorted(["cni-bridge", "cni-bridge-python", LIBDIR, "cni-ipam"])
