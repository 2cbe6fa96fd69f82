"""Calling the IPAM plugin named by `ipam.type`, as a runtime would.

`cni-ipam` runs in-process (same code, one interpreter start saved); any other
type is exec'd from CNI_PATH with the same env and stdin, so the reference
host-local works too.
"""
from __future__ import annotations

import dataclasses
import errno
import json
import os
import time
from typing import TYPE_CHECKING, Optional

from .protocol.errors import CNIError, Code
from .protocol.result import Result
from .protocol.runner import Request

if TYPE_CHECKING:   # imported when an IPAM plugin is exec'd, not by every cni-ipam-in-process call
    import subprocess

IN_PROCESS_TYPE = "cni-ipam"
_SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_BUSY_RETRIES = 5


def ipam_type(req: Request) -> str:
    return str(req.config["ipam"]["type"])


def add(req: Request) -> Result:
    out = _call("ADD", req)
    assert out is not None
    return out


def delete(req: Request) -> None:
    _call("DEL", req)


def check(req: Request) -> None:
    _call("CHECK", req)


def gc(req: Request) -> None:
    _call("GC", req)


def status(req: Request) -> None:
    _call("STATUS", req)


def _call(verb: str, req: Request) -> Optional[Result]:
    sub = dataclasses.replace(req, cmd=dataclasses.replace(req.cmd, command=verb))
    if ipam_type(req) == IN_PROCESS_TYPE:
        from ipam.plugin import IpamPlugin

        plugin = IpamPlugin()
        handler = {"ADD": plugin.add, "DEL": plugin.delete, "CHECK": plugin.check,
                   "GC": plugin.gc, "STATUS": plugin.status}[verb]
        return handler(sub)
    return _exec(verb, sub)


def find_plugin(name: str, path: tuple[str, ...]) -> str:
    for directory in path:
        candidate = os.path.join(directory, name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise CNIError(Code.INVALID_CONFIG, f"IPAM plugin {name!r} not found in CNI_PATH",
                   f"searched: {':'.join(path) or '(CNI_PATH is empty)'}")


def _exec(verb: str, req: Request) -> Optional[Result]:
    name = ipam_type(req)
    binary = find_plugin(name, req.cmd.path)
    env = {
        "CNI_COMMAND": verb,
        "CNI_CONTAINERID": req.cmd.container_id,
        "CNI_NETNS": req.cmd.netns,
        "CNI_IFNAME": req.cmd.ifname,
        "CNI_ARGS": req.cmd.raw_args,
        "CNI_PATH": ":".join(req.cmd.path),
        "PATH": _SYSTEM_PATH,
    }
    proc = _run_retrying_busy(binary, env, req.stdin)
    if proc.returncode != 0:
        raise _delegate_error(name, verb, proc)
    if verb != "ADD":
        return None
    try:
        data = json.loads(proc.stdout)
    except ValueError:
        raise CNIError(Code.DELEGATE_FAILED, f"IPAM plugin {name} printed a result that is not JSON",
                       proc.stdout[:200].decode("utf-8", "replace")) from None
    return Result.from_dict(data, f"IPAM plugin {name}'s result")


def _run_retrying_busy(binary: str, env: dict, stdin: bytes) -> subprocess.CompletedProcess:
    import subprocess

    # A plugin binary being replaced on disk gives ETXTBSY for a moment; libcni retries too.
    for attempt in range(_BUSY_RETRIES):
        try:
            return subprocess.run([binary], input=stdin, env=env, capture_output=True, timeout=120)
        except OSError as exc:
            if exc.errno != errno.ETXTBSY or attempt == _BUSY_RETRIES - 1:
                raise CNIError(Code.DELEGATE_FAILED, f"cannot run IPAM plugin {binary}: {exc.strerror}") from None
            time.sleep(0.05 * (attempt + 1))
        except subprocess.TimeoutExpired:
            raise CNIError(Code.TRY_AGAIN_LATER, f"IPAM plugin {binary} did not answer within 120s") from None
    raise AssertionError("unreachable")


def _delegate_error(name: str, verb: str, proc: subprocess.CompletedProcess) -> CNIError:
    for stream in (proc.stdout, proc.stderr):
        try:
            data = json.loads(stream)
        except ValueError:
            continue
        if isinstance(data, dict) and isinstance(data.get("code"), int):
            return CNIError(data["code"], str(data.get("msg", "")), str(data.get("details", "")))
    text = (proc.stderr or proc.stdout).decode("utf-8", "replace").strip()
    return CNIError(Code.DELEGATE_FAILED, f"IPAM plugin {name} failed on {verb}", text[:500])
