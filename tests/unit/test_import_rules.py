"""Import rules of the design, checked on the source (ast) and on real processes (sys.modules)."""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("cni_bridge", "ipam")


def source_files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path) -> set[str]:
    """Every module an import statement in `path` names, relative imports resolved."""
    tree = ast.parse(path.read_text(), str(path))
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.add(base)
            # `from pkg import sub` may import the submodule pkg.sub
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def top(module: str) -> str:
    return module.split(".")[0]


ALL_FILES = [p for pkg in PACKAGES for p in source_files(pkg)]


def test_the_scan_sees_the_code():
    names = {module_name(p) for p in ALL_FILES}
    assert {"cni_bridge.netlink", "cni_bridge.plugin", "cni_bridge.protocol.runner",
            "ipam.plugin", "ipam.filestore"} <= names
    # the resolver handles relative imports (netlink.py imports .protocol.errors)
    assert "cni_bridge.protocol.errors" in imported_modules(ROOT / "cni_bridge" / "netlink.py")


def test_only_the_netlink_adapter_imports_pyroute2():
    importers = sorted(module_name(p) for p in ALL_FILES
                       if any(top(m) == "pyroute2" for m in imported_modules(p)))
    assert importers == ["cni_bridge.netlink"]


# The netlink adapter layer: the adapter itself (which alone imports pyroute2), the raw
# rtnetlink client it drives the plugin's operations with, and the agent's extension of it
# for the overlay (VXLAN device, FDB, neighbours), the one user of the adapter's pyroute2
# IPRoute handle; it imports pyroute2 nowhere. Also the nftables masquerade backend's
# nf_tables netlink client (masq/nfnl.py), which speaks NETLINK_NETFILTER to the kernel
# with rtnl's attribute codec and error type (no rtnetlink requests of its own).
ADAPTER_LAYER = {"cni_bridge.netlink", "cni_bridge.rtnl", "cni_bridge.agent.overlay_netlink",
                 "cni_bridge.masq.nfnl"}


def uses_the_iproute_handle(path: Path) -> bool:
    """Touches `<something>.ipr` (the adapter's pyroute2 IPRoute object)."""
    return any(isinstance(node, ast.Attribute) and node.attr == "ipr" for node in ast.walk(ast.parse(path.read_text())))


def test_only_the_overlay_drives_pyroute2():
    users = {module_name(p) for p in ALL_FILES if uses_the_iproute_handle(p)}
    assert users == {"cni_bridge.agent.overlay_netlink"}


def test_only_the_adapter_layer_speaks_rtnetlink():
    importers = {module_name(p) for p in ALL_FILES if "cni_bridge.rtnl" in imported_modules(p)}
    assert importers <= ADAPTER_LAYER and "cni_bridge.netlink" in importers


def test_the_plugin_side_never_imports_the_agent():
    # The exec'd plugins must not load the agent (and its kernel code) by accident.
    # `cni-bridge inspect` is a tool for people, like the agent, and reads the agent's state.
    importers = sorted(module_name(p) for p in ALL_FILES
                       if not module_name(p).startswith(("cni_bridge.agent", "cni_bridge.inspect"))
                       and any(m.startswith("cni_bridge.agent") for m in imported_modules(p))
                       and module_name(p) != "cni_bridge.main")
    assert importers == []


@pytest.mark.parametrize("path", source_files("ipam"), ids=lambda p: p.name)
def test_ipam_never_imports_pyroute2_netlink_or_the_bridge_plugin(path):
    forbidden = {m for m in imported_modules(path)
                 if top(m) == "pyroute2" or m in ("cni_bridge.netlink", "cni_bridge.plugin")}
    assert forbidden == set()


@pytest.mark.parametrize("path", source_files("cni_bridge/protocol"), ids=lambda p: p.name)
def test_protocol_imports_only_the_standard_library_and_itself(path):
    outside = {m for m in imported_modules(path)
               if top(m) not in sys.stdlib_module_names and not m.startswith("cni_bridge.protocol")
               and m != "__future__" and not m.startswith("__future__.")}
    assert outside == set()


# -- real processes ------------------------------------------------------------------------

PROBE = """
import sys
sys.argv = ["plugin"]
{call}
heavy = sorted({{m.split(".")[0] for m in sys.modules}} & {{"pyroute2", "pydantic"}})
sys.stderr.write("\\nLOADED=" + ",".join(heavy) + "\\n")
sys.exit(rc)
"""


def probe(call: str, env: dict, stdin: bytes = b"") -> tuple[int, dict | None, set[str]]:
    base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run([sys.executable, "-c", PROBE.format(call=call)], input=stdin, cwd=ROOT,
                          env={**base, **env}, capture_output=True, timeout=60)
    err = proc.stderr.decode()
    loaded_line = [line for line in err.splitlines() if line.startswith("LOADED=")]
    assert loaded_line, err
    loaded = set(filter(None, loaded_line[-1][len("LOADED="):].split(",")))
    out = json.loads(proc.stdout) if proc.stdout.strip() else None
    return proc.returncode, out, loaded


def ipam_config(tmp_path) -> bytes:
    return json.dumps({
        "cniVersion": "1.1.0", "name": "probe", "type": "cni-bridge", "daemonSocket": "",
        "ipam": {"type": "cni-ipam", "dataDir": str(tmp_path), "ranges": [[{"subnet": "10.77.0.0/24"}]]},
    }).encode()


def test_the_probe_sees_pyroute2_when_it_is_imported():
    # control: the detection is real (loading the adapter's IPRoute class needs no root)
    rc, _, loaded = probe("from cni_bridge.netlink import _iproute_class\n_iproute_class()\nrc = 0", {})
    assert rc == 0 and "pyroute2" in loaded


def test_cni_ipam_add_never_loads_pyroute2(tmp_path):
    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "probe1", "CNI_NETNS": "/var/run/netns/probe",
           "CNI_IFNAME": "eth0", "CNI_PATH": "/opt/cni/bin"}
    rc, out, loaded = probe("from ipam.main import main\nrc = main()", env, ipam_config(tmp_path))
    assert rc == 0, out
    assert out["ips"][0]["address"] == "10.77.0.2/24"
    assert "pyroute2" not in loaded and "pydantic" in loaded


def test_cni_bridge_version_loads_neither_pyroute2_nor_pydantic():
    rc, out, loaded = probe("from cni_bridge.main import main\nrc = main()", {"CNI_COMMAND": "VERSION"},
                            b'{"cniVersion": "1.0.0"}')
    assert rc == 0 and out["cniVersion"] == "1.0.0" and "1.1.0" in out["supportedVersions"]
    assert loaded == set()


def test_cni_bridge_status_with_in_process_ipam_never_loads_pyroute2(tmp_path):
    env = {"CNI_COMMAND": "STATUS", "CNI_PATH": "/opt/cni/bin"}
    call = ("import os\nfrom cni_bridge.main import run_in_process\n"
            "rc = run_in_process(os.environ, sys.stdin.buffer.read(), sys.stdout, sys.stderr)")
    rc, out, loaded = probe(call, env, ipam_config(tmp_path))
    assert rc == 0, out
    assert "pyroute2" not in loaded


# -- the node view and the daemon's metrics stay off the plugin's path ------------------------

NODE_TOOLS = ("prometheus_client", "cni_bridge.metrics", "cni_bridge.inspect", "cni_bridge.conflist")


def test_only_the_metrics_module_imports_prometheus_client():
    importers = sorted(module_name(p) for p in ALL_FILES
                       if any(top(m) == "prometheus_client" for m in imported_modules(p)))
    assert importers == ["cni_bridge.metrics"]


@pytest.mark.parametrize("path", [p for p in ALL_FILES if not module_name(p).startswith(
    ("cni_bridge.inspect", "cni_bridge.metrics", "cni_bridge.daemon", "cni_bridge.main"))], ids=module_name)
def test_plugin_modules_never_import_the_node_tools(path):
    """Only `inspect` itself, the daemon (metrics) and main's lazy subcommand import them."""
    assert {m for m in imported_modules(path) if m.startswith(NODE_TOOLS)} == set()


NODE_TOOLS_PROBE = """
import os, sys, io
from cni_bridge.main import run_in_process
import cni_bridge.plugin, ipam.plugin, ipam.main, cni_bridge.daemon_client
rc = run_in_process(dict(os.environ), sys.stdin.buffer.read(), io.StringIO(), io.StringIO())
print(",".join(sorted(m for m in sys.modules if m.startswith({tools!r}))))
sys.exit(rc)
"""


def test_a_plugin_call_loads_neither_inspect_nor_metrics(tmp_path):
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(ROOT), "CNI_COMMAND": "STATUS",
           "CNI_PATH": "/opt/cni/bin"}
    proc = subprocess.run([sys.executable, "-c", NODE_TOOLS_PROBE.format(tools=NODE_TOOLS)],
                          input=ipam_config(tmp_path), cwd=ROOT, env=env, capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.decode().strip() == ""
    # control: the probe sees them when they are imported
    proc = subprocess.run([sys.executable, "-c", "import sys, cni_bridge.inspect.cli\n"
                           "print(sorted(m for m in sys.modules if m.startswith(('cni_bridge.inspect', "
                           "'cni_bridge.conflist'))))"], cwd=ROOT, env=env, capture_output=True, timeout=60)
    assert "cni_bridge.inspect.cli" in proc.stdout.decode() and "cni_bridge.conflist" in proc.stdout.decode()
