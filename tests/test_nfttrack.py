"""The plain machine: nothing makes the kernel track connections, so conntrack never announces a
trigger flow. The service loads its own nftables table (``inet igdtrigger``) so it does, says
why not where it cannot (then the socket table stands in), and never reports conntrack active
on the mere fact that its netlink socket opened.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer

import igdtrigger.runtime.detectors as service_mod
from igdtrigger.api.app import make_app
from igdtrigger.api.metrics import Metrics
from igdtrigger.cli.doctor import check_detectors, check_tracking, doctor
from igdtrigger.config import parse_config
from igdtrigger.core.errors import DetectionUnavailable
from igdtrigger.core.model import PortRange, Proto, parse_port_spec
from igdtrigger.detect.base import FlowSink
from igdtrigger.detect.nfttrack import TABLE, KernelTracking, merge_ranges, ruleset
from igdtrigger.nftcmd import NftResult
from igdtrigger.runtime.service import Service
from igdtrigger.runtime.views import DetectorView

from .fakes import FakeClock, FakeGateway

REPO = Path(__file__).resolve().parent.parent
RULES = [{"name": "game", "trigger": ["udp/27015", "tcp/27015-27030"],
          "open": ["udp/40000-40002", "both/3074"], "idle_timeout": "5s"}]


def ports(*specs: str) -> list[PortRange]:
    return [r for s in specs for r in parse_port_spec(s)]


def test_ranges_are_merged_per_protocol() -> None:
    merged = merge_ranges(ports("udp/27015", "udp/27010-27016", "udp/27017", "tcp/80",
                                "udp/30000", "tcp/79"))
    assert merged == {Proto.TCP: [(79, 80)], Proto.UDP: [(27010, 27017), (30000, 30000)]}


def test_ruleset_touches_only_our_table_and_replaces_it_atomically() -> None:
    text = ruleset(ports("udp/27015", "tcp/27015-27030"), ports("udp/40000-40002"))
    lines = [ln.strip() for ln in text.splitlines()]
    # one transaction: create-if-missing, delete (a stale table of a crashed run), define
    assert lines[:3] == [f"table {TABLE} {{}}", f"delete table {TABLE}", f"table {TABLE} {{"]
    assert [ln for ln in lines if ln.startswith(("table", "delete"))] == lines[:3]
    assert "udp dport { 27015 } ct state new counter" in lines
    assert "tcp dport { 27015-27030 } ct state new counter" in lines
    assert "udp dport { 40000-40002 } ct state new counter" in lines
    for verdict in ("drop", "accept;", "reject", "jump", "goto", "nat", "mark set"):
        assert not [ln for ln in lines if verdict in ln and "policy accept" not in ln], verdict


class FakeNft:
    """Records nft invocations; fails with what the real one prints without CAP_NET_ADMIN."""

    def __init__(self, *, allowed: bool = True) -> None:
        self.allowed = allowed
        self.packets = 0  # what our trigger_out counter shows
        self.calls: list[tuple[list[str], str]] = []
        self.table = False

    def __call__(self, argv: Sequence[str], script: str) -> NftResult:
        self.calls.append((list(argv), script))
        if not self.allowed:
            return NftResult(1, "", "Error: Could not process rule: Operation not permitted\n")
        if "list" in argv:
            rule = {"rule": {"family": "inet", "table": "igdtrigger", "chain": "trigger_out",
                             "expr": [{"match": {}}, {"counter": {"packets": self.packets,
                                                                  "bytes": 40}}]}}
            return NftResult(0 if self.table else 1, json.dumps({"nftables": [rule]}))
        self.table = "ct state new" in script
        return NftResult(0)


class FakeDetector:
    """A detector that can run here; conntrack's events_seen grows when the kernel tracks."""

    def __init__(self, name: str, standby_for: str = "") -> None:
        self.name, self.standby_for = name, standby_for
        self.events_seen = 0
        self.flows_reported = 0
        self.running = asyncio.Event()

    def check(self) -> None:
        pass

    async def run(self, sink: FlowSink) -> None:
        self.running.set()
        await asyncio.Event().wait()


def detectors_of(svc: Service) -> dict[str, DetectorView]:
    return {d["name"]: d for d in svc.status()["detectors"]}


async def test_plain_machine_without_privilege_is_not_reported_active(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """nft refused (no CAP_NET_ADMIN) and a loopback probe sees no event: conntrack is listening
    but blind, status says so and why, and the socket table takes over; once events do arrive
    conntrack is reported active again."""
    monkeypatch.setattr(service_mod, "TRACKING_CHECK", 0.05)
    clock = FakeClock()
    conntrack, sockets = FakeDetector("conntrack"), FakeDetector("sockets", "conntrack")
    nft = FakeNft(allowed=False)
    tracking = KernelTracking(nft="/usr/sbin/nft", runner=nft, probe=lambda t, w: False,
                              netlink=False)
    svc = Service(parse_config({"rules": RULES}), FakeGateway(clock), clock=clock,
                  state_dir=tmp_path, detectors=[conntrack, sockets], tracking=tracking)
    await svc.start()
    try:
        await asyncio.wait_for(sockets.running.wait(), 5)
        st = detectors_of(svc)
        assert not st["conntrack"]["active"]
        assert "does not track connections" in st["conntrack"]["reason"]
        assert "CAP_NET_ADMIN" in st["conntrack"]["reason"]
        assert st["sockets"]["active"]
        assert any("detector conntrack inactive" in w for w in svc.status()["warnings"])
        assert st["conntrack"]["tracking"]["loaded"] is False
        conntrack.events_seen = 3  # the user added a firewall rule: events arrive
        for _ in range(200):
            if detectors_of(svc)["conntrack"]["active"]:
                break
            await asyncio.sleep(0.02)
        st = detectors_of(svc)
        assert st["conntrack"]["active"] and "events seen" in st["conntrack"]["detail"]
    finally:
        await svc.stop()


async def test_table_loaded_at_start_put_back_when_flushed_removed_at_stop(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(service_mod, "TRACKING_CHECK", 0.05)
    clock = FakeClock()
    conntrack, sockets = FakeDetector("conntrack"), FakeDetector("sockets", "conntrack")
    nft = FakeNft()
    probes: list[float] = []

    def probe(timeout: float, wanted: object) -> bool:
        probes.append(timeout)
        return False

    tracking = KernelTracking(nft="/usr/sbin/nft", runner=nft, probe=probe, netlink=False)
    svc = Service(parse_config({"rules": RULES}), FakeGateway(clock), clock=clock,
                  state_dir=tmp_path, detectors=[conntrack, sockets], tracking=tracking)
    await svc.start()
    try:
        st = detectors_of(svc)
        assert st["conntrack"]["active"] and TABLE in st["conntrack"]["detail"]
        assert st["sockets"]["reason"].startswith("standby")
        assert nft.table and not probes
        [(argv, script)] = nft.calls
        assert argv[-2:] == ["-f", "-"] and "udp dport { 27015 }" in script
        nft.table = False  # `nft flush ruleset` (a firewall reload)
        for _ in range(200):
            if nft.table:
                break
            await asyncio.sleep(0.02)
        assert nft.table and tracking.reinstalls == 1
        text = Metrics().render(svc)
        assert "igdtrigger_tracking_table_loaded 1" in text
        assert 'igdtrigger_detector_active{detector="conntrack"} 1' in text
    finally:
        await svc.stop()
    assert not nft.table
    assert nft.calls[-1][1] == f"table {TABLE} {{}}\ndelete table {TABLE}\n"


async def test_new_rules_replace_the_table(tmp_path: Path) -> None:
    clock = FakeClock()
    nft = FakeNft()
    tracking = KernelTracking(nft="/usr/sbin/nft", runner=nft, probe=lambda t, w: False,
                              netlink=False)
    svc = Service(parse_config({"rules": RULES}), FakeGateway(clock), clock=clock,
                  state_dir=tmp_path, detectors=[FakeDetector("conntrack")], tracking=tracking)
    await svc.start()
    try:
        svc.config = parse_config({"rules": [{**RULES[0], "trigger": ["udp/3478"]}]})
        await svc.retrack()
        script = nft.calls[-1][1]
        assert script.startswith(f"table {TABLE} {{}}\ndelete table {TABLE}\n")
        assert "udp dport { 3478 }" in script and "27015" not in script
    finally:
        await svc.stop()


def test_doctor_says_when_conntrack_would_be_blind() -> None:
    config = parse_config({"rules": RULES, "detect": {"track_flows": False}})
    blind = KernelTracking(enabled=False, nft=None, probe=lambda t, w: False)
    check = check_tracking(config, object(), blind)
    assert check.level == "warn" and "does not track connections" in check.detail
    assert "track_flows" in check.fix
    able = KernelTracking(nft="/usr/sbin/nft", runner=FakeNft(), netlink=False)
    assert check_tracking(parse_config({"rules": RULES}), object(), able).level == "ok"


# --- the real kernel, in a throwaway network namespace ----------------------------------------


def _run(*args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=30, check=False,
                          input=input)


@pytest.fixture
def bare_netns() -> Iterator[str]:
    """A network namespace with no firewall rule at all: a plain desktop."""
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        pytest.skip("needs Linux and root (ip netns, nft)")
    if shutil.which("nft") is None or shutil.which("ip") is None:
        pytest.skip("needs the nft and ip commands")
    name = f"igdt-nt-{os.getpid()}-{secrets.token_hex(3)}"
    if _run("ip", "netns", "add", name).returncode != 0:
        pytest.skip("cannot create a network namespace")
    try:
        _run("ip", "-n", name, "link", "set", "lo", "up").check_returncode()
        yield name
    finally:
        _run("ip", "netns", "del", name)


def in_ns(ns: str, code: str) -> Any:
    p = _run("ip", "netns", "exec", ns, sys.executable, "-c",
             f"import sys, json; sys.path.insert(0, {str(REPO)!r})\n{code}")
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1])


PROBE = ("from igdtrigger.detect.nfttrack import probe_events\n"
         "print(json.dumps(probe_events(2.0)))")


def ruleset_without_ours(ns: str) -> str:
    text = _run("ip", "netns", "exec", ns, "nft", "list", "ruleset").stdout
    out, skip = [], False
    for line in text.splitlines():
        if line.startswith("table inet igdtrigger "):
            skip = True
        elif skip and line == "}":
            skip = False
            continue
        if not skip:
            out.append(line)
    return "\n".join(out)


def test_plain_namespace_tracks_trigger_flows_only_with_our_table(bare_netns: str) -> None:
    ns = bare_netns
    assert in_ns(ns, PROBE) is False  # the plain machine: no conntrack event at all
    code = ("from igdtrigger.detect.nfttrack import KernelTracking, probe_events\n"
            "from igdtrigger.core.model import parse_port_spec as p\n"
            "t = KernelTracking()\n"
            "ok = t.install(p('udp/27015') + p('tcp/27015-27030'), p('udp/40000'))\n"
            "seen = probe_events(2.0)\n"
            "import socket\n"
            "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            "s.sendto(b'x', ('127.0.0.1', 27015))\n"
            "print(json.dumps([ok, t.reason, seen, t.present(), t.counted()]))")
    ok, reason, seen, present, counted = in_ns(ns, code)
    assert (ok, reason, seen, present) == (True, "", True, True)
    assert counted == 1  # the one trigger flow, counted by our own rule
    # a second install (a restart after a crash, or new rules) replaces it: still one table
    code = ("from igdtrigger.detect.nfttrack import KernelTracking\n"
            "from igdtrigger.core.model import parse_port_spec as p\n"
            "t = KernelTracking(); t.install(p('udp/5000'), [])\n"
            "print(json.dumps(t.counted()))")
    assert in_ns(ns, code) == 0
    listed = _run("ip", "netns", "exec", ns, "nft", "list", "ruleset").stdout
    assert listed.count("table inet igdtrigger") == 1 and "27015" not in listed
    # a firewall reload flushes every table: the periodic check puts ours back
    code = ("from igdtrigger.detect.nfttrack import KernelTracking\n"
            "from igdtrigger.core.model import parse_port_spec as p\n"
            "import subprocess\n"
            "t = KernelTracking(); t.install(p('udp/5000'), [])\n"
            "subprocess.run(['nft', 'flush', 'ruleset'], check=True)\n"
            "gone = not t.present()\n"
            "t.check()\n"
            "print(json.dumps([gone, t.reinstalls, t.present(), t.check()]))")
    assert in_ns(ns, code) == [True, 1, True, 0]
    code = ("from igdtrigger.detect.nfttrack import KernelTracking\n"
            "from igdtrigger.core.model import parse_port_spec as p\n"
            "t = KernelTracking(); t.install(p('udp/5000'), []); t.remove()\n"
            "print(json.dumps(t.present()))")
    assert in_ns(ns, code) is False
    assert _run("ip", "netns", "exec", ns, "nft", "list", "ruleset").stdout.strip() == ""


def test_a_users_own_firewall_is_left_exactly_as_it_was(bare_netns: str) -> None:
    ns = bare_netns
    mine = """
table inet myfw {
    set allowed {
        type inet_service
        elements = { 22, 443 }
    }
    chain input {
        type filter hook input priority 0; policy accept;
        ct state established,related accept
        tcp dport @allowed accept
    }
    chain output {
        type filter hook output priority 0; policy accept;
        counter
    }
}
table ip nat {
    chain post {
        type nat hook postrouting priority 100; policy accept;
    }
}
"""
    assert _run("ip", "netns", "exec", ns, "nft", "-f", "-", input=mine).returncode == 0
    before = _run("ip", "netns", "exec", ns, "nft", "list", "ruleset").stdout
    code = ("from igdtrigger.detect.nfttrack import KernelTracking\n"
            "from igdtrigger.core.model import parse_port_spec as p\n"
            "t = KernelTracking(); ok = t.install(p('udp/27015'), p('udp/40000'))\n"
            "print(json.dumps(ok))")
    assert in_ns(ns, code) is True
    during = ruleset_without_ours(ns)
    # counters in the user's chains moved (their traffic), nothing else did
    strip = [ln for ln in before.splitlines() if "counter" not in ln]
    assert [ln for ln in during.splitlines() if "counter" not in ln] == strip
    code = ("from igdtrigger.detect.nfttrack import KernelTracking\n"
            "t = KernelTracking(); t.installed = True; t.remove()\n"
            "print(json.dumps(t.present()))")
    assert in_ns(ns, code) is False
    after = _run("ip", "netns", "exec", ns, "nft", "list", "ruleset").stdout
    assert [ln for ln in after.splitlines() if "counter" not in ln] == strip


def test_no_nft_command_is_said_plainly() -> None:
    t = KernelTracking(nft=None, probe=lambda timeout, wanted: False, netlink=False)
    t.nft = None
    vis = t.establish(ports("udp/27015"), [])
    assert not vis.seen and "nft command is missing" in vis.text


def test_doctor_detector_lines_use_the_tracking_verdict(monkeypatch: pytest.MonkeyPatch) -> None:
    import igdtrigger.detect.nfttrack as nfttrack

    class Ok:
        name = "conntrack"

        def check(self) -> None:
            pass

        async def run(self, sink: FlowSink) -> None:
            raise DetectionUnavailable("unused")

    monkeypatch.setattr(nfttrack, "find_nft", lambda: None)
    monkeypatch.setattr(nfttrack, "probe_events", lambda timeout=1.0, wanted=None: False)
    monkeypatch.setattr("igdtrigger.runtime.compose.build_detectors", lambda config: [Ok()])
    [line] = check_detectors(parse_config({"rules": RULES}))
    assert line.level == "ok" and "over netlink" in line.detail  # no nft: netlink does it
    [line] = check_detectors(parse_config({"rules": RULES, "detect": {"track_flows": False}}))
    assert line.level == "warn" and "does not track connections" in line.detail


def test_without_the_nft_command_netlink_loads_the_table(bare_netns: str) -> None:
    """Ubuntu ships no `nft`: the table is written over nf_tables netlink instead, with the
    same life cycle (replaced, put back after a flush, removed)."""
    code = ("from igdtrigger.detect.nfttrack import KernelTracking, probe_events\n"
            "from igdtrigger.core.model import parse_port_spec as p\n"
            "import subprocess\n"
            "t = KernelTracking(); t.nft = None\n"
            "before = probe_events(2.0)\n"
            "vis = t.establish(p('udp/27015'), p('udp/40000'))\n"
            "seen = probe_events(2.0)\n"
            "subprocess.run(['nft', 'flush', 'ruleset'], check=True)\n"
            "gone = not t.present()\n"
            "t.check()\n"
            "back = t.present()\n"
            "t.remove()\n"
            "print(json.dumps([before, vis.seen, vis.text, t.via, seen, gone, back,\n"
            "                  t.reinstalls, t.present()]))")
    before, seen_vis, text, via, seen, gone, back, reinstalls, after = in_ns(bare_netns, code)
    assert (before, seen_vis, via, seen) == (False, True, "netlink", True), text
    assert "over netlink" in text
    assert (gone, back, reinstalls, after) == (True, True, 1, False)
    assert _run("ip", "netns", "exec", bare_netns, "nft", "list", "ruleset").stdout.strip() == ""


def test_without_privilege_the_reason_names_it(bare_netns: str) -> None:
    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv (util-linux)")
    code = (f"import sys, json; sys.path.insert(0, {str(REPO)!r})\n"
            "from igdtrigger.detect.nfttrack import KernelTracking\n"
            "from igdtrigger.core.model import parse_port_spec as p\n"
            "out = []\n"
            "for nft in (True, False):\n"
            "    t = KernelTracking()\n"
            "    if not nft: t.nft = None\n"
            "    out.append([t.install(p('udp/27015'), []), t.reason])\n"
            "print(json.dumps(out))")
    p = _run("ip", "netns", "exec", bare_netns, "setpriv", "--reuid=65534", "--regid=65534",
             "--clear-groups", "--inh-caps=-all", "--bounding-set=-all", sys.executable, "-c",
             code)
    if p.returncode != 0 and "Permission denied" in p.stderr:
        pytest.skip(f"this checkout is not readable by nobody: {p.stderr.strip()[-200:]}")
    assert p.returncode == 0, p.stderr
    for ok, reason in json.loads(p.stdout.strip().splitlines()[-1]):
        assert ok is False and "CAP_NET_ADMIN" in reason, reason


async def test_trigger_flows_counted_but_never_announced_is_not_seeing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Our table counts trigger flows, conntrack announces none (events lost or switched off):
    conntrack is not reported active on the table's word alone; the socket table takes over;
    when announcements come, conntrack is active again."""
    monkeypatch.setattr(service_mod, "TRACKING_CHECK", 0.05)
    clock = FakeClock()
    conntrack = FakeDetector("conntrack")
    sockets = FakeDetector("sockets", "conntrack")
    nft = FakeNft()
    tracking = KernelTracking(nft="/usr/sbin/nft", runner=nft, probe=lambda t, w: True,
                              netlink=False)
    svc = Service(parse_config({"rules": RULES}), FakeGateway(clock), clock=clock,
                  state_dir=tmp_path, detectors=[conntrack, sockets], tracking=tracking)
    await svc.start()
    try:
        assert detectors_of(svc)["conntrack"]["active"]
        nft.packets = 2
        await asyncio.wait_for(sockets.running.wait(), 5)
        st = detectors_of(svc)
        assert not st["conntrack"]["active"] and st["sockets"]["active"]
        assert "no conntrack event announced" in st["conntrack"]["reason"]
        assert st["conntrack"]["tracking"]["trigger_flows_counted"] == 2
        conntrack.flows_reported = 2
        for _ in range(200):
            if detectors_of(svc)["conntrack"]["active"]:
                break
            await asyncio.sleep(0.02)
        assert detectors_of(svc)["conntrack"]["active"]
    finally:
        await svc.stop()


async def test_doctor_reports_what_the_running_service_sees(tmp_path: Path) -> None:
    """The plain machine's `doctor` used to say ok while the service was blind: now it shows
    the running service's own verdict on conntrack."""
    clock = FakeClock()
    tracking = KernelTracking(nft="/usr/sbin/nft", runner=FakeNft(allowed=False),
                              probe=lambda t, w: False, netlink=False)
    svc = Service(parse_config({"rules": RULES}), FakeGateway(clock), clock=clock,
                  state_dir=tmp_path / "svc", detectors=[FakeDetector("conntrack")],
                  tracking=tracking)
    await svc.start()
    server = TestServer(make_app(svc), host="127.0.0.1")
    await server.start_server()
    try:
        cfg = tmp_path / "config.toml"
        cfg.write_text('[gateway]\nurl = "simulate"\n[detect]\nmethods = []\n'
                       '[[rules]]\nname = "game"\ntrigger = ["udp/27015"]\nopen = ["udp/40000"]\n')
        out = io.StringIO()
        await asyncio.to_thread(doctor, str(cfg), f"http://127.0.0.1:{server.port}",
                                svc.api_token, out=out)
    finally:
        await server.close()
        await svc.stop()
    [seen] = [ln for ln in out.getvalue().splitlines() if "service's conntrack" in ln]
    assert seen.startswith("warn") and "does not track connections" in seen
