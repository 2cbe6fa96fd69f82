"""Sysctls the bridge needs, written in the calling thread's network namespace: the
plugin's own for host settings (netlink.py enters a pod's namespace for the pod's)."""
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


def _set(path: str, value: str) -> bool:
    """Write `value` unless the file holds it already; False when there is no such file."""
    try:
        with open(path) as f:
            if f.read().strip() == value:
                return True
        with open(path, "w") as f:
            f.write(value)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise CNIError(Code.IO_FAILURE, f"cannot set {path} to {value}: {exc.strerror}") from None
    return True


def set_link(version: int, link: str, key: str, value: str) -> bool:
    """net.ipv<version>.conf.<link>.<key>; False when it does not exist (that IP version
    is disabled, or the link has no such settings)."""
    return _set(f"/proc/sys/net/ipv{version}/conf/{link}/{key}", value)


def refuse_router_advertisements(bridge: str) -> None:
    """accept_ra=0 on the bridge, as the reference plugin does: a pod could otherwise send a
    Router Advertisement and set the host's IPv6 default route through itself. Without
    IPv6 there is no such file and nothing to refuse."""
    set_link(6, bridge, "accept_ra", "0")
