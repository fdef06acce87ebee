"""Never clobber a mapping we do not own, and keep the journal exact, across cut-short stops:
issue 12's owner variants (a leftover whose port another host took meanwhile; a stop budget
that ends a long round of deletes on a slow router)."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest

from igdtrigger.core.model import MappingKey, MappingSpec, Proto
from igdtrigger.runtime.journal import Journal
from igdtrigger.runtime.mapper import Mapper

from .fakes import FakeClock, FakeGateway

TAG = "abc"


def spec(port: int, client: str = "192.168.1.10", tag: str = TAG) -> MappingSpec:
    return MappingSpec(Proto.UDP, port, client, port, f"igdtrigger game {tag}")


def journaled(path: Path) -> set[int]:
    j = Journal.open(path)
    try:
        return {m.external_port for m in j.mappings()}
    finally:
        j.close()


async def test_a_journaled_leftover_whose_port_another_host_took_is_not_deleted(
        tmp_path: Path) -> None:
    clock = FakeClock()
    gw = FakeGateway(clock)
    journal = Journal.open(tmp_path)
    # an earlier run journaled 5000 and 5001 and was cut short; its mappings lapsed since,
    # and another host (another program) took 5000; 5001 is still ours
    journal.mappings_requested([spec(5000), spec(5001)])
    gw.foreign(Proto.UDP, 5000, "192.168.1.77", "miniupnpc 5000")
    await gw.add(spec(5001), 0)
    m = Mapper(gw, clock=clock, tag=TAG, lease=60, journal=journal)
    m.adopt_orphans([x.spec for x in journal.mappings()])
    await m.reconcile({})
    assert gw.ports() == {"udp/5000": "192.168.1.77"}  # the other host's mapping stays
    assert f"delete {MappingKey(Proto.UDP, 5000)}" not in gw.calls
    assert m.orphans == {}
    journal.close()
    assert journaled(tmp_path) == set()  # and neither row is kept


async def test_a_journaled_leftover_for_another_instance_on_the_same_port_is_not_deleted(
        tmp_path: Path) -> None:
    clock = FakeClock()
    gw = FakeGateway(clock)
    journal = Journal.open(tmp_path)
    journal.mappings_requested([spec(5002)])
    await gw.add(spec(5002, tag="other"), 0)  # another igdtrigger of this host holds it now
    m = Mapper(gw, clock=clock, tag=TAG, lease=60, journal=journal)
    m.adopt_orphans([x.spec for x in journal.mappings()])
    await m.reconcile({})
    assert gw.ports() == {"udp/5002": "192.168.1.10"}
    journal.close()


async def test_our_lapsed_mapping_taken_by_another_host_is_not_deleted_on_retry(
        tmp_path: Path) -> None:
    clock = FakeClock()
    gw = FakeGateway(clock)
    m = Mapper(gw, clock=clock, tag=TAG, lease=60)
    await m.reconcile({spec(5003).key: spec(5003)})
    gw.down = True
    await m.reconcile({})  # the delete did not get through: an orphan, retried later
    assert spec(5003).key in m.orphans
    clock.advance(120)  # our lease ran out on the router; another host took the port
    gw.down = False
    gw.foreign(Proto.UDP, 5003, "192.168.1.77")
    m.retry_gateway_now()
    clock.advance(600)
    await m.reconcile({})
    assert gw.ports() == {"udp/5003": "192.168.1.77"}
    assert m.orphans == {}


class SlowGateway(FakeGateway):
    """Answers 700 deletes, then hangs: a slow router that outlasts the stop's budget."""

    answered = 0

    async def delete(self, proto: Proto, external_port: int) -> None:
        if self.answered >= 700:
            await asyncio.Event().wait()
        self.answered += 1
        await super().delete(proto, external_port)


async def test_a_stop_cut_short_leaves_journaled_exactly_what_is_still_mapped(
        tmp_path: Path) -> None:
    clock = FakeClock()
    gw = SlowGateway(clock)
    journal = Journal.open(tmp_path)
    m = Mapper(gw, clock=clock, tag=TAG, lease=0, journal=journal)
    want = {spec(p).key: spec(p) for p in range(20000, 22000)}
    await m.reconcile(want)
    assert len(gw.table) == 2000
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(m.remove_all(), 1.0)
    left = {k.external_port for k in gw.table}
    assert len(left) == 1300  # the budget cut the round short
    journal.close()
    assert journaled(tmp_path) == left


async def test_a_second_run_of_the_same_rule_takes_the_ports_over_soon_after_the_first_ends(
        ) -> None:
    """Two `igdtrigger run` of one rule on one host: the second finds the first's mappings
    (same host and port, tag run<pid>, alive). When the first ends it deletes them; the second
    re-took them only at the 30 s conflict recheck, the game closed meanwhile."""
    clock = FakeClock()
    gw = FakeGateway(clock)
    first = spec(6000, tag="run111")
    await gw.add(first, 0)
    second = Mapper(gw, clock=clock, tag="run222", lease=60,
                    reclaim=lambda d: False)  # the first wrapper is alive
    mine = spec(6000, tag="run222")
    await second.reconcile({mine.key: mine})
    [app] = second.applied.values()
    assert app.state.value == "conflict" and "open meanwhile" in app.error
    assert gw.ports() == {"udp/6000": "192.168.1.10"}  # untouched: the first still holds it
    await gw.delete(Proto.UDP, 6000)  # the first ends
    clock.advance(3)
    due = second.next_deadline()
    assert due is not None and due <= clock()
    await second.reconcile({mine.key: mine})
    assert app.state.value == "active"
    assert gw.table[mine.key][0].description == "igdtrigger game run222"


async def test_another_hosts_mapping_is_still_rechecked_at_the_slow_pace() -> None:
    clock = FakeClock()
    gw = FakeGateway(clock)
    gw.foreign(Proto.UDP, 6001, "192.168.1.77", "igdtrigger game xyz")  # another machine's
    m = Mapper(gw, clock=clock, tag=TAG, lease=60)
    await m.reconcile({spec(6001).key: spec(6001)})
    [app] = m.applied.values()
    assert app.state.value == "conflict" and app.retry_at - clock() >= 30


async def test_a_service_stop_cut_short_says_how_many_are_left_and_journals_exactly_those(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from igdtrigger.config import parse_config
    from igdtrigger.core.activation import Source
    from igdtrigger.runtime.service import Service

    clock = FakeClock()
    gw = SlowGateway(clock)
    config = parse_config({"rules": [{"name": "big", "open": ["udp/20000-20999"],
                                      "idle_timeout": "1h"}],
                           "detect": {"methods": []}, "gateway": {"ipv6_pinholes": False}})
    s = Service(config, gw, clock=clock, state_dir=tmp_path)
    await s.start()
    await s.activate("big", "192.168.1.10", ttl=3600, source=Source.API)
    await s._wait_applied(s.pipeline.engine.generation, 30)
    assert len(gw.table) == 1000
    await s.stop(timeout=1.0)
    assert len(gw.table) == 300  # the router answered 700 deletes, then hung
    assert "(700 removed, 300 left)" in caplog.text
    assert journaled(tmp_path) == {k.external_port for k in gw.table}


async def test_many_journaled_leftovers_are_checked_from_one_listing(tmp_path: Path) -> None:
    clock = FakeClock()
    gw = FakeGateway(clock)
    journal = Journal.open(tmp_path)
    journal.mappings_requested([spec(p) for p in range(7000, 7050)])
    for p in range(7000, 7010):  # still ours on the router
        await gw.add(spec(p), 0)
    for p in range(7040, 7045):  # taken by another host meanwhile
        gw.foreign(Proto.UDP, p, "192.168.1.77")
    m = Mapper(gw, clock=clock, tag=TAG, lease=60, journal=journal)
    m.adopt_orphans([x.spec for x in journal.mappings()])
    gw.calls.clear()
    await m.reconcile({})
    assert set(gw.ports()) == {f"udp/{p}" for p in range(7040, 7045)}  # theirs, untouched
    assert not [c for c in gw.calls if c.startswith("get")]  # one listing, not 50 look-ups
    assert len([c for c in gw.calls if c.startswith("delete")]) == 10  # only ours deleted
    journal.close()
    assert journaled(tmp_path) == set()
