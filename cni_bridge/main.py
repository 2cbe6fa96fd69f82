"""Entry point of the `cni-bridge` executable: the only code that reads os.environ and sys.std*."""
from __future__ import annotations

import os
import sys

USAGE = """\
cni-bridge: CNI plugin that attaches containers to a Linux bridge

A CNI runtime (containerd, podman, cnitool) runs this program with CNI_COMMAND
set (ADD, DEL, CHECK, GC, STATUS, VERSION), the network config on stdin and the
CNI_* variables in the environment; it prints the result JSON on stdout.

Example network config (a plugin entry in a conflist):
  {"type": "cni-bridge", "bridge": "cni0", "isGateway": true, "ipMasq": true,
   "ipam": {"type": "cni-ipam", "ranges": [[{"subnet": "10.22.0.0/16"}]],
            "routes": [{"dst": "0.0.0.0/0"}]}}
"""


def main() -> int:
    if "CNI_COMMAND" not in os.environ:
        sys.stderr.write(USAGE)
        return 0 if len(sys.argv) > 1 and sys.argv[1] in ("-h", "--help") else 2
    from .protocol.runner import run

    return run(_load_plugin, os.environ, sys.stdin.buffer.read(), sys.stdout)


def _load_plugin():
    from .plugin import BridgePlugin

    return BridgePlugin()


if __name__ == "__main__":
    sys.exit(main())
