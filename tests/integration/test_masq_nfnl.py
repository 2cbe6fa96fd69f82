"""The nftables backend's per-pod steps through nf_tables netlink (masq/nfnl.py), on real
namespaces: what netlink writes is what `nft` reads back, refusals are handled as the
`nft` path handled them, and unexpected failures fall back to `nft` with a CNI error."""
from __future__ import annotations

import json
import os
import shutil
import sys
import textwrap

import pytest

from cni_bridge.masq.nftables import chain_name, nets_set, pods_set
from cni_bridge.plan import masq_chain_name
from tests.support.netns import REPO

NET = "nfnlnet"
TABLE = "cni_bridge"

pytestmark = pytest.mark.skipif(shutil.which("nft") is None, reason="needs nft (Debian nftables)")

PRELUDE = """
import ipaddress, json, logging, sys
from cni_bridge.masq import nfnl, nftables
from cni_bridge.plan import MasqPlan, MasqRule, masq_chain_name
from cni_bridge.protocol.errors import CNIError

warnings = []
class Keep(logging.Handler):
    def emit(self, record):
        warnings.append(record.getMessage())
logging.getLogger("cni_bridge.masq").addHandler(Keep())

NET = {net!r}

def plan(cid, *addresses, subnets=("10.98.0.0/24", "fd98::/64")):
    rules = []
    for address in addresses:
        ip = ipaddress.ip_address(address)
        subnet = next(ipaddress.ip_network(s) for s in subnets if ipaddress.ip_network(s).version == ip.version)
        rules.append(MasqRule(ip, subnet))
    return MasqPlan(chain=masq_chain_name(NET, cid, "eth0"), comment="", rules=tuple(rules), network=NET,
                    backend="nftables")

out = {{}}
"""


def run_in(ns, body: str) -> dict:
    """Run `body` (after PRELUDE) in a Python process inside `ns`; returns its `out` dict and warnings."""
    code = PRELUDE.format(net=NET) + textwrap.dedent(body) + "\nout['warnings'] = warnings\nprint(json.dumps(out))\n"
    proc = ns.exec(sys.executable, "-c", code, check=False,
                   env={"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


def listed_set(ns, name: str) -> dict[str, str]:
    """address -> comment, as `nft -j list set` shows the set."""
    out = json.loads(ns.exec("nft", "-j", "list", "set", "inet", TABLE, name).stdout)
    found = {}
    for obj in out["nftables"]:
        for elem in obj.get("set", {}).get("elem", []):
            if isinstance(elem, dict) and "elem" in elem:
                found[elem["elem"]["val"]] = elem["elem"].get("comment", "")
            elif isinstance(elem, dict) and "prefix" in elem:
                found[f"{elem['prefix']['addr']}/{elem['prefix']['len']}"] = ""
            else:
                found[str(elem)] = ""
    return found


def rule_count(ns) -> int:
    return ns.exec("nft", "list", "chain", "inet", TABLE, chain_name(NET)).stdout.count("masquerade")


@pytest.fixture
def host(make_netns):
    return make_netns("nl")


def test_missing_table_takes_the_ensure_path_then_elements_go_through_netlink(host):
    out = run_in(host, """
        nftables.setup(plan("c1", "10.98.0.5", "fd98::5"))
    """)
    assert out["warnings"] == []          # no fallback to nft for the element step
    assert rule_count(host) == 2
    key = masq_chain_name(NET, "c1", "eth0")
    assert listed_set(host, pods_set(NET, 4)) == {"10.98.0.5": key}
    assert listed_set(host, pods_set(NET, 6)) == {"fd98::5": key}
    assert "10.98.0.0/24" in listed_set(host, nets_set(NET, 4))


def test_element_added_by_netlink_reads_back_through_nft_and_delete_removes_it(host):
    out = run_in(host, """
        nftables.setup(plan("c1", "10.98.0.5"))
        nftables.setup(plan("c2", "10.98.0.6", "fd98::6"))
        out["members"] = sorted(nftables._members(NET))
        out["attachments"] = sorted(nftables.attachments(NET))
        out["missing"] = [str(ip) for ip in nftables.missing(NET, "c2", "eth0", [ipaddress.ip_address("10.98.0.6")])]
        out["deleted"] = nftables.teardown(NET, "c2", "eth0", [ipaddress.ip_address("10.98.0.6"),
                                                               ipaddress.ip_address("fd98::6")])
        out["after"] = sorted(nftables._members(NET))
    """)
    k1, k2 = masq_chain_name(NET, "c1", "eth0"), masq_chain_name(NET, "c2", "eth0")
    assert out["warnings"] == []
    assert out["members"] == [[4, "10.98.0.5", k1], [4, "10.98.0.6", k2], [6, "fd98::6", k2]]
    assert out["attachments"] == sorted([k1, k2])
    assert out["missing"] == []           # CHECK sees the netlink-made element as the attachment's
    assert out["deleted"] is True
    assert out["after"] == [[4, "10.98.0.5", k1]]
    assert listed_set(host, pods_set(NET, 4)) == {"10.98.0.5": k1}


def test_comment_bytes_are_the_ones_nft_writes(host):
    # nft adds one element, netlink the other; the kernel must hold the same userdata format.
    out = run_in(host, """
        nftables.setup(plan("c1", "10.98.0.5"))
        nftables._nft('add element inet cni_bridge %s { 10.98.0.7 comment "CNI-same" }\\n' % nftables.pods_set(NET, 4))
        nfnl.run([nfnl.add_step("cni_bridge", nftables.pods_set(NET, 4), [(ipaddress.ip_address("10.98.0.8"), "CNI-same")], True)])
    """)
    assert out["warnings"] == []
    listed = listed_set(host, pods_set(NET, 4))
    assert listed["10.98.0.7"] == listed["10.98.0.8"] == "CNI-same"
    text = host.exec("nft", "list", "set", "inet", TABLE, pods_set(NET, 4)).stdout
    assert '10.98.0.8 comment "CNI-same"' in text


def test_an_address_already_in_the_set_is_replaced_with_the_new_attachments_comment(host):
    out = run_in(host, """
        nftables.setup(plan("old", "10.98.0.5"))
        nftables.setup(plan("new", "10.98.0.5", "fd98::5"))   # EEXIST for the IPv4 element
    """)
    assert out["warnings"] == []
    key = masq_chain_name(NET, "new", "eth0")
    assert listed_set(host, pods_set(NET, 4)) == {"10.98.0.5": key}
    assert listed_set(host, pods_set(NET, 6)) == {"fd98::5": key}


def test_a_delete_of_absent_addresses_finds_the_attachment_by_its_key(host):
    out = run_in(host, """
        nftables.setup(plan("c1", "10.98.0.5"))
        # DEL with an address the set does not hold (ENOENT): the attachment's elements are found by key
        out["deleted"] = nftables.teardown(NET, "c1", "eth0", [ipaddress.ip_address("10.98.0.99")])
        out["again"] = nftables.teardown(NET, "c1", "eth0", [ipaddress.ip_address("10.98.0.5")])
    """)
    assert out["warnings"] == []
    assert out["deleted"] is True and out["again"] is False
    assert listed_set(host, pods_set(NET, 4)) == {}


def test_a_flushed_chain_is_noticed_and_rebuilt_on_the_next_add(host):
    run_in(host, 'nftables.setup(plan("c1", "10.98.0.5"))')
    host.exec("nft", "flush", "chain", "inet", TABLE, chain_name(NET))
    host.exec("nft", "flush", "set", "inet", TABLE, nets_set(NET, 4))
    out = run_in(host, """
        out["ready"] = nftables._ready(NET, [4], {ipaddress.ip_network("10.98.0.0/24")})
        nftables.setup(plan("c2", "10.98.0.6"))
        out["ready_after"] = nftables._ready(NET, [4], {ipaddress.ip_network("10.98.0.0/24")})
        out["other_subnet"] = nftables._ready(NET, [4], {ipaddress.ip_network("10.98.1.0/24")})
    """)
    assert out["ready"] is False and out["ready_after"] is True and out["other_subnet"] is False
    assert out["warnings"] == []
    assert rule_count(host) == 2
    assert "10.98.0.0/24" in listed_set(host, nets_set(NET, 4))


def test_netlink_refusals_carry_the_errno_and_the_kernels_text(host):
    out = run_in(host, """
        try:
            nfnl.run([nfnl.delete_step("cni_bridge", "nosuchset", [ipaddress.ip_address("10.98.0.5")])])
        except nfnl.NetlinkError as err:
            out["errno"], out["text"] = err.errno, str(err)
    """)
    assert out["errno"] == 2 and "No such file or directory" in out["text"]


def test_an_unexpected_refusal_falls_back_to_nft_and_fails_with_a_cni_error(host):
    # A pods set of the wrong type: the kernel refuses the IPv4 key (EINVAL), nft explains.
    pods4, nets4, chain = pods_set(NET, 4), nets_set(NET, 4), chain_name(NET)
    host.exec("nft", "-f", "-", input=textwrap.dedent(f"""
        add table inet {TABLE}
        add set inet {TABLE} {pods4} {{ type ipv6_addr; }}
        add set inet {TABLE} {nets4} {{ type ipv4_addr; flags interval; }}
        add element inet {TABLE} {nets4} {{ 10.98.0.0/24 }}
        add chain inet {TABLE} {chain} {{ type nat hook postrouting priority srcnat; }}
        add rule inet {TABLE} {chain} ip saddr 10.98.0.0/24 counter
        add rule inet {TABLE} {chain} ip saddr 10.98.0.0/24 counter
    """))
    out = run_in(host, """
        try:
            nftables.setup(plan("c1", "10.98.0.5"))
        except CNIError as err:
            out["code"], out["msg"] = err.code, err.msg
    """)
    assert out["code"] == 106                      # FIREWALL_FAILED
    assert out["msg"].startswith(shutil.which("nft")) and "failed:" in out["msg"] and "Traceback" not in out["msg"]
    assert any("retrying with nft" in w for w in out["warnings"])


def test_the_kept_socket_follows_the_process_and_its_namespace(host, make_netns):
    other = make_netns("nl")
    out = run_in(host, f"""
        import ctypes, os
        nftables.setup(plan("c1", "10.98.0.5"))
        first = set(nfnl._cached)
        # another namespace (setns for this thread): a new socket there, the old one closed
        fd = os.open("/var/run/netns/{other.name}", os.O_RDONLY)
        assert ctypes.CDLL(None, use_errno=True).setns(fd, 0x40000000) == 0   # CLONE_NEWNET
        nftables.setup(plan("c2", "10.98.0.6"))
        second = set(nfnl._cached)
        out["moved"] = len(first) == len(second) == 1 and first != second
        pid = os.fork()
        if pid == 0:
            nftables.setup(plan("c3", "10.98.0.7"))
            os._exit(0 if all(k[0] == os.getpid() for k in nfnl._cached) else 1)
        out["child"] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    """)
    assert out["moved"] is True and out["child"] == 0 and out["warnings"] == []
    assert listed_set(host, pods_set(NET, 4)) == {"10.98.0.5": masq_chain_name(NET, "c1", "eth0")}
    assert set(listed_set(other, pods_set(NET, 4))) == {"10.98.0.6", "10.98.0.7"}


def test_the_nft_readiness_fallback_sees_a_dual_stack_network_ready(host):
    # nft 1.0.6 cannot list the chain and both families' sets in one JSON command; the
    # fallback reads them one by one, so a ready dual-stack network is not rebuilt.
    out = run_in(host, """
        nftables.setup(plan("c1", "10.98.0.5", "fd98::5"))
        subnets = {ipaddress.ip_network("10.98.0.0/24"), ipaddress.ip_network("fd98::/64")}
        out["ready"] = nftables._ready_nft(NET, [4, 6], subnets)
        out["wider"] = nftables._ready_nft(NET, [4, 6], subnets | {ipaddress.ip_network("10.99.0.0/24")})
    """)
    assert out["ready"] is True and out["wider"] is False
