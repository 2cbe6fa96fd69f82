"""Read DNS settings from a resolv.conf-style file (the `resolvConf` key)."""
from __future__ import annotations

from cni_bridge.protocol.errors import CNIError, Code
from cni_bridge.protocol.result import DNS


def parse_resolv_conf(text: str) -> DNS:
    nameservers: list[str] = []
    search: list[str] = []
    options: list[str] = []
    domain = ""
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split(";", 1)[0].split()
        if not fields:
            continue
        key, values = fields[0], fields[1:]
        if key == "nameserver" and values:
            nameservers.append(values[0])
        elif key == "domain" and values:
            domain = values[0]
        elif key == "search":
            search = values
        elif key == "options":
            options.extend(values)
    return DNS(tuple(nameservers), domain, tuple(search), tuple(options))


def load_resolv_conf(path: str) -> DNS:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return parse_resolv_conf(f.read())
    except OSError as exc:
        raise CNIError(Code.IO_FAILURE, f"cannot read resolvConf {path}: {exc.strerror}") from None
