"""Kubernetes mode: watch Node objects and keep this node in step with them.

List, apply, then watch from the list's resourceVersion; every change to a
node's podCIDRs or InternalIPs re-applies, and every `resync` seconds the
agent lists again and re-applies anyway (that also repairs masquerade rules
or routes someone removed). The official `kubernetes` client is imported
only here, and only in this mode.
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Callable, Iterable, Optional

from .apply import Changes, apply, read_underlay
from .desired import AgentOptions, desired_state
from .overlay import OverlayOptions, Underlay
from .topology import AgentError, IPNetwork, Node, Topology, check_topology, node_from_kubernetes
from .vtep import VTEP_MAC_ANNOTATION

log = logging.getLogger("cni_bridge.agent")


class NodeAgent:
    """The state machine of Kubernetes mode, free of the client so tests can feed it objects."""

    def __init__(self, node_name: str, cluster_cidrs: tuple[IPNetwork, ...], options: AgentOptions,
                 conf_dir: str, apply_fn: Callable[..., Changes] = apply,
                 overlay: OverlayOptions = OverlayOptions(),
                 underlay_fn: Callable[[Topology, str], Optional[Underlay]] = read_underlay,
                 publish_fn: Optional[Callable[[str, str], None]] = None) -> None:
        self.node_name = node_name
        self.cluster_cidrs = cluster_cidrs
        self.options = options
        self.conf_dir = conf_dir
        self.apply_fn = apply_fn
        self.overlay = overlay
        self.underlay_fn = underlay_fn
        # (node name, VTEP MAC): puts the MAC on the own Node so peers can reach this node by VXLAN.
        self.publish_fn = publish_fn
        self.nodes: dict[str, Node] = {}
        self._reported: set[str] = set()

    def replace_all(self, objects: Iterable[Any]) -> None:
        nodes = {}
        for obj in objects:
            node = self._convert(obj)
            if node is not None:
                nodes[node.name] = node
        self.nodes = nodes

    def handle_event(self, kind: str, obj: Any) -> bool:
        """Apply one watch event to the cache; True when it changed what the agent acts on."""
        node = self._convert(obj)
        if node is None:
            return False
        if kind == "DELETED":
            return self.nodes.pop(node.name, None) is not None
        if self.nodes.get(node.name) == node:
            return False  # a heartbeat or a label change: nothing the agent uses
        self.nodes[node.name] = node
        return True

    def sync(self) -> Optional[Changes]:
        """Converge the node; None while it cannot (own node unknown or without a podCIDR)."""
        own = self.nodes.get(self.node_name)
        if own is None:
            self._once(f"node {self.node_name!r} is not among the cluster's nodes; waiting")
            return None
        if not own.pod_cidrs:
            self._once(f"node {self.node_name!r} has no spec.podCIDR yet; waiting "
                       "(is the controller-manager run with --allocate-node-cidrs?)")
            return None
        topology = Topology(self.cluster_cidrs, tuple(sorted(self.nodes.values(), key=lambda n: n.name)))
        for problem in check_topology(topology):
            self._once(problem)
        underlay = self.underlay_fn(topology, self.node_name) if self.overlay.backend != "routes" else None
        state = desired_state(topology, self.node_name, self.options, self.overlay, underlay)
        changes = self.apply_fn(state, self.conf_dir)
        if changes.any:
            log.info("%s", changes.summary())
        for error in changes.errors:
            log.warning("%s", error)
        if state.vxlan is not None and own.vtep_mac != state.vxlan.mac and self.publish_fn is not None:
            try:
                self.publish_fn(self.node_name, state.vxlan.mac)
                log.info("published VTEP MAC %s as annotation %s", state.vxlan.mac, VTEP_MAC_ANNOTATION)
            except Exception as exc:   # the next sync tries again; peers keep what they had
                log.warning("cannot annotate node %s with its VTEP MAC: %s", self.node_name, api_error(exc))
        return changes

    def _convert(self, obj: Any) -> Optional[Node]:
        node, warnings = node_from_kubernetes(obj)
        for warning in warnings:
            self._once(warning)
        return node

    def _once(self, message: str) -> None:
        if message not in self._reported:
            self._reported.add(message)
            log.warning("%s", message)


def load_client(kubeconfig: Optional[str]) -> tuple[Any, Any]:
    """(CoreV1Api, watch module), with a clear error when the client or credentials are missing."""
    try:
        from kubernetes import client, config, watch
    except ImportError:
        raise AgentError("Kubernetes mode needs the official kubernetes Python client: "
                         "pip install 'cni-bridge[agent]' (or run with --topology FILE --once)") from None
    try:
        if kubeconfig:
            config.load_kube_config(config_file=kubeconfig)
        elif os.environ.get("KUBERNETES_SERVICE_HOST"):
            config.load_incluster_config()
        else:
            config.load_kube_config()
    except Exception as exc:
        raise AgentError(f"cannot load Kubernetes credentials ({type(exc).__name__}: {exc}); "
                         "pass --kubeconfig or run in a pod with a service account") from None
    return client.CoreV1Api(), watch


def publisher(api: Any) -> Callable[[str, str], None]:
    """Patch the annotation onto the agent's own Node through the status subresource
    (RBAC: `patch` on `nodes/status`, which cannot touch a node's spec), as flannel does."""
    def publish(node_name: str, mac: str) -> None:
        api.patch_node_status(node_name, {"metadata": {"annotations": {VTEP_MAC_ANNOTATION: mac}}},
                       _request_timeout=30)
    return publish


def api_error(exc: BaseException) -> str:
    """One line for a failed API call. The client's ApiException prints status, reason,
    every response header and the body over several lines; the Status body's message says it all."""
    status = getattr(exc, "status", None)
    if isinstance(status, int):
        text = " ".join(part for part in (f"HTTP {status}", getattr(exc, "reason", None) or "") if part)
        try:
            message = json.loads(getattr(exc, "body", None) or "").get("message")
        except (ValueError, TypeError, AttributeError):
            message = None
        return f"{text}: {message}" if message else text
    first = (str(exc).splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def run(agent: NodeAgent, api: Any, watch_module: Any, resync: float,
        should_stop: Callable[[], bool] = lambda: False) -> None:
    """List + apply + watch, forever (until should_stop); API failures back off and relist."""
    backoff = 1.0
    while not should_stop():
        try:
            listing = api.list_node(_request_timeout=30)
            agent.replace_all(listing.items)
            agent.sync()
            deadline = time.monotonic() + resync
            watcher = watch_module.Watch()
            # timeout_seconds ends the watch server-side; _request_timeout guards against a dead connection.
            for event in watcher.stream(api.list_node, resource_version=listing.metadata.resource_version,
                                        timeout_seconds=max(1, int(resync)), _request_timeout=resync + 30):
                if event.get("type") == "ERROR":   # e.g. 410 Gone: the resourceVersion is too old
                    break
                if agent.handle_event(event.get("type", ""), event.get("object")):
                    agent.sync()
                if should_stop() or time.monotonic() >= deadline:
                    watcher.stop()
                    break
            backoff = 1.0
        except AgentError:
            raise
        except Exception as exc:  # API server restarts, connection resets, auth hiccups
            log.warning("Kubernetes API: %s; retrying in %.0fs", api_error(exc), backoff)
            time.sleep(backoff)
            backoff = min(backoff * 2, 30.0)
