"""A private containerd (Debian's 1.6, with its CRI plugin) and a minimal CRI client, so the
tests drive the plugins the way kubelet does: RunPodSandbox / StopPodSandbox / RemovePodSandbox.

- `proto.py` compiles `runtime_v1.proto` (our excerpt of the CRI API) with grpcio-tools.
- `client.py` is the CRI client (RuntimeService over the containerd socket).
- `pause_image.py` builds the sandbox image from busybox-static (no registry is reachable).
- `layouts.py` lays out the CNI bin dir as pip, `make install` and `make bundle` do, and runs
  the node daemon beside it.
- `containerd.py` runs containerd with its own config, root, state and socket, inside a
  scratch "host" netns, and removes everything it made.
"""
