"""The operator log: one line per call in the `logFile`, rotated by size, never on stdout."""
from __future__ import annotations

import io
import json
import re

import pytest

from cni_bridge import oplog
from cni_bridge.protocol.errors import CNIError, Code
from tests.support.netns import unique
from tests.support.reliability import bridge_conf, ipam_conf

LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} \[\d+\] (INFO|WARNING|ERROR) (\S+): (.*)$")


def lines(path):
    return [LINE.match(line) for line in path.read_text().splitlines() if LINE.match(line)]


@pytest.fixture(autouse=True)
def _close_logs():
    yield
    oplog.close_logs()


def test_bridge_calls_are_logged(cni_host, make_netns, tmp_path):
    log = tmp_path / "cni.log"
    conf = {**bridge_conf(cni_host.data_dir, unique("br"), network="logged", subnet="10.81.0.0/24"),
            "logFile": str(log)}
    pod = make_netns("p")
    res = cni_host.run("cni-bridge", "ADD", conf, container_id="c1", netns=pod.path)
    assert res.rc == 0
    assert json.loads(res.stdout)["ips"]               # stdout is still exactly the result
    assert cni_host.run("cni-bridge", "DEL", conf, container_id="c1", netns=pod.path).rc == 0
    bad = {**conf, "mtu": 1}
    assert cni_host.run("cni-bridge", "ADD", bad, container_id="c2", netns=pod.path).rc == 1

    found = lines(log)
    assert [m.group(2) for m in found] == ["cni-bridge"] * 3
    add, delete, failed = (m.group(3) for m in found)
    assert re.match(rf"ADD net=logged cid=c1 if=eth0 netns={pod.path} -> ok 10\.81\.0\.\d+/24 \(\d+\.\d{{3}}s\)$",
                    add), add
    assert re.match(r"DEL net=logged cid=c1 if=eth0 .*-> ok \(\d+\.\d{3}s\)$", delete), delete
    assert found[2].group(1) == "WARNING" and "-> error 7: invalid network config (mtu" in failed


def test_ipam_logs_to_ipam_log_file_with_store_warnings(cni_host, tmp_path):
    log = tmp_path / "ipam.log"
    conf = ipam_conf(cni_host.data_dir, network="logged", subnet="10.82.0.0/28", logFile=str(log))
    (cni_host.data_dir / "logged").mkdir(parents=True)
    (cni_host.data_dir / "logged" / "10.82.0.2").write_text("not a record")   # (a bare word reads as an old host-local record)
    res = cni_host.run("cni-ipam", "ADD", conf, container_id="c1", netns="/none")
    assert res.rc == 0, res.stdout
    assert "damaged" not in res.stderr                 # the logged skip went to the log
    text = log.read_text()
    assert "WARNING ipam.filestore: reservation file for 10.82.0.2" in text
    assert "INFO cni-ipam: ADD net=logged cid=c1 if=eth0 netns=/none -> ok 10.82.0.3/28" in text


def test_unusable_log_file_does_not_fail_the_call(cni_host, tmp_path):
    conf = ipam_conf(cni_host.data_dir, network="logged", logFile=str(tmp_path / "missing" / "x.log"))
    res = cni_host.run("cni-ipam", "ADD", conf, container_id="c1", netns="/none")
    assert res.rc == 0 and json.loads(res.stdout)["ips"]
    assert "not logging" in res.stderr and "Traceback" not in res.stderr


class Exploding:
    def add(self, req):
        raise RuntimeError("boom")

    def delete(self, req):
        raise CNIError(Code.IO_FAILURE, "disk gone")

    check = gc = status = delete


ENV = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_IFNAME": "eth0", "CNI_NETNS": "/x",
       "CNI_PATH": "/x"}


def test_unexpected_exception_traceback_goes_to_the_log_only(tmp_path):
    log = tmp_path / "cni.log"
    stdin = json.dumps({"cniVersion": "1.1.0", "name": "n", "type": "t", "logFile": str(log)}).encode()
    out, err = io.StringIO(), io.StringIO()
    rc = oplog.run_logged("cni-bridge", Exploding, ENV, stdin, out, oplog.BRIDGE_LOG_KEYS, err)
    assert rc == 1
    assert json.loads(out.getvalue())["code"] == 999
    assert "Traceback" not in out.getvalue() + err.getvalue()
    text = log.read_text()
    assert "ERROR cni-bridge: unexpected RuntimeError during ADD net=n cid=c1" in text
    assert "Traceback (most recent call last)" in text and "RuntimeError: boom" in text
    assert "-> error 999: internal error: RuntimeError: boom" in text


def test_log_rotates_by_size(tmp_path, monkeypatch):
    monkeypatch.setattr(oplog, "MAX_BYTES", 1000)
    log = tmp_path / "cni.log"
    stdin = json.dumps({"cniVersion": "1.1.0", "name": "n", "type": "t", "logFile": str(log)}).encode()
    env = {**ENV, "CNI_COMMAND": "DEL"}
    for _ in range(40):
        oplog.run_logged("cni-bridge", Exploding, env, stdin, io.StringIO(), oplog.BRIDGE_LOG_KEYS, io.StringIO())
    rotated = sorted(p.name for p in tmp_path.iterdir())
    assert rotated == ["cni.log", "cni.log.1", "cni.log.2", "cni.log.3"]
    assert all(p.stat().st_size <= 1000 for p in tmp_path.iterdir())
    assert "error 5: disk gone" in log.read_text()


def test_default_is_no_log(tmp_path):
    stdin = json.dumps({"cniVersion": "1.1.0", "name": "n", "type": "t"}).encode()
    out = io.StringIO()
    assert oplog.run_logged("cni-bridge", Exploding, {**ENV, "CNI_COMMAND": "DEL"}, stdin, out,
                            oplog.BRIDGE_LOG_KEYS, io.StringIO()) == 1
    assert oplog._handlers == {} and json.loads(out.getvalue())["code"] == 5


def test_log_file_keys():
    assert oplog.find_log_file({"logFile": "/a", "ipam": {"logFile": "/b"}}, oplog.BRIDGE_LOG_KEYS) == "/a"
    assert oplog.find_log_file({"logFile": "/a", "ipam": {"logFile": "/b"}}, oplog.IPAM_LOG_KEYS) == "/b"
    assert oplog.find_log_file({"logFile": "/a", "ipam": {}}, oplog.IPAM_LOG_KEYS) == "/a"
    assert oplog.find_log_file({"logFile": 3, "ipam": "x"}, oplog.IPAM_LOG_KEYS) is None
    assert oplog.find_log_file(["not", "a", "dict"], oplog.BRIDGE_LOG_KEYS) is None
