#!/usr/bin/env python3
"""`make demo`: pods as network namespaces on a bridge, through the real executables.

Everything runs inside a scratch "node" namespace, so the machine's own links,
routes and iptables rules are never touched; everything is removed at the end.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFLIST = REPO / "conf" / "10-cni-bridge.conflist"
VENV_BIN = Path(sys.executable).parent
REFERENCE = Path("/usr/lib/cni")
PODS = 3
TCP_PORT = 7000
HOST_PORT = 8080
# The node's uplink and a host beyond it (a scratch namespace): the outside world of the demo.
NODE_UPLINK, OUTSIDE_HOST = "10.99.9.1", "10.99.9.2"


def sh(*argv: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(argv, input=input, text=True, capture_output=True, check=check)


def in_ns(ns: str, *argv: str, **kw) -> subprocess.CompletedProcess:
    return sh("ip", "netns", "exec", ns, *argv, **kw)


class Node:
    """A scratch node namespace that runs the plugin chain like a runtime would."""

    def __init__(self, workdir: Path) -> None:
        tag = uuid.uuid4().hex[:6]
        self.ns = f"demo-node-{tag}"
        self.pods = [f"demo-pod{i}-{tag}" for i in range(PODS)]
        self.outside = f"demo-out-{tag}"
        self.port_mappings: dict[str, list[dict]] = {}   # what a runtime passes as capability args
        self.bin = workdir / "bin"
        self.bin.mkdir()
        for name in ("cni-bridge", "cni-ipam"):
            os.symlink(VENV_BIN / name, self.bin / name)
        if (REFERENCE / "portmap").exists():
            os.symlink(REFERENCE / "portmap", self.bin / "portmap")
        self.conflist = json.loads(CONFLIST.read_text())
        # A private store, so the demo never touches /var/lib/cni.
        self.conflist["plugins"][0]["ipam"]["dataDir"] = str(workdir / "ipam")
        if not (self.bin / "portmap").exists():
            self.conflist["plugins"] = self.conflist["plugins"][:1]

    def plugin_conf(self, plugin: dict, prev: dict | None, pod: str) -> str:
        conf = dict(plugin, name=self.conflist["name"], cniVersion=self.conflist["cniVersion"])
        if prev is not None:
            conf["prevResult"] = prev
        # Like libcni: runtimeConfig carries a capability's args only to plugins declaring it.
        if plugin.get("capabilities", {}).get("portMappings") and pod in self.port_mappings:
            conf["runtimeConfig"] = {"portMappings": self.port_mappings[pod]}
        return json.dumps(conf)

    def call(self, command: str, pod: str, plugin: dict, prev: dict | None) -> dict | None:
        env = {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "CNI_COMMAND": command, "CNI_CONTAINERID": pod, "CNI_NETNS": f"/var/run/netns/{pod}",
            "CNI_IFNAME": "eth0", "CNI_PATH": str(self.bin),
        }
        proc = subprocess.run(["ip", "netns", "exec", self.ns, str(self.bin / plugin["type"])],
                              input=self.plugin_conf(plugin, prev, pod), env=env, text=True, capture_output=True)
        if proc.returncode != 0:
            raise SystemExit(f"{plugin['type']} {command} failed for {pod}:\n{proc.stdout}{proc.stderr}")
        return json.loads(proc.stdout) if proc.stdout.strip() else None

    def add(self, pod: str) -> dict:
        result = None
        for plugin in self.conflist["plugins"]:
            result = self.call("ADD", pod, plugin, result)
        assert result is not None
        return result

    def delete(self, pod: str, result: dict | None) -> None:
        for plugin in reversed(self.conflist["plugins"]):
            self.call("DEL", pod, plugin, result)


def tcp_exchange(server_pod: str, server_ip: str, client_ns: str, target: str = "",
                 port: int = TCP_PORT) -> str:
    """A one-shot TCP server in server_pod; a client in client_ns connects to target:port
    (default: the server's own address and port) and returns the answer."""
    target = target or server_ip
    server = subprocess.Popen(
        ["ip", "netns", "exec", server_pod, sys.executable, "-c", textwrap.dedent(f"""
            import socket
            s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("{server_ip}", {TCP_PORT})); s.listen(1); s.settimeout(10)
            conn, peer = s.accept()
            msg = conn.recv(100).decode()
            conn.sendall(f"hello {{peer[0]}}, you said {{msg!r}}".encode()); conn.close()
        """)], text=True)
    try:
        client = textwrap.dedent(f"""
            import socket, time
            for _ in range(50):
                try:
                    c = socket.create_connection(("{target}", {port}), timeout=2); break
                except ConnectionRefusedError:
                    time.sleep(0.1)
            c.sendall(b"ping over TCP"); print(c.recv(100).decode())
        """)
        return in_ns(client_ns, sys.executable, "-c", client).stdout.strip()
    finally:
        server.wait(timeout=15)


def show_node(node: Node, workdir: Path) -> None:
    """`cni-bridge inspect` of the demo node, and its --dot picture rendered to docs/node.svg."""
    conf_dir = workdir / "net.d"
    conf_dir.mkdir(exist_ok=True)
    (conf_dir / CONFLIST.name).write_text(json.dumps(node.conflist, indent=2))
    argv = [str(VENV_BIN / "cni-bridge"), "inspect", "--conf-dir", str(conf_dir), "--bin-dir", str(node.bin)]
    print("\n$ cni-bridge inspect")
    print(textwrap.indent(in_ns(node.ns, *argv, check=False).stdout, "  "), end="")
    graph = in_ns(node.ns, *argv, "--dot", check=False).stdout
    if shutil.which("dot") is None:
        print("(graphviz's dot is missing: no docs/node.svg)")
        return
    sh("dot", "-Tsvg", "-o", str(REPO / "docs" / "node.svg"), input=graph)
    print("picture of the node (cni-bridge inspect --dot | dot -Tsvg): docs/node.svg")


def main() -> int:
    if os.geteuid() != 0:
        print("make demo needs root (it creates network namespaces)", file=sys.stderr)
        return 1
    workdir = Path(tempfile.mkdtemp(prefix="cni-bridge-demo-"))
    node = Node(workdir)
    made: list[str] = []
    results: dict[str, dict] = {}
    try:
        for ns in [node.ns, *node.pods, node.outside]:
            sh("ip", "netns", "add", ns)
            made.append(ns)
            in_ns(ns, "ip", "link", "set", "lo", "up")
        print(f"node namespace {node.ns}; plugins: {', '.join(p['type'] for p in node.conflist['plugins'])}\n")

        # An uplink from the node to a host outside it, for the port forwarding below.
        in_ns(node.ns, "ip", "link", "add", "uplink0", "type", "veth", "peer", "name", "eth0",
              "netns", node.outside)
        in_ns(node.ns, "ip", "addr", "add", f"{NODE_UPLINK}/24", "dev", "uplink0")
        in_ns(node.ns, "ip", "link", "set", "uplink0", "up")
        in_ns(node.outside, "ip", "addr", "add", f"{OUTSIDE_HOST}/24", "dev", "eth0")
        in_ns(node.outside, "ip", "link", "set", "eth0", "up")
        published = node.pods[1]
        if (node.bin / "portmap").exists():
            node.port_mappings[published] = [{"hostPort": HOST_PORT, "containerPort": TCP_PORT, "protocol": "tcp"}]

        for pod in node.pods:
            started = time.monotonic()
            results[pod] = node.add(pod)
            ip = results[pod]["ips"][0]["address"]
            print(f"ADD {pod:<22} eth0 {ip:<16} ({(time.monotonic() - started) * 1000:.0f} ms)")

        print("\ninside", node.pods[0] + ":")
        print(textwrap.indent(in_ns(node.pods[0], "ip", "-br", "addr").stdout, "  "), end="")
        print(textwrap.indent(in_ns(node.pods[0], "ip", "route").stdout, "  "))

        addrs = [results[p]["ips"][0]["address"].split("/")[0] for p in node.pods]
        ping = in_ns(node.pods[0], "busybox", "ping", "-c", "2", "-W", "2", addrs[1], check=False)
        print(f"ping {node.pods[0]} -> {addrs[1]}:")
        print(textwrap.indent(ping.stdout.strip(), "  "))
        reply = tcp_exchange(node.pods[2], addrs[2], node.pods[0])
        print(f"\nTCP {node.pods[0]} -> {addrs[2]}:{TCP_PORT}: {reply}")
        ok = ping.returncode == 0 and "hello" in reply
        if published in node.port_mappings:
            # The chained portmap: the node's port HOST_PORT forwards to the pod's TCP_PORT.
            forwarded = tcp_exchange(published, "0.0.0.0", node.outside, NODE_UPLINK, HOST_PORT)
            print(f"\nport forwarding: {node.outside} -> node {NODE_UPLINK}:{HOST_PORT} -> "
                  f"{published} {addrs[1]}:{TCP_PORT}: {forwarded}")
            ok = ok and f"hello {OUTSIDE_HOST}" in forwarded
        else:
            print("\nport forwarding skipped: no portmap plugin (apt-get install containernetworking-plugins)")
        show_node(node, workdir)
    finally:
        for pod in reversed(node.pods):
            if pod in results:
                node.delete(pod, results[pod])
                print(f"DEL {pod}")
        for ns in reversed(made):
            sh("ip", "netns", "del", ns, check=False)
        leftovers = [p.name for p in (workdir / "ipam").glob("*/*") if p.name[0].isdigit()]
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"\nremoved {len(made)} namespaces and the demo's files; leftover reservations: {len(leftovers)}")
    print("demo OK: pods got addresses and talked" if ok else "demo FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
