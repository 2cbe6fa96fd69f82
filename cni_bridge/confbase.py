"""Pydantic base for network configs shared by cni-bridge and cni-ipam.

Models are frozen, read camelCase keys, and ignore unknown keys (a conflist
carries other plugins' keys). Any validation failure becomes CNI error 7.
"""
from __future__ import annotations

import ipaddress
import sys
import types
from typing import Any, Optional, TypeVar


def _skip_pydantic_plugin_discovery() -> None:
    """Building the first model makes pydantic look for third-party pydantic plugins
    through importlib.metadata entry points: ~15 ms of every exec'd call, for plugins
    a CNI plugin never uses. Load pydantic's plugin loader with an empty entry-point
    list instead (no plugins, no scan); if it is not the loader we know, load it as usual.
    """
    if "pydantic.plugin._loader" in sys.modules or "importlib.metadata" in sys.modules:
        return   # loaded already, or its cost is paid already
    import pydantic.plugin  # noqa: F401  (everything but the loader, imported as usual)

    empty = types.ModuleType("importlib.metadata")
    empty.entry_points = lambda **_: ()  # type: ignore[attr-defined]
    sys.modules["importlib.metadata"] = empty
    try:
        import pydantic.plugin._loader  # noqa: F401  (binds the empty entry_points)
    except ImportError:
        sys.modules.pop("pydantic.plugin._loader", None)
    finally:
        if sys.modules.get("importlib.metadata") is empty:
            del sys.modules["importlib.metadata"]


_skip_pydantic_plugin_discovery()

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator  # noqa: E402
from pydantic.alias_generators import to_camel  # noqa: E402

from .protocol.errors import CNIError, Code  # noqa: E402
from .protocol.result import DNS, Result  # noqa: E402

_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


class Model(BaseModel):
    model_config = ConfigDict(
        frozen=True, extra="ignore", alias_generator=to_camel, populate_by_name=True,
    )


class DNSConf(Model):
    nameservers: list[str] = []
    domain: str = ""
    search: list[str] = []
    options: list[str] = []

    def to_dns(self) -> DNS:
        return DNS(tuple(self.nameservers), self.domain, tuple(self.search), tuple(self.options))


class CniArgs(Model):
    ips: list[str] = []
    mac: str = ""


class ArgsConf(Model):
    cni: CniArgs = CniArgs()


class RuntimeConf(Model):
    """Capability args a runtime injects (only those we use are modelled)."""

    ips: list[str] = []
    mac: str = ""


class Attachment(Model):
    container_id: str = Field(alias="containerID")
    ifname: str


class NetConf(Model):
    cni_version: str = "0.1.0"
    name: str
    type: str
    dns: DNSConf = DNSConf()
    args: ArgsConf = ArgsConf()
    runtime_config: RuntimeConf = RuntimeConf()
    prev_result: Optional[dict[str, Any]] = None
    valid_attachments: Optional[list[Attachment]] = Field(default=None, alias="cni.dev/valid-attachments")
    # The spec-v1.1.0 tag names the GC key differently; libcni sends both.
    attachments: Optional[list[Attachment]] = Field(default=None, alias="cni.dev/attachments")

    @field_validator("name")
    @classmethod
    def _valid_name(cls, name: str) -> str:
        if not name or not set(name) <= _NAME_CHARS or not name[0].isalnum():
            raise ValueError("must start with a letter or digit and hold only letters, digits, '_', '.', '-'")
        return name

    def previous_result(self) -> Optional[Result]:
        return Result.from_dict(self.prev_result, "prevResult") if self.prev_result else None

    def gc_keep(self) -> Optional[set[tuple[str, str]]]:
        """The (containerID, ifname) pairs GC must keep; None when the runtime sent no list."""
        listed = self.valid_attachments if self.valid_attachments is not None else self.attachments
        return None if listed is None else {(a.container_id, a.ifname) for a in listed}


M = TypeVar("M", bound=BaseModel)


def load(model: type[M], config: dict) -> M:
    """Validate `config` into `model`; a bad config is CNI error 7 naming the field."""
    try:
        return model.model_validate(config)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"]) or "config"
            problems.append(f"{where}: {err['msg']}")
        raise CNIError(Code.INVALID_CONFIG, "invalid network config", "; ".join(problems)) from None


def parse_ip_request(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """A requested IP may come as '10.0.0.5' or '10.0.0.5/24' (the ips capability)."""
    try:
        return ipaddress.ip_interface(text.strip()).ip
    except ValueError:
        raise CNIError(Code.INVALID_CONFIG, f"requested IP {text!r} is not an IP address") from None
