"""CNI_* environment parsing and validation, per verb."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping

from .errors import CNIError, Code

VERBS = ("ADD", "DEL", "CHECK", "VERSION", "GC", "STATUS")

# Which variables each verb needs (spec table; NETNS is optional for DEL).
_REQUIRED = {
    "ADD": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"),
    "CHECK": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"),
    "DEL": ("CNI_CONTAINERID", "CNI_IFNAME", "CNI_PATH"),
    "GC": ("CNI_PATH",),
    "STATUS": (),
    "VERSION": (),
}

_CONTAINER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
IFNAME_MAX = 15
# Keys our plugins understand in CNI_ARGS; anything else needs IgnoreUnknown.
KNOWN_ARGS = frozenset({
    "IgnoreUnknown", "IP", "MAC",
    "K8S_POD_NAMESPACE", "K8S_POD_NAME", "K8S_POD_INFRA_CONTAINER_ID", "K8S_POD_UID",
})


@dataclass(frozen=True)
class CmdArgs:
    command: str
    container_id: str = ""
    netns: str = ""
    ifname: str = ""
    path: tuple[str, ...] = ()
    args: Mapping[str, str] = field(default_factory=dict)
    raw_args: str = ""


def validate_ifname(name: str, what: str = "CNI_IFNAME") -> None:
    """Kernel rules for an interface name; raise code 4 naming the variable."""
    problem = None
    if not name:
        problem = "is empty"
    elif len(name) > IFNAME_MAX:
        problem = f"is longer than {IFNAME_MAX} characters"
    elif name in (".", ".."):
        problem = "may not be '.' or '..'"
    elif any(c in name for c in "/:") or any(c.isspace() for c in name):
        problem = "may not contain '/', ':' or whitespace"
    if problem:
        raise CNIError(Code.INVALID_ENV, f"{what} {name!r} {problem}")


def parse_cni_args(raw: str) -> dict[str, str]:
    """Parse 'K=V;K2=V2'; unknown keys are an error unless IgnoreUnknown is true."""
    pairs: dict[str, str] = {}
    for item in filter(None, raw.split(";")):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CNIError(Code.INVALID_ENV, f"CNI_ARGS item {item!r} is not KEY=VALUE")
        pairs[key] = value
    ignore_unknown = pairs.get("IgnoreUnknown", "").lower() in ("1", "true")
    unknown = sorted(k for k in pairs if k not in KNOWN_ARGS)
    if unknown and not ignore_unknown:
        raise CNIError(
            Code.INVALID_ENV,
            f"CNI_ARGS has unknown keys: {', '.join(unknown)}",
            "add IgnoreUnknown=1 to CNI_ARGS to pass keys meant for other plugins",
        )
    return pairs


def parse_env(env: Mapping[str, str]) -> CmdArgs:
    command = env.get("CNI_COMMAND", "")
    if command not in VERBS:
        raise CNIError(
            Code.INVALID_ENV,
            f"CNI_COMMAND {command!r} is not one of {', '.join(VERBS)}" if command
            else "CNI_COMMAND is not set",
        )
    missing = [name for name in _REQUIRED[command] if not env.get(name)]
    if missing:
        raise CNIError(
            Code.INVALID_ENV,
            f"{command} needs environment variables that are missing or empty: {', '.join(missing)}",
        )
    container_id = env.get("CNI_CONTAINERID", "")
    if container_id and not _CONTAINER_ID.match(container_id):
        raise CNIError(
            Code.INVALID_ENV,
            f"CNI_CONTAINERID {container_id!r} is invalid",
            "it must start with a letter or digit and hold only letters, digits, '_', '.' and '-'",
        )
    ifname = env.get("CNI_IFNAME", "")
    if command in ("ADD", "CHECK", "DEL"):
        validate_ifname(ifname)
    raw_args = env.get("CNI_ARGS", "")
    return CmdArgs(
        command=command,
        container_id=container_id,
        netns=env.get("CNI_NETNS", ""),
        ifname=ifname,
        path=tuple(p for p in env.get("CNI_PATH", "").split(":") if p),
        args=parse_cni_args(raw_args),
        raw_args=raw_args,
    )
