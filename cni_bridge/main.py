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

# Set by the static front end when it runs this program: "unavailable" (the
# daemon cannot have run the call) or "lost" (it took the call, no answer came).
FRONT_END_ENV = "CNI_BRIDGE_FRONT_END"


def _agent(argv: list[str]) -> int:
    from .agent.cli import main as agent_main

    return agent_main(argv)


def _daemon(argv: list[str]) -> int:
    from .daemon import main as daemon_main

    return daemon_main(argv)


def _inspect(argv: list[str]) -> int:
    from .inspect.cli import main as inspect_main

    return inspect_main(argv)


# `cni-bridge NAME ARGS...` with CNI_COMMAND unset runs a subcommand: NAME -> function(ARGS).
SUBCOMMANDS = {
    "agent": _agent,
    "daemon": _daemon,
    "inspect": _inspect,
}


def about(usage: str, subcommands: str) -> str:
    """The text a person gets with CNI_COMMAND unset (like the reference plugins' skeleton, on stderr)."""
    from .protocol.versions import SUPPORTED_VERSIONS

    return (usage + f"\nCNI protocol versions supported: {', '.join(SUPPORTED_VERSIONS)}\n"
            + f"Subcommands (CNI_COMMAND unset): {subcommands}\n")


def main() -> int:
    if "CNI_COMMAND" not in os.environ:
        if len(sys.argv) > 1 and sys.argv[1] in SUBCOMMANDS:
            return SUBCOMMANDS[sys.argv[1]](sys.argv[2:])
        sys.stderr.write(about(USAGE, ", ".join(SUBCOMMANDS)))
        if len(sys.argv) > 1 and sys.argv[1] not in ("-h", "--help"):
            sys.stderr.write(f"cni-bridge: unknown subcommand {sys.argv[1]!r}\n")
            return 2
        return 0
    env, stdin = os.environ, sys.stdin.buffer.read()
    # The static front end (packaging/shim) already asked the daemon and says how that went.
    asked = env.get(FRONT_END_ENV)
    if asked is not None:
        env = {k: v for k, v in env.items() if k != FRONT_END_ENV}
    elif env["CNI_COMMAND"] != "VERSION":
        # A node daemon, when there is one, answers without this process importing
        # pydantic or pyroute2; otherwise (or if it fails us) run in-process.
        from . import daemon_client

        reply = daemon_client.forward(env, stdin)
        if reply.state == daemon_client.ANSWERED:
            sys.stderr.write(reply.stderr)
            sys.stdout.write(reply.stdout)
            return reply.exit
        if reply.state == daemon_client.TIMED_OUT:
            return _gave_up(stdin, reply.reason, sys.stdout)
        asked = reply.state
    if asked == "lost":
        env = _after_lost_call(env, stdin)
    # This process lives for one call: collecting cycles while pydantic and pyroute2
    # import (hundreds of thousands of objects) costs ~10-15 ms and frees nothing
    # that exit would not. (The daemon calls run_in_process directly, with gc on.)
    import gc

    gc.disable()
    return run_in_process(env, stdin, sys.stdout, sys.stderr)


def run_in_process(env, stdin: bytes, stdout, stderr) -> int:
    """One CNI call in this process; the node daemon runs this same function per request."""
    from . import faults
    from .oplog import BRIDGE_LOG_KEYS, run_logged

    faults.arm(env.get(faults.ENV_VAR))  # test-only; unset in production
    return run_logged("cni-bridge", _load_plugin, env, stdin, stdout, BRIDGE_LOG_KEYS, stderr)


def _gave_up(stdin: bytes, reason: str, stdout) -> int:
    """The daemon may still be running the call: never redo it here, let the runtime retry."""
    from .protocol.errors import CNIError, Code
    from .protocol.runner import write_error

    write_error(stdout, CNIError(Code.TRY_AGAIN_LATER, f"the cni-bridge daemon gave no answer: {reason}",
                                 "the daemon stops or undoes a call whose plugin has gone; retry the call"), stdin)
    return 1


def _after_lost_call(env, stdin: bytes) -> dict:
    """The daemon took the call and its worker died before answering: prepare to redo it in-process.

    DEL, CHECK, GC and STATUS are safe to repeat. An ADD may have been half done
    (an IP reserved, the container interface made), and a repeated ADD would fail
    on those leftovers, so undo them first with a DEL of the same attachment: the
    runtime sends no second ADD for a (container, ifname) without a DEL, so
    anything found belongs to the lost call. A test fault injected into the call
    fired in the daemon and is not fired again.
    """
    from io import StringIO

    from .faults import ENV_VAR

    env = {k: v for k, v in env.items() if k != ENV_VAR}
    if env.get("CNI_COMMAND") == "ADD":
        run_in_process({**env, "CNI_COMMAND": "DEL"}, stdin, StringIO(), StringIO())
    return env


def _load_plugin():
    from .plugin import BridgePlugin

    return BridgePlugin()


if __name__ == "__main__":
    sys.exit(main())
