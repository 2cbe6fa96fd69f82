import pytest

from tests.integration.cnitest import Cni


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "tests/integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture
def cni(cni_host, tmp_path) -> Cni:
    """The scratch host netns with a runner that checks every plugin answer for tracebacks."""
    return Cni(cni_host, tmp_path)


@pytest.fixture
def pod(make_netns):
    """A fresh container netns (deleted at teardown)."""
    return make_netns("p")


def _built(build) -> object:
    """The path a tests.support.runtime build returns; skip when the tools cannot be
    installed here, fail when they are present and the build breaks."""
    path, why = build()
    if path is None:
        if why.startswith("BUILD FAILED"):
            pytest.fail(why, pytrace=False)
        pytest.skip(why)
    return path


@pytest.fixture(scope="session")
def cnitool_bin():
    """build/cnitool (the libcni harness), built once per session by tests/harness/build_cnitool.sh."""
    from tests.support.runtime import build_cnitool

    return _built(build_cnitool)


@pytest.fixture(scope="session")
def shim_bin():
    """build/shim/cni-bridge (the static front end), built once per session by scripts/build_shim.sh."""
    from tests.support.runtime import build_shim

    return _built(build_shim)
