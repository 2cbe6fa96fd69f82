"""runner.run(): env + stdin in, result or error JSON out, driven with plain dicts and bytes."""
from __future__ import annotations

import ipaddress
import json

import pytest

from cni_bridge.protocol.errors import CNIError, Code
from cni_bridge.protocol.result import IPConfig, Result
from cni_bridge.protocol.runner import Request

from .helpers import cni_env, run_plugin

CONFIG = {"cniVersion": "1.0.0", "name": "net", "type": "fake"}


class FakePlugin:
    """Records every call; behaviour per verb set by the test."""

    def __init__(self, raise_on: dict[str, BaseException] | None = None) -> None:
        self.calls: list[tuple[str, Request]] = []
        self.raise_on = raise_on or {}

    def _record(self, verb: str, req: Request) -> None:
        self.calls.append((verb, req))
        if verb in self.raise_on:
            raise self.raise_on[verb]

    def add(self, req: Request) -> Result:
        self._record("ADD", req)
        return Result(ips=(IPConfig(ipaddress.ip_interface("10.1.0.7/24"), ipaddress.ip_address("10.1.0.1")),))

    def delete(self, req: Request) -> None:
        self._record("DEL", req)

    def check(self, req: Request) -> None:
        self._record("CHECK", req)

    def gc(self, req: Request) -> None:
        self._record("GC", req)

    def status(self, req: Request) -> None:
        self._record("STATUS", req)


def loader(plugin):
    loads = []

    def load():
        loads.append(1)
        return plugin

    load.count = loads  # type: ignore[attr-defined]
    return load


def assert_error(rc, out, err, code):
    assert rc == 1
    assert set(out) == {"cniVersion", "code", "msg", "details"}
    assert out["code"] == code
    assert "Traceback" not in json.dumps(out) and "Traceback" not in err
    return out


@pytest.mark.parametrize("version", ["0.3.1", "1.0.0"])
def test_add_success_prints_result_in_the_config_version(version):
    plugin = FakePlugin()
    rc, out, err = run_plugin(loader(plugin), cni_env("ADD"), {**CONFIG, "cniVersion": version})
    assert rc == 0 and err == ""
    assert out["cniVersion"] == version
    assert out["ips"][0]["address"] == "10.1.0.7/24"
    assert ("version" in out["ips"][0]) == (version == "0.3.1")
    verb, req = plugin.calls[0]
    assert verb == "ADD" and req.version == version and req.config["name"] == "net"
    assert req.cmd.container_id == "c0ffee01" and req.stdin == json.dumps({**CONFIG, "cniVersion": version}).encode()


@pytest.mark.parametrize("verb", ["DEL", "CHECK", "GC", "STATUS"])
def test_other_verbs_print_nothing_on_success(verb):
    plugin = FakePlugin()
    rc, out, _ = run_plugin(loader(plugin), cni_env(verb), {**CONFIG, "cniVersion": "1.1.0"})
    assert rc == 0 and out is None
    assert [c[0] for c in plugin.calls] == [verb]


def test_version_never_loads_the_plugin():
    load = loader(FakePlugin())
    rc, out, _ = run_plugin(load, {"CNI_COMMAND": "VERSION"}, stdin=b'{"cniVersion": "0.4.0"}')
    assert rc == 0 and out["cniVersion"] == "0.4.0" and "1.1.0" in out["supportedVersions"]
    assert load.count == []


@pytest.mark.parametrize("stdin", [b"\xff\xfe\x00garbage", b"{not json", b""])
def test_undecodable_stdin_is_code_6(stdin):
    load = loader(FakePlugin())
    rc, out, err = run_plugin(load, cni_env("ADD"), stdin=stdin)
    assert_error(rc, out, err, 6)
    assert out["cniVersion"] == "1.1.0"
    assert load.count == []  # bad input never pays for the plugin's imports


@pytest.mark.parametrize("stdin", [b"[]", b'"text"', b"42", b"null"])
def test_non_object_json_is_code_6(stdin):
    rc, out, err = run_plugin(loader(FakePlugin()), cni_env("ADD"), stdin=stdin)
    assert_error(rc, out, err, 6)
    assert "JSON object" in out["msg"]


def test_missing_cni_version_is_code_1():
    rc, out, err = run_plugin(loader(FakePlugin()), cni_env("ADD"), {"name": "n", "type": "t"})
    assert_error(rc, out, err, 1)


def test_non_string_cni_version_is_code_1():
    rc, out, err = run_plugin(loader(FakePlugin()), cni_env("ADD"), {**CONFIG, "cniVersion": 1.0})
    assert_error(rc, out, err, 1)


def test_check_below_0_4_0_refused_before_the_plugin_runs():
    plugin = FakePlugin()
    rc, out, err = run_plugin(loader(plugin), cni_env("CHECK"), {**CONFIG, "cniVersion": "0.3.1"})
    assert_error(rc, out, err, 1)
    assert out["cniVersion"] == "0.3.1"   # errors answer in the caller's version when we speak it
    assert plugin.calls == []


def test_bad_env_is_code_4_in_the_config_version():
    rc, out, err = run_plugin(loader(FakePlugin()), cni_env("ADD", CNI_IFNAME=None), CONFIG)
    out = assert_error(rc, out, err, 4)
    assert "CNI_IFNAME" in out["msg"] and out["cniVersion"] == "1.0.0"


def test_plugin_cni_error_is_reported_with_exit_1():
    plugin = FakePlugin({"ADD": CNIError(Code.RANGE_EXHAUSTED, "no addresses left", "widen the range")})
    rc, out, err = run_plugin(loader(plugin), cni_env("ADD"), CONFIG)
    assert_error(rc, out, err, 100)
    assert out == {"cniVersion": "1.0.0", "code": 100, "msg": "no addresses left", "details": "widen the range"}
    assert "no addresses left" in err


@pytest.mark.parametrize("verb", ["ADD", "DEL"])
def test_unexpected_exception_is_code_999_without_traceback(verb):
    plugin = FakePlugin({verb: KeyError("boom-key")})
    rc, out, err = run_plugin(loader(plugin), cni_env(verb), CONFIG)
    assert_error(rc, out, err, 999)
    assert "KeyError" in out["msg"] and "boom-key" in out["msg"]
    assert "File \"" not in out["msg"] + out["details"] + err


def test_unexpected_exception_traceback_goes_only_to_on_error():
    import io

    from cni_bridge.protocol.runner import run

    seen = []
    plugin = FakePlugin({"ADD": ZeroDivisionError("division by zero")})
    out, err = io.StringIO(), io.StringIO()
    rc = run(lambda: plugin, cni_env("ADD"), json.dumps(CONFIG).encode(), out, err,
             on_error=lambda exc, tb: seen.append((exc, tb)))
    assert rc == 1 and json.loads(out.getvalue())["code"] == 999
    assert isinstance(seen[0][0], ZeroDivisionError)
    assert "Traceback" in seen[0][1] and "Traceback" not in out.getvalue() + err.getvalue()


def test_plugin_that_fails_to_load_is_999():
    def load():
        raise ImportError("no module named pyroute2")

    rc, out, err = run_plugin(load, cni_env("ADD"), CONFIG)
    assert_error(rc, out, err, 999)
    assert "ImportError" in out["msg"]
