"""Host sysctls the bridge needs (written in the plugin's own network namespace)."""
from __future__ import annotations

from .protocol.errors import CNIError, Code

_FORWARDING = {
    4: "/proc/sys/net/ipv4/ip_forward",
    6: "/proc/sys/net/ipv6/conf/all/forwarding",
}


def enable_forwarding(families: tuple[int, ...]) -> None:
    for family in families:
        path = _FORWARDING[family]
        try:
            with open(path) as f:
                if f.read().strip() == "1":
                    continue
            with open(path, "w") as f:
                f.write("1")
        except OSError as exc:
            raise CNIError(Code.IO_FAILURE, f"cannot enable IP forwarding ({path}): {exc.strerror}") from None
