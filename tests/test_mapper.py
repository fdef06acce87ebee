"""Mapper against an in-memory router: adds, renewals, conflicts, lease refusal, loss, cleanup."""

from __future__ import annotations

import pytest

from igdtrigger.core.activation import description_for
from igdtrigger.core.errors import ActionFailed
from igdtrigger.core.model import MappingKey, MappingSpec, Proto, RouterMapping
from igdtrigger.gateway.base import Granted
from igdtrigger.runtime.mapper import Mapper, MapState

from .fakes import FakeClock, FakeGateway

TAG = "abc123"


def spec(port: int, host: str = "192.168.1.10", proto: Proto = Proto.UDP,
         rule: str = "demo") -> MappingSpec:
    return MappingSpec(proto, port, host, port, description_for(rule, TAG))


def want(*specs: MappingSpec) -> dict[MappingKey, MappingSpec]:
    return {s.key: s for s in specs}


@pytest.fixture
def gw(clock: FakeClock) -> FakeGateway:
    return FakeGateway(clock)


def mapper(gw: FakeGateway, clock: FakeClock, lease: float = 600, **kw: object) -> Mapper:
    return Mapper(gw, clock=clock, tag=TAG, lease=lease, verify_interval=60, **kw)  # type: ignore[arg-type]


async def test_adds_and_removes_exactly_the_desired_mappings(gw: FakeGateway,
                                                             clock: FakeClock) -> None:
    m = mapper(gw, clock)
    await m.reconcile(want(spec(40000), spec(40001)))
    assert gw.ports() == {"udp/40000": "192.168.1.10", "udp/40001": "192.168.1.10"}
    await m.reconcile(want(spec(40001)))
    assert gw.ports() == {"udp/40001": "192.168.1.10"}
    await m.reconcile({})
    assert gw.ports() == {}
    assert m.applied == {}


async def test_lease_renewed_at_half_life_so_mapping_never_lapses(gw: FakeGateway,
                                                                  clock: FakeClock) -> None:
    m = mapper(gw, clock, lease=600)
    d = want(spec(40000))
    await m.reconcile(d)
    assert m.next_deadline() == clock.now + 2  # the canary check comes first
    for _ in range(30):  # 30 minutes, far past one lease
        clock.advance(60)
        await m.reconcile(d)
        assert gw.ports() == {"udp/40000": "192.168.1.10"}
    assert m.ops["renew"] >= 5


async def test_foreign_mapping_is_never_taken_over_or_deleted(gw: FakeGateway,
                                                              clock: FakeClock) -> None:
    gw.foreign(Proto.UDP, 40000, "192.168.1.99", "Xbox")
    m = mapper(gw, clock)
    await m.reconcile(want(spec(40000), spec(40001)))
    assert m.applied[MappingKey(Proto.UDP, 40000)].state is MapState.CONFLICT
    assert "192.168.1.99" in m.applied[MappingKey(Proto.UDP, 40000)].error
    assert gw.ports()["udp/40000"] == "192.168.1.99"
    await m.reconcile({})
    await m.remove_all()
    assert gw.ports() == {"udp/40000": "192.168.1.99"}


async def test_conflict_without_precheck_is_reported_not_forced(gw: FakeGateway,
                                                                clock: FakeClock) -> None:
    gw.foreign(Proto.UDP, 40000, "192.168.1.99")
    m = mapper(gw, clock, check_before_add=False)
    await m.reconcile(want(spec(40000)))
    assert m.applied[MappingKey(Proto.UDP, 40000)].state is MapState.CONFLICT
    assert gw.ports()["udp/40000"] == "192.168.1.99"


async def test_router_refusing_timed_leases_gets_permanent_ones_we_delete(
        gw: FakeGateway, clock: FakeClock) -> None:
    gw.permanent_only = True
    m = mapper(gw, clock)
    await m.reconcile(want(spec(40000)))
    assert m.permanent_only
    assert m.applied[MappingKey(Proto.UDP, 40000)].lease == 0
    await m.reconcile({})
    assert gw.ports() == {}


async def test_secure_mode_refusal_is_reported_and_retried(gw: FakeGateway,
                                                           clock: FakeClock) -> None:
    gw.secure_mode = True
    m = mapper(gw, clock)
    await m.reconcile(want(spec(40000, host="192.168.1.50")))
    app = m.applied[MappingKey(Proto.UDP, 40000)]
    assert app.state is MapState.FAILED
    assert "run igdtrigger on the host" in app.error or "606" in app.error
    deadline = m.next_deadline()
    assert deadline is not None and deadline > clock.now


async def test_lost_mapping_is_found_by_verification_and_reapplied(gw: FakeGateway,
                                                                   clock: FakeClock) -> None:
    m = mapper(gw, clock, lease=3600)
    d = want(spec(40000))
    await m.reconcile(d)
    gw.table.clear()  # the router forgot it
    clock.advance(61)
    await m.reconcile(d)
    assert gw.ports() == {"udp/40000": "192.168.1.10"}


async def test_router_down_then_back_reapplies(gw: FakeGateway, clock: FakeClock) -> None:
    m = mapper(gw, clock)
    d = want(spec(40000))
    await m.reconcile(d)
    gw.down = True
    clock.advance(61)
    await m.reconcile(d)  # verification fails: gateway marked down, nothing raised
    assert not m.gateway_up
    gw.down = False
    gw.table.clear()  # it restarted with an empty table
    deadline = m.next_deadline()
    assert deadline is not None
    clock.now = deadline
    await m.reconcile(d)
    assert m.gateway_up
    assert gw.ports() == {"udp/40000": "192.168.1.10"}


async def test_gateway_down_at_start_retries_with_backoff(gw: FakeGateway,
                                                          clock: FakeClock) -> None:
    gw.down = True
    m = mapper(gw, clock)
    d = want(spec(40000))
    await m.reconcile(d)
    first = m.next_deadline()
    assert first is not None and first > clock.now
    clock.now = first
    await m.reconcile(d)
    second = m.next_deadline()
    assert second is not None and second - clock.now > first - 1000.0  # back-off grew
    gw.down = False
    clock.now = second
    await m.reconcile(d)
    assert gw.ports() == {"udp/40000": "192.168.1.10"}


async def test_stale_mappings_of_this_instance_are_swept_on_connect(gw: FakeGateway,
                                                                    clock: FakeClock) -> None:
    gw.foreign(Proto.UDP, 41000, "192.168.1.10", description_for("old", TAG))  # ours, stale
    gw.foreign(Proto.UDP, 41001, "192.168.1.10", description_for("old", "zzz999"))  # other inst.
    gw.foreign(Proto.UDP, 41002, "192.168.1.10", "Skype")
    m = mapper(gw, clock)
    await m.reconcile({})
    assert sorted(gw.ports()) == ["udp/41001", "udp/41002"]
    assert m.stale_removed == 1


async def test_remove_all_deletes_everything_we_hold(gw: FakeGateway, clock: FakeClock) -> None:
    m = mapper(gw, clock)
    await m.reconcile(want(*(spec(p) for p in range(40000, 40050))))
    assert len(gw.ports()) == 50
    assert await m.remove_all() == 50
    assert gw.ports() == {}


async def test_host_change_moves_the_mapping(gw: FakeGateway, clock: FakeClock) -> None:
    m = mapper(gw, clock)
    await m.reconcile(want(spec(40000, host="192.168.1.20")))
    await m.reconcile(want(spec(40000, host="192.168.1.21")))
    assert gw.ports() == {"udp/40000": "192.168.1.21"}


async def test_router_that_lost_everything_is_noticed_within_the_canary_interval(
        gw: FakeGateway, clock: FakeClock) -> None:
    m = mapper(gw, clock, lease=3600)
    d = want(spec(40000), spec(40001), spec(40002))
    await m.reconcile(d)
    gw.table.clear()  # router restarted: its table is empty, nothing told us
    clock.advance(2)
    await m.reconcile(d)
    assert len(gw.ports()) == 3


async def test_external_any_takes_another_port_never_the_taken_one(gw: FakeGateway,
                                                                   clock: FakeClock) -> None:
    gw.foreign(Proto.UDP, 40000, "192.168.1.99", "console")
    m = mapper(gw, clock)
    s = MappingSpec(Proto.UDP, 40000, "192.168.1.10", 40000, description_for("demo", TAG),
                    external_any=True)
    await m.reconcile(want(s))
    app = m.applied[MappingKey(Proto.UDP, 40000)]
    assert app.state is MapState.ACTIVE
    assert app.external_port != 40000
    assert 1024 <= app.external_port <= 65535
    ports = gw.ports()
    assert ports["udp/40000"] == "192.168.1.99"
    assert ports[f"udp/{app.external_port}"] == "192.168.1.10"
    assert m.snapshot()[0]["external_port"] == app.external_port
    for _ in range(3):  # renewals and checks keep using the granted port
        clock.advance(400)
        await m.reconcile(want(s))
    assert gw.ports()[f"udp/{app.external_port}"] == "192.168.1.10"
    await m.reconcile({})
    assert gw.ports() == {"udp/40000": "192.168.1.99"}


async def test_stop_after_the_router_came_back_deletes_a_leftover_once_wanted(
        gw: FakeGateway, clock: FakeClock) -> None:
    """The router first answers at stop: the start-up sweep then keeps nothing for a wanted
    mapping of an earlier round (nothing is wanted at stop), so no port of ours stays open."""
    gw.foreign(Proto.UDP, 41000, "192.168.1.10", description_for("demo", TAG))  # crashed run's
    gw.foreign(Proto.UDP, 41001, "192.168.1.10", description_for("demo", TAG))
    m = mapper(gw, clock)
    m.adopt_orphans([spec(41001)])  # the journal's leftover: remove_all connects for it
    gw.down = True
    await m.reconcile(want(spec(41000)))  # a restored activation wants it; router not answering
    assert m.gateway_up is False
    gw.down = False
    await m.remove_all()
    assert gw.ports() == {}
    assert m.left_open == []


async def test_a_mapping_left_open_says_until_when_on_the_injected_wall_clock(
        gw: FakeGateway, clock: FakeClock) -> None:
    """A router that answers the delete but keeps the mapping: the stop names it with the
    wall-clock time its lease ends, read from the mapper's wall clock (never the system's)."""
    async def answered_but_kept(proto: Proto, external_port: int) -> None:
        gw.calls.append(f"delete {MappingKey(proto, external_port)}")

    m = mapper(gw, clock, lease=600, wall=lambda: 1_000_000.0)
    await m.reconcile(want(spec(40000)))
    gw.delete = answered_but_kept  # type: ignore[method-assign]
    assert await m.remove_all() == 0
    [left] = m.left_open
    assert left.lease_remaining == 600
    assert left.until_wall == 1_000_600.0


class _OverwritingRouter(FakeGateway):
    """A router that answers an add for another host's port by overwriting it (no 718), and
    whose next lookup fails once: only the check before the add stands between us and
    clobbering that host's mapping."""

    fail_next_get = False

    async def _add_once(self, spec: MappingSpec, lease: int) -> Granted:
        self.table.pop(spec.key, None)
        return await super()._add_once(spec, lease)

    async def get(self, proto: Proto, external_port: int) -> RouterMapping | None:
        if self.fail_next_get:
            self.fail_next_get = False
            raise ActionFailed("GetSpecificPortMappingEntry", 501, "ActionFailed")
        return await super().get(proto, external_port)


async def test_a_failed_check_before_an_add_never_lets_the_add_clobber_another_host(
        clock: FakeClock) -> None:
    gw = _OverwritingRouter(clock)
    m = mapper(gw, clock)
    await m.reconcile(want(spec(40001)))  # the router's lookups have worked once
    assert m.traits.reports_mappings
    gw.foreign(Proto.UDP, 40000, "192.168.1.99", "Xbox")
    gw.fail_next_get = True
    await m.reconcile(want(spec(40001), spec(40000)))
    assert gw.ports()["udp/40000"] == "192.168.1.99"
