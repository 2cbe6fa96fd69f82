"""IPAM pool usage per range, from the reservations of a file store (cni-ipam's or host-local's).

The counting is the allocator's own (`Allocator.usage`, which STATUS uses to
decide whether ADD can be served), run over reservations already read.
"""
from __future__ import annotations

import time
from typing import Iterable, Iterator, Optional

from ipam.allocator import Allocator
from ipam.store import Reservation

from ..conflist import PLUGIN_TYPE, PluginConf, read_conf_dir
from .model import Pool

# IPAM types whose reservations live in <dataDir>/<network>/ in the format cni-ipam reads.
STORE_TYPES = ("cni-ipam", "host-local")


class _Snapshot:
    """The one store method `Allocator.usage` needs, over reservations read already."""

    def __init__(self, reservations: Iterable[Reservation]) -> None:
        self._reservations = list(reservations)

    def reservations(self) -> Iterator[Reservation]:
        return iter(self._reservations)


def ipam_conf(plugin: PluginConf):
    """The validated IPAM config of a cni-bridge plugin with a file store, else None."""
    if plugin.type != PLUGIN_TYPE or plugin.ipam_type not in STORE_TYPES:
        return None
    from ipam.config import IPAMNetConf

    from ..confbase import load
    from ..protocol.errors import CNIError

    try:
        return load(IPAMNetConf, plugin.config)
    except CNIError:
        return None   # reported by the conflist check


def pools(network: str, conf, reservations: Iterable[Reservation], boot_id: str) -> list[Pool]:
    allocator = Allocator(_Snapshot(reservations), conf.ipam.range_sets, boot_id, time.time())
    return [Pool(network=network, set_index=u.set_index, subnet=u.range.subnet, range_start=str(u.range.start),
                 range_end=str(u.range.end), gateway=str(u.range.gateway_ip), size=u.size, used=u.used,
                 reclaimable=u.reclaimable, free=u.free)
            for u in allocator.usage()]


def network_pools(conf_dir: str, boot_id: Optional[str] = None) -> list[tuple[str, list[Pool]]]:
    """(network, pools) of every cni-bridge network configured in `conf_dir`, read now."""
    from ipam.filestore import FileStore, current_boot_id

    from ..protocol.errors import CNIError

    boot_id = current_boot_id() if boot_id is None else boot_id
    found = []
    seen = set()
    for conf_file in read_conf_dir(conf_dir):
        for plugin in conf_file.plugins:
            conf = ipam_conf(plugin)
            if conf is None or (conf.name, conf.ipam.data_dir) in seen:
                continue
            seen.add((conf.name, conf.ipam.data_dir))
            try:
                reservations = list(FileStore(conf.ipam.data_dir, conf.name).reservations())
            except CNIError:
                continue   # an unreadable store: `inspect` reports it
            found.append((conf.name, pools(conf.name, conf, reservations, boot_id)))
    return found
