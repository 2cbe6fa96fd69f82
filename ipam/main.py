"""Entry point of the `cni-ipam` executable: the only code here that reads os.environ and sys.std*."""
from __future__ import annotations

import os
import sys

USAGE = """\
cni-ipam: file-backed IPAM plugin for CNI (host-local compatible config)

A CNI runtime runs this program with CNI_COMMAND set (ADD, DEL, CHECK, GC,
STATUS, VERSION), the network config on stdin and the CNI_* variables in the
environment; it prints the result JSON on stdout.

Example network config:
  "ipam": {"type": "cni-ipam", "ranges": [[{"subnet": "10.22.0.0/16"}]],
           "routes": [{"dst": "0.0.0.0/0"}], "dataDir": "/var/lib/cni/networks"}
"""


def main() -> int:
    if "CNI_COMMAND" not in os.environ:
        sys.stderr.write(USAGE)
        return 0 if len(sys.argv) > 1 and sys.argv[1] in ("-h", "--help") else 2
    from cni_bridge.protocol.runner import run

    return run(_load_plugin, os.environ, sys.stdin.buffer.read(), sys.stdout)


def _load_plugin():
    from .plugin import IpamPlugin

    return IpamPlugin()


if __name__ == "__main__":
    sys.exit(main())
