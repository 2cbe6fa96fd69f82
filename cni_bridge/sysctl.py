"""Sysctls the bridge needs, written in the calling thread's network namespace: the
plugin's own for host settings (netlink.py enters a pod's namespace for the pod's)."""
from __future__ import annotations

import errno
import logging

from .protocol.errors import CNIError, Code

log = logging.getLogger(__name__)
# A read-only /proc/sys (a node that is an unprivileged container) or no right to write it.
_NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)

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


def _set(path: str, value: str, required: bool = True) -> bool:
    """Write `value` unless the file holds it already; False when there is no such file.

    `required=False` is for settings that harden but are not needed to connect the pod:
    where /proc/sys cannot be written (an unprivileged container as node: Docker mounts it
    read-only), warn and go on, as the reference plugin does, instead of failing the pod.
    """
    try:
        with open(path) as f:
            if f.read().strip() == value:
                return True
        with open(path, "w") as f:
            f.write(value)
    except FileNotFoundError:
        return False
    except OSError as exc:
        if not required and exc.errno in _NOT_WRITABLE:
            log.warning("cannot set %s to %s (%s); set the default for new links on this node instead",
                        path, value, exc.strerror)
            return True
        raise CNIError(Code.IO_FAILURE, f"cannot set {path} to {value}: {exc.strerror}") from None
    return True


def set_link(version: int, link: str, key: str, value: str, required: bool = True) -> bool:
    """net.ipv<version>.conf.<link>.<key>; False when it does not exist (that IP version
    is disabled, or the link has no such settings)."""
    return _set(f"/proc/sys/net/ipv{version}/conf/{link}/{key}", value, required)


def refuse_router_advertisements(bridge: str) -> None:
    """accept_ra=0 on the bridge, as the reference plugin does: a pod could otherwise send a
    Router Advertisement and set the host's IPv6 default route through itself. Without
    IPv6 there is no such file and nothing to refuse."""
    set_link(6, bridge, "accept_ra", "0", required=False)


def keep_ipv6_off_port(port: str) -> None:
    """disable_ipv6=1 on a bridge port (a pod's host-side veth) before it comes up. A port
    only forwards frames; with IPv6 on, each one gets a link-local address and its route,
    sends DAD and MLD packets, and every link event on the node then walks those routes
    too, which made one more pod's cycle grow with the pods present. The pod's end, and
    the bridge (the gateway), keep IPv6."""
    set_link(6, port, "disable_ipv6", "1", required=False)
