"""kind end-to-end tests: every test here is marked `kind` and skips without Docker and kind."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Optional

import pytest

HERE = Path(__file__).resolve().parent


def missing_tools() -> Optional[str]:
    """None when a Docker engine, kind and kubectl are all usable, else what is missing."""
    problems = [f"{tool} is not installed" for tool in ("docker", "kind", "kubectl") if shutil.which(tool) is None]
    if shutil.which("docker") is not None:
        try:
            info = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=30)
            if info.returncode != 0:
                problems.append("no Docker engine answers (docker info failed)")
        except subprocess.TimeoutExpired:
            problems.append("docker info timed out")
    return "; ".join(problems) or None


def pytest_collection_modifyitems(config, items):
    reason = None
    checked = False
    for item in items:
        path = Path(str(item.fspath))
        if HERE not in path.parents or HERE / "nodes" in path.parents:   # nodes/: Docker only, no kind
            continue
        item.add_marker(pytest.mark.kind)
        if not checked:
            reason, checked = missing_tools(), True
        if reason:
            item.add_marker(pytest.mark.skip(reason=f"kind e2e needs a Docker engine, kind and kubectl: {reason}"))


@pytest.fixture(scope="session")
def docker_compose_file():
    """pytest-docker: the outside server on kind's network."""
    return str(HERE / "docker-compose.yml")


@pytest.fixture(scope="session")
def docker_compose_project_name():
    return "cni-bridge-e2e"
