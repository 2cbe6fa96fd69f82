"""Supported CNI versions and the per-verb version gates."""
from __future__ import annotations

from .errors import CNIError, Code

SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
LATEST = SUPPORTED_VERSIONS[-1]
# A config without cniVersion is, by the spec, version 0.1.0 (which we do not serve).
IMPLICIT_VERSION = "0.1.0"

# Lowest config version that allows each verb (the spec added them over time).
MIN_VERSION_FOR = {"CHECK": "0.4.0", "GC": "1.1.0", "STATUS": "1.1.0"}


def parse(version: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in version.split("."))
    except (AttributeError, ValueError):
        raise CNIError(Code.INCOMPATIBLE_VERSION, f"malformed cniVersion {version!r}") from None


def at_least(version: str, minimum: str) -> bool:
    return parse(version) >= parse(minimum)


def is_legacy(version: str) -> bool:
    """0.3.x and 0.4.0 results carry ips[].version; 1.x results do not."""
    return parse(version) < (1, 0, 0)


def require_supported(version: str, verb: str) -> None:
    if version not in SUPPORTED_VERSIONS:
        raise CNIError(
            Code.INCOMPATIBLE_VERSION,
            f"unsupported cniVersion {version!r}",
            f"this plugin supports {', '.join(SUPPORTED_VERSIONS)}",
        )
    minimum = MIN_VERSION_FOR.get(verb)
    if minimum and not at_least(version, minimum):
        raise CNIError(
            Code.INCOMPATIBLE_VERSION,
            f"config version {version} does not allow {verb}",
            f"{verb} needs cniVersion {minimum} or later",
        )
