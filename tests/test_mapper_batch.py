"""Many ports at once: one listing of the router's table replaces one check per port, when the
table is known to be smaller than the batch; the safety of the per-port check is kept."""

from __future__ import annotations

import time

from igdtrigger.core.activation import description_for
from igdtrigger.core.model import MappingKey, MappingSpec, Proto
from igdtrigger.core.traits import TRUST_AFTER
from igdtrigger.runtime.mapper import Mapper, MapState
from igdtrigger.runtime.readback import LIST_MIN_BATCH

from .fakes import FakeClock, FakeGateway

TAG = "abc123"


def specs(n: int, client: str = "192.168.1.10", first: int = 42000) -> dict[MappingKey,
                                                                          MappingSpec]:
    out = {}
    for port in range(first, first + n):
        s = MappingSpec(Proto.UDP, port, client, port, description_for("range", TAG))
        out[s.key] = s
    return out


def mapper(gw: FakeGateway, clock: FakeClock, **kw: object) -> Mapper:
    return Mapper(gw, clock=clock, tag=TAG, lease=3600, **kw)  # type: ignore[arg-type]


async def test_a_range_is_checked_with_one_listing() -> None:
    clock = FakeClock()
    gw = FakeGateway(clock)
    gw.foreign(Proto.UDP, 42005, "192.168.1.99", "console")  # someone else's, inside the range
    m = mapper(gw, clock)
    await m.reconcile(specs(200))
    gets = [c for c in gw.calls if c.startswith("get")]
    # no check per port; only the first adds are read back, until the router has shown that
    # it keeps what it accepts
    assert gets == [f"get udp/{p}" for p in range(42000, 42000 + TRUST_AFTER)]
    assert gw.calls.count("list") == 2  # the start-up sweep, then one for the whole batch
    assert m.count(MapState.ACTIVE) == 199
    app = m.applied[MappingKey(Proto.UDP, 42005)]
    assert app.state is MapState.CONFLICT and "192.168.1.99" in app.error
    assert gw.table[MappingKey(Proto.UDP, 42005)][0].internal_client == "192.168.1.99"


async def test_small_batches_and_big_tables_check_port_by_port() -> None:
    clock = FakeClock()
    gw = FakeGateway(clock)
    m = mapper(gw, clock)
    await m.reconcile(specs(LIST_MIN_BATCH - 1))
    assert gw.calls.count("list") == 1  # only the sweep
    assert len([c for c in gw.calls if c.startswith("get")]) == LIST_MIN_BATCH - 1 + TRUST_AFTER

    gw2 = FakeGateway(clock)
    for port in range(1000, 1300):  # the router holds more than the batch: listing costs more
        gw2.foreign(Proto.TCP, port, "192.168.1.99")
    m2 = mapper(gw2, clock)
    await m2.reconcile(specs(200))
    assert gw2.calls.count("list") == 1
    assert len([c for c in gw2.calls if c.startswith("get")]) == 200 + TRUST_AFTER
    assert m2.count(MapState.ACTIVE) == 200


async def test_a_failing_listing_falls_back_to_checks() -> None:
    clock = FakeClock()
    gw = FakeGateway(clock)
    m = mapper(gw, clock)
    await m.reconcile({})  # sweep done: the table is known to be small

    async def broken() -> list[object]:
        from igdtrigger.core.errors import ActionFailed

        raise ActionFailed("GetGenericPortMappingEntry", 401, "Invalid Action")

    gw.list = broken  # type: ignore[method-assign, assignment]
    await m.reconcile(specs(50))
    assert len([c for c in gw.calls if c.startswith("get")]) == 50 + TRUST_AFTER
    assert m.count(MapState.ACTIVE) == 50


async def test_check_before_add_off_never_lists() -> None:
    clock = FakeClock()
    gw = FakeGateway(clock)
    m = mapper(gw, clock, check_before_add=False)
    await m.reconcile(specs(100))
    assert gw.calls.count("list") == 1  # the sweep only
    # no check before the adds; the read-back of the first adds only
    assert len([c for c in gw.calls if c.startswith("get")]) == TRUST_AFTER


async def test_after_a_router_restart_everything_is_reapplied_from_one_listing() -> None:
    clock = FakeClock()
    gw = FakeGateway(clock)
    gw.foreign(Proto.UDP, 42003, "192.168.1.99", "console")
    m = mapper(gw, clock, canary_interval=2.0)
    want = specs(100)
    del want[MappingKey(Proto.UDP, 42003)]
    await m.reconcile(want)
    assert m.count(MapState.ACTIVE) == 99
    gw.table.clear()  # the router restarted and lost everything...
    gw.foreign(Proto.UDP, 42007, "192.168.1.99", "console")  # ...and someone took one of ours
    gw.calls.clear()
    clock.advance(3.0)
    t0 = time.monotonic()
    await m.reconcile(want)
    assert time.monotonic() - t0 < 5
    assert gw.calls.count("list") == 1
    # the canary's own check, and the read-back of the first mapping re-added
    assert [c for c in gw.calls if c.startswith("get")] == ["get udp/42000"] * 2
    assert m.count(MapState.ACTIVE) == 98
    taken = m.applied[MappingKey(Proto.UDP, 42007)]
    assert taken.state is MapState.CONFLICT
    assert gw.table[MappingKey(Proto.UDP, 42007)][0].internal_client == "192.168.1.99"
    assert len([k for k, (r, _) in gw.table.items() if r.internal_client == "192.168.1.10"]) == 98
