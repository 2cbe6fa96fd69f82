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

Run without CNI_COMMAND it is a tool for operators (see `cni-ipam COMMAND --help`):
  cni-ipam list      show the reservations of a dataDir
  cni-ipam check     report suspected leaks
  cni-ipam release   free one reservation
  cni-ipam gc        free every reservation not in a list of live containers
"""


def main() -> int:
    if "CNI_COMMAND" not in os.environ:
        if len(sys.argv) > 1 and sys.argv[1] not in ("-h", "--help"):
            from .cli import main as cli_main

            return cli_main(sys.argv[1:], sys.stdout, sys.stderr)
        from cni_bridge.main import about

        sys.stderr.write(about(USAGE, "list, check, release, gc"))
        return 0
    import gc

    gc.disable()   # one call per process: cycle collection during imports only costs time
    from cni_bridge import faults
    from cni_bridge.oplog import IPAM_LOG_KEYS, run_logged

    faults.arm(os.environ.get(faults.ENV_VAR))  # test-only; unset in production
    return run_logged("cni-ipam", _load_plugin, os.environ, sys.stdin.buffer.read(), sys.stdout,
                      IPAM_LOG_KEYS)


def _load_plugin():
    from .plugin import IpamPlugin

    return IpamPlugin()


if __name__ == "__main__":
    sys.exit(main())
