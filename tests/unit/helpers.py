"""Builders shared by the unit tests: CNI env, Requests made from the runner's own pieces."""
from __future__ import annotations

import io
import json
from typing import Any, Callable, Mapping, Optional

from cni_bridge.protocol.env import parse_env
from cni_bridge.protocol.runner import Request, config_version, decode_config, run

NETNS = "/var/run/netns/pod-a"
CID = "c0ffee01"


def cni_env(command: str = "ADD", **overrides: str) -> dict[str, str]:
    """A complete, valid CNI environment for `command`; override or drop (None) any key."""
    env = {
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": CID,
        "CNI_NETNS": NETNS,
        "CNI_IFNAME": "eth0",
        "CNI_PATH": "/opt/cni/bin",
    }
    for key, value in overrides.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def make_request(env: Mapping[str, str], config: dict) -> Request:
    """A Request exactly as runner.handle() builds it (env validated, stdin decoded)."""
    stdin = json.dumps(config).encode()
    decoded = decode_config(stdin)
    return Request(cmd=parse_env(env), config=decoded, stdin=stdin, version=config_version(decoded))


def run_plugin(load_plugin: Callable[[], Any], env: Mapping[str, str],
               config: Optional[dict] = None, stdin: Optional[bytes] = None) -> tuple[int, Any, str]:
    """runner.run() with in-memory streams: (exit status, decoded stdout or None, stderr)."""
    if stdin is None:
        stdin = json.dumps(config).encode()
    out, err = io.StringIO(), io.StringIO()
    rc = run(load_plugin, env, stdin, out, err)
    text = out.getvalue()
    return rc, (json.loads(text) if text.strip() else None), err.getvalue()
