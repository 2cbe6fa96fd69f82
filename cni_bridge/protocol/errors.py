"""CNI error codes and the error type every user-visible failure is raised as."""
from __future__ import annotations

from enum import IntEnum


class Code(IntEnum):
    INCOMPATIBLE_VERSION = 1
    UNSUPPORTED_FIELD = 2
    UNKNOWN_CONTAINER = 3
    INVALID_ENV = 4
    IO_FAILURE = 5
    DECODE_FAILURE = 6
    INVALID_CONFIG = 7
    TRY_AGAIN_LATER = 11
    CANNOT_SERVE_ADD = 50
    LIMITED_CONNECTIVITY = 51
    # Plugin-specific codes (100 and up).
    RANGE_EXHAUSTED = 100
    ADDRESS_UNAVAILABLE = 101
    INTERFACE_EXISTS = 102
    NETNS_UNUSABLE = 103
    BRIDGE_CONFLICT = 104
    DELEGATE_FAILED = 105
    FIREWALL_FAILED = 106
    CHECK_FAILED = 107
    KERNEL_REFUSED = 108
    INTERNAL = 999


class CNIError(Exception):
    """A failure reported to the runtime as a CNI error object."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = int(code)
        self.msg = msg
        self.details = details

    def to_dict(self, cni_version: str) -> dict:
        return {
            "cniVersion": cni_version,
            "code": self.code,
            "msg": self.msg,
            "details": self.details,
        }

    def __str__(self) -> str:
        return f"{self.msg}: {self.details}" if self.details else self.msg
