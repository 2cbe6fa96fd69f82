"""Shared fixtures: scratch namespaces and a CNI host for integration tests."""
from __future__ import annotations

import pytest

from tests.support.netns import CniHost, Netns, can_use_netns, make_cni_path


def pytest_collection_modifyitems(config, items):
    reason = can_use_netns()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "integration" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def make_netns():
    """Factory for scratch namespaces; all are deleted at teardown, pass or fail."""
    made: list[Netns] = []

    def factory(prefix: str = "t") -> Netns:
        ns = Netns(prefix)
        made.append(ns)
        return ns

    yield factory
    for ns in reversed(made):
        ns.delete()


@pytest.fixture
def cni_host(make_netns, tmp_path) -> CniHost:
    """A scratch "host" netns in which the plugins run, with its own CNI_PATH and dataDir."""
    host = make_netns("h")
    return CniHost(netns=host, cni_path=make_cni_path(tmp_path / "bin"), data_dir=tmp_path / "ipam")
