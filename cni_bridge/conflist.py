"""Network config files as a runtime reads them, and the checks ADD makes on a config.

A runtime (libcni) reads `*.conf`, `*.conflist` and `*.json` from a conf dir
in name order and hands each plugin of a list its own config with the list's
`name` and `cniVersion` injected. `validate_for_add` runs the checks an ADD
makes before it touches anything, with the functions ADD itself calls (version
gate, BridgeConf, and IPAMNetConf when IPAM runs in-process), so a typo shows
here before a pod fails. Reads only.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Optional

from .protocol.errors import CNIError

EXTENSIONS = (".conf", ".conflist", ".json")
PLUGIN_TYPE = "cni-bridge"


@dataclass
class PluginConf:
    """One plugin of a list, as the runtime would pass it on stdin (without runtime keys)."""

    index: int
    config: dict

    @property
    def type(self) -> str:
        value = self.config.get("type")
        return value if isinstance(value, str) else ""

    @property
    def ipam_type(self) -> str:
        ipam = self.config.get("ipam")
        value = ipam.get("type") if isinstance(ipam, dict) else None
        return value if isinstance(value, str) else ""


@dataclass
class ConfFile:
    path: str
    name: str = ""                 # the network name, when the file says
    cni_version: str = ""
    plugins: list[PluginConf] = field(default_factory=list)
    error: Optional[str] = None    # why a runtime cannot use this file at all

    @property
    def types(self) -> list[str]:
        return [p.type for p in self.plugins]


def list_files(conf_dir: str) -> list[str]:
    try:
        names = sorted(os.listdir(conf_dir))
    except FileNotFoundError:
        return []
    return [os.path.join(conf_dir, n) for n in names
            if n.endswith(EXTENSIONS) and not n.startswith(".") and os.path.isfile(os.path.join(conf_dir, n))]


def read_file(path: str) -> ConfFile:
    conf = ConfFile(path)
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read())
    except OSError as exc:
        conf.error = f"cannot read: {exc.strerror or exc}"
        return conf
    except (ValueError, UnicodeDecodeError) as exc:
        conf.error = f"not JSON: {exc}"
        return conf
    if not isinstance(data, dict):
        conf.error = "not a JSON object"
        return conf
    if not path.endswith(".conflist") and "plugins" not in data:
        data = {"cniVersion": data.get("cniVersion"), "name": data.get("name"), "plugins": [data]}
    conf.name = data.get("name") if isinstance(data.get("name"), str) else ""
    conf.cni_version = data.get("cniVersion") if isinstance(data.get("cniVersion"), str) else ""
    plugins = data.get("plugins")
    if not conf.name:
        conf.error = "no network name"
    elif not isinstance(plugins, list) or not plugins:
        conf.error = "no plugins list"
    if not isinstance(plugins, list):
        return conf
    for index, plugin in enumerate(plugins):
        if not isinstance(plugin, dict):
            conf.error = conf.error or f"plugins[{index}] is not a JSON object"
            continue
        # What libcni injects into each plugin's config.
        injected = {**plugin, "name": data.get("name"), "cniVersion": data.get("cniVersion")}
        if "cniVersion" not in data:
            injected.pop("cniVersion")
        conf.plugins.append(PluginConf(index, injected))
        if not isinstance(plugin.get("type"), str) or not plugin["type"]:
            conf.error = conf.error or f"plugins[{index}] has no type"
    return conf


def read_conf_dir(conf_dir: str) -> list[ConfFile]:
    return [read_file(path) for path in list_files(conf_dir)]


def validate_for_add(config: dict) -> None:
    """Raise the CNIError an ADD with this cni-bridge config would fail with before any work."""
    from ipam.config import IPAMNetConf

    from .confbase import load
    from .config import BridgeConf
    from .ipam_client import IN_PROCESS_TYPE
    from .protocol import versions
    from .protocol.runner import config_version

    versions.require_supported(config_version(config), "ADD")
    conf = load(BridgeConf, config)
    if conf.ipam.type == IN_PROCESS_TYPE:
        load(IPAMNetConf, config)


def ipam_runs_in_process(plugin: PluginConf) -> bool:
    """cni-bridge runs cni-ipam in its own process: no cni-ipam executable is needed in the bin dir."""
    from .ipam_client import IN_PROCESS_TYPE

    return plugin.type == PLUGIN_TYPE and plugin.ipam_type == IN_PROCESS_TYPE


def executables(plugin: PluginConf) -> list[str]:
    """The programs a runtime (and cni-bridge, for IPAM) execs from the bin dir for this plugin."""
    names = [plugin.type] if plugin.type else []
    if plugin.ipam_type and not ipam_runs_in_process(plugin):
        names.append(plugin.ipam_type)
    return names


def describe(error: CNIError) -> str:
    return f"{error.msg}: {error.details}" if error.details else error.msg


__all__ = ["ConfFile", "PluginConf", "read_conf_dir", "read_file", "validate_for_add", "executables",
           "describe"]
