"""Fixtures for nodes as Docker containers: a private engine, the node image, the bundle,
and pytest-docker bringing the compose project up and down on that engine."""
from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest

from tests.e2e.nodes.engine import REPO, PrivateDocker, missing, node_image

HERE = Path(__file__).resolve().parent
BUNDLE = REPO / "build" / "test-bundle" / "cni-bin"     # shared with tests/integration/test_bundle.py


def pytest_collection_modifyitems(config, items):
    reason = None
    for item in items:
        if HERE in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.docker_nodes)
            reason = reason or missing() or ""
            if reason:
                item.add_marker(pytest.mark.skip(reason=f"nodes as containers: {reason}"))


@pytest.fixture(scope="session")
def private_docker():
    trust_key = Path("/etc/docker/key.json")      # where dockerd would put its key by default
    had_key = trust_key.exists()
    engine = PrivateDocker()
    engine.start()
    try:
        yield engine
    finally:
        engine.stop()
    # The engine ran in its own network namespace: the host must hold nothing of it.
    leftovers = subprocess.run(["ip", "-o", "link", "show", "docker0"], capture_output=True, text=True).stdout
    chains = [line for line in subprocess.run(["iptables", "-w", "-S"], capture_output=True, text=True).stdout.splitlines()
              if "DOCKER" in line]
    assert leftovers == "" and chains == [], f"Docker left links or iptables chains on the host: {leftovers} {chains}"
    assert trust_key.exists() == had_key, "dockerd wrote /etc/docker/key.json"


@pytest.fixture(scope="session")
def bundle_dir() -> Path:
    proc = subprocess.run([str(REPO / "scripts" / "bundle.sh"), str(BUNDLE)], cwd=REPO,
                          capture_output=True, text=True, timeout=1200)
    if proc.returncode != 0:
        pytest.fail(f"scripts/bundle.sh failed:\n{(proc.stdout + proc.stderr)[-3000:]}", pytrace=False)
    return BUNDLE


@pytest.fixture(scope="session")
def cluster_dir(tmp_path_factory) -> Path:
    """Mounted read-only at /cluster in every node: the topology file the agents read."""
    return tmp_path_factory.mktemp("docker-cluster")


@pytest.fixture(scope="session")
def docker_compose_command(private_docker, bundle_dir, cluster_dir) -> str:
    """pytest-docker runs compose through a shell: point it at the private engine and fill
    the compose file's variables, without touching this process's environment."""
    variables = {
        "DOCKER_HOST": f"unix://{private_docker.socket}",
        "NODE_IMAGE": node_image(private_docker),
        "BUNDLE_DIR": str(bundle_dir),
        "INSTALL_SCRIPT": str(REPO / "conf" / "image" / "install-cni.sh"),
        "CLUSTER_DIR": str(cluster_dir),
    }
    return "env " + " ".join(f"{k}={shlex.quote(v)}" for k, v in variables.items()) + " docker-compose"


@pytest.fixture(scope="session")
def docker_compose_file() -> str:
    return str(HERE / "docker-compose.yml")


@pytest.fixture(scope="session")
def docker_compose_project_name() -> str:
    return f"cnie2e{os.getpid()}"


@pytest.fixture(scope="session")
def docker_setup():
    return ["up -d"]          # compose v1 (Debian's docker-compose) has no --wait


@pytest.fixture(scope="session")
def docker_cleanup():
    return ["down -v --timeout 5"]
