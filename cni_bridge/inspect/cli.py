"""`cni-bridge inspect [--json | --dot] [--conf-dir DIR] [--bin-dir DIR] ...`: entry point.

Exit status: 0 when no check failed, 1 when one did (with --strict, a
warning too), 2 when inspect itself could not run.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Optional, Sequence, TextIO

from . import checks, dot, gather, table
from .model import FAIL, WARN, NodeView

EXIT_OK, EXIT_FAILED, EXIT_ERROR = 0, 1, 2

DESCRIPTION = """\
Show this node's CNI state: the conflists of the conf dir, every cni-bridge network with its
bridge, pools and attachments (container, pod, IPs, netns, host veth, MAC, masquerade and the
backend holding it: iptables or nftables), the node agent's peers (direct routes, or VXLAN with
the device and each peer's FDB, neighbour and route entries), the node daemon, and checks with
a verdict each (forwarding, br_netfilter, tools, conflists validated as ADD does, plugins in the
bin dir, the leaks `cni-ipam check` finds plus veths and masquerade rules or nftables elements
no reservation explains, overlay peers missing an entry). Reads only; changes nothing.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cni-bridge inspect", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="exit status: 0 no check failed, 1 a check failed "
                                            "(--strict: or warned), 2 inspect could not run")
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print JSON (schemaVersion 1) for tools")
    output.add_argument("--dot", action="store_true", help="print a Graphviz graph of the node "
                                                           "(render: dot -Tsvg -o node.svg)")
    parser.add_argument("--conf-dir", default=gather.Options.conf_dir, help="conflists (%(default)s)")
    parser.add_argument("--bin-dir", default=gather.Options.bin_dir, help="CNI plugins (%(default)s)")
    parser.add_argument("--cache-dir", default=gather.Options.cache_dir,
                        help="libcni's cache, for pod names from CNI_ARGS (%(default)s)")
    parser.add_argument("--daemon-socket", help="the node daemon's socket (default: the conflists' "
                                                "daemonSocket, else /run/cni-bridge/daemon.sock)")
    parser.add_argument("--vxlan-name", default=gather.Options.vxlan_name,
                        help="the agent's VXLAN device, when no route uses it yet (%(default)s)")
    parser.add_argument("--strict", action="store_true", help="exit 1 on warnings too")
    return parser


def main(argv: Optional[Sequence[str]] = None, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    args = build_parser().parse_args(argv)
    options = gather.Options(conf_dir=args.conf_dir, bin_dir=args.bin_dir, cache_dir=args.cache_dir,
                             daemon_socket=args.daemon_socket, vxlan_name=args.vxlan_name)
    try:
        view = inspect_node(options)
    except Exception as exc:   # one line, never a traceback
        err.write(f"cni-bridge inspect: error: {type(exc).__name__}: {exc}\n")
        return EXIT_ERROR
    if args.json:
        json.dump(view.to_dict(), out, indent=2)
        out.write("\n")
    elif args.dot:
        dot.render(view, out)
    else:
        table.render(view, out)
    return exit_status(view, args.strict)


def inspect_node(options: gather.Options) -> NodeView:
    # Damaged reservation files are findings here; the store's warning per file would be noise.
    store_log = logging.getLogger("ipam")
    level = store_log.level
    store_log.setLevel(logging.ERROR)
    try:
        reading = gather.read_node(options)
    finally:
        store_log.setLevel(level)
    reading.view.checks = checks.evaluate(reading)
    return reading.view


def exit_status(view: NodeView, strict: bool) -> int:
    counts = view.verdicts()
    if counts[FAIL] or (strict and counts[WARN]):
        return EXIT_FAILED
    return EXIT_OK
