"""Ask the node daemon how it is: a `status` request on its socket, answered by a worker.

An answer proves the whole path a plugin uses (socket, accept, a worker);
the daemon changes nothing to give it.
"""
from __future__ import annotations

import json
import os
import socket

from .. import daemon_client as wire
from .model import Daemon

PROBE_TIMEOUT = 3.0


def probe(path: str) -> Daemon:
    view = Daemon(socket=path, exists=os.path.exists(path))
    if not view.exists:
        return view
    if not wire.trusted_socket(path):
        view.error = "not a socket owned by root: plugins will not use it"
        return view
    body = json.dumps({"v": wire.VERSION, "status": True}).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(PROBE_TIMEOUT)
            sock.connect(path)
            sock.sendall(len(body).to_bytes(4, "big") + body)
            answer = json.loads(wire.recv_frame(sock, wire.MAX_RESPONSE_BYTES))
    except (OSError, EOFError, ValueError) as exc:
        view.error = f"no answer: {exc}"
        return view
    status = answer.get("status") if isinstance(answer, dict) else None
    if not isinstance(status, dict):
        view.error = f"refused: {answer.get('refused')}" if isinstance(answer, dict) else "odd answer"
        return view
    view.reachable = True
    view.pid = int(status.get("pid", 0))
    view.workers = int(status.get("workers", 0))
    view.worker_pids = [int(p) for p in status.get("workerPids", [])]
    view.uptime_seconds = float(status.get("uptimeSeconds", 0.0))
    view.metrics_address = str(status.get("metrics") or "")
    return view
