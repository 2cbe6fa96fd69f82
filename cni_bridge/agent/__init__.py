"""The node agent: `cni-bridge agent --node NAME`.

Kubernetes gives every Node its own `spec.podCIDR`; the agent turns the
cluster's nodes into what one node needs:

- its own conflist (cni-bridge + cni-ipam serving the node's podCIDR, portmap),
- a route `<podCIDR> via <InternalIP>` for every other node,
- one masquerade chain for pod traffic that leaves the cluster CIDR.

`topology` and `desired` are pure (unit-tested without root); `apply` touches
the kernel (through the netlink adapter and iptables) and the conf dir;
`kube` feeds Node objects from the API server; `cli` is the entry point.
"""
