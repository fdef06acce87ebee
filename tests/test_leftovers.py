"""Nothing leaks: what a killed `igdtrigger run` (no service) mapped is removed by the next
`run` or `serve` on the machine, on a router that only takes permanent leases (a simulated one
here; tests/lab has the same against miniupnpd)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from igdtrigger.runtime.leftovers import (
    dead_run_tag,
    dead_runs,
    own_run_dir,
    process_start,
    run_alive,
)
from igdtrigger.sim.device import SimulatedRouter
from igdtrigger.sim.router import SimulatedIgdThread, run_in_thread

from .fakes import free_port, wait_for

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc")

CONFIG = """
[gateway]
url = "{url}"
ipv6_pinholes = false

[api]
listen = "127.0.0.1:{port}"

[detect]
methods = []

[service]
state_dir = "{state}"

[[rules]]
name = "demo"
open = ["udp/40000-40001"]
"""


@pytest.fixture
def router() -> Iterator[SimulatedIgdThread]:
    sim = run_in_thread(SimulatedRouter(lease_mode="permanent_only_725"))
    yield sim
    sim.stop()


def descriptions(sim: SimulatedIgdThread) -> list[str]:
    return sorted(m.description for m in sim.call(sim.router.mappings))


def write_config(tmp_path: Path, sim: SimulatedIgdThread, state: Path) -> Path:
    cfg = tmp_path / f"config-{state.name}.toml"
    cfg.write_text(CONFIG.format(url=sim.url, port=free_port(), state=state))
    return cfg


def run_wrapper(cfg: Path, *command: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "IGDTRIGGER_TOKEN": ""}
    return subprocess.Popen(
        [sys.executable, "-m", "igdtrigger", "run", "--config", str(cfg), "--rule", "demo",
         "--", *command], env=env, text=True, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, start_new_session=True)


def kill_9(proc: subprocess.Popen[str]) -> None:
    """kill -9 of the wrapper alone; its child (the game) is ended afterwards by the test."""
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    if proc.stderr is not None:
        proc.stderr.close()


def crashed_wrapper(tmp_path: Path, sim: SimulatedIgdThread, state: Path) -> int:
    cfg = write_config(tmp_path, sim, state)
    proc = run_wrapper(cfg, "sleep", "60")
    wait_for(lambda: len(descriptions(sim)) == 2, 30, "the wrapper to map both ports")
    kill_9(proc)
    time.sleep(0.2)
    assert descriptions(sim) == [f"igdtrigger demo run{proc.pid}"] * 2  # permanent: forever
    return proc.pid


def test_relaunching_the_same_rule_after_a_kill_9_reclaims_its_ports(
        tmp_path: Path, router: SimulatedIgdThread) -> None:
    """It used to open 0 of 2 ("already mapped ... igdtrigger leaves it alone")."""
    state = tmp_path / "state"
    dead = crashed_wrapper(tmp_path, router, state)
    assert [d.name.split("-")[0] for d in dead_runs(state)] == [str(dead)]
    again = run_wrapper(write_config(tmp_path, router, state), "sleep", "4")
    wait_for(lambda: descriptions(router) == [f"igdtrigger demo run{again.pid}"] * 2, 30,
             "the new wrapper to hold both ports")
    _, err = again.communicate(timeout=30)
    assert again.returncode == 0, err
    assert "opened 0 of" not in err and "leaves it alone" not in err, err
    assert descriptions(router) == []  # and removed at its clean exit
    assert not (state / "run").exists() or not list((state / "run").iterdir())


def test_a_failed_run_still_removes_a_dead_wrappers_leftovers(
        tmp_path: Path, router: SimulatedIgdThread) -> None:
    """The next `run` of another command (exit 3) first removes what the dead one left."""
    state = tmp_path / "state"
    crashed_wrapper(tmp_path, router, state)
    again = run_wrapper(write_config(tmp_path, router, state), sys.executable, "-c",
                        "import time, sys; time.sleep(2); sys.exit(3)")
    _, err = again.communicate(timeout=30)
    assert again.returncode == 3, err
    assert descriptions(router) == []


def test_serve_removes_a_dead_wrappers_leftovers_even_without_its_journal(
        tmp_path: Path, router: SimulatedIgdThread) -> None:
    """The service's state directory is not the wrapper's (root vs a user): the tag of a wrapper
    that is not running, on a mapping to this host, is enough."""
    crashed_wrapper(tmp_path, router, tmp_path / "user-state")
    cfg = write_config(tmp_path, router, tmp_path / "service-state")
    ready = tmp_path / "ready"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "igdtrigger", "serve", "--config", str(cfg), "--ready-file",
         str(ready)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: descriptions(router) == [], 30, "serve to remove the leftovers")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert "left by an earlier run" in err, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_liveness_of_a_wrapper_is_its_pid_and_start_time() -> None:
    me = os.getpid()
    start = process_start(me)
    assert start is not None and run_alive(me, start)
    assert not run_alive(me, str(int(start) + 1))  # the pid was reused since
    child = subprocess.Popen(["true"])
    child.wait()
    assert not run_alive(child.pid, "1")
    assert dead_run_tag(f"igdtrigger demo run{child.pid}")
    assert not dead_run_tag(f"igdtrigger demo run{me}")  # our own
    assert not dead_run_tag("igdtrigger demo ab12cd")  # a service's tag: not a wrapper's
    assert not dead_run_tag("upnpc run1")
    assert own_run_dir(Path("/x")).name == f"{me}-{start}"


# --- igdtrigger gateway --list / --clean -------------------------------------------------------

def add_mappings(sim: SimulatedIgdThread, entries: list[tuple[int, str, str]]) -> None:
    """Map udp/<port> -> client with a description, as the program it names would."""
    import asyncio

    from igdtrigger.core.model import MappingSpec, Proto
    from igdtrigger.gateway.select import build_gateway

    async def go() -> None:
        gw = build_gateway(sim.url, backend="soap")
        await gw.connect()
        for port, client, desc in entries:
            await gw.add(MappingSpec(Proto.UDP, port, client, port, desc), 0)
        await gw.close()

    asyncio.run(go())


def gateway_cmd(cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "IGDTRIGGER_TOKEN": ""}
    return subprocess.run([sys.executable, "-m", "igdtrigger", "gateway", "--config", str(cfg),
                           *args], env=env, capture_output=True, text=True, timeout=60)


def test_gateway_list_and_clean_remove_ours_never_another_programs(
        tmp_path: Path, router: SimulatedIgdThread, request: pytest.FixtureRequest) -> None:
    import json

    from igdtrigger.runtime.state import derived_tag

    state = tmp_path / "state"
    cfg = write_config(tmp_path, router, state)
    dead = subprocess.Popen(["true"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "igdtrigger",
                             "run"])

    def reap() -> None:
        live.kill()
        live.wait()

    request.addfinalizer(reap)
    mine = derived_tag(state)  # no service ever wrote the state directory: the derived tag
    add_mappings(router, [
        (41000, "127.0.0.1", "libminiupnpc"),  # upnpc -a on this host: another program's
        (41001, "127.0.0.1", f"igdtrigger game {mine}"),  # this service's, not running
        (41002, "127.0.0.1", f"igdtrigger game run{dead.pid}"),  # a killed wrapper's
        (41003, "127.0.0.1", f"igdtrigger game run{live.pid}"),  # a running wrapper's
        (41004, "192.168.1.77", "igdtrigger game ab12cd"),  # another machine's igdtrigger
    ])
    listed = gateway_cmd(cfg, "--list", "--json")
    assert listed.returncode == 0, listed.stderr
    table = {m["external_port"]: m for m in json.loads(listed.stdout)["mappings"]}
    assert {p for p, m in table.items() if m["leftover"]} == {41001, 41002}
    assert not table[41000]["ours"] and table[41004]["ours"]
    text = gateway_cmd(cfg, "--list").stdout
    assert "another program" in text and "gateway --clean removes them" in text
    dry = gateway_cmd(cfg, "--clean", "--dry-run")
    assert "would remove 2 leftover mapping(s)" in dry.stdout, dry.stdout + dry.stderr
    assert len(descriptions(router)) == 5
    done = gateway_cmd(cfg, "--clean")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "removed 2 leftover mapping(s)" in done.stdout
    assert {m.external_port for m in router.call(router.router.mappings)} == {41000, 41003,
                                                                               41004}


def test_a_wrapper_whose_game_ends_mid_pass_stops_adding_and_leaves_nothing(
        tmp_path: Path) -> None:
    """A 500-port rule on a router taking 20 ms per call: the game exits after a second; the
    wrapper abandons the pass (it used to add on for 5 s, then exit with them mapped)."""
    sim = run_in_thread(SimulatedRouter(latency=0.02))
    try:
        cfg = write_config(tmp_path, sim, tmp_path / "state")
        cfg.write_text(cfg.read_text().replace('"udp/40000-40001"', '"udp/40000-40499"'))
        t0 = time.monotonic()
        p = run_wrapper(cfg, "sleep", "1")
        _, err = p.communicate(timeout=60)
        took = time.monotonic() - t0
        assert p.returncode == 0, err
        assert descriptions(sim) == [], err
        assert took < 30, took  # a bound against hanging, not a timing claim
    finally:
        sim.stop()


# --- liveness across pid namespaces (issue 12, owner variants) ------------------------------

BEACON_HOLDER = """
import sys, time
from igdtrigger.runtime.leftovers import hold_beacon
b = hold_beacon()
print("held" if b is not None else "none", flush=True)
time.sleep(60)
"""


def _in_own_pid_namespace(code: str) -> str:
    """Run ``code`` in a fresh pid namespace with its own /proc (a container with the host's
    network, as `docker run --network host` makes)."""
    out = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c",
                          code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for a pid namespace")
def test_a_live_wrapper_is_not_taken_for_dead_from_another_pid_namespace(tmp_path: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", BEACON_HOLDER], stdout=subprocess.PIPE,
                              text=True, cwd=ROOT)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        pid = holder.pid
        start = process_start(pid)
        (tmp_path / "run" / f"{pid}-{start}").mkdir(parents=True)
        code = (f"from pathlib import Path\n"
                f"from igdtrigger.runtime.leftovers import dead_run_tag, dead_runs\n"
                f"import os\n"
                f"print(os.path.exists('/proc/{pid}'),"
                f" dead_run_tag('igdtrigger demo run{pid}'),"
                f" len(dead_runs(Path({str(tmp_path)!r}))))")
        seen, tag_dead, dirs_dead = _in_own_pid_namespace(code).split()
        if seen == "True":
            pytest.skip("the pid happens to exist in the new namespace")
        assert (tag_dead, dirs_dead) == ("False", "0")  # alive: its mappings are left alone
    finally:
        holder.kill()
        holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()
    # once it is dead (kill -9: the kernel drops the beacon), the same check reclaims
    seen, tag_dead, dirs_dead = _in_own_pid_namespace(code).split()
    assert (tag_dead, dirs_dead) == ("True", "1")


def test_a_wrapper_pid_reused_by_another_program_is_dead(tmp_path: Path) -> None:
    other = subprocess.Popen(["sleep", "60"])
    try:
        assert dead_run_tag(f"igdtrigger demo run{other.pid}")
        (tmp_path / "run" / f"{other.pid}-1").mkdir(parents=True)  # another start time
        assert dead_runs(tmp_path) == [tmp_path / "run" / f"{other.pid}-1"]
    finally:
        other.kill()
        other.wait()


def test_kill_9_of_run_during_its_first_add_leaves_nothing_after_the_next_run(
        tmp_path: Path) -> None:
    """The router did the add but its answer had not arrived when the wrapper died: the
    mapping is on the router, journaled as requested only. The next run removes it."""
    sim = run_in_thread(SimulatedRouter(lease_mode="permanent_only_725"))
    try:
        state = tmp_path / "state"
        cfg = write_config(tmp_path, sim, state)
        proc = run_wrapper(cfg, "sleep", "60")
        # once its journal is open (the router found), every answer comes late: an add the
        # router did stays unanswered for a while
        wait_for(lambda: any((state / "run").glob("*/journal.sqlite3")), 60,
                 "the wrapper to open its journal")
        sim.router.latency = 1.5
        wait_for(lambda: len(descriptions(sim)) >= 1, 60, "the router to have done an add")
        kill_9(proc)  # its answer still on the way
        assert any(d == f"igdtrigger demo run{proc.pid}" for d in descriptions(sim))
        sim.router.latency = 0.0
        again = run_wrapper(cfg, "true")
        _, err = again.communicate(timeout=60)
        assert again.returncode == 0, err
        assert descriptions(sim) == []
    finally:
        sim.stop()
