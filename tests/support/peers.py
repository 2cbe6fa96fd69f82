"""Small pieces the multi-node tests share: a pod-side TCP server that answers each
connection with the peer address it saw (so a test can tell NAT from none), its client,
and the environment the agent runs with."""
from __future__ import annotations

import os

# Dual-stack: accepts IPv4 (as ::ffff:a.b.c.d) and IPv6; answers with the peer address it saw.
PEER_ECHO_SERVER = """
import socket, sys
s = socket.socket(socket.AF_INET6)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind(("::", int(sys.argv[1])))
s.listen(16)
print("ready", flush=True)
while True:
    c, peer = s.accept()
    c.sendall(peer[0].removeprefix("::ffff:").encode())
    c.close()
"""
PEER_ECHO_CLIENT = """
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)
print(c.recv(100).decode())
"""


def agent_env() -> dict:
    """This process's environment without CNI_ variables (the agent is not a CNI call)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("CNI_")}
