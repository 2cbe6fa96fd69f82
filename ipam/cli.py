"""`cni-ipam` for people: see, check and repair the reservations of a dataDir.

Runs when cni-ipam is started without CNI_COMMAND and with a command:

    cni-ipam list    [--data-dir DIR] [--network NAME] [--json]
    cni-ipam check   [--data-dir DIR] [--network NAME] [--json] [--netns-dir DIR] [--host-veths] [--masquerade]
    cni-ipam release --network NAME (--ip IP | --container-id CID [--ifname IF]) [--dry-run]
    cni-ipam gc      --network NAME (--keep CID[/IFNAME] ... [--force] | --all-dead) [--dry-run]

`list` and `check` only read (no lock, so they work on a read-only disk; every
file is replaced atomically, so each one read is whole). `release` and `gc`
take the same lock as the plugin. Exit status: 0 fine, 1 `check` found
something, 2 an error (bad arguments, nothing to release, I/O, lock timeout).
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Iterable, Optional, TextIO

from cni_bridge.protocol.errors import CNIError, Code

from .filestore import _TMP_PREFIX, FileStore, current_boot_id
from .store import Owner, Reservation

EXIT_OK, EXIT_FINDINGS, EXIT_ERROR = 0, 1, 2
# Same as ipam.config.DEFAULT_DATA_DIR; not imported from there to keep pydantic out of the CLI.
DEFAULT_DATA_DIR = "/var/lib/cni/networks"

CHECKS = """\
what each finding means:
  earlier-boot         reserved in an earlier boot (the boot ID recorded with the
                       reservation differs from this one), so its container cannot be
                       running. cni-ipam reclaims such addresses by itself when a range
                       runs out; `release` or `gc` frees them now.
  netns-gone           the network namespace recorded at ADD (CNI_NETNS) no longer
                       exists: the container went away and its DEL never came.
  no-netns             (only with --netns-dir) the reservation has no recorded netns
                       (written by host-local or an older cni-ipam) and DIR holds no
                       entry named after its container ID (the cnitool/`ip netns`
                       naming). Other runtimes name netns differently: verify first.
  no-host-veth         (only with --host-veths; run it in the host's network
                       namespace) the host-side veth cni-bridge names after this
                       container and ifname is missing. Meaningless for networks
                       attached by another main plugin, whose veth names are random.
  masq-leak            (only with --masquerade; run it in the host's network
                       namespace) cni-bridge masquerade rules of this network (an
                       iptables chain or an nftables set element, whichever backend
                       made them) belong to an attachment that holds no address
                       here; the network's GC, or the attachment's DEL, removes them.
  damaged              the reservation file cannot be parsed; the address stays
                       blocked until `release --ip` removes the file.
  not-indexed          the reservation is missing from the owner index (host-local's
                       files); the next cni-ipam call on this network indexes it, so
                       that its container's DEL frees it.
  orphan-owner-record  an owners/ entry names addresses its container no longer holds
                       (left by a plugin killed mid-DEL, or reclaimed after a reboot).
  temp-file            a temp file left by a writer killed mid-write; harmless, `gc`
                       removes it.
"""


# -- reading a dataDir -----------------------------------------------------------
@dataclass
class Entry:
    network: str
    reservation: Reservation
    path: str
    mtime: float

    def boot(self, boot_id: str) -> str:
        r = self.reservation
        if r.damaged:
            return "damaged"
        if not r.boot_id:
            return "unknown"
        return "current" if r.boot_id == boot_id else "earlier"

    def age(self, now: float) -> float:
        created = self.reservation.created or self.mtime
        return max(0.0, now - created)


@dataclass
class NetworkState:
    name: str
    store: FileStore
    entries: list[Entry] = field(default_factory=list)
    index: dict[Owner, list[str]] = field(default_factory=dict)
    temp_files: list[str] = field(default_factory=list)


def networks(data_dir: str, only: Optional[str]) -> list[str]:
    if only is not None:
        if not os.path.isdir(os.path.join(data_dir, only)):
            raise CNIError(Code.IO_FAILURE, f"no network {only!r} in {data_dir}")
        return [only]
    try:
        names = sorted(os.listdir(data_dir))
    except FileNotFoundError:
        raise CNIError(Code.IO_FAILURE, f"data directory {data_dir} does not exist",
                       "give the ipam dataDir with --data-dir") from None
    except OSError as exc:
        raise CNIError(Code.IO_FAILURE, f"cannot list {data_dir}: {exc.strerror}") from None
    return [n for n in names if os.path.isdir(os.path.join(data_dir, n))]


def read_network(data_dir: str, name: str) -> NetworkState:
    store = FileStore(data_dir, name)
    state = NetworkState(name, store)
    for reservation in store.reservations():
        path = os.path.join(store.dir, str(reservation.ip))
        try:
            mtime = os.stat(path).st_mtime
        except OSError:
            continue  # released while we looked
        state.entries.append(Entry(name, reservation, path, mtime))
    state.entries.sort(key=lambda e: (e.reservation.ip.version, e.reservation.ip))
    for owner in store.owners():
        state.index[owner] = [str(ip) for ip in store.owned_by(owner)]
    for directory in (store.dir, store.owners_dir):
        try:
            state.temp_files += [os.path.join(directory, n) for n in sorted(os.listdir(directory))
                                 if n.startswith(_TMP_PREFIX)]
        except OSError:
            pass
    return state


def read_all(data_dir: str, only: Optional[str]) -> list[NetworkState]:
    return [read_network(data_dir, name) for name in networks(data_dir, only)]


def format_age(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def table(rows: list[list[str]], out: TextIO) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        out.write("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() + "\n")


# -- list ---------------------------------------------------------------------------
def cmd_list(args: argparse.Namespace, out: TextIO) -> int:
    boot_id, now = current_boot_id(), time.time()
    entries = [e for state in read_all(args.data_dir, args.network) for e in state.entries]
    if args.json:
        json.dump([{
            "network": e.network, "ip": str(e.reservation.ip),
            "containerID": e.reservation.container_id, "ifname": e.reservation.ifname,
            "boot": e.boot(boot_id), "bootID": e.reservation.boot_id,
            "created": e.reservation.created or e.mtime, "ageSeconds": round(e.age(now), 1),
            "netns": e.reservation.netns, "damaged": e.reservation.damaged,
        } for e in entries], out, indent=2)
        out.write("\n")
        return EXIT_OK
    if not entries:
        out.write(f"no reservations in {args.data_dir}\n")
        return EXIT_OK
    rows = [["NETWORK", "IP", "CONTAINER", "IFNAME", "BOOT", "AGE"]]
    for e in entries:
        r = e.reservation
        rows.append([e.network, str(r.ip), r.container_id or "-", r.ifname or "-",
                     e.boot(boot_id), format_age(e.age(now))])
    table(rows, out)
    return EXIT_OK


# -- check --------------------------------------------------------------------------
@dataclass(frozen=True)
class Finding:
    network: str
    kind: str
    detail: str
    ip: str = ""
    container_id: str = ""
    ifname: str = ""

    def to_dict(self) -> dict:
        return {"network": self.network, "kind": self.kind, "ip": self.ip,
                "containerID": self.container_id, "ifname": self.ifname, "detail": self.detail}


def find_problems(state: NetworkState, boot_id: str, netns_dir: Optional[str],
                  host_veths: bool) -> list[Finding]:
    found: list[Finding] = []
    held: dict[Owner, set[str]] = {}
    veth_name = None
    if host_veths:
        from cni_bridge.plan import host_veth_name as veth_name
    for e in state.entries:
        r = e.reservation
        where = dict(network=state.name, ip=str(r.ip), container_id=r.container_id, ifname=r.ifname)
        if r.damaged:
            found.append(Finding(kind="damaged", detail=f"cannot parse {e.path}", **where))
            continue
        held.setdefault(r.owner, set()).add(str(r.ip))
        if e.boot(boot_id) == "earlier":
            # Says it all: no netns or veth of an earlier boot can exist.
            found.append(Finding(kind="earlier-boot", detail=f"reserved in boot {r.boot_id}", **where))
        elif r.netns and not os.path.exists(r.netns):
            found.append(Finding(kind="netns-gone", detail=f"{r.netns} does not exist", **where))
        elif not r.netns and netns_dir and not os.path.exists(os.path.join(netns_dir, r.container_id)):
            found.append(Finding(kind="no-netns", detail=f"no {os.path.join(netns_dir, r.container_id)}",
                                 **where))
        if veth_name is not None and e.boot(boot_id) != "earlier":
            name = veth_name(r.container_id, r.ifname)
            if not os.path.exists(os.path.join("/sys/class/net", name)):
                found.append(Finding(kind="no-host-veth", detail=f"host veth {name} is missing", **where))
        if str(r.ip) not in state.index.get(r.owner, []):
            found.append(Finding(kind="not-indexed",
                                 detail="not in the owner index yet: the next cni-ipam call indexes it",
                                 **where))
    for owner, ips in sorted(state.index.items()):
        stale = [ip for ip in ips if ip not in held.get(owner, set())]
        if stale:
            found.append(Finding(state.name, "orphan-owner-record",
                                 f"owners/{owner[0]}:{owner[1]} lists {', '.join(stale)}, not reserved by it",
                                 container_id=owner[0], ifname=owner[1]))
    for path in state.temp_files:
        found.append(Finding(state.name, "temp-file", f"{path} left by a killed writer"))
    return found


def masquerade_leaks(state: NetworkState) -> list[Finding]:
    """Masquerade rules of the network, in either backend, whose attachment holds no address."""
    from cni_bridge import masq   # only with --masquerade: it brings the bridge's config models
    from cni_bridge.plan import masq_chain_name

    live = {masq_chain_name(state.name, e.reservation.container_id, e.reservation.ifname)
            for e in state.entries if not e.reservation.damaged}
    found = []
    for backend, module in sorted(masq.BACKENDS.items()):
        if not module.available():
            continue
        for key in sorted(module.attachments(state.name) - live):
            found.append(Finding(state.name, "masq-leak",
                                 f"{backend} masquerade rules {key} belong to no reservation of this network"))
    return found


def cmd_check(args: argparse.Namespace, out: TextIO) -> int:
    boot_id = current_boot_id()
    findings = [f for state in read_all(args.data_dir, args.network)
                for f in find_problems(state, boot_id, args.netns_dir, args.host_veths)
                + (masquerade_leaks(state) if args.masquerade else [])]
    if args.json:
        json.dump([f.to_dict() for f in findings], out, indent=2)
        out.write("\n")
    elif not findings:
        out.write("no suspected leaks\n")
    else:
        rows = [["NETWORK", "KIND", "IP", "CONTAINER", "IFNAME", "DETAIL"]]
        rows += [[f.network, f.kind, f.ip or "-", f.container_id or "-", f.ifname or "-", f.detail]
                 for f in findings]
        table(rows, out)
    return EXIT_FINDINGS if findings else EXIT_OK


# -- release and gc ---------------------------------------------------------------------
def _store(args: argparse.Namespace) -> FileStore:
    networks(args.data_dir, args.network)  # the network must exist
    return FileStore(args.data_dir, args.network, args.lock_timeout, index_unindexed=not args.dry_run)


def _drop(store: FileStore, reservation: Reservation, dry_run: bool, out: TextIO, verb: str) -> None:
    r = reservation
    who = "damaged record" if r.damaged else f"container {r.container_id} ifname {r.ifname}"
    out.write(f"{'would ' + verb if dry_run else verb + 'd'} {r.ip} ({who})\n")
    if not dry_run:
        store.delete(r.ip)


def cmd_release(args: argparse.Namespace, out: TextIO) -> int:
    store = _store(args)
    with store.locked():
        if args.ip is not None:
            reservation = store.get(args.ip)
            if reservation is None:
                raise CNIError(Code.UNKNOWN_CONTAINER, f"{args.ip} is not reserved in network {args.network}")
            _drop(store, reservation, args.dry_run, out, "release")
            if not reservation.damaged and not args.dry_run:
                owned = store.owned_by(reservation.owner)
                store.set_owned(reservation.owner, [ip for ip in owned if ip != args.ip])
            return EXIT_OK
        mine = [r for r in store.reservations() if not r.damaged and r.container_id == args.container_id
                and args.ifname in (None, r.ifname)]
        owners = {r.owner for r in mine} | {o for o in store.owners() if o[0] == args.container_id
                                             and args.ifname in (None, o[1])}
        if not owners:
            what = f"container {args.container_id}" + (f" ifname {args.ifname}" if args.ifname else "")
            raise CNIError(Code.UNKNOWN_CONTAINER, f"nothing is reserved for {what} in network {args.network}")
        for reservation in mine:
            _drop(store, reservation, args.dry_run, out, "release")
        if not args.dry_run:
            for owner in owners:
                store.set_owned(owner, [])
    return EXIT_OK


def parse_keep(items: Iterable[str]) -> tuple[set[Owner], set[str]]:
    """`CID/IFNAME` keeps one attachment; a bare `CID` keeps all of that container's."""
    pairs: set[Owner] = set()
    whole: set[str] = set()
    for item in items:
        cid, sep, ifname = item.partition("/")
        if not cid or (sep and not ifname):
            raise CNIError(Code.INVALID_CONFIG, f"--keep {item!r} is not CID or CID/IFNAME")
        if sep:
            pairs.add((cid, ifname))
        else:
            whole.add(cid)
    return pairs, whole


def _unmatched_keeps(items: list[str], owners: set[Owner]) -> list[str]:
    """The --keep items that name no attachment in `owners` (in the order given)."""
    cids = {cid for cid, _ in owners}
    unmatched = []
    for item in items:
        cid, sep, ifname = item.partition("/")
        # CID/IFNAME also matches an older host-local's record, which names no ifname
        found = ((cid, ifname) in owners or (cid, "") in owners) if sep else cid in cids
        if not found and item not in unmatched:
            unmatched.append(item)
    return unmatched


def cmd_gc(args: argparse.Namespace, out: TextIO) -> int:
    if not args.keep and not args.all_dead:
        raise CNIError(Code.INVALID_CONFIG, "refusing to free every reservation: no --keep given",
                       "list every live attachment with --keep CID/IFNAME, or pass --all-dead "
                       "if no container on this network is running")
    pairs, whole = parse_keep(args.keep)
    paired = {cid for cid, _ in pairs}

    def live(owner: Owner) -> bool:
        # an older host-local's record names no ifname: any kept attachment of its container keeps it
        return owner in pairs or owner[0] in whole or (not owner[1] and owner[0] in paired)

    store = _store(args)
    with store.locked():
        reservations = list(store.reservations())
        unmatched = _unmatched_keeps(args.keep, {r.owner for r in reservations if not r.damaged}
                                     | set(store.owners()))
        if unmatched and not args.force:
            # A mistyped ID keeps nothing, so its container would lose its addresses.
            raise CNIError(Code.INVALID_CONFIG,
                           f"--keep {', '.join(unmatched)}: no reservation in network {args.network}",
                           "check the IDs with `cni-ipam list`; pass --force to free the rest anyway")
        if unmatched:
            out.write(f"--keep {', '.join(unmatched)} matched nothing (--force)\n")
        freed = damaged = 0
        for reservation in reservations:
            if reservation.damaged:
                damaged += 1
            elif not live(reservation.owner):
                _drop(store, reservation, args.dry_run, out, "free")
                freed += 1
        if not args.dry_run:
            for owner in store.owners():
                if not live(owner):
                    store.set_owned(owner, [])
            store.sweep_temp_files()
    out.write(f"{'would free' if args.dry_run else 'freed'} {freed} reservation(s) in network {args.network}\n")
    if damaged:
        out.write(f"left {damaged} damaged record(s) alone: see `cni-ipam check`, remove with `release --ip`\n")
    return EXIT_OK


# -- argument parsing ---------------------------------------------------------------------
def _ip(text: str):
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an IP address") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cni-ipam",
        description="See, check and repair the address reservations cni-ipam keeps in its dataDir. "
                    "(Run by a CNI runtime, with CNI_COMMAND set, cni-ipam is the IPAM plugin instead.)",
        epilog="exit status: 0 fine, 1 check found suspected leaks, 2 error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(p: argparse.ArgumentParser, network_required: bool) -> None:
        p.add_argument("--data-dir", default=DEFAULT_DATA_DIR,
                       help=f"the ipam dataDir (default {DEFAULT_DATA_DIR})")
        p.add_argument("--network", required=network_required,
                       help="the network name (the config's `name`)" + ("" if network_required else "; default all"))

    p = sub.add_parser("list", help="show reservations",
                       description="Show every reservation: network, IP, container ID, ifname, boot "
                                   "(current, earlier = made before the last reboot, unknown = host-local "
                                   "file, damaged) and age. Reads only; takes no lock.")
    common(p, False)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=cmd_list)

    p = sub.add_parser("check", help="report suspected leaks",
                       description="Report reservations that look leaked and store debris. Reads only; "
                                   "changes nothing. Exit status 1 when anything is found.",
                       epilog=CHECKS, formatter_class=argparse.RawDescriptionHelpFormatter)
    common(p, False)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--netns-dir", default=None, metavar="DIR",
                   help="for reservations with no recorded netns, expect DIR/<containerID> "
                        "(e.g. /var/run/netns with cnitool); off by default")
    p.add_argument("--masquerade", action="store_true",
                   help="also report masquerade rules (iptables or nftables) whose attachment holds no "
                        "address (run it in the host's network namespace)")
    p.add_argument("--host-veths", action="store_true",
                   help="flag reservations whose cni-bridge host veth is missing (cni-bridge networks only)")
    p.set_defaults(run=cmd_check)

    lock_help = "seconds to wait for the store lock (default 10)"
    p = sub.add_parser("release", help="free one reservation",
                       description="Free the reservation of one IP, or every reservation of one container "
                                   "(optionally one ifname). Use it for a container that is gone; releasing a "
                                   "live container's address lets it be handed out twice.")
    common(p, True)
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--ip", type=_ip, help="the reserved address")
    who.add_argument("--container-id", help="the container ID the reservation belongs to")
    p.add_argument("--ifname", help="with --container-id: only this interface")
    p.add_argument("--dry-run", action="store_true", help="say what would be freed, change nothing")
    p.add_argument("--lock-timeout", type=float, default=10.0, help=lock_help)
    p.set_defaults(run=cmd_release)

    p = sub.add_parser("gc", help="free every reservation not in a list of live containers",
                       description="Free every reservation of NETWORK whose container is not listed with "
                                   "--keep. The list must be complete: an attachment left out loses its "
                                   "address. With no --keep it refuses, unless --all-dead says that no "
                                   "container of this network runs, and a --keep that matches no reservation "
                                   "(a typo) is an error unless --force is given. Damaged records are left "
                                   "for `release`. "
                                   "Also removes temp files left by killed writers.")
    common(p, True)
    p.add_argument("--keep", action="append", default=[], metavar="CID[/IFNAME]",
                   help="a live attachment (repeat for each); a bare CID keeps all its interfaces")
    p.add_argument("--all-dead", action="store_true", help="no container on this network is alive: free all")
    p.add_argument("--force", action="store_true",
                   help="go ahead even when a --keep matches no reservation (by default that is an "
                        "error: a mistyped ID would free the addresses of the container it meant)")
    p.add_argument("--dry-run", action="store_true", help="say what would be freed, change nothing")
    p.add_argument("--lock-timeout", type=float, default=10.0, help=lock_help)
    p.set_defaults(run=cmd_gc)
    return parser


def main(argv: list[str], stdout: TextIO, stderr: TextIO) -> int:
    # The store logs a warning per damaged file; here `check` and `list` report them instead.
    store_log = logging.getLogger("ipam")
    level = store_log.level
    store_log.setLevel(logging.ERROR)
    try:
        return _main(argv, stdout, stderr)
    finally:
        store_log.setLevel(level)


def _main(argv: list[str], stdout: TextIO, stderr: TextIO) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse printed help (0) or a usage error (2)
        return int(exc.code or 0)
    if getattr(args, "ifname", None) and not getattr(args, "container_id", None):
        stderr.write("cni-ipam: error: --ifname needs --container-id\n")
        return EXIT_ERROR
    try:
        return args.run(args, stdout)
    except CNIError as err:
        stderr.write(f"cni-ipam: error: {err}\n")
    except OSError as exc:
        stderr.write(f"cni-ipam: error: {exc}\n")
    except Exception as exc:  # a bug still ends with a message, not a traceback
        stderr.write(f"cni-ipam: internal error: {type(exc).__name__}: {exc}\n")
    return EXIT_ERROR
