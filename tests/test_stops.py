"""Open exactly while needed: every way `serve` stops, what the next start restores, clocks.

- every terminating signal (a closed terminal's SIGHUP included) is the same clean stop;
- a clean stop ends the activations it held (only a crash restores them);
- `serve --simulate` keeps its journal apart from the real service's;
- a restored activation never outlives its ttl, whatever the journal's wall clock says;
- the instance tag is the same at every start, even when nothing can be written.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from igdtrigger.config import parse_config
from igdtrigger.core.activation import Source
from igdtrigger.core.errors import UsageError
from igdtrigger.core.model import MappingSpec, Proto
from igdtrigger.gateway.base import Granted
from igdtrigger.runtime.journal import FILENAME, Journal, JournalActivation
from igdtrigger.runtime.service import Service
from igdtrigger.runtime.state import derived_tag

from .fakes import FakeClock, FakeGateway, free_port, wait_ready
from .test_daemon_ops import CONFIG as SERVE_CONFIG

ROOT = Path(__file__).resolve().parent.parent
CONFIG = {"rules": [{"name": "demo", "open": ["udp/40000-40002"], "idle_timeout": "10m"}]}
WALL0 = 1.7e9


def service(tmp_path: Path, gw: FakeGateway, clock: FakeClock, wall_skew: float = 0.0,
            config: dict[str, Any] = CONFIG) -> Service:
    return Service(parse_config(config), gw, clock=clock,
                   wall=lambda: clock.now + WALL0 + wall_skew, state_dir=tmp_path)


def journal_activations(state: Path) -> list[tuple[str, ...]]:
    path = state / FILENAME
    if not path.exists():
        return []
    with sqlite3.connect(path) as db:
        return [tuple(r) for r in db.execute("SELECT id, rule FROM activations")]


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT,
                                 signal.SIGUSR1],
                         ids=lambda s: signal.Signals(s).name)
def test_every_terminating_signal_is_a_clean_stop(tmp_path: Path, sig: int) -> None:
    """SIGHUP (a closed terminal, a dropped SSH session) used to kill `serve` with every mapping
    left open; now it, SIGQUIT, SIGINT and SIGTERM all remove the mappings, end the activations
    and exit 0. The simulated router's journal is apart from the real service's."""
    port = free_port()
    config = tmp_path / "config.toml"
    config.write_text(SERVE_CONFIG)
    ready = tmp_path / "ready"
    state = tmp_path / "state"
    env = {**os.environ, "IGDTRIGGER_STATE_DIR": str(state), "PYTHONPATH": str(ROOT)}
    env.pop("JOURNAL_STREAM", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "igdtrigger", "serve", "--config", str(config), "--simulate",
         "--listen", f"127.0.0.1:{port}", "--ready-file", str(ready)], env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_ready(proc, ready, why=proc.communicate)
        act = subprocess.run([sys.executable, "-m", "igdtrigger", "activate", "demo", "--for",
                              "1h", "--server", f"http://127.0.0.1:{port}"], env=env,
                             capture_output=True, text=True, timeout=30)
        assert act.returncode == 0, act.stdout + act.stderr
        assert journal_activations(state / "simulate")  # journaled while it runs...
        assert not (state / FILENAME).exists()  # ...apart from the real service's journal
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert f"{signal.Signals(sig).name} received" in err
        assert "(1 mapping(s) removed)" in err, err
        assert journal_activations(state / "simulate") == []  # ended: nothing to restore
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_clean_stop_ends_activations_crash_restores_them(tmp_path: Path) -> None:
    clock = FakeClock()
    gw = FakeGateway(clock, local_address="192.168.1.10")
    s1 = service(tmp_path, gw, clock)
    await s1.start()
    await s1.activate("demo", "192.168.1.10", ttl=3600, source=Source.API)
    assert await s1.stop() == 3
    s2 = service(tmp_path, gw, clock)
    assert s2.restored == 0  # a clean stop: nothing comes back, nothing re-opens
    await s2.start()
    await s2._wait_applied(s2.pipeline.engine.generation, 2)
    assert gw.ports() == {}
    await s2.activate("demo", "192.168.1.10", ttl=3600, source=Source.API)
    for t in s2._tasks:  # crash: the tasks just vanish
        t.cancel()
    s2.pipeline.journal.close()
    s3 = service(tmp_path, gw, clock)
    assert s3.restored == 1
    held = dict(gw.ports())
    assert len(held) == 3
    gw.calls.clear()
    await s3.start()
    await s3._wait_applied(s3.pipeline.engine.generation, 2)
    # the restored activation's ports stay open across the restart: never deleted and re-added
    assert not [c for c in gw.calls if c.startswith("delete")], gw.calls
    assert gw.ports().keys() == held.keys()
    await s3.stop()
    assert gw.ports() == {}


@pytest.mark.parametrize(("expires_in", "wall_skew", "left"), [
    (20 * 365 * 86400.0, 0.0, 600.0),  # a row 20 years ahead: capped at the ttl
    (600.0, -5 * 365 * 86400.0, 600.0),  # the clock is years behind now: not 5 years + 10 min
    (300.0, 0.0, 300.0),  # an honest row: as journaled
])
async def test_restored_activation_never_outlives_its_ttl(tmp_path: Path, expires_in: float,
                                                          wall_skew: float, left: float) -> None:
    clock = FakeClock()
    gw = FakeGateway(clock, local_address="192.168.1.10")
    now_wall = clock.now + WALL0
    j = Journal.open(tmp_path)
    j.activations_put([JournalActivation("a1", "demo", "192.168.1.10", "api", now_wall - 10,
                                         now_wall + expires_in, 600.0, {})])
    j.close()
    s = service(tmp_path, gw, clock, wall_skew=wall_skew)
    assert s.restored == 1
    [act] = s.pipeline.engine.activations.values()
    assert act.expires - clock() == pytest.approx(left)
    await s.stop()


async def test_journal_row_with_an_absurd_ttl_is_not_restored(tmp_path: Path) -> None:
    clock = FakeClock()
    now_wall = clock.now + WALL0
    j = Journal.open(tmp_path)
    j.activations_put([
        JournalActivation("a1", "demo", "192.168.1.10", "api", now_wall, now_wall + 9e9, 9e9, {}),
        JournalActivation("a2", "demo", "192.168.1.10", "api", now_wall, float("inf"),
                          float("inf"), {})])
    j.close()
    s = service(tmp_path, FakeGateway(clock), clock)
    assert s.restored == 0
    await s.stop()


def test_instance_tag_is_stable_even_when_nothing_can_be_written(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    unwritable = blocker / "state"  # mkdir fails here, as on a read-only disk
    clock = FakeClock()
    tags = {Service(parse_config(CONFIG), FakeGateway(clock), clock=clock,
                    state_dir=unwritable).tag for _ in range(2)}
    assert tags == {derived_tag(unwritable)}  # the same after a crash: leftovers recognised
    writable = tmp_path / "ok"
    first = Service(parse_config(CONFIG), FakeGateway(clock), clock=clock, state_dir=writable)
    assert first.tag == derived_tag(writable)
    assert (writable / "instance").read_text().strip() == first.tag
    assert derived_tag(writable) != derived_tag(unwritable)  # two services, two tags


# --- lifetimes while a long pass runs; a stop whatever is in flight ---------------------------

class SlowGateway(FakeGateway):
    """Every add takes a second of (fake) time, as on a slow router with a large rule."""

    async def add(self, spec: MappingSpec, lease: int) -> Granted:
        self.clock.advance(1.0)
        await asyncio.sleep(0)
        return await super().add(spec, lease)


class LostAnswerGateway(FakeGateway):
    """The router makes the mapping but its answer never comes (until the caller gives up)."""

    async def add(self, spec: MappingSpec, lease: int) -> Granted:
        granted = await super().add(spec, lease)
        if spec.external_port == 40001:
            await asyncio.Event().wait()
        return granted


BIG = {"rules": [{"name": "big", "open": ["udp/41000-41199"], "idle_timeout": "10m"}]}


async def test_a_pass_stops_adding_when_its_activation_lapses(tmp_path: Path) -> None:
    """A 200-port rule activated for 10 s on a router taking 1 s per add: the pass stops adding
    once the activation lapsed (it used to go on for the whole range), and what it added goes."""
    clock = FakeClock()
    gw = SlowGateway(clock)
    s = service(tmp_path, gw, clock, config=BIG)
    await s.start()
    await s.activate("big", gw.local_address, ttl=10, source=Source.API, wait=0)
    for _ in range(200):
        await asyncio.sleep(0)
        if not s.pipeline.engine.activations and not gw.ports():
            break
    adds = sum(c.startswith("add ") for c in gw.calls)
    assert adds <= 12, f"{adds} adds for an activation of 10 s at 1 s per add"
    assert not s.pipeline.engine.activations and gw.ports() == {}
    await s.stop()


async def test_stop_deletes_an_add_whose_answer_was_lost(tmp_path: Path) -> None:
    clock = FakeClock()
    gw = LostAnswerGateway(clock)
    s = service(tmp_path, gw, clock)
    await s.start()
    await s.activate("demo", gw.local_address, ttl=3600, source=Source.API, wait=0)
    for _ in range(100):
        await asyncio.sleep(0)
    assert set(gw.ports()) == {"udp/40000", "udp/40001"}  # 40001's answer hangs
    async with asyncio.timeout(5):
        await s.stop()
    assert gw.ports() == {}  # the in-flight one too: the router had made it
    assert Journal.open(tmp_path).mappings() == []


@pytest.mark.parametrize("ttl", [0.5, 0.001, float("nan"), float("inf"), 8 * 86400.0])
async def test_activation_ttl_outside_1s_to_7d_is_refused(tmp_path: Path, ttl: float) -> None:
    clock = FakeClock()
    s = Service(parse_config(CONFIG), FakeGateway(clock), clock=clock, state_dir=tmp_path)
    with pytest.raises(UsageError, match="outside 1s-7d"):
        await s.activate("demo", "192.168.1.10", ttl=ttl, source=Source.API)
    assert not s.pipeline.engine.activations
    await s.stop()


def dead_pid() -> int:
    """The pid of a process that has ended."""
    done = subprocess.Popen(["true"])
    done.wait()
    return done.pid


async def test_only_the_real_service_takes_over_a_dead_wrappers_journal(tmp_path: Path) -> None:
    """A killed `igdtrigger run` mapped on the real router: a `serve --simulate` must not take
    its journal (it would "delete" them on the simulated router and forget them)."""
    pid = dead_pid()
    dead = tmp_path / "run" / f"{pid}-1"
    j = Journal.open(dead)
    j.mappings_requested([MappingSpec(Proto.UDP, 40000, "192.168.1.10", 40000,
                                      f"igdtrigger demo run{pid}")])
    j.close()
    clock = FakeClock()
    sim = Service(parse_config(CONFIG), FakeGateway(clock), clock=clock, state_dir=tmp_path,
                  journal_dir=tmp_path / "simulate")
    assert dead.exists() and sim.pipeline.journal.mappings() == []
    await sim.stop()
    real = Service(parse_config(CONFIG), FakeGateway(clock), clock=clock, state_dir=tmp_path)
    assert not dead.exists()
    assert [m.external_port for m in real.pipeline.journal.mappings()] == [40000]
    journaled = [m.spec.key for m in real.pipeline.journal.mappings()]
    assert list(real.pipeline.mapper.orphans) == journaled
    await real.stop()


async def test_with_nothing_writable_a_crashs_leftovers_are_still_removed(tmp_path: Path) -> None:
    """No journal, no instance file: the restarted service still knows the crashed one's
    mappings by their tag (it used to start with a random tag and leave them forever on a
    router with permanent leases)."""
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    unwritable = blocker / "state"
    clock = FakeClock()
    gw = FakeGateway(clock, permanent_only=True)
    gw.foreign(Proto.UDP, 50000, gw.local_address, "libminiupnpc")  # another program's
    s1 = Service(parse_config(CONFIG), gw, clock=clock, state_dir=unwritable)
    await s1.start()
    await s1.activate("demo", gw.local_address, ttl=60, source=Source.API)
    assert len(gw.ports()) == 4
    for t in s1._tasks:  # crash
        t.cancel()
    s2 = Service(parse_config(CONFIG), gw, clock=clock, state_dir=unwritable)
    await s2.start()
    await s2._wait_applied(s2.pipeline.engine.generation, 2)
    assert gw.ports() == {"udp/50000": gw.local_address}
    await s2.stop()


# --- the wall clock jumps while the service is down (issue 12, owner variants) ----------------

@pytest.mark.parametrize(("wall_jump", "same_boot", "left"), [
    (2 * 3600.0, True, 540.0),  # NTP set the clock 2 h ahead: still 9 min left, not lapsed
    (-86400.0, True, 540.0),  # a day back (a dead RTC battery): 9 min, not a fresh 10
    (0.0, True, 540.0),
    (0.0, False, 540.0),  # rebooted: only the wall clock can tell, and it is right
    (-86400.0, False, 600.0),  # rebooted with a clock a day behind: capped at the ttl
    (2 * 3600.0, False, None),  # rebooted with a clock 2 h ahead: lapsed (fails closed)
])
async def test_restore_after_a_wall_clock_jump_uses_the_boot_clock(
        tmp_path: Path, wall_jump: float, same_boot: bool, left: float | None) -> None:
    clock = FakeClock()
    gw = FakeGateway(clock, local_address="192.168.1.10")
    s1 = Service(parse_config(CONFIG), gw, clock=clock, wall=lambda: clock.now + WALL0,
                 state_dir=tmp_path, boot=lambda: ("boot-1", clock.now))
    await s1.start()
    await s1.activate("demo", "192.168.1.10", ttl=600, source=Source.API)
    await s1._wait_applied(s1.pipeline.engine.generation, 2)
    for t in s1._tasks:  # crash
        t.cancel()
    s1.pipeline.journal.close()
    clock.advance(60)
    boot = "boot-1" if same_boot else "boot-2"
    s2 = Service(parse_config(CONFIG), gw, clock=clock,
                 wall=lambda: clock.now + WALL0 + wall_jump, state_dir=tmp_path,
                 boot=lambda: (boot, clock.now if same_boot else 5.0))
    if left is None:
        assert s2.restored == 0
    else:
        assert s2.restored == 1
        [act] = s2.pipeline.engine.activations.values()
        assert act.expires - clock() == pytest.approx(left)
    await s2.stop()


def _restore_a_row_with(tmp_path: Path, column: str, value: str) -> Service:
    """A journaled activation with one column set to ``value`` (SQL), then a start."""
    clock = FakeClock()
    now_wall = clock.now + WALL0
    j = Journal.open(tmp_path)
    j.activations_put([JournalActivation("a1", "demo", "192.168.1.10", "api", now_wall - 10,
                                         now_wall + 300, 600.0, {}, "boot-1", clock.now + 300)])
    j.close()
    with sqlite3.connect(tmp_path / FILENAME) as db:
        db.execute(f"UPDATE activations SET {column} = {value}")
    s = Service(parse_config(CONFIG), FakeGateway(clock), clock=clock,
                wall=lambda: clock.now + WALL0, state_dir=tmp_path,
                boot=lambda: ("boot-1", clock.now))
    for act in s.pipeline.engine.activations.values():  # restored only when what is left is sound
        assert 0 < act.expires - clock() <= 600
        assert act.host == "192.168.1.10"
    return s


@pytest.mark.parametrize("column", ["created_wall", "expires_wall", "ttl", "expires_boot"])
@pytest.mark.parametrize("value", ["'nan'", "-1e309", "1e309", "-5", "0", "'x'", "X'00'",
                                   "9e18"])
async def test_a_journal_row_with_any_bad_number_is_refused_without_a_traceback(
        tmp_path: Path, column: str, value: str) -> None:
    await _restore_a_row_with(tmp_path, column, value).stop()


@pytest.mark.parametrize("column", ["id", "rule", "host", "source", "meta", "boot_id"])
@pytest.mark.parametrize("value", ["''", "X'ff00'", "'[1,2]'", "'{\"a\": [1]}'", "42",
                                   "'999.999.1.1'"])
async def test_a_journal_row_with_any_bad_text_is_refused_without_a_traceback(
        tmp_path: Path, column: str, value: str) -> None:
    await _restore_a_row_with(tmp_path, column, value).stop()


# --- status never claims what is not so (issue 12, owner variants) ---------------------------

async def test_status_after_the_router_vanishes_claims_no_mapping_verified(
        tmp_path: Path) -> None:
    clock = FakeClock()
    gw = FakeGateway(clock, local_address="192.168.1.10")
    s = service(tmp_path, gw, clock)
    await s.start()
    await s.activate("demo", "192.168.1.10", ttl=3600, source=Source.API)
    await s._wait_applied(s.pipeline.engine.generation, 2)
    assert {m["verified"] for m in s.status()["mappings"]} == {True}
    gw.down = True  # the router is unplugged (it takes its table with it)
    gw.table.clear()
    clock.advance(5)
    s.wake()
    for _ in range(100):
        if not s.status()["gateway"]["up"]:
            break
        await asyncio.sleep(0.02)
    st = s.status()
    assert st["gateway"]["up"] is False
    for m in st["mappings"]:  # it said active and verified, every one
        assert m["verified"] is False
        assert "router is not answering" in m["error"]
    await s.stop()


async def test_state_directory_deleted_while_running_is_written_again_before_a_crash(
        tmp_path: Path) -> None:
    import shutil

    clock = FakeClock()
    gw = FakeGateway(clock, local_address="192.168.1.10")
    state = tmp_path / "state"
    s1 = service(state, gw, clock)
    await s1.start()
    await s1.activate("demo", "192.168.1.10", ttl=3600, source=Source.API)
    await s1._wait_applied(s1.pipeline.engine.generation, 2)
    shutil.rmtree(state)  # rm -rf of the state directory (or a tmpfiles clean-up)
    for _ in range(3):
        clock.advance(6)
        s1.wake()
        await asyncio.sleep(0.05)
    for t in s1._tasks:  # then a crash
        t.cancel()
    s1.pipeline.journal.close()
    s2 = service(state, gw, clock)
    assert s2.restored == 1  # the activation came back: its journal was written again
    # and its mappings are known, whatever the router lists
    assert len(s2.pipeline.mapper.orphans) == 3
    await s2.stop()


# --- signal timing (issue 12, owner variants) ---------------------------------------------------

SILENT_ROUTER_CONFIG = """
[gateway]
url = "http://127.0.0.1:{port}/rootDesc.xml"
discover_timeout = "30s"
ipv6_pinholes = false

[detect]
methods = []

[[rules]]
name = "demo"
open = ["udp/40000"]
"""


def _serve(tmp_path: Path, config_text: str, *extra: str) -> tuple[subprocess.Popen[str], Path]:
    port = free_port()
    config = tmp_path / "config.toml"
    config.write_text(config_text)
    ready = tmp_path / "ready"
    env = {**os.environ, "IGDTRIGGER_STATE_DIR": str(tmp_path / "state"),
           "PYTHONPATH": str(ROOT)}
    env.pop("JOURNAL_STREAM", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "igdtrigger", "serve", "--config", str(config), *extra,
         "--listen", f"127.0.0.1:{port}", "--ready-file", str(ready)], env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_ready(proc, ready, why=proc.communicate)
    return proc, ready


def _signal_and_wait(proc: subprocess.Popen[str], *sigs: signal.Signals) -> str:
    """Send ``sigs`` in a burst; the service's log once it exited (killed if it hangs)."""
    try:
        for sig in sigs:
            proc.send_signal(sig)
        return proc.communicate(timeout=60)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sigterm_before_the_router_answered_stops_at_once(tmp_path: Path) -> None:
    """A router that accepts and never answers: SIGTERM while the service still waits for it.
    With nothing mapped there is nothing to delete, so the stop does not wait on the router
    (it used to connect again and sit out the stop's 8 s budget)."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)  # accepts, never answers
        proc, _ = _serve(tmp_path, SILENT_ROUTER_CONFIG.format(port=silent.getsockname()[1]))
        time.sleep(0.3)
        err = _signal_and_wait(proc, signal.SIGTERM)
    assert proc.returncode == 0, err
    assert "SIGTERM received" in err
    assert "Traceback" not in err, err  # the cancelled router probes' errors were unretrieved
    stopping = err[err.index("stopping: removing mappings"):]
    assert "gateway down" not in stopping, err  # the stop did not go looking for the router


def test_a_second_sigterm_and_a_ctrl_c_during_the_stop_change_nothing(tmp_path: Path) -> None:
    proc, _ = _serve(tmp_path, SERVE_CONFIG, "--simulate")
    env = {**os.environ, "IGDTRIGGER_STATE_DIR": str(tmp_path / "state"),
           "PYTHONPATH": str(ROOT)}
    args = proc.args
    assert isinstance(args, list)
    act = subprocess.run([sys.executable, "-m", "igdtrigger", "activate", "demo", "--for",
                          "1h", "--server", f"http://{args[args.index('--listen') + 1]}"],
                         env=env, capture_output=True, text=True, timeout=30)
    assert act.returncode == 0, act.stdout + act.stderr
    err = _signal_and_wait(proc, signal.SIGTERM, signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    assert proc.returncode == 0, err
    assert "(1 mapping(s) removed)" in err, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert journal_activations(tmp_path / "state" / "simulate") == []
