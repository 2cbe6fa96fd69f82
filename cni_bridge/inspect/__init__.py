"""`cni-bridge inspect`: the node's CNI state and checks with verdicts, read only.

`gather` reads the node into a `model.NodeView`, `checks` adds a verdict per
check, and `table`, `dot` and `NodeView.to_dict()` (JSON) print it; `cli`
is the entry point; `pools` (IPAM usage per range) also feeds the daemon's
metrics; `overlay` joins the agent's routes, neighbours and FDB entries into peers. Never on the exec'd plugin's path.
"""
