"""A tiny stand-in for the Kubernetes API server: Nodes only, list and watch.

    python fake_kube_api.py STATE.json      # prints "ready PORT" once listening on 127.0.0.1

STATE.json is {"resourceVersion": N, "nodes": [{"name", "internalIP", "podCIDR",
"annotations"?}]} (podCIDR may be null: not allocated yet). The test rewrites it
(atomically, with a higher resourceVersion) to change the cluster. Served:

    GET /api/v1/nodes                         NodeList
    GET /api/v1/nodes?watch=true&...          chunked watch events (ADDED, MODIFIED,
                                              DELETED) diffed from STATE.json changes,
                                              until timeoutSeconds
    PATCH /api/v1/nodes/NAME[/status]         merges metadata.annotations (kept in memory,
                                              over the file's), answers the Node

Enough for the official Python client's CoreV1Api.list_node and watch.Watch;
nothing else of the API is here. Stdlib only.
"""
from __future__ import annotations

import json
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

STATE = ""
PATCHED: dict[str, dict] = {}       # node name -> annotations set by PATCH
PATCHES = [0]


def load() -> tuple[int, dict[str, dict]]:
    with open(STATE) as f:
        data = json.load(f)
    # Both the file (the test) and PATCH (the agent) move the resourceVersion forward.
    rv = int(data["resourceVersion"]) * 1000 + PATCHES[0]
    return rv, {n["name"]: to_node(n, rv) for n in data["nodes"]}


def to_node(entry: dict, rv: int) -> dict:
    spec = {}
    if entry.get("podCIDR"):
        spec = {"podCIDR": entry["podCIDR"], "podCIDRs": [entry["podCIDR"]]}
    return {
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": entry["name"], "resourceVersion": str(rv),
                     "annotations": {**entry.get("annotations", {}), **PATCHED.get(entry["name"], {})}},
        "spec": spec,
        "status": {"addresses": [{"type": "InternalIP", "address": entry["internalIP"]},
                                 {"type": "Hostname", "address": entry["name"]}]},
    }


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        url = urlparse(self.path)
        query = parse_qs(url.query)
        if url.path != "/api/v1/nodes":
            self._send(404, {"kind": "Status", "status": "Failure", "code": 404})
            return
        if query.get("watch", ["false"])[0].lower() in ("true", "1"):
            self._watch(int(query.get("resourceVersion", ["0"])[0] or 0),
                        float(query.get("timeoutSeconds", ["30"])[0]))
            return
        rv, nodes = load()
        self._send(200, {"apiVersion": "v1", "kind": "NodeList", "metadata": {"resourceVersion": str(rv)},
                         "items": list(nodes.values())})

    def do_PATCH(self) -> None:
        name = urlparse(self.path).path.removeprefix("/api/v1/nodes/").removesuffix("/status")
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))) or b"{}")
        if name not in load()[1]:
            self._send(404, {"kind": "Status", "status": "Failure", "code": 404})
            return
        PATCHED.setdefault(name, {}).update((body.get("metadata") or {}).get("annotations") or {})
        PATCHES[0] += 1
        self._send(200, load()[1][name])

    def _send(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _watch(self, since: int, timeout: float) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        seen_rv, seen = load()
        if seen_rv != since:        # the client listed an older state: replay as a full diff
            seen = {}
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                rv, nodes = load()
                if rv != seen_rv or not seen and nodes:
                    for name, node in nodes.items():
                        if name not in seen:
                            self._event("ADDED", node)
                        elif any(seen[name][k] != node[k] for k in ("spec", "status")) or \
                                seen[name]["metadata"]["annotations"] != node["metadata"]["annotations"]:
                            self._event("MODIFIED", node)
                    for name, node in seen.items():
                        if name not in nodes:
                            self._event("DELETED", {**node, "metadata": {**node["metadata"], "resourceVersion": str(rv)}})
                    seen_rv, seen = rv, nodes
                time.sleep(0.05)
            self._chunk(b"")
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _event(self, kind: str, node: dict) -> None:
        self._chunk(json.dumps({"type": kind, "object": node}).encode() + b"\n")


def main() -> None:
    global STATE
    STATE = sys.argv[1]
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    print(f"ready {server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
