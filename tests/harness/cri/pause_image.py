"""The sandbox ("pause") image, built here: no registry is reachable on these machines.

An OCI image layout tar holding one layer: a statically linked busybox (Debian's
busybox-static) and a shell script as the entrypoint that sleeps until SIGTERM or SIGINT.
(The real pause binary does the same; PID 1 ignores signals it has no handler for, so a
bare `sleep` would hang on a TERM.) `ctr images import` reads the image name from the
`io.containerd.image.name` annotation of the index.
"""
from __future__ import annotations

import hashlib
import io
import json
import platform
import tarfile
from pathlib import Path

from tests.harness.podman_env import find_static_busybox

PAUSE_SCRIPT = b"#!/bin/sh\ntrap 'exit 0' TERM INT\nwhile :; do sleep 3600 & wait $!; done\n"
_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le", "s390x": "s390x"}


def _layer(busybox: Path) -> bytes:
    """An uncompressed layer tar: /bin/busybox, /bin/sh and /bin/sleep, and /pause."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        def add(name: str, kind: bytes, mode: int, data: bytes = b"", link: str = "") -> None:
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.linkname, info.size = kind, mode, link, len(data)
            tar.addfile(info, io.BytesIO(data) if data else None)
        add("bin", tarfile.DIRTYPE, 0o755)
        add("bin/busybox", tarfile.REGTYPE, 0o755, busybox.read_bytes())
        for applet in ("sh", "sleep"):
            add(f"bin/{applet}", tarfile.SYMTYPE, 0o777, link="busybox")
        add("pause", tarfile.REGTYPE, 0o755, PAUSE_SCRIPT)
    return buf.getvalue()


def _blob(tar: tarfile.TarFile, data: bytes) -> str:
    digest = hashlib.sha256(data).hexdigest()
    info = tarfile.TarInfo(f"blobs/sha256/{digest}")
    info.size, info.mode = len(data), 0o644
    tar.addfile(info, io.BytesIO(data))
    return f"sha256:{digest}"


def build_pause_image(out: Path, name: str) -> Path:
    """Write the image as an OCI layout tar at `out`, named `name`; returns `out`."""
    busybox = find_static_busybox()
    if busybox is None:
        raise RuntimeError("no statically linked busybox (apt-get install busybox-static)")
    arch = _ARCH.get(platform.machine(), platform.machine())
    layer = _layer(Path(busybox))
    out.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(out, "w") as tar:
        layer_digest = _blob(tar, layer)
        config = json.dumps({
            "architecture": arch, "os": "linux",
            "config": {"Entrypoint": ["/pause"], "Env": ["PATH=/bin"], "WorkingDir": "/"},
            "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
        }).encode()
        config_digest = _blob(tar, config)
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": config_digest, "size": len(config)},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                        "digest": layer_digest, "size": len(layer)}],
        }).encode()
        manifest_digest = _blob(tar, manifest)
        index = {"schemaVersion": 2, "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest, "size": len(manifest),
            "platform": {"architecture": arch, "os": "linux"},
            "annotations": {"io.containerd.image.name": name,
                            "org.opencontainers.image.ref.name": name.rsplit(":", 1)[-1]},
        }]}
        for filename, doc in (("oci-layout", {"imageLayoutVersion": "1.0.0"}), ("index.json", index)):
            data = json.dumps(doc).encode()
            info = tarfile.TarInfo(filename)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return out
