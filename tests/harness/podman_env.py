"""A private, throwaway podman (CNI backend) for integration tests.

``PodmanEnv`` runs the system podman 4.x with its CNI network backend, with
the CNI plugins taken from a directory we choose. Nothing system-wide is
changed: config, storage, locks, events, runc state and image blobs all live
under ``base_dir``, and podman is pointed at them through environment
variables (``CONTAINERS_CONF`` and ``CONTAINERS_STORAGE_CONF`` replace the
system files outright, so ``/etc/containers`` is never read for these keys).

Networking. Podman runs the CNI plugins in its *own* network namespace, so
the bridge, the host-side veths, the portmap iptables chains and
``ip_forward=1`` (set by ``isGateway``) land wherever podman runs. By default
(``isolate_netns=True``) every podman command is run through ``nsenter`` into
a scratch netns ``pmh-<hex>`` that acts as the "host": the machine's real
network stack is never touched, and ``cleanup()`` just deletes the netns.
Reach published ports from that "host" with ``host_run()``. With
``isolate_netns=False`` podman uses the real host netns; ``cleanup()`` then
undoes what the networks registered through ``add_network()`` left behind
(bridge, iptables chains, nft tables, forwarding sysctls). That mode assumes
nobody else uses CNI on this host at the same time.

Left outside ``base_dir`` (podman/libcni have no setting for these):
``/var/lib/cni/results`` (libcni result cache; entries go on CNI DEL) and
the container netns files in ``/run/netns`` (removed on teardown).
``cleanup()`` removes those directories if they were absent before and are
empty now.

Stdlib only.
"""

from __future__ import annotations

import io
import json
import os
import re
import resource
import secrets
import shlex
import shutil
import struct
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Sequence

__all__ = ["PodmanEnv", "PodmanError", "podman_unavailable_reason", "find_static_busybox"]

# Podman 4 turns a network name into a CNI config name; it must match this.
_NET_NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]*$")
# Directories that podman/libcni create outside our base_dir when missing.
_HOST_DIRS = ("/var/lib/cni/results", "/var/lib/cni")
_FORWARD_SYSCTLS = ("net/ipv4/ip_forward", "net/ipv6/conf/all/forwarding")
# Chains the portmap plugin shares between all attachments (nat table).
_PORTMAP_SHARED = ("CNI-HOSTPORT-DNAT", "CNI-HOSTPORT-SNAT", "CNI-HOSTPORT-MASQ",
                   "CNI-HOSTPORT-SETMARK")
_STD_PATH = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")


class PodmanError(subprocess.CalledProcessError):
    """A failed podman (or helper) command; str() includes its stderr/stdout."""

    def __str__(self) -> str:
        cmd = shlex.join(str(a) for a in self.cmd) if isinstance(self.cmd, (list, tuple)) else self.cmd
        parts = [f"command {cmd} exited {self.returncode}"]
        for label, text in (("stderr", self.stderr), ("stdout", self.output)):
            if text and text.strip():
                parts.append(f"{label}:\n{text.strip()[-4000:]}")
        return "\n".join(parts)


def _which(name: str) -> str | None:
    """shutil.which, also searching the sbin dirs a non-login PATH may lack."""
    return shutil.which(name) or shutil.which(name, path=os.pathsep.join(_STD_PATH))


def _is_static_elf(path: str) -> bool:
    """True if path is an ELF binary without a PT_INTERP (dynamic loader) header."""
    try:
        with open(path, "rb") as f:
            hdr = f.read(64)
            if hdr[:4] != b"\x7fELF":
                return False
            is64, end = hdr[4] == 2, "<" if hdr[5] == 1 else ">"
            if is64:
                phoff, = struct.unpack_from(end + "Q", hdr, 0x20)
                phentsize, phnum = struct.unpack_from(end + "HH", hdr, 0x36)
            else:
                phoff, = struct.unpack_from(end + "I", hdr, 0x1C)
                phentsize, phnum = struct.unpack_from(end + "HH", hdr, 0x2A)
            f.seek(phoff)
            table = f.read(phentsize * phnum)
        return all(struct.unpack_from(end + "I", table, i * phentsize)[0] != 3  # PT_INTERP
                   for i in range(phnum))
    except (OSError, struct.error):
        return False


def find_static_busybox() -> str | None:
    """Path of a statically linked busybox (Debian: busybox-static), or None.

    The image has no libc, so a dynamically linked busybox would fail inside
    the container with a confusing "no such file or directory".
    """
    for cand in (_which("busybox"), "/bin/busybox", "/usr/bin/busybox"):
        if cand and _is_static_elf(cand):
            return cand
    return None


def podman_unavailable_reason() -> str | None:
    """Why podman with the CNI backend cannot run here, or None if it can.

    Cheap checks only (binaries, uid, podman version); meant for pytest skips.
    """
    if os.geteuid() != 0:
        return ("podman CNI tests need root: CNI plugins create bridges, veths "
                "and iptables rules, and rootless podman does not run them directly")
    podman = _which("podman")
    if not podman:
        return "podman is not installed (apt-get install podman)"
    try:
        out = subprocess.run([podman, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"`podman --version` failed: {e}"
    m = re.search(r"(\d+)\.(\d+)", out.stdout)
    if out.returncode != 0 or not m:
        return f"`podman --version` failed (rc={out.returncode}): {out.stderr.strip()}"
    if int(m[1]) != 4:
        return (f"podman {m[0]} found; the harness needs podman 4.x "
                "(network_backend=cni was removed in 5.0, and 3.x lacks the setting)")
    if not _which("runc"):
        return "runc is not installed (apt-get install runc); crun 1.8 refuses this cgroup layout"
    if not (_which("conmon") or os.path.exists("/usr/libexec/podman/conmon")):
        return "conmon is not installed (apt-get install conmon)"
    for tool in ("nsenter", "unshare", "ip"):
        if not _which(tool):
            return f"`{tool}` is not installed (util-linux / iproute2)"
    return None


def _toml(value) -> str:
    """TOML literal for str/list[str]/int (JSON string escapes are valid TOML)."""
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(value)


def _default_ulimits() -> list[str]:
    """nofile/nproc no higher than our own hard limits.

    Without CAP_SYS_RESOURCE, runc cannot raise a hard rlimit; podman's root
    default (nofile=1048576) then fails with "error setting rlimit type 7:
    operation not permitted". Pin both to min(our hard limit, sane default).
    """
    out = []
    for name, res, default in (("nofile", resource.RLIMIT_NOFILE, 20000),
                               ("nproc", resource.RLIMIT_NPROC, 32768)):
        hard = resource.getrlimit(res)[1]
        n = default if hard == resource.RLIM_INFINITY else min(hard, default)
        out.append(f"{name}={n}:{n}")
    return out


class PodmanEnv:
    """Private podman configuration + storage under ``base_dir``.

    Layout of base_dir: containers.conf, storage.conf, registries.conf,
    reset.conf (for cleanup), bin/runc (wrapper), storage/{root,run},
    runc/ (runc state), tmp/ (podman tmp_dir, locks, events), images/.

    Use as a context manager or call ``cleanup()`` yourself. Containers must
    be removed (``cleanup()`` does it) before their conflist is deleted,
    otherwise podman cannot run CNI DEL for them.
    """

    def __init__(self, base_dir, plugin_dir, netconf_dir, *, isolate_netns: bool = True,
                 ulimits: Sequence[str] | None = None):
        self.base_dir = Path(base_dir).resolve()
        dirs = [plugin_dir] if isinstance(plugin_dir, (str, os.PathLike)) else list(plugin_dir)
        self.plugin_dirs = [str(Path(d).resolve()) for d in dirs]
        self.netconf_dir = Path(netconf_dir).resolve()
        self.isolate_netns = isolate_netns
        self.netns: str | None = None  # name under /run/netns when isolated
        self.containers_conf = self.base_dir / "containers.conf"
        self.storage_conf = self.base_dir / "storage.conf"
        self.registries_conf = self.base_dir / "registries.conf"
        self.graphroot = self.base_dir / "storage" / "root"
        self.runroot = self.base_dir / "storage" / "run"
        self.tmp_dir = self.base_dir / "tmp"
        self._podman = _which("podman") or "podman"
        self._networks: set[str] = set()
        self._bridges: set[str] = set()
        self._cleaned = False
        # What existed before us, so cleanup() removes only what we caused.
        self._host_dirs_before = {d: os.path.exists(d) for d in _HOST_DIRS}
        self._host_state = None if isolate_netns else self._host_net_state()

        for d in (self.base_dir, self.netconf_dir, self.graphroot, self.runroot, self.tmp_dir,
                  self.base_dir / "runc", self.base_dir / "bin", self.base_dir / "images",
                  self.base_dir / "reset-netconf"):
            d.mkdir(parents=True, exist_ok=True)
        self._write_configs(list(ulimits) if ulimits is not None else _default_ulimits())
        if isolate_netns:
            try:
                self._create_netns()
            except BaseException:
                self.cleanup()
                raise

    # ---------------------------------------------------------------- config
    def _containers_conf_text(self, ulimits: list[str], netconf_dir: Path) -> str:
        b = self.base_dir
        return "\n".join([
            "# Written by tests/harness/podman_env.py; used via CONTAINERS_CONF.",
            "[containers]",
            f"default_ulimits = {_toml(ulimits)}",
            "",
            "[network]",
            'network_backend = "cni"',
            f"cni_plugin_dirs = {_toml(self.plugin_dirs)}",
            f"network_config_dir = {_toml(str(netconf_dir))}",
            "",
            "[engine]",
            # No systemd on these machines: the systemd manager fails with
            # "systemd not running on this host, cannot use systemd cgroups manager".
            'cgroup_manager = "cgroupfs"',
            # journald is not available; keep events in our own file.
            'events_logger = "file"',
            f"events_logfile_path = {_toml(str(self.tmp_dir / 'events.log'))}",
            'runtime = "runc"',
            # No registry is reachable: never try to pull a missing image.
            'pull_policy = "never"',
            # Default /run/libpod; also holds the lock files (lock_type=file),
            # instead of the shared /dev/shm/libpod_lock segment.
            f"tmp_dir = {_toml(str(self.tmp_dir / 'libpod'))}",
            'lock_type = "file"',
            f"image_copy_tmp_dir = {_toml(str(self.tmp_dir))}",
            f"static_dir = {_toml(str(self.graphroot / 'libpod'))}",
            f"volume_path = {_toml(str(self.graphroot / 'volumes'))}",
            "",
            "[engine.runtimes]",
            # Wrapper adds `runc --root <base>/runc` so runc state is not in /run/runc.
            f"runc = {_toml([str(b / 'bin' / 'runc')])}",
            "",
        ])

    def _write_configs(self, ulimits: list[str]) -> None:
        runc = _which("runc") or "/usr/sbin/runc"
        wrapper = self.base_dir / "bin" / "runc"
        wrapper.write_text(f'#!/bin/sh\nexec {shlex.quote(runc)} --root '
                           f'{shlex.quote(str(self.base_dir / "runc"))} "$@"\n')
        wrapper.chmod(0o755)
        self.containers_conf.write_text(self._containers_conf_text(ulimits, self.netconf_dir))
        # Same config, but an empty network dir: `podman system reset` deletes
        # every conflist in network_config_dir (and their bridges), and those
        # belong to the caller.
        (self.base_dir / "reset.conf").write_text(
            self._containers_conf_text(ulimits, self.base_dir / "reset-netconf"))
        self.storage_conf.write_text("\n".join([
            "[storage]",
            'driver = "vfs"',  # no overlay/fuse mounts needed
            f"graphroot = {_toml(str(self.graphroot))}",
            f"runroot = {_toml(str(self.runroot))}",
            "",
        ]))
        # No search registries: an unknown short name fails at once instead of
        # trying docker.io (no registry is reachable here).
        self.registries_conf.write_text("unqualified-search-registries = []\n")

    # ------------------------------------------------------------- commands
    def env(self, conf: Path | None = None) -> dict[str, str]:
        """Environment for running podman against this private setup."""
        env = dict(os.environ)
        for k in ("CONTAINER_HOST", "CONTAINER_CONNECTION"):  # would make podman remote
            env.pop(k, None)
        env.update(
            CONTAINERS_CONF=str(conf or self.containers_conf),
            CONTAINERS_STORAGE_CONF=str(self.storage_conf),
            CONTAINERS_REGISTRIES_CONF=str(self.registries_conf),
            TMPDIR=str(self.tmp_dir),
        )
        # Plugins inherit podman's PATH; portmap/bridge need iptables from sbin.
        path = env.get("PATH", "").split(os.pathsep)
        env["PATH"] = os.pathsep.join([p for p in path if p] + [p for p in _STD_PATH if p not in path])
        return env

    def host_argv(self, *cmd) -> list[str]:
        """argv that runs cmd in the env's "host" netns (unchanged if not isolated)."""
        if self.netns:
            return [_which("nsenter") or "nsenter", f"--net=/run/netns/{self.netns}", *map(str, cmd)]
        return [str(c) for c in cmd]

    def argv(self, *args) -> list[str]:
        """Full argv for `podman ARGS` (run it with env=self.env())."""
        return self.host_argv(self._podman, *args)

    def run(self, *args, check: bool = True, timeout: float = 120, input: str | None = None,
            conf: Path | None = None) -> subprocess.CompletedProcess:
        """Run `podman ARGS`; text mode, output captured. Raises PodmanError if check."""
        return self._exec(self.argv(*args), check, timeout, input, self.env(conf))

    def host_run(self, *cmd, check: bool = True, timeout: float = 60,
                 input: str | None = None) -> subprocess.CompletedProcess:
        """Run a command in the "host" netns, e.g. host_run('busybox','nc','127.0.0.1','18080')."""
        return self._exec(self.host_argv(*cmd), check, timeout, input, self.env())

    @staticmethod
    def _exec(argv, check, timeout, input, env) -> subprocess.CompletedProcess:
        cp = subprocess.run(argv, env=env, text=True, capture_output=True, timeout=timeout,
                            input=input, stdin=None if input is not None else subprocess.DEVNULL)
        if check and cp.returncode != 0:
            raise PodmanError(cp.returncode, argv, cp.stdout, cp.stderr)
        return cp

    # ------------------------------------------------------------- networks
    def add_network(self, conflist: dict) -> Path:
        """Write conflist to netconf_dir/<name>.conflist and check podman accepts it.

        Podman silently skips a conflist that fails validation (it only logs
        "Error validating CNI config file ..."; e.g. a plugin missing from
        plugin_dir or an unsupported cniVersion), and `run --network NAME` then
        says the network does not exist; here that raises with the warning.
        Use cniVersion <= 1.0.0: podman 4.3's libcni passes a 1.1.0 config on
        but fails ADD with 'unsupported CNI result version "1.1.0"'.
        Also remembers bridge names for cleanup in non-isolated mode.
        """
        name = conflist.get("name", "")
        if not _NET_NAME_RE.match(name):
            raise ValueError(f"invalid CNI network name {name!r} (podman needs {_NET_NAME_RE.pattern})")
        path = self.netconf_dir / f"{name}.conflist"
        tmp = self.netconf_dir / f".{name}.tmp"  # not *.conflist, so never half-read
        tmp.write_text(json.dumps(conflist, indent=2))
        os.replace(tmp, path)
        self._networks.add(name)
        self._bridges.update(p["bridge"] for p in conflist.get("plugins", [])
                             if isinstance(p.get("bridge"), str))
        cp = self.run("network", "inspect", name, check=False)
        if cp.returncode != 0:
            path.unlink()  # else every later podman command repeats the warning
            self._networks.discard(name)
            raise PodmanError(cp.returncode, self.argv("network", "inspect", name), cp.stdout, cp.stderr)
        return path

    # ---------------------------------------------------------------- image
    def ensure_busybox_image(self, name: str = "localhost/cni-busybox") -> str:
        """Import a tiny busybox image once (cached by a marker); return its name.

        No registry is reachable, so the image is a tar of /bin/busybox plus
        one symlink per applet, imported with PATH=/bin.
        """
        marker = self.base_dir / "images" / (re.sub(r"[^A-Za-z0-9_.-]", "_", name) + ".id")
        if marker.exists() and self.run("image", "exists", name, check=False).returncode == 0:
            return name
        busybox = find_static_busybox()
        if not busybox:
            raise RuntimeError("no statically linked busybox found (apt-get install busybox-static)")
        applets = subprocess.run([busybox, "--list"], capture_output=True, text=True,
                                 check=True).stdout.split()
        tar_path = self.base_dir / "images" / "busybox-rootfs.tar"
        with tarfile.open(tar_path, "w") as tar:
            def add(tname, ttype, mode, data=b"", link=""):
                ti = tarfile.TarInfo(tname)
                ti.type, ti.mode, ti.linkname, ti.size = ttype, mode, link, len(data)
                tar.addfile(ti, io.BytesIO(data) if data else None)
            add("bin", tarfile.DIRTYPE, 0o755)
            add("tmp", tarfile.DIRTYPE, 0o1777)
            add("bin/busybox", tarfile.REGTYPE, 0o755, Path(busybox).read_bytes())
            for a in sorted(set(applets) - {"busybox"}):
                if "/" not in a:
                    add(f"bin/{a}", tarfile.SYMTYPE, 0o777, link="busybox")
        argv = [self._podman, "import", "--quiet", "--change", "ENV PATH=/bin", str(tar_path), name]
        image_id = self._exec(self._isolate_blob_cache(argv), True, 300, None, self.env()).stdout.strip()
        marker.write_text(image_id + "\n")
        return name

    def _isolate_blob_cache(self, argv: list[str]) -> list[str]:
        """Wrap an image-copying podman command so its blob-info cache is private.

        containers/image puts it in /var/lib/containers/cache for root and
        podman 4.3 has no setting for that; so run the command in a private
        mount namespace with a tmpfs over the deepest existing ancestor.
        """
        target = next((d for d in ("/var/lib/containers/cache", "/var/lib/containers", "/var/lib")
                       if os.path.isdir(d)), None)
        unshare = _which("unshare")
        if not target or not unshare or self.base_dir.is_relative_to(target):
            return argv  # cannot shadow it without hiding our own storage
        script = 'mount -t tmpfs -o size=64m,mode=0755 pmh-blobcache "$1" && shift && exec "$@"'
        return [unshare, "--mount", "--propagation", "private", "sh", "-c", script, "sh", target, *argv]

    # ------------------------------------------------------------- host net
    def _create_netns(self) -> None:
        name = f"pmh-{secrets.token_hex(4)}"
        ip = _which("ip") or "ip"
        self._exec([ip, "netns", "add", name], True, 30, None, None)
        self.netns = name
        self._exec([ip, "-n", name, "link", "set", "lo", "up"], True, 30, None, None)

    @staticmethod
    def _iptables_save(family: str, table: str) -> list[str]:
        tool = _which(f"{family}-save")
        if not tool:
            return []
        cp = subprocess.run([tool, "-t", table], capture_output=True, text=True)
        return cp.stdout.splitlines() if cp.returncode == 0 else []

    def _host_net_state(self) -> dict:
        chains = {}
        for fam in ("iptables", "ip6tables"):
            for table in ("nat", "filter"):
                chains[fam, table] = {ln[1:].split()[0] for ln in self._iptables_save(fam, table)
                                      if ln.startswith(":")}
        nft = _which("nft")
        tables = subprocess.run([nft, "list", "tables"], capture_output=True, text=True).stdout \
            if nft else ""
        sysctls = {}
        for s in _FORWARD_SYSCTLS:
            try:
                sysctls[s] = Path("/proc/sys", s).read_text().strip()
            except OSError:
                pass
        links = set(os.listdir("/sys/class/net"))
        return {"chains": chains, "nft_tables": set(tables.splitlines()), "sysctls": sysctls,
                "links": links}

    def _restore_host_net(self, problems: list[str]) -> None:
        """Undo what CNI did in the real host netns for our networks (best effort)."""
        before = self._host_state
        ip = _which("ip") or "ip"
        for br in sorted(self._bridges - before["links"]):
            if os.path.exists(f"/sys/class/net/{br}/bridge"):  # the bridge plugin never deletes it
                self._try([ip, "link", "del", br], problems)
        for fam in ("iptables", "ip6tables"):
            tool = _which(fam)
            if not tool:
                continue
            for table in ("nat", "filter"):
                self._remove_cni_rules(tool, fam, table, before["chains"][fam, table], problems)
            # iptables-nft leaves the (now empty) tables behind; drop those that
            # were not there before. (Legacy iptables tables cannot be removed.)
            nft = _which("nft")
            if not nft or "nf_tables" not in subprocess.run(
                    [tool, "-V"], capture_output=True, text=True).stdout:
                continue
            now = subprocess.run([nft, "list", "tables"], capture_output=True,
                                 text=True).stdout.splitlines()
            for table in ("nat", "filter"):
                nft_table = f"table {'ip' if fam == 'iptables' else 'ip6'} {table}"
                if nft_table in now and nft_table not in before["nft_tables"] and not any(
                        ln.startswith("-A ") for ln in self._iptables_save(fam, table)):
                    self._try([nft, "delete", *nft_table.split()], problems)
        for s, val in before["sysctls"].items():  # isGateway sets ip_forward=1
            try:
                if Path("/proc/sys", s).read_text().strip() != val:
                    Path("/proc/sys", s).write_text(val + "\n")
            except OSError as e:
                problems.append(f"restore {s}={val}: {e}")

    def _remove_cni_rules(self, tool, fam, table, chains_before, problems) -> None:
        """Drop rules commented with one of our network names (portmap's
        'dnat name: "NET" id: ...', bridge ipMasq's 'name: "NET" id: ...') and
        the per-attachment CNI-* chains they live in or jump to."""
        ours = [f'name: "{n}"' for n in self._networks]
        # Match on the unquoted args: iptables-save escapes the inner quotes.
        rules = [args for args in (shlex.split(ln) for ln in self._iptables_save(fam, table)
                                   if ln.startswith("-A "))
                 if any(o in a for a in args for o in ours)]
        doomed = set()
        for args in rules:
            target = args[args.index("-j") + 1] if "-j" in args else ""
            doomed |= {c for c in (args[1], target) if c.startswith("CNI-")
                       and c not in chains_before and c not in _PORTMAP_SHARED}
        for args in rules:  # references from chains that stay (built-in/shared)
            if args[1] not in doomed:
                self._try([tool, "-t", table, "-D", *args[1:]], problems)
        for op in ("-F", "-X"):
            for c in sorted(doomed):
                self._try([tool, "-t", table, op, c], problems)
        if table != "nat":
            return
        lines = self._iptables_save(fam, table)
        chains = {ln[1:].split()[0] for ln in lines if ln.startswith(":")}
        shared_new = [c for c in _PORTMAP_SHARED if c in chains and c not in chains_before]
        if not shared_new or any(c.startswith("CNI-DN-") for c in chains):
            return  # someone still has port mappings: keep the shared chains
        for ln in lines:  # jumps into the shared chains from built-in chains
            args = shlex.split(ln) if ln.startswith("-A ") else []
            if args and args[1] not in shared_new and "-j" in args \
                    and args[args.index("-j") + 1] in shared_new:
                self._try([tool, "-t", table, "-D", *args[1:]], problems)
        for c in shared_new:
            self._try([tool, "-t", table, "-F", c], problems)
        for c in shared_new:
            self._try([tool, "-t", table, "-X", c], problems)

    @staticmethod
    def _try(argv, problems: list[str], env=None) -> bool:
        try:
            cp = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)
        except (OSError, subprocess.TimeoutExpired) as e:
            problems.append(f"{shlex.join(map(str, argv))}: {e}")
            return False
        if cp.returncode != 0:
            problems.append(f"{shlex.join(map(str, argv))}: rc={cp.returncode} "
                            f"{(cp.stderr or cp.stdout).strip()[-500:]}")
            return False
        return True

    # -------------------------------------------------------------- cleanup
    def cleanup(self) -> list[str]:
        """Remove containers, private storage, the scratch netns and base_dir.

        Never raises; returns what could not be cleaned (empty list = clean).
        Safe to call twice and after partial failures.
        """
        problems: list[str] = []
        if self._cleaned:
            return problems
        if self.graphroot.exists() or self.runroot.exists():
            env = self.env()
            self._try(self.argv("pod", "rm", "-af", "-t", "0"), problems, env)
            self._try(self.argv("rm", "-af", "-t", "0"), problems, env)
            # reset.conf points network_config_dir at an empty dir, so the
            # caller's conflists (and bridges) survive the reset.
            self._try(self.argv("system", "reset", "-f"), problems,
                      self.env(self.base_dir / "reset.conf"))
        if self._host_state is not None:
            self._restore_host_net(problems)
        if self.netns:
            # Deleting the netns removes the bridge, veths, iptables rules and
            # sysctls it holds (once no process is left in it).
            if self._try([_which("ip") or "ip", "netns", "del", self.netns], problems):
                self.netns = None
        self._umount_under(self.base_dir, problems)
        if self.base_dir.exists():
            def rm_error(func, path, exc):
                problems.append(f"rm {path}: {exc if isinstance(exc, BaseException) else exc[1]}")
            kw = {"onexc": rm_error} if sys.version_info >= (3, 12) else {"onerror": rm_error}
            shutil.rmtree(self.base_dir, **kw)
        for d in _HOST_DIRS:  # deepest first; only if we caused them and they are empty
            if not self._host_dirs_before[d]:
                try:
                    os.rmdir(d)
                except OSError:
                    pass
        self._cleaned = not problems
        return problems

    @staticmethod
    def _umount_under(root: Path, problems: list[str]) -> None:
        """Lazily unmount anything left mounted below root (e.g. a container shm)."""
        try:
            with open("/proc/self/mountinfo") as f:
                points = [re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), ln.split()[4])
                          for ln in f]
        except OSError:
            return
        for mp in sorted({p for p in points if Path(p).is_relative_to(root)}, reverse=True):
            PodmanEnv._try(["umount", "-l", mp], problems)

    def __enter__(self) -> "PodmanEnv":
        return self

    def __exit__(self, *exc) -> None:
        self.cleanup()

    def __repr__(self) -> str:
        return f"PodmanEnv(base_dir={str(self.base_dir)!r}, netns={self.netns!r})"
