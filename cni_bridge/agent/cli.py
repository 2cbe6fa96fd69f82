"""`cni-bridge agent`: argument parsing and the two modes' top level.

Errors the user can act on print one line and exit 1, never a traceback.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Optional, Sequence

from .desired import CONFLIST_NAME, AgentOptions
from .overlay import BACKENDS, OverlayOptions, VxlanOptions
from .topology import AgentError, parse_cidrs, parse_topology
from .vtep import VTEP_MAC_ANNOTATION

log = logging.getLogger("cni_bridge.agent")

DESCRIPTION = f"""\
Node agent for cni-bridge. For its own node it writes CONF_DIR/{CONFLIST_NAME}
(cni-bridge + cni-ipam over the node's podCIDR, then portmap); for every other
node it keeps a route to its podCIDR: <podCIDR> via <InternalIP> when the node
shares this node's subnet, through the VXLAN device when it does not (--backend);
it masquerades pod traffic that leaves the cluster CIDR (never pod-to-pod).

Kubernetes mode (default) watches Node objects. Topology mode reads a JSON file:
  {{"clusterCIDR": "10.244.0.0/16",
   "nodes": [{{"name": "n1", "internalIP": "172.18.0.2", "podCIDR": "10.244.1.0/24"}}, ...]}}
VXLAN needs each node's VTEP MAC: derived from its IPv4 internalIP in topology mode (a node
may give "vtepMAC"); in Kubernetes mode each agent publishes its own as the Node annotation
{VTEP_MAC_ANNOTATION}.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cni-bridge agent", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--node", required=True, help="this node's name (Kubernetes: spec.nodeName)")
    parser.add_argument("--conf-dir", default="/etc/cni/net.d", help="where the conflist goes (%(default)s)")
    mode = parser.add_argument_group("topology mode")
    mode.add_argument("--topology", metavar="FILE", help="read the cluster from this JSON file instead of Kubernetes")
    mode.add_argument("--once", action="store_true", help="one pass, then exit (status 1 if anything failed)")
    kube = parser.add_argument_group("Kubernetes mode")
    kube.add_argument("--cluster-cidr", help="the cluster's pod CIDR(s), comma-separated (kind: podSubnet)")
    kube.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster service account, then ~/.kube/config)")
    parser.add_argument("--resync", type=float, default=60.0, metavar="SECONDS",
                        help="re-list and re-apply this often (%(default)s)")
    overlay = parser.add_argument_group("reaching other nodes' pods")
    overlay.add_argument("--backend", choices=BACKENDS, default="auto",
                         help="auto: a direct route to nodes in this node's subnet, VXLAN to the others; "
                              "routes / vxlan: that one for every node (%(default)s)")
    defaults = VxlanOptions()
    overlay.add_argument("--vxlan-name", default=defaults.name, help="VXLAN device (%(default)s)")
    overlay.add_argument("--vxlan-vni", type=int, default=defaults.vni, help="VXLAN network identifier (%(default)s)")
    overlay.add_argument("--vxlan-port", type=int, default=defaults.port,
                         help="VXLAN UDP port (%(default)s: the Linux default, as flannel; IANA's is 4789)")
    conf = parser.add_argument_group("written conflist")
    conf.add_argument("--network-name", default=AgentOptions.network_name)
    conf.add_argument("--bridge", default=AgentOptions.bridge)
    conf.add_argument("--cni-version", default=AgentOptions.cni_version)
    conf.add_argument("--ipam-data-dir", default=AgentOptions.ipam_data_dir)
    conf.add_argument("--mtu", type=int, help="pod MTU (default: the kernel's, or the underlay's minus 50 "
                                                "when some node is reached by VXLAN)")
    conf.add_argument("--daemon-socket", help="socket of `cni-bridge daemon`, written as daemonSocket")
    conf.add_argument("--no-portmap", action="store_true", help="leave portmap out of the chain")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def options_from(args: argparse.Namespace) -> AgentOptions:
    return AgentOptions(
        network_name=args.network_name, bridge=args.bridge, cni_version=args.cni_version,
        ipam_data_dir=args.ipam_data_dir, mtu=args.mtu, daemon_socket=args.daemon_socket,
        portmap=not args.no_portmap,
    )


def overlay_from(args: argparse.Namespace) -> OverlayOptions:
    if not 1 <= args.vxlan_vni < 2 ** 24:
        raise AgentError(f"--vxlan-vni {args.vxlan_vni} is not a VXLAN network identifier (1..16777215)")
    if not 1 <= args.vxlan_port <= 65535:
        raise AgentError(f"--vxlan-port {args.vxlan_port} is not a UDP port")
    if not 1 <= len(args.vxlan_name) <= 15 or "/" in args.vxlan_name or args.vxlan_name.strip() != args.vxlan_name:
        raise AgentError(f"--vxlan-name {args.vxlan_name!r} is not an interface name (1-15 characters)")
    return OverlayOptions(args.backend, VxlanOptions(args.vxlan_name, args.vxlan_vni, args.vxlan_port))


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s cni-bridge agent: %(levelname)s %(message)s")
    try:
        if args.topology:
            return topology_mode(args)
        return kubernetes_mode(args, once=args.once)
    except AgentError as err:
        sys.stderr.write(f"cni-bridge agent: error: {err}\n")
        return 1
    except KeyboardInterrupt:
        return 0
    except Exception as exc:  # a bug: one line, the traceback only with --verbose
        if args.verbose:
            log.exception("internal error")
        sys.stderr.write(f"cni-bridge agent: internal error: {type(exc).__name__}: {exc}\n")
        return 1


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as exc:
        raise AgentError(f"cannot read topology file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise AgentError(f"topology file {path} is not UTF-8 text") from None


def topology_mode(args: argparse.Namespace) -> int:
    from .apply import apply, plan_node

    options = options_from(args)
    overlay = overlay_from(args)
    while True:
        try:
            topology = parse_topology(_read(args.topology), args.topology)
            state = plan_node(topology, args.node, options, overlay)
        except AgentError as err:
            if args.once:
                raise
            # Most likely a file caught mid-write (an editor, `cat > file`) or a bad edit: the
            # node keeps what the last good file gave it, and the next resync reads again.
            log.error("%s; changing nothing, reading it again in %gs", err, args.resync)
            time.sleep(args.resync)
            continue
        changes = apply(state, args.conf_dir)
        for error in changes.errors:
            log.error("%s", error)
        if args.once:
            print(f"{args.node}: {changes.summary()}")
            return 1 if changes.errors else 0
        if changes.any:
            log.info("%s", changes.summary())
        time.sleep(args.resync)


def kubernetes_mode(args: argparse.Namespace, once: bool = False) -> int:
    from . import kube

    if not args.cluster_cidr:
        raise AgentError("Kubernetes mode needs --cluster-cidr (kind: networking.podSubnet), "
                         "or use --topology FILE --once")
    cluster = parse_cidrs(args.cluster_cidr, "--cluster-cidr")
    api, watch_module = kube.load_client(args.kubeconfig)
    agent = kube.NodeAgent(args.node, cluster, options_from(args), args.conf_dir, overlay=overlay_from(args),
                           publish_fn=kube.publisher(api))
    if once:
        try:
            nodes = api.list_node(_request_timeout=30).items
        except Exception as exc:  # the API's answer, not a bug here: no "internal error", no headers
            raise AgentError(f"cannot list Nodes from the Kubernetes API: {kube.api_error(exc)}") from None
        agent.replace_all(nodes)
        changes = agent.sync()
        if changes is None:
            raise AgentError(f"node {args.node!r} is not ready for the agent (see the warning above)")
        print(f"{args.node}: {changes.summary()}")
        return 1 if changes.errors else 0
    log.info("watching Nodes as %s (cluster CIDR %s)", args.node, ", ".join(map(str, cluster)))
    kube.run(agent, api, watch_module, args.resync)
    return 0
