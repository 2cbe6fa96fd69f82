"""A log a person can read: one line per CNI call, in the file named by `logFile`.

    2025-11-28 14:02:11,532 [4711] INFO cni-bridge: ADD net=pods cid=3f2a9c if=eth0 -> ok 10.22.0.5/16 (0.391s)
    2025-11-28 14:02:19,004 [4790] INFO cni-ipam: DEL net=pods cid=77ab01 if=eth0 -> error 5: cannot write ... (0.012s)

Off unless the config names a file (cni-bridge: top-level `logFile`; cni-ipam:
`ipam.logFile`, else top-level `logFile`). Rotated by size (1 MiB, 3 old
files). Never stdout: stdout carries the CNI result. When on, warnings of the
plugin code (a damaged store file skipped, a rollback step that failed) and the
traceback of an unexpected exception go to the same file; the CNI error on
stdout never carries a traceback. A log that cannot be opened is skipped with
one line on stderr: logging never fails a CNI call.

Stdlib only; `logging.handlers` is imported only when a log is configured.
"""
from __future__ import annotations

import io
import json
import logging
import sys
import time
from typing import Any, Callable, Mapping, Optional, Sequence, TextIO

from .protocol.runner import Plugin, loads, run

MAX_BYTES = 1 << 20
BACKUPS = 3
FORMAT = "%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s"

KeyPath = Sequence[str]
BRIDGE_LOG_KEYS: tuple[KeyPath, ...] = (("logFile",),)
IPAM_LOG_KEYS: tuple[KeyPath, ...] = (("ipam", "logFile"), ("logFile",))


def find_log_file(config: Any, key_paths: Sequence[KeyPath]) -> Optional[str]:
    """The first non-empty string found at one of `key_paths` in the decoded config."""
    for path in key_paths:
        node = config
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, str) and node:
            return node
    return None


_handlers: dict[str, logging.Handler] = {}   # one per path, so a long-lived caller adds it once


def open_log(program: str, path: str, stderr: TextIO) -> Optional[logging.Logger]:
    """A logger writing to `path` (rotated by size), or None when the file cannot be opened."""
    if path not in _handlers:
        from logging.handlers import RotatingFileHandler

        try:
            handler = RotatingFileHandler(path, maxBytes=MAX_BYTES, backupCount=BACKUPS, encoding="utf-8")
        except OSError as exc:
            stderr.write(f"{program}: log file {path} not usable ({exc.strerror}); not logging\n")
            return None
        logging.raiseExceptions = False   # a failed write or rotation must not print a traceback
        handler.setFormatter(logging.Formatter(FORMAT))
        logging.getLogger().addHandler(handler)   # plugin warnings land here too, not on stderr
        _handlers[path] = handler
    root = logging.getLogger()
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    return logging.getLogger(program)


def close_logs() -> None:
    """Detach and close every log handler opened here (for tests and long-lived callers)."""
    for handler in _handlers.values():
        logging.getLogger().removeHandler(handler)
        handler.close()
    _handlers.clear()


def describe_call(env: Mapping[str, str], config: Any) -> str:
    net = config.get("name", "?") if isinstance(config, dict) else "?"
    parts = [env.get("CNI_COMMAND", "?"), f"net={net}"]
    for label, var in (("cid", "CNI_CONTAINERID"), ("if", "CNI_IFNAME"), ("netns", "CNI_NETNS")):
        if env.get(var):
            parts.append(f"{label}={env[var]}")
    if isinstance(config, dict):
        keep = config.get("cni.dev/valid-attachments", config.get("cni.dev/attachments"))
        if isinstance(keep, list):
            parts.append(f"keep={len(keep)}")
    return " ".join(parts)


def describe_outcome(rc: int, output: str) -> str:
    try:
        data = json.loads(output) if output.strip() else None
    except ValueError:
        data = None
    if rc != 0:
        if isinstance(data, dict) and "code" in data:
            details = f" ({data['details']})" if data.get("details") else ""
            return f"error {data['code']}: {data.get('msg', '')}{details}"
        return f"error (exit {rc})"
    if isinstance(data, dict) and isinstance(data.get("ips"), list):
        addresses = [str(ip.get("address")) for ip in data["ips"] if isinstance(ip, dict)]
        return "ok " + ",".join(addresses) if addresses else "ok"
    return "ok"


def run_logged(program: str, load_plugin: Callable[[], Plugin], env: Mapping[str, str],
               stdin: bytes, stdout: TextIO, key_paths: Sequence[KeyPath],
               stderr: TextIO = sys.stderr) -> int:
    """`runner.run`, plus one log line per call when the config names a log file."""
    try:
        config = loads(stdin)
    except ValueError:
        config = None
    path = find_log_file(config, key_paths)
    logger = open_log(program, path, stderr) if path else None
    if logger is None:
        return run(load_plugin, env, stdin, stdout, stderr)

    def on_error(exc: BaseException, traceback_text: str) -> None:
        logger.error("unexpected %s during %s\n%s", type(exc).__name__,
                     describe_call(env, config), traceback_text.rstrip())

    started = time.monotonic()
    captured = io.StringIO()
    rc = run(load_plugin, env, stdin, captured, stderr, on_error=on_error)
    output = captured.getvalue()
    stdout.write(output)
    stdout.flush()
    level = logging.INFO if rc == 0 else logging.WARNING
    logger.log(level, "%s -> %s (%.3fs)", describe_call(env, config),
               describe_outcome(rc, output), time.monotonic() - started)
    return rc
