"""Review fixes (plugin side), no root: protocol edge cases, planning, CHECK and GC logic."""
from __future__ import annotations

import pytest

from cni_bridge.protocol.errors import Code

from .helpers import cni_env, run_plugin
from .test_runner import FakePlugin, loader

DEEP = b"[" * 100000


# -- stdin nested deeper than the recursion limit ----------------------------------------
@pytest.mark.parametrize("command", ["ADD", "DEL", "CHECK", "GC", "STATUS"])
def test_deeply_nested_stdin_is_code_6(command):
    plugin = FakePlugin()
    rc, out, err = run_plugin(loader(plugin), cni_env(command), stdin=DEEP)
    assert rc == 1 and out["code"] == Code.DECODE_FAILURE, out
    assert "nested too deeply" in out["details"]
    assert "Traceback" not in err and plugin.calls == []


def test_version_with_deeply_nested_stdin_still_answers():
    rc, out, _ = run_plugin(loader(FakePlugin()), cni_env("VERSION"), stdin=DEEP)
    assert rc == 0 and "1.1.0" in out["supportedVersions"]


def test_logged_run_survives_deeply_nested_stdin(tmp_path):
    """oplog.run_logged decodes stdin (looking for logFile) before the runner does."""
    import io

    from cni_bridge.oplog import BRIDGE_LOG_KEYS, run_logged

    out, err = io.StringIO(), io.StringIO()
    rc = run_logged("cni-bridge", loader(FakePlugin()), cni_env("ADD"), DEEP, out, BRIDGE_LOG_KEYS, err)
    assert rc == 1 and '"code": 6' in out.getvalue()
