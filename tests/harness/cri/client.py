"""A CRI client for the calls kubelet makes around a pod's network (runtime.v1).

Thin on purpose: each method is one RPC and returns plain Python values, so a test reads
like kubelet's side of the conversation. gRPC errors propagate as grpc.RpcError (the CNI
plugin's message, when one failed, is in `.details()`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Optional

import grpc

from tests.harness.cri.proto import load

pb, pb_grpc = load()
CALL_TIMEOUT = 120.0   # a bound on one RPC, never a measured duration


@dataclass(frozen=True)
class PodSpec:
    """What kubelet sends for a pod: its identity (K8S_POD_* in CNI_ARGS) and host ports."""
    name: str
    namespace: str
    uid: str
    port_mappings: tuple[tuple[str, int, int], ...] = ()   # (protocol, container port, host port)
    hostname: str = ""


@dataclass(frozen=True)
class SandboxStatus:
    id: str
    state: str                     # SANDBOX_READY or SANDBOX_NOTREADY
    ip: str
    additional_ips: list[str]
    pid: int                       # the pause process (verbose info)
    netns: str                     # the pod's network namespace path (verbose info)
    info: dict = field(default_factory=dict)


class CriClient:
    def __init__(self, socket_path: str) -> None:
        self.channel = grpc.insecure_channel(f"unix://{socket_path}")
        self.stub = pb_grpc.RuntimeServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def version(self) -> tuple[str, str, str]:
        """(runtime name, runtime version, CRI API version)."""
        got = self.stub.Version(pb.VersionRequest(version="v1"), timeout=CALL_TIMEOUT)
        return got.runtime_name, got.runtime_version, got.runtime_api_version

    def conditions(self) -> dict[str, tuple[bool, str, str]]:
        """Status conditions by type: RuntimeReady, NetworkReady -> (status, reason, message)."""
        got = self.stub.Status(pb.StatusRequest(), timeout=CALL_TIMEOUT)
        return {c.type: (c.status, c.reason, c.message) for c in got.status.conditions}

    def status_info(self) -> dict[str, str]:
        """Status(verbose): JSON documents by key; "cniconfig" is the CNI config containerd loaded."""
        return dict(self.stub.Status(pb.StatusRequest(verbose=True), timeout=CALL_TIMEOUT).info)

    def network_ready(self) -> bool:
        return self.conditions().get("NetworkReady", (False, "", ""))[0]

    def run_pod_sandbox(self, pod: PodSpec, cgroup_parent: str = "", timeout: float = CALL_TIMEOUT) -> str:
        config = pb.PodSandboxConfig(
            metadata=pb.PodSandboxMetadata(name=pod.name, namespace=pod.namespace, uid=pod.uid, attempt=0),
            hostname=pod.hostname or pod.name,
            port_mappings=[pb.PortMapping(protocol=pb.Protocol.Value(proto.upper()),
                                          container_port=container, host_port=host)
                           for proto, container, host in pod.port_mappings],
            labels={"io.kubernetes.pod.name": pod.name, "io.kubernetes.pod.namespace": pod.namespace,
                    "io.kubernetes.pod.uid": pod.uid},
            linux=pb.LinuxPodSandboxConfig(cgroup_parent=cgroup_parent),
        )
        got = self.stub.RunPodSandbox(pb.RunPodSandboxRequest(config=config), timeout=timeout)
        return got.pod_sandbox_id

    def stop_pod_sandbox(self, sandbox_id: str) -> None:
        self.stub.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sandbox_id), timeout=CALL_TIMEOUT)

    def remove_pod_sandbox(self, sandbox_id: str) -> None:
        self.stub.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sandbox_id), timeout=CALL_TIMEOUT)

    def pod_sandbox_status(self, sandbox_id: str) -> SandboxStatus:
        got = self.stub.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=sandbox_id, verbose=True),
                                         timeout=CALL_TIMEOUT)
        info = json.loads(got.info.get("info", "{}"))
        status = got.status
        return SandboxStatus(
            id=status.id, state=pb.PodSandboxState.Name(status.state), ip=status.network.ip,
            additional_ips=[extra.ip for extra in status.network.additional_ips],
            pid=int(info.get("pid", 0)), netns=_netns_path(info), info=info)

    def list_pod_sandbox(self, ready_only: bool = False) -> list[tuple[str, str, str]]:
        """(id, pod name, state) of every sandbox containerd knows."""
        flt = pb.PodSandboxFilter(state=pb.PodSandboxStateValue(state=pb.SANDBOX_READY)) if ready_only else None
        got = self.stub.ListPodSandbox(pb.ListPodSandboxRequest(filter=flt), timeout=CALL_TIMEOUT)
        return [(s.id, s.metadata.name, pb.PodSandboxState.Name(s.state)) for s in got.items]


def _netns_path(info: dict) -> str:
    """The netns path from containerd 1.6's verbose sandbox info (runtimeSpec namespaces)."""
    spec: Optional[dict] = info.get("runtimeSpec")
    for ns in (spec or {}).get("linux", {}).get("namespaces", []):
        if ns.get("type") == "network":
            return ns.get("path", "")
    return ""
