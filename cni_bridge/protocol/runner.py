"""One `run()` for both executables: env + stdin in, result or error JSON out.

It takes env, stdin and stdout as arguments so tests drive it with plain dicts
and bytes; the entry points are the only callers that pass the real ones.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Protocol, TextIO

from . import versions
from .env import CmdArgs, parse_env
from .errors import CNIError, Code

if TYPE_CHECKING:   # VERSION and early errors never need the result types (nor traceback)
    from .result import Result


@dataclass(frozen=True)
class Request:
    """What a verb handler gets: validated env, the decoded config, and its bytes."""

    cmd: CmdArgs
    config: dict
    stdin: bytes
    version: str


class Plugin(Protocol):
    def add(self, req: Request) -> Result: ...
    def delete(self, req: Request) -> None: ...
    def check(self, req: Request) -> None: ...
    def gc(self, req: Request) -> None: ...
    def status(self, req: Request) -> None: ...


def loads(data: bytes | str) -> Any:
    """json.loads whose every decoding failure is a ValueError: input nested deeper than
    the recursion limit ('[' * 100000) makes the decoder raise RecursionError instead."""
    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError("the JSON is nested too deeply") from None


def decode_config(stdin: bytes) -> dict:
    try:
        config = loads(stdin)
    except ValueError as exc:   # UnicodeDecodeError is one too
        raise CNIError(Code.DECODE_FAILURE, "cannot decode the network config on stdin", str(exc)) from None
    if not isinstance(config, dict):
        raise CNIError(Code.DECODE_FAILURE, "the network config on stdin must be a JSON object")
    return config


def config_version(config: Mapping[str, Any]) -> str:
    version = config.get("cniVersion", versions.IMPLICIT_VERSION)
    if not isinstance(version, str):
        raise CNIError(Code.INCOMPATIBLE_VERSION, f"cniVersion must be a string, not {version!r}")
    return version


def version_info(stdin: bytes) -> dict:
    """VERSION answers in the caller's version when we speak it."""
    try:
        requested = loads(stdin or b"{}").get("cniVersion")
    except (ValueError, AttributeError):
        requested = None
    version = requested if requested in versions.SUPPORTED_VERSIONS else versions.LATEST
    return {"cniVersion": version, "supportedVersions": list(versions.SUPPORTED_VERSIONS)}


def handle(load_plugin: Callable[[], Plugin], env: Mapping[str, str], stdin: bytes) -> Optional[dict]:
    """Run one verb; return the JSON to print, or None. Raises CNIError.

    The plugin is loaded only after the cheap checks, so VERSION and bad input
    never pay for its imports.
    """
    cmd = parse_env(env)
    if cmd.command == "VERSION":
        return version_info(stdin)
    config = decode_config(stdin)
    version = config_version(config)
    versions.require_supported(version, cmd.command)
    req = Request(cmd=cmd, config=config, stdin=stdin, version=version)
    plugin = load_plugin()
    if cmd.command == "ADD":
        return plugin.add(req).to_dict(version)
    handler: Callable[[Request], None] = {
        "DEL": plugin.delete,
        "CHECK": plugin.check,
        "GC": plugin.gc,
        "STATUS": plugin.status,
    }[cmd.command]
    handler(req)
    return None


def guess_version(stdin: bytes) -> str:
    """Best-effort version for an error raised before the config was validated."""
    try:
        version = loads(stdin).get("cniVersion")
    except Exception:
        return versions.LATEST
    return version if version in versions.SUPPORTED_VERSIONS else versions.LATEST


def write_error(stdout: TextIO, error: CNIError, stdin: bytes) -> None:
    """The error object, in the version the config asks for when it can be read."""
    json.dump(error.to_dict(guess_version(stdin)), stdout, indent=2)
    stdout.write("\n")


def run(
    load_plugin: Callable[[], Plugin],
    env: Mapping[str, str],
    stdin: bytes,
    stdout: TextIO,
    stderr: TextIO = sys.stderr,
    on_error: Optional[Callable[[BaseException, str], None]] = None,
) -> int:
    """Execute one CNI call. Exit status 0 on success, 1 with an error object on stdout."""
    try:
        output = handle(load_plugin, env, stdin)
    except CNIError as err:
        error = err
    except Exception as exc:  # an unexpected bug still answers with a CNI error, no traceback
        if on_error:
            import traceback

            on_error(exc, traceback.format_exc())
        error = CNIError(Code.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")
    else:
        if output is not None:
            json.dump(output, stdout, indent=2)
            stdout.write("\n")
        return 0
    write_error(stdout, error, stdin)
    stderr.write(f"{error}\n")
    return 1
