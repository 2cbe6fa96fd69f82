"""cni-ipam's verbs: reserve, release, check, collect and report on addresses."""
from __future__ import annotations

import functools
import ipaddress
import json
import os
import time
from typing import Optional

from cni_bridge.confbase import load
from cni_bridge.protocol.errors import CNIError, Code
from cni_bridge.protocol.result import DNS, IPConfig, Result
from cni_bridge.protocol.runner import Request

from .allocator import Allocator
from .config import IPAMNetConf
from .filestore import FileStore, current_boot_id
from .resolvconf import load_resolv_conf


# A node daemon sees the same few network configs on every call.
_CONF_CACHE_SIZE = 16


def load_conf(config: dict) -> IPAMNetConf:
    """The validated model of `config`, from a small cache keyed on its canonical JSON.

    Validation is most of an ADD's CPU in a long-lived process; a model is frozen and
    its key holds every byte it was built from, so a changed config misses the cache.
    """
    return _load_conf_json(json.dumps(config, sort_keys=True, separators=(",", ":")))


@functools.lru_cache(maxsize=_CONF_CACHE_SIZE)
def _load_conf_json(text: str) -> IPAMNetConf:
    return load(IPAMNetConf, json.loads(text))   # a bad config raises, and is not cached


def open_allocator(conf: IPAMNetConf, boot_id: Optional[str] = None) -> Allocator:
    store = FileStore(conf.ipam.data_dir, conf.name, conf.ipam.lock_timeout)
    return Allocator(store, conf.ipam.range_sets,
                     current_boot_id() if boot_id is None else boot_id, time.time())


class IpamPlugin:
    about = "cni-ipam: file-backed IPAM for CNI (host-local compatible config)"

    def add(self, req: Request) -> Result:
        conf = load_conf(req.config)
        owner = (req.cmd.container_id, req.cmd.ifname)
        dns = conf.dns.to_dns()
        if conf.ipam.resolv_conf:  # read before reserving, so a bad file leaks no reservation
            dns = _merge_dns(load_resolv_conf(conf.ipam.resolv_conf), dns)
        allocations = open_allocator(conf).allocate(owner, conf.requested_ips(dict(req.cmd.args)),
                                                    netns=req.cmd.netns)
        ips = tuple(
            IPConfig(
                address=ipaddress.ip_interface(f"{a.ip}/{a.range.network.prefixlen}"),
                gateway=a.range.gateway_ip,
            )
            for a in allocations
        )
        return Result(ips=ips, routes=tuple(r.to_route() for r in conf.ipam.routes), dns=dns)

    def delete(self, req: Request) -> None:
        conf = load_conf(req.config)
        open_allocator(conf).release((req.cmd.container_id, req.cmd.ifname))

    def check(self, req: Request) -> None:
        conf = load_conf(req.config)
        owner = (req.cmd.container_id, req.cmd.ifname)
        held = set(open_allocator(conf).held_by(owner))
        if not held:
            raise CNIError(Code.CHECK_FAILED,
                           f"no address is reserved for container {owner[0]} interface {owner[1]}")
        prev = conf.previous_result()
        for ip in prev.ips if prev else ():
            if ip.address.ip not in held and any(r.contains(ip.address.ip) for s in conf.ipam.range_sets for r in s):
                raise CNIError(Code.CHECK_FAILED,
                               f"address {ip.address.ip} is not reserved for container {owner[0]}")

    def gc(self, req: Request) -> None:
        conf = load_conf(req.config)
        keep = conf.gc_keep()
        if keep is None:
            raise CNIError(Code.INVALID_CONFIG, "GC needs cni.dev/valid-attachments in the config")
        allocator = open_allocator(conf)
        with allocator.store.locked():
            allocator.gc(keep)
            if isinstance(allocator.store, FileStore):
                allocator.store.sweep_temp_files()  # left by a writer killed mid-write

    def status(self, req: Request) -> None:
        conf = load_conf(req.config)
        allocator = open_allocator(conf)
        store = allocator.store
        assert isinstance(store, FileStore)
        try:
            store.ensure_dirs()
        except CNIError as err:
            raise CNIError(Code.CANNOT_SERVE_ADD, f"IPAM store unusable: {err.msg}") from None
        if not os.access(store.dir, os.W_OK):
            raise CNIError(Code.CANNOT_SERVE_ADD, f"IPAM store {store.dir} is not writable")
        for index, range_set in enumerate(conf.ipam.range_sets):
            if allocator.free_count(index) <= 0:
                subnets = ", ".join(r.subnet for r in range_set)
                raise CNIError(Code.CANNOT_SERVE_ADD, f"no free addresses left in range set {subnets}")


def _merge_dns(from_file: DNS, from_conf: DNS) -> DNS:
    """Explicit `dns` in the config wins over the resolvConf file, field by field."""
    return DNS(
        from_conf.nameservers or from_file.nameservers,
        from_conf.domain or from_file.domain,
        from_conf.search or from_file.search,
        from_conf.options or from_file.options,
    )
