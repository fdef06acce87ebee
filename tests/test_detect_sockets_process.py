"""Socket-table and process detectors: parsing, real tables on this host, service wiring."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from igdtrigger.cli.child import ProcessWaiter
from igdtrigger.config import parse_config
from igdtrigger.core.errors import ConfigError, DetectionUnavailable
from igdtrigger.core.model import Flow, FlowEnded, FlowLive, ProcessSeen, Proto
from igdtrigger.detect.base import FlowSink
from igdtrigger.detect.process import Matcher, ProcessDetector, scan_proc, scan_psutil
from igdtrigger.detect.sockets import (
    Conn,
    SocketTableDetector,
    parse_proc_net,
    read_proc_net,
    read_psutil,
)
from igdtrigger.runtime.compose import build_detectors
from igdtrigger.runtime.service import Service

from .fakes import FakeClock, FakeGateway
from .test_engine import make, rule

LINUX = sys.platform.startswith("linux")
HEADER = ("  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  "
          "timeout inode\n")


def line(local: str, remote: str, st: str) -> str:
    return f"   0: {local} {remote} {st} 00000000:00000000 00:00000000 00000000  1000  0 1 1\n"


def test_parse_proc_net_tcp() -> None:
    text = HEADER + "".join([
        line("0A00A8C0:C350", "08080808:6987", "01"),  # 192.168.0.10:50000 -> 8.8.8.8:27015
        line("0A00A8C0:C351", "08080808:6988", "02"),  # SYN_SENT: an outbound connect
        line("00000000:1F90", "00000000:0000", "0A"),  # listening on 8080
        line("0A00A8C0:1F90", "09090909:D431", "01"),  # accepted on 8080: inbound
        line("0A00A8C0:C352", "08080808:6989", "06"),  # TIME_WAIT: over
        # FIN_WAIT2: closed by the game, the peer never closed (an orphan for 60 s): over
        line("0A00A8C0:C353", "08080808:6989", "05"),
        "   1: garbage\n",
    ])
    conns, listening = parse_proc_net(text, Proto.TCP, v6=False)
    assert listening == {8080}
    assert conns == [
        (Proto.TCP, "192.168.0.10", 50000, "8.8.8.8", 27015),
        (Proto.TCP, "192.168.0.10", 50001, "8.8.8.8", 27016),
        (Proto.TCP, "192.168.0.10", 8080, "9.9.9.9", 54321),  # read_proc_net turns it around
    ]


def test_parse_proc_net_udp6() -> None:
    # 2a0c::10 as /proc writes it (four little-endian words); ::ffff:192.168.0.10 (v4-mapped)
    v6 = "00000C2A000000000000000010000000"
    mapped = "0000000000000000FFFF00000A00A8C0"
    remote = "00000C2A000000000000000099000000"
    text = HEADER + line(f"{v6}:C350", f"{remote}:6987", "01") + line(
        f"{mapped}:C351", f"{remote}:6987", "01") + line(f"{v6}:0035", "0" * 32 + ":0000", "07")
    conns, listening = parse_proc_net(text, Proto.UDP, v6=True)
    assert conns == [(Proto.UDP, "2a0c::10", 50000, "2a0c::99", 27015),
                     (Proto.UDP, "192.168.0.10", 50001, "2a0c::99", 27015)]
    assert listening == {53}


@pytest.fixture
def loopback_connection() -> Iterator[tuple[int, int]]:
    """A real TCP connection on loopback: (server port, client port)."""
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        with socket.create_connection(srv.getsockname()) as cli:
            conn, _ = srv.accept()
            with conn:
                yield srv.getsockname()[1], cli.getsockname()[1]


@pytest.mark.skipif(not LINUX, reason="procfs")
def test_read_proc_net_sees_our_outbound_connection_only(
        loopback_connection: tuple[int, int]) -> None:
    server, client = loopback_connection
    got = read_proc_net()
    assert (Proto.TCP, "127.0.0.1", client, "127.0.0.1", server) in got
    # the accepted side is inbound: listed as the flow that arrived (the same tuple on
    # loopback), never as a flow from the server port to the client's
    assert not [c for c in got if c[4] == client]


def test_read_psutil_sees_our_outbound_connection_only(
        loopback_connection: tuple[int, int]) -> None:
    server, client = loopback_connection
    got = read_psutil()
    assert (Proto.TCP, "127.0.0.1", client, "127.0.0.1", server) in got
    assert not [c for c in got if c[4] == client]


def test_each_socket_is_reported_once() -> None:
    table: list[Conn] = [(Proto.UDP, "192.168.0.10", 5000, "8.8.8.8", 27015),
                         (Proto.TCP, "192.168.0.10", 5001, "8.8.8.8", 443)]
    det = SocketTableDetector(reader=lambda: list(table),
                              wanted=lambda proto, port: port == 27015)
    flows = det.poll()
    assert flows == [Flow(Proto.UDP, ipaddress.ip_address("192.168.0.10"),
                          ipaddress.ip_address("8.8.8.8"), 5000, 27015)]
    assert det.poll() == []  # still open: already reported
    table.clear()
    assert det.poll() == []
    table.append((Proto.UDP, "192.168.0.10", 5000, "8.8.8.8", 27015))
    assert len(det.poll()) == 1  # a new socket on the same tuple after it closed
    assert det.polls == 4 and det.poll_seconds >= 0


def test_an_inbound_connection_on_an_opened_port_holds_until_it_closes(
        tmp_path: Path) -> None:
    """Issue 18, sockets only: a WAN client connected to the port the rule opened (the accepted
    socket on a listening port) is inbound use: it holds the activation however silent, and
    its close starts the idle timer."""
    eng, clock, _ = make(rule(trigger="tcp/27015", open_="tcp/40000", idle=5))
    proc = tmp_path / "net"
    proc.mkdir()
    rows = {"game": line("0A00A8C0:C350", "08080808:6987", "01"),  # 192.168.0.10 -> :27015
            "listen": line("00000000:9C40", "00000000:0000", "0A"),  # listening on 40000
            "peer": line("0A00A8C0:9C40", "09090909:D431", "01")}  # 9.9.9.9 connected to it

    def table(*names: str) -> None:
        (proc / "tcp").write_text(HEADER + "".join(rows[n] for n in names))

    def feed(det: SocketTableDetector) -> None:
        for obs in det.look():
            if isinstance(obs, Flow):
                eng.on_flow(obs)
            elif isinstance(obs, FlowLive):
                eng.on_flow_live(obs.flow, connected=obs.connected, idle=obs.idle)
            elif isinstance(obs, FlowEnded):
                eng.on_flow_ended(obs.flow, closed=obs.closed)

    det = SocketTableDetector(reader=lambda: read_proc_net(str(proc)), wanted=eng.wants)
    table("game", "listen")
    feed(det)
    (act,) = eng.activations.values()
    table("listen", "peer")  # the game's connection closed; the WAN peer's is connected
    feed(det)
    assert eng.flows_inbound == 1
    assert act.held and act.hold_reason(clock.now) == "1 live flow"
    clock.advance(60)
    assert not eng.expire(), "the connected inbound peer holds the ports"
    table("listen")  # the peer hung up
    feed(det)
    clock.advance(4.9)
    assert not eng.expire()
    clock.advance(0.2)
    assert eng.expire() == [act]


def test_socket_detector_check_explains() -> None:
    def denied() -> list[Conn]:
        raise PermissionError("psutil.AccessDenied")

    with pytest.raises(DetectionUnavailable, match="macOS"):
        SocketTableDetector(reader=denied).check()


# --- processes --------------------------------------------------------------------------------

def test_matcher() -> None:
    m = Matcher(["EldenRing.exe", "cs2", "FactoryGameSteam-Win64-Shipping.exe"])
    assert m.match("cs2") == "cs2"
    assert m.match("eldenring.exe") == "eldenring.exe"
    assert m.match("ELDENRING.EXE") == "eldenring.exe"
    assert m.match("cs") is None
    # Linux truncates comm to 15 bytes: the full name comes from argv[0]
    assert m.needs_cmdline("factorygamestea")
    assert m.match("factorygamestea",
                   r"Z:\games\Satisfactory\FactoryGameSteam-Win64-Shipping.exe") \
        == "factorygamesteam-win64-shipping.exe"
    assert m.match("wine64-preloader", r"C:\Games\eldenring.exe") == "eldenring.exe"
    assert m.match("bash", "/usr/bin/bash") is None


@pytest.fixture
def game(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """Two 'games' (copies of sleep): a short name and one longer than comm's 15 bytes."""
    short = tmp_path / "igdtgame7"
    long = tmp_path / "igdtrigger-long-game-name.exe"
    for p in (short, long):
        shutil.copy(shutil.which("sleep") or "/bin/sleep", p)
    procs = [subprocess.Popen([str(p), "30"]) for p in (short, long)]
    time.sleep(0.2)
    yield short.name, long.name
    for proc in procs:
        proc.kill()
        proc.wait()


@pytest.mark.skipif(not LINUX, reason="procfs")
def test_scan_proc_finds_running_games(game: tuple[str, str]) -> None:
    short, long = game
    found = scan_proc(Matcher([short, long, "not-running-game"]))
    assert found == {short, long}


def test_scan_psutil_finds_running_games(game: tuple[str, str]) -> None:
    short, long = game
    assert scan_psutil(Matcher([short, long, "not-running-game"])) == {short, long}


def test_process_detector_reports_what_runs() -> None:
    running: set[str] = {"cs2"}
    det = ProcessDetector(["cs2", "dota2"], scanner=lambda m: set(running))
    assert det.poll() == ProcessSeen(frozenset({"cs2"}))
    running.clear()
    assert det.poll() == ProcessSeen(frozenset())
    with pytest.raises(DetectionUnavailable, match="no rule names a process"):
        ProcessDetector([]).check()


# --- configuration and the service ------------------------------------------------------------

RULES = [{"name": "game", "trigger": ["udp/27015"], "open": ["udp/40000"],
          "process": ["igdtgame7"], "idle_timeout": "5s"}]


def test_detect_config() -> None:
    cfg = parse_config({"rules": RULES})
    assert cfg.detect.methods == ("conntrack", "sockets", "process")
    assert not cfg.detect.explicit
    names = [d.name for d in build_detectors(cfg)]
    assert names == ["conntrack", "sockets", "process"]
    cfg = parse_config({"detect": {"methods": ["sockets"], "socket_interval": "250ms"},
                        "rules": RULES})
    [det] = build_detectors(cfg)
    assert isinstance(det, SocketTableDetector) and det.interval == 0.25
    assert det.standby_for == ""
    with pytest.raises(ConfigError, match="unknown detector 'ebpf'"):
        parse_config({"detect": {"methods": ["ebpf"]}})
    with pytest.raises(ConfigError, match="process_interval"):
        parse_config({"detect": {"process_interval": "1ms"}})
    with pytest.raises(ConfigError, match="executable names"):
        parse_config({"rules": [{**RULES[0], "process": ["C:\\Games\\x.exe"]}]})


class FakeDetector:
    def __init__(self, name: str, *, ok: bool = True, standby_for: str = "") -> None:
        self.name = name
        self.ok = ok
        self.standby_for = standby_for
        self.started = asyncio.Event()
        self.finish = asyncio.Event()

    def check(self) -> None:
        if not self.ok:
            raise DetectionUnavailable(f"{self.name} cannot run here")

    async def run(self, sink: FlowSink) -> None:
        self.started.set()
        await self.finish.wait()
        raise DetectionUnavailable(f"{self.name} stopped")


def status_of(svc: Service) -> dict[str, Any]:
    return {d["name"]: d for d in svc.status()["detectors"]}


async def test_sockets_stand_in_for_conntrack(tmp_path: Path) -> None:
    clock = FakeClock()
    conntrack, sockets = FakeDetector("conntrack"), FakeDetector("sockets",
                                                                 standby_for="conntrack")
    svc = Service(parse_config({"rules": RULES}), FakeGateway(clock), clock=clock,
                  state_dir=tmp_path, detectors=[conntrack, sockets])
    await svc.start()
    try:
        await asyncio.wait_for(conntrack.started.wait(), 2)
        st = status_of(svc)
        assert st["conntrack"]["active"] and not st["sockets"]["active"]
        assert st["sockets"]["reason"].startswith("standby")
        assert not [w for w in svc.status()["warnings"] if "detector" in w]
        conntrack.finish.set()  # conntrack dies: the socket table takes over
        await asyncio.wait_for(sockets.started.wait(), 2)
        st = status_of(svc)
        assert st["sockets"]["active"] and not st["conntrack"]["active"]
    finally:
        await svc.stop()


async def test_without_conntrack_the_socket_table_runs(tmp_path: Path) -> None:
    clock = FakeClock()
    conntrack = FakeDetector("conntrack", ok=False)
    sockets = FakeDetector("sockets", standby_for="conntrack")
    svc = Service(parse_config({"rules": RULES}), FakeGateway(clock), clock=clock,
                  state_dir=tmp_path, detectors=[conntrack, sockets])
    await svc.start()
    try:
        await asyncio.wait_for(sockets.started.wait(), 2)
        assert "conntrack cannot run here" in status_of(svc)["conntrack"]["reason"]
    finally:
        await svc.stop()


async def test_process_seen_holds_the_rule_then_lapses(tmp_path: Path) -> None:
    clock = FakeClock()
    svc = Service(parse_config({"rules": RULES}), FakeGateway(clock, local_address="10.0.0.5"),
                  clock=clock, state_dir=tmp_path)
    await svc.gateway.connect()  # the router tells us our LAN address
    svc.observe(ProcessSeen(frozenset({"igdtgame7"})))
    [act] = svc.pipeline.engine.activations.values()
    assert (act.rule.name, act.host, act.source.value) == ("game", "10.0.0.5", "process")
    for _ in range(3):  # still running: held past the idle timeout
        clock.advance(4)
        svc.observe(ProcessSeen(frozenset({"igdtgame7"})))
        svc.pipeline.engine.expire()
    assert len(svc.pipeline.engine.activations) == 1
    svc.observe(ProcessSeen(frozenset()))  # gone: lapses idle_timeout after the last sighting
    clock.advance(5.1)
    svc.pipeline.engine.expire()
    assert svc.pipeline.engine.activations == {}
    svc.pipeline.journal.close()


# --- run --wait-process -----------------------------------------------------------------------

def test_waiter_holds_while_the_process_runs() -> None:
    seq = iter([set(), {"game"}, {"game"}, set(), {"game"}])
    scans: list[int] = []

    def scan(_m: Any) -> set[str]:
        scans.append(1)
        return next(seq)

    ProcessWaiter(["game"], 10, scan=scan).wait(lambda s: False)
    assert len(scans) == 4  # absent, appears, runs, gone: done (never the 5th)


def test_waiter_gives_up_when_the_process_never_comes() -> None:
    t0 = time.monotonic()
    ProcessWaiter(["game"], 0.0, scan=lambda m: set()).wait(lambda s: False)
    assert time.monotonic() - t0 < 1


def test_waiter_stops_on_a_signal() -> None:
    calls: list[float] = []

    def pause(seconds: float) -> bool:
        calls.append(seconds)
        return True

    ProcessWaiter(["game"], 60, scan=lambda m: {"game"}).wait(pause)
    assert calls == [1.0]


@pytest.mark.skipif(not LINUX, reason="POSIX signals and procfs")
def test_run_wait_process_outlives_the_launcher_stub(tmp_path: Path) -> None:
    """The stub starts the game and exits 3 at once; `run` returns 3 when the game is gone."""
    game = tmp_path / "igdtstubgame"
    shutil.copy(shutil.which("sleep") or "/bin/sleep", game)
    config = tmp_path / "config.toml"
    config.write_text('[gateway]\nurl = "http://127.0.0.1:9/rootDesc.xml"\n'
                      '[api]\nlisten = "127.0.0.1:9"\n'
                      '[[rules]]\nname = "demo"\nopen = ["udp/40000"]\n')
    env = {**os.environ, "IGDTRIGGER_STATE_DIR": str(tmp_path / "state")}
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "igdtrigger", "run", "--config", str(config),
                        "--rule", "demo", "--wait-process", game.name, "--", "sh", "-c",
                        f"{game} 2 & exit 3"], env=env, capture_output=True, text=True,
                       timeout=60)
    took = time.monotonic() - t0
    assert p.returncode == 3, p.stderr
    assert f"holding the ports while {game.name} runs" in p.stderr
    assert took >= 1.9, f"returned after {took:.1f}s, before the game ended"


async def test_the_socket_table_says_it_listed_its_flows_after_its_first_good_look() -> None:
    """FlowsListed (restored holds are settled on it) follows the first look that read the
    table, never a failed one."""
    reads = 0

    def reader() -> list[Conn]:
        nonlocal reads
        reads += 1
        if reads == 1:
            raise OSError("transient")
        return [(Proto.TCP, "192.168.0.10", 50000, "8.8.8.8", 27015)]

    got: list[object] = []
    det = SocketTableDetector(0.01, reader=reader)
    task = asyncio.create_task(det.run(got.append))
    for _ in range(100):
        await asyncio.sleep(0.01)
        if reads >= 3:
            break
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    kinds = [type(o).__name__ for o in got]
    assert kinds[:3] == ["Flow", "FlowLive", "FlowsListed"], kinds
    assert kinds.count("FlowsListed") == 1
