"""cni-bridge's config model; keys follow the reference `bridge` plugin."""
from __future__ import annotations

import re
from typing import Any, Literal, Optional

from pydantic import StrictBool, StrictInt, StrictStr, field_validator, model_validator

from .confbase import Model, NetConf
from .protocol.env import IFNAME_MAX

_MAC = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")


class IPAMRef(Model):
    """Only `type` matters to the bridge; the rest belongs to the IPAM plugin."""

    type: StrictStr

    @field_validator("type")
    @classmethod
    def _non_empty(cls, value: str) -> str:
        if not value or "/" in value:
            raise ValueError("must name an IPAM plugin in CNI_PATH")
        return value


class BridgeConf(NetConf):
    bridge: StrictStr = "cni0"
    is_gateway: StrictBool = False
    is_default_gateway: StrictBool = False
    force_address: StrictBool = False
    ip_masq: StrictBool = False
    # As the reference plugins (v1.6.0+); None: iptables, or nftables where only nft is installed.
    ip_masq_backend: Optional[Literal["iptables", "nftables"]] = None
    mtu: Optional[StrictInt] = None
    hairpin_mode: StrictBool = False
    promisc_mode: StrictBool = False
    ipam: IPAMRef
    # Where a node daemon listens (see the daemon issue); unused by the in-process path.
    daemon_socket: Optional[StrictStr] = None

    @field_validator("bridge")
    @classmethod
    def _bridge_name(cls, name: str) -> str:
        if not name or len(name) > IFNAME_MAX or name in (".", "..") or \
                any(c in "/:" or c.isspace() for c in name):
            raise ValueError(f"must be a valid interface name of at most {IFNAME_MAX} characters")
        return name

    @field_validator("mtu")
    @classmethod
    def _mtu(cls, mtu: Optional[int]) -> Optional[int]:
        if mtu is not None and not 68 <= mtu <= 65535:
            raise ValueError("must be between 68 and 65535")
        return mtu

    @model_validator(mode="after")
    def _cross_checks(self) -> "BridgeConf":
        if self.hairpin_mode and self.promisc_mode:
            raise ValueError("hairpinMode and promiscMode cannot both be true")
        if self.is_default_gateway:
            # A default gateway must be a gateway (the reference plugin does the same).
            object.__setattr__(self, "is_gateway", True)
        mac = self.requested_mac(None)
        if mac and not _MAC.match(mac):
            raise ValueError(f"MAC {mac!r} is not a MAC address like 0a:58:0a:f4:00:05")
        return self

    def requested_mac(self, cni_args: Optional[dict[str, Any]]) -> str:
        """CNI_ARGS MAC=, then args.cni.mac, then runtimeConfig.mac; the last one set wins."""
        mac = (cni_args or {}).get("MAC", "")
        mac = self.args.cni.mac or mac
        return self.runtime_config.mac or mac
