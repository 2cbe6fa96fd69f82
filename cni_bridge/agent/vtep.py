"""VTEP MACs: derived from a node's IPv4 address, or given (topology file, Node annotation). Pure."""
from __future__ import annotations

import ipaddress
import re

# Locally administered, unicast (bit 1 of the first octet set, bit 0 clear); the four
# bytes that follow are the node's IPv4 InternalIP, so every node can derive every MAC.
VTEP_MAC_PREFIX = "0e:cb"
# Kubernetes mode: each agent publishes its own device's MAC on its own Node object.
VTEP_MAC_ANNOTATION = "cni-bridge.dev/vtep-mac"
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


def derived_vtep_mac(address: ipaddress.IPv4Address) -> str:
    return VTEP_MAC_PREFIX + "".join(f":{b:02x}" for b in address.packed)


def parse_vtep_mac(value: object) -> str:
    """A unicast MAC in lower case; ValueError says what is wrong."""
    text = value.strip().lower() if isinstance(value, str) else ""
    if not _MAC.match(text):
        raise ValueError(f"{value!r} is not a MAC address like 0e:cb:0a:00:00:01")
    if int(text[:2], 16) & 1:
        raise ValueError(f"{value!r} is a multicast MAC; a VTEP needs a unicast one")
    if text == "00:00:00:00:00:00":
        raise ValueError("the all-zero MAC is not a VTEP")
    return text
