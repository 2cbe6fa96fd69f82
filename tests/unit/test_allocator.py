"""Allocator policy over the in-memory store."""
from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cni_bridge.protocol.errors import CNIError
from ipam.allocator import Allocator
from ipam.config import Range
from ipam.store import MemoryStore, Reservation

ip = ipaddress.ip_address
BOOT = "boot-1"


def rng(subnet, start=None, end=None, gateway=None) -> Range:
    return Range(subnet=subnet, range_start=start, range_end=end, gateway=gateway)


def alloc(range_sets, store=None, boot=BOOT) -> Allocator:
    return Allocator(store if store is not None else MemoryStore(), range_sets, boot, 1000.0)


def got(allocator, cid, ifname="eth0", requested=()):
    return [str(a.ip) for a in allocator.allocate((cid, ifname), [ip(r) for r in requested])]


# /29: .1 gateway, .2-.6 usable (.7 broadcast)
SMALL = [[rng("10.0.0.0/29")]]


def test_first_allocation_skips_the_gateway():
    a = alloc(SMALL)
    assert got(a, "c1") == ["10.0.0.2"]
    assert a.store.get(ip("10.0.0.2")) == Reservation(ip("10.0.0.2"), "c1", "eth0", BOOT, 1000.0)


def test_round_robin_continues_after_the_last_reserved_even_after_release():
    a = alloc(SMALL)
    assert [got(a, f"c{i}")[0] for i in range(3)] == ["10.0.0.2", "10.0.0.3", "10.0.0.4"]
    a.release(("c0", "eth0"))
    # .2 is free again, but round-robin goes on from .4 (avoids stale ARP entries)
    assert got(a, "c3") == ["10.0.0.5"]


def test_round_robin_wraps_to_the_start():
    a = alloc(SMALL)
    for i in range(5):
        got(a, f"c{i}")
    a.release(("c1", "eth0"))   # frees .3
    assert got(a, "new") == ["10.0.0.3"]


def test_round_robin_across_several_ranges_in_a_set_with_wraparound():
    range_set = [rng("10.0.0.0/24", "10.0.0.10", "10.0.0.11"),
                 rng("10.0.1.0/24", "10.0.1.20", "10.0.1.21"),
                 rng("10.0.2.0/24", "10.0.2.30", "10.0.2.30")]
    a = alloc([range_set])
    order = [got(a, f"c{i}")[0] for i in range(5)]
    assert order == ["10.0.0.10", "10.0.0.11", "10.0.1.20", "10.0.1.21", "10.0.2.30"]
    a.release(("c0", "eth0"))
    a.release(("c3", "eth0"))
    # last reserved was .2.30 (end of the last range): wraps to the first range, then the second
    assert got(a, "d1") == ["10.0.0.10"]
    assert got(a, "d2") == ["10.0.1.21"]


def test_round_robin_wraps_within_the_starting_range_head():
    range_set = [rng("10.0.0.0/24", "10.0.0.10", "10.0.0.13"), rng("10.0.1.0/24", "10.0.1.10", "10.0.1.10")]
    a = alloc([range_set])
    for i in range(5):
        got(a, f"c{i}")          # fills .0.10-.0.13 and .1.10
    a.release(("c1", "eth0"))    # .0.11
    a.store.set_last_reserved(0, ip("10.0.0.12"))
    # from .0.12: .0.13 taken, .1.10 taken, wrap to .0.10 taken, .0.11 free
    assert got(a, "x") == ["10.0.0.11"]


def test_last_reserved_outside_the_ranges_starts_at_the_beginning():
    a = alloc(SMALL)
    a.store.set_last_reserved(0, ip("192.168.9.9"))
    assert got(a, "c1") == ["10.0.0.2"]


def test_explicit_gateway_inside_the_range_is_skipped():
    a = alloc([[rng("10.0.0.0/29", gateway="10.0.0.3")]])
    assert [got(a, f"c{i}")[0] for i in range(5)] == ["10.0.0.1", "10.0.0.2", "10.0.0.4", "10.0.0.5", "10.0.0.6"]


def test_exhaustion_is_code_100_with_an_actionable_message():
    a = alloc(SMALL)
    for i in range(5):
        got(a, f"c{i}")
    with pytest.raises(CNIError) as info:
        got(a, "one-too-many")
    assert info.value.code == 100
    assert "10.0.0.0/29" in info.value.msg
    assert "gc" in info.value.details and "widen" in info.value.details
    assert a.store.owned_by(("one-too-many", "eth0")) == []


def test_repeated_add_returns_the_same_ips():
    a = alloc([[rng("10.0.0.0/24")], [rng("fd00::/120")]])
    first = got(a, "c1")
    got(a, "c2")
    assert got(a, "c1") == first
    assert got(a, "c1", requested=[first[0]]) == first
    assert len(list(a.store.reservations())) == 4


def test_repeated_add_asking_for_another_ip_frees_the_old_one():
    a = alloc(SMALL)
    assert got(a, "c1") == ["10.0.0.2"]
    assert got(a, "c1", requested=["10.0.0.5"]) == ["10.0.0.5"]
    assert a.store.get(ip("10.0.0.2")) is None          # not orphaned outside the owner index
    assert a.release(("c1", "eth0")) == [ip("10.0.0.5")]
    assert list(a.store.reservations()) == []


def test_repeated_add_after_the_ranges_changed_frees_the_old_address():
    store = MemoryStore()
    got(alloc(SMALL, store), "c1")
    moved = alloc([[rng("10.9.0.0/29")]], store)
    assert got(moved, "c1") == ["10.9.0.2"]
    assert [str(r.ip) for r in store.reservations()] == ["10.9.0.2"]


def test_same_container_other_ifname_gets_another_ip():
    a = alloc(SMALL)
    assert got(a, "c1", "eth0") != got(a, "c1", "net1")


def test_dual_stack_one_address_per_range_set():
    a = alloc([[rng("10.0.0.0/24")], [rng("fd00::/64")]])
    allocations = a.allocate(("c1", "eth0"))
    assert [str(x.ip) for x in allocations] == ["10.0.0.2", "fd00::2"]
    assert [x.range.subnet for x in allocations] == ["10.0.0.0/24", "fd00::/64"]
    assert a.store.last_reserved(0) == ip("10.0.0.2") and a.store.last_reserved(1) == ip("fd00::2")


def test_requested_free_ip():
    a = alloc([[rng("10.0.0.0/24")], [rng("fd00::/64")]])
    assert got(a, "c1", requested=["10.0.0.77"]) == ["10.0.0.77", "fd00::2"]
    assert got(a, "c2", requested=["fd00::99", "10.0.0.78"]) == ["10.0.0.78", "fd00::99"]


def test_requested_ip_taken_by_another_is_code_101():
    a = alloc(SMALL)
    got(a, "c1", requested=["10.0.0.4"])
    with pytest.raises(CNIError) as info:
        got(a, "c2", requested=["10.0.0.4"])
    assert info.value.code == 101 and "10.0.0.4" in info.value.msg
    assert a.store.get(ip("10.0.0.4")).container_id == "c1"


@pytest.mark.parametrize("requested", ["10.0.1.5", "10.0.0.7", "fd00::1"])
def test_requested_ip_outside_all_ranges_is_code_101(requested):
    a = alloc(SMALL)
    with pytest.raises(CNIError) as info:
        got(a, "c1", requested=[requested])
    assert info.value.code == 101 and "not inside any configured range" in info.value.msg
    assert list(a.store.reservations()) == []


def test_two_requested_ips_in_one_set_is_code_101():
    a = alloc(SMALL)
    with pytest.raises(CNIError) as info:
        got(a, "c1", requested=["10.0.0.2", "10.0.0.3"])
    assert info.value.code == 101 and "same range set" in info.value.msg


def test_requested_gateway_is_code_101():
    # host-local refuses it too ("requested ip ... is subnet's gateway"): it belongs on the bridge.
    a = alloc(SMALL)
    with pytest.raises(CNIError) as info:
        got(a, "c1", requested=["10.0.0.1"])
    assert info.value.code == 101 and "gateway" in info.value.msg
    assert list(a.store.reservations()) == []


def test_release_frees_only_own_reservations():
    a = alloc(SMALL)
    got(a, "c1")
    got(a, "c2")
    assert [str(x) for x in a.release(("c1", "eth0"))] == ["10.0.0.2"]
    assert a.store.get(ip("10.0.0.2")) is None
    assert a.store.get(ip("10.0.0.3")).container_id == "c2"
    assert a.release(("c1", "eth0")) == []       # repeated DEL is fine
    assert a.release(("never", "eth0")) == []


def test_release_leaves_an_address_reclaimed_by_someone_else():
    store = MemoryStore()
    old = alloc(SMALL, store, boot="boot-0")
    for i in range(5):
        got(old, f"old{i}")
    new = alloc(SMALL, store, boot="boot-1")
    taken = got(new, "fresh")[0]                 # reclaimed from an earlier boot
    previous_owner = next(f"old{i}" for i in range(5) if f"10.0.0.{i + 2}" == taken)
    assert new.release((previous_owner, "eth0")) == []
    assert store.get(ip(taken)).container_id == "fresh"


def test_earlier_boot_reservations_reclaimed_only_when_nothing_else_is_free():
    store = MemoryStore()
    store.put(Reservation(ip("10.0.0.2"), "old", "eth0", boot_id="boot-0"))
    a = alloc(SMALL, store)
    assert [got(a, f"c{i}")[0] for i in range(4)] == ["10.0.0.3", "10.0.0.4", "10.0.0.5", "10.0.0.6"]
    assert got(a, "c4") == ["10.0.0.2"]
    assert store.get(ip("10.0.0.2")).boot_id == BOOT


@pytest.mark.parametrize("blocker", [
    Reservation(ip("10.0.0.2"), "live", "eth0", boot_id=BOOT),          # same boot: alive
    Reservation(ip("10.0.0.2"), "", "", damaged=True, boot_id="boot-0"),  # damaged record
    Reservation(ip("10.0.0.2"), "hostlocal", "eth0"),                   # no boot recorded (host-local file)
])
def test_never_reclaims_live_damaged_or_unknown_boot_reservations(blocker):
    store = MemoryStore()
    store.put(blocker)
    a = alloc([[rng("10.0.0.0/29", "10.0.0.2", "10.0.0.2")]], store)
    with pytest.raises(CNIError) as info:
        got(a, "c1")
    assert info.value.code == 100
    assert store.get(ip("10.0.0.2")) == blocker


def test_allocator_without_boot_id_never_reclaims():
    store = MemoryStore()
    store.put(Reservation(ip("10.0.0.2"), "old", "eth0", boot_id="boot-0"))
    a = alloc([[rng("10.0.0.0/29", "10.0.0.2", "10.0.0.2")]], store, boot="")
    with pytest.raises(CNIError):
        got(a, "c1")


def test_requested_ip_held_by_an_earlier_boot_can_be_taken():
    store = MemoryStore()
    store.put(Reservation(ip("10.0.0.4"), "old", "eth0", boot_id="boot-0"))
    assert got(alloc(SMALL, store), "c1", requested=["10.0.0.4"]) == ["10.0.0.4"]


def test_gc_keeps_live_owners_and_drops_the_rest():
    a = alloc([[rng("10.0.0.0/24")], [rng("fd00::/64")]])
    for cid in ("keep", "drop1", "drop2"):
        got(a, cid)
    a.store.put(Reservation(ip("10.0.0.200"), "", "", damaged=True))
    dropped = a.gc({("keep", "eth0")})
    assert sorted({r.container_id for r in dropped}) == ["drop1", "drop2"] and len(dropped) == 4
    remaining = {(r.container_id, r.damaged) for r in a.store.reservations()}
    assert remaining == {("keep", False), ("", True)}
    assert a.store.owners() == [("keep", "eth0")]
    assert a.held_by(("keep", "eth0")) == [ip("10.0.0.2"), ip("fd00::2")]


def test_gc_with_an_empty_list_drops_everything_but_damaged():
    a = alloc(SMALL)
    got(a, "c1")
    assert len(a.gc(set())) == 1
    assert list(a.store.reservations()) == [] and a.store.owners() == []


def test_free_count():
    a = alloc([[rng("10.0.0.0/29"), rng("10.0.1.0/29", "10.0.1.5", "10.0.1.6")], [rng("fd00::/125")]])
    assert a.free_count(0) == 5 + 2          # gateway .0.1 excluded; .1.1 gateway is outside .5-.6
    assert a.free_count(1) == 7 - 1
    got(a, "c1")
    got(a, "c2")
    assert (a.free_count(0), a.free_count(1)) == (5, 4)
    a.release(("c1", "eth0"))
    assert (a.free_count(0), a.free_count(1)) == (6, 5)


def test_held_by_ignores_reclaimed_addresses():
    store = MemoryStore()
    a = alloc(SMALL, store)
    got(a, "c1")
    store.put(Reservation(ip("10.0.0.2"), "thief", "eth0", BOOT))
    assert a.held_by(("c1", "eth0")) == []


# -- property: never two live owners for one address -------------------------------------

OWNERS = [(f"c{i}", ifname) for i in range(4) for ifname in ("eth0", "net1")]
step = st.one_of(
    st.tuples(st.just("add"), st.sampled_from(OWNERS), st.none()),
    st.tuples(st.just("add"), st.sampled_from(OWNERS), st.integers(min_value=0, max_value=9)),
    st.tuples(st.just("del"), st.sampled_from(OWNERS), st.none()),
)


def assert_consistent(a: Allocator, live: dict) -> None:
    """Live owners hold pairwise disjoint addresses, each backed by the store, and nothing leaks."""
    seen: dict = {}
    for who, held in live.items():
        for x in held:
            assert x not in seen, f"{x} handed to {seen[x]} and {who}"
            seen[x] = who
    for x, who in seen.items():
        assert a.store.get(x).owner == who
    assert {r.ip for r in a.store.reservations()} == set(seen)


@settings(max_examples=150, deadline=None, database=None)
@given(st.lists(step, max_size=40))
def test_no_address_is_ever_handed_to_two_live_owners(steps):
    # Two sets over tiny ranges (.1 gateway, 5 usable / 6 usable) so exhaustion and wrap-around happen.
    range_sets = [[rng("10.0.0.0/29")], [rng("fd00::/125", "fd00::2", "fd00::7")]]
    a = alloc(range_sets)
    live: dict[tuple[str, str], list] = {}
    for verb, owner, want in steps:
        if verb == "del":
            a.release(owner)
            live.pop(owner, None)
        else:
            requested = [ip(f"10.0.0.{want}")] if want is not None else []
            try:
                ips = [x.ip for x in a.allocate(owner, requested)]
            except CNIError as err:
                assert err.code in (100, 101)
                if owner in live:   # a failed repeat ADD never takes away what the owner holds
                    assert a.held_by(owner) == live[owner]
            else:
                if owner in live and not requested:
                    assert ips == live[owner]           # idempotent
                assert len(ips) == 2 and ips[0].version == 4 and ips[1].version == 6
                assert ip("10.0.0.1") not in ips and ip("fd00::1") not in ips
                assert all(any(r.contains(x) for s in range_sets for r in s) for x in ips)
                live[owner] = ips
        assert_consistent(a, live)
