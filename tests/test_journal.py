"""The journal: what a crash leaves is known at the next start; bad files are handled safely."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from igdtrigger.config import parse_config
from igdtrigger.core.activation import Source, description_for
from igdtrigger.core.errors import JournalError
from igdtrigger.core.model import MappingSpec, Proto
from igdtrigger.runtime.journal import FILENAME, FORMAT, Journal
from igdtrigger.runtime.service import Service

from .fakes import FakeClock, FakeGateway

CONFIG = {"rules": [{"name": "demo", "open": ["udp/40000-40002"], "idle_timeout": "10m"}]}


def service(tmp_path: Path, gw: FakeGateway, clock: FakeClock) -> Service:
    return Service(parse_config(CONFIG), gw, clock=clock, wall=lambda: clock.now + 1.7e9,
                   state_dir=tmp_path)


async def test_crash_then_restart_restores_activation_and_its_mappings(tmp_path: Path) -> None:
    clock = FakeClock()
    gw = FakeGateway(clock, local_address="192.168.1.10")
    s1 = service(tmp_path, gw, clock)
    await s1.start()
    await s1.activate("demo", "192.168.1.10", ttl=3600, source=Source.API)
    assert len(gw.ports()) == 3
    # crash: no stop(), tasks just vanish; the router keeps the mappings
    for t in s1._tasks:
        t.cancel()
    s1.pipeline.journal.close()
    gw.table.clear()  # and say the router rebooted meanwhile
    s2 = service(tmp_path, gw, clock)
    assert s2.restored == 1
    await s2.start()
    await s2._wait_applied(s2.pipeline.engine.generation, 2)
    assert len(gw.ports()) == 3  # re-applied for the restored activation
    assert await s2.stop() == 3
    assert gw.ports() == {}


async def test_crash_leftovers_no_longer_wanted_are_deleted(tmp_path: Path) -> None:
    clock = FakeClock()
    gw = FakeGateway(clock, local_address="192.168.1.10")
    s1 = service(tmp_path, gw, clock)
    await s1.start()
    await s1.activate("demo", "192.168.1.10", ttl=60, source=Source.API)
    for t in s1._tasks:
        t.cancel()
    s1.pipeline.journal.close()
    gw.foreign(Proto.UDP, 50000, "192.168.1.99", "console")
    clock.advance(7200)  # the activation's time ran out while we were down
    s2 = service(tmp_path, gw, clock)
    assert s2.restored == 0
    await s2.start()
    await s2._wait_applied(s2.pipeline.engine.generation, 2)
    assert gw.ports() == {"udp/50000": "192.168.1.99"}  # ours gone, the foreign one untouched
    assert s2.pipeline.journal.mappings() == []
    await s2.stop()


async def test_failed_delete_is_retried_when_the_router_returns(tmp_path: Path) -> None:
    clock = FakeClock()
    gw = FakeGateway(clock)
    s = service(tmp_path, gw, clock)
    await s.start()
    act = await s.activate("demo", gw.local_address, ttl=60, source=Source.API)
    gw.down = True
    await s.deactivate(act["id"])
    assert len(s.pipeline.mapper.orphans) == 3  # not forgotten
    assert len(gw.table) == 3
    gw.down = False
    clock.advance(120)
    s.wake()
    await s._wait_applied(s.pipeline.engine.generation + 1, 0.3)
    assert gw.ports() == {}
    assert s.pipeline.mapper.orphans == {}
    await s.stop()


def test_newer_format_is_a_clear_error(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / FILENAME)
    db.execute("PRAGMA user_version=99")
    db.close()
    with pytest.raises(JournalError, match=r"newer igdtrigger .* move the file away"):
        Journal.open(tmp_path)


def test_corrupt_file_is_set_aside_and_a_fresh_journal_started(tmp_path: Path) -> None:
    (tmp_path / FILENAME).write_bytes(b"this is not a database" * 100)
    j = Journal.open(tmp_path, wall=lambda: 1_700_000_000.0)  # named by the injected clock
    assert j.mappings() == []
    assert (tmp_path / f"{FILENAME}.corrupt-1700000000").exists()


async def test_disk_write_failure_degrades_but_service_keeps_working(tmp_path: Path) -> None:
    clock = FakeClock()
    gw = FakeGateway(clock)
    s = service(tmp_path, gw, clock)
    await s.start()
    assert s.pipeline.journal._db is not None
    s.pipeline.journal._db.close()  # every write now fails, as on a full or read-only disk
    act = await s.activate("demo", gw.local_address, ttl=60, source=Source.API)
    assert act["state"] == "open"
    assert s.pipeline.journal.degraded
    assert any("not writable" in w for w in s.status()["warnings"])
    await s.stop()
    assert gw.ports() == {}


def test_mappings_recorded_before_request(tmp_path: Path) -> None:
    from igdtrigger.core.model import MappingSpec

    j = Journal.open(tmp_path)
    spec = MappingSpec(Proto.UDP, 40000, "192.168.1.10", 40000, description_for("demo", "t"))
    j.mappings_requested([spec])
    j.close()
    again = Journal.open(tmp_path)
    assert [(m.proto, m.external_port, m.internal_client) for m in again.mappings()] == [
        (Proto.UDP, 40000, "192.168.1.10")]
    again.mappings_gone([(Proto.UDP, 40000)])
    assert again.mappings() == []


def test_router_traits_round_trip_and_bad_records(tmp_path: Path) -> None:
    from igdtrigger.core.traits import RouterTraits

    j = Journal.open(tmp_path)
    t = RouterTraits("upnp-igd@192.168.1.1", reports_mappings=False, keeps_timed=True,
                     forced_lease=86400, adds_confirmed=2)
    j.router_traits_put(t.identity, t.persisted())
    j.close()
    j = Journal.open(tmp_path)
    back = RouterTraits.restore(t.identity, j.router_traits(t.identity) or {})
    assert back.persisted() == t.persisted()
    assert back.adds_confirmed == 0  # per run: trust is earned again
    assert j.router_traits("nat-pmp@10.0.0.1") is None
    j.close()
    db = sqlite3.connect(tmp_path / FILENAME)
    db.execute("UPDATE routers SET traits='{\"keeps_timed\": \"no\", \"forced_lease\": -1, "
               "\"permanent_only\": true}'")
    db.execute("INSERT INTO routers VALUES ('x', 'not json', 0)")
    db.commit()
    db.close()
    j = Journal.open(tmp_path)
    odd = RouterTraits.restore(t.identity, j.router_traits(t.identity) or {})
    assert (odd.keeps_timed, odd.forced_lease, odd.permanent_only) == (None, None, True)
    assert j.router_traits("x") is None
    j.close()


# --- rows that are not what igdtrigger wrote (issue 12, owner variants) -----------------------

@pytest.mark.parametrize(("column", "value"), [
    ("external_port", "'x'"), ("external_port", "-5"), ("external_port", "70000"),
    ("external_port", "1e309"), ("external_port", "9e18"), ("external_port", "X'00'"),
    ("internal_port", "0"), ("internal_port", "'x'"), ("internal_client", "'not-an-ip'"),
    ("internal_client", "X'ff'"), ("description", "X'ff'"), ("proto", "'SCTP'"),
])
async def test_a_bad_mapping_row_is_skipped_never_deleted_or_a_traceback(
        tmp_path: Path, column: str, value: str) -> None:
    from igdtrigger.core.model import MappingSpec

    j = Journal.open(tmp_path)
    j.mappings_requested([MappingSpec(Proto.UDP, 5000, "192.168.1.10", 5000, "igdtrigger x y")])
    j.close()
    with sqlite3.connect(tmp_path / FILENAME) as db:
        db.execute(f"UPDATE mappings SET {column} = {value}")
    clock = FakeClock()
    gw = FakeGateway(clock, local_address="192.168.1.10")
    s = service(tmp_path, gw, clock)  # a ValueError/OverflowError here stopped the start
    assert s.pipeline.mapper.orphans == {}
    await s.start()
    await s._wait_applied(s.pipeline.engine.generation, 2)
    assert not [c for c in gw.calls if c.startswith("delete")]
    await s.stop()


@pytest.mark.parametrize("value", ["1e309", "'x'", "0", "70000", "X'00'"])
def test_a_bad_pinhole_row_is_skipped(tmp_path: Path, value: str) -> None:
    from igdtrigger.core.model import PinholeSpec

    j = Journal.open(tmp_path)
    j.pinholes_requested([PinholeSpec("2001:db8::10", Proto.UDP, 5000)])
    j.close()
    with sqlite3.connect(tmp_path / FILENAME) as db:
        db.execute(f"UPDATE pinholes SET port = {value}")
    j = Journal.open(tmp_path)
    assert j.pinholes() == []
    j.close()


def test_a_format_1_journal_is_brought_up_and_its_activations_still_restore(
        tmp_path: Path) -> None:
    """A journal of the igdtrigger before the boot clock: no boot_id/expires_boot columns."""
    with sqlite3.connect(tmp_path / FILENAME) as db:
        db.executescript("""
            CREATE TABLE activations (id TEXT PRIMARY KEY, rule TEXT NOT NULL,
                host TEXT NOT NULL, source TEXT NOT NULL, created_wall REAL NOT NULL,
                expires_wall REAL NOT NULL, ttl REAL NOT NULL, meta TEXT NOT NULL DEFAULT '{}');
            PRAGMA user_version=1;""")
        db.execute("INSERT INTO activations VALUES ('a1','demo','192.168.1.10','api',?,?,600,"
                   "'{}')", (1.7e9 + 1000 - 10, 1.7e9 + 1000 + 300))
    clock = FakeClock()
    s = service(tmp_path, FakeGateway(clock), clock)
    assert s.restored == 1  # by the wall clock, as that journal knew no other
    [act] = s.pipeline.engine.activations.values()
    assert act.expires - clock() == 300
    with sqlite3.connect(tmp_path / FILENAME) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == FORMAT


FORMAT_1_MAPPINGS = """
CREATE TABLE mappings (proto TEXT NOT NULL, external_port INTEGER NOT NULL,
    internal_client TEXT NOT NULL, internal_port INTEGER NOT NULL, description TEXT NOT NULL,
    state TEXT NOT NULL, updated REAL NOT NULL, PRIMARY KEY (proto, external_port));
INSERT INTO mappings VALUES ('UDP', 3074, '192.168.1.10', 3074, 'igdtrigger x demo',
    'requested', 1.7e9);
PRAGMA user_version=1;
"""


def test_format_1_journal_is_migrated_and_its_mappings_kept(tmp_path: Path) -> None:
    """A journal of the igdtrigger before PCP nonces were recorded: its leftovers are still
    read (nonce unknown), new ones carry their nonce, and it is format 2 from then on."""
    db = sqlite3.connect(tmp_path / FILENAME)
    db.executescript(FORMAT_1_MAPPINGS)
    db.close()
    j = Journal.open(tmp_path)
    [old] = j.mappings()
    assert (old.proto, old.external_port, old.nonce, old.protocol) == (Proto.UDP, 3074, b"", "")
    spec = MappingSpec(Proto.TCP, 3075, "192.168.1.10", 3075, "igdtrigger x demo")
    j.mappings_requested([spec], {spec.key: b"\x01" * 12}, "pcp")
    key = j.secret("pcp-nonce-key")
    assert key is not None and len(key) == 16
    j.close()
    again = Journal.open(tmp_path)
    assert {m.external_port: (m.nonce, m.protocol) for m in again.mappings()} \
        == {3074: (b"", ""), 3075: (b"\x01" * 12, "pcp")}
    assert again.secret("pcp-nonce-key") == key  # the same key in every run
    again.close()
    version = sqlite3.connect(tmp_path / FILENAME).execute("PRAGMA user_version").fetchone()[0]
    assert version == FORMAT


def test_format_1_journal_in_a_read_only_directory_is_still_read(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch
                                                                 ) -> None:
    db = sqlite3.connect(tmp_path / FILENAME)
    db.executescript(FORMAT_1_MAPPINGS)
    db.close()
    j = Journal(tmp_path / FILENAME)
    j._unavailable("read-only file system")  # what open() does when it cannot write
    assert [(m.external_port, m.nonce) for m in j.mappings()] == [(3074, b"")]
    assert j.secret("pcp-nonce-key") is None  # none kept, none can be: nonces stay random
    j.close()


def test_a_dead_runs_mappings_are_taken_over_with_their_nonce(tmp_path: Path) -> None:
    """A killed `igdtrigger run`'s journal (its own PCP key) moves into the service's as it
    is: without its nonces its PCP mappings could not be deleted."""
    from igdtrigger.runtime.leftovers import take_over

    spec = MappingSpec(Proto.UDP, 3074, "192.168.1.10", 3074, "igdtrigger demo run9")
    dead = tmp_path / "run" / "9-1"
    j = Journal.open(dead)
    j.mappings_requested([spec], {spec.key: b"\x05" * 12}, "pcp")
    j.close()
    mine = Journal.open(tmp_path)
    assert take_over(mine, [dead]) == 1
    [row] = mine.mappings()
    assert (row.spec, row.nonce, row.protocol) == (spec, b"\x05" * 12, "pcp")
    assert not dead.exists()
    mine.close()
