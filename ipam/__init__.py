"""cni-ipam: a file-backed IPAM plugin, compatible with host-local's config.

Never imports pyroute2 (checked by tests/unit/test_import_rules.py).
"""
