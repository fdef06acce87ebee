"""NatPmpGateway / PcpGateway against the real miniupnpd 2.3.1 in the lab.

The backend runs inside the LAN namespace: a small driver process (``DRIVER`` below) holds one
gateway object and executes JSON commands from stdin, so the same client sees a router restart.
Packets from the WAN host (``lab.probe``) are the ground truth.
"""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.lab.netlab import Lab
from tests.lab.netlab import Proto as LabProto

pytestmark = pytest.mark.lab

ROOT = Path(__file__).resolve().parents[2]

DRIVER = r"""
import asyncio, json, statistics, sys, time
sys.path.insert(0, sys.argv[1])
from igdtrigger.core.errors import IgdTriggerError
from igdtrigger.gateway.natpmp.backend import NatPmpGateway, PcpGateway
from igdtrigger.core.model import MappingSpec, Proto

def out(msg):
    sys.stdout.write(json.dumps(msg) + "\n")
    sys.stdout.flush()

async def main():
    kind, gateway, kwargs = sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
    lost = []
    cls = NatPmpGateway if kind == "nat-pmp" else PcpGateway
    gw = cls(gateway, on_lost_state=lost.append, **kwargs)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    async def spec(c):
        client = c.get("client") or (gw.info or await gw.connect()).local_address
        return MappingSpec(Proto(c["proto"].upper()), c["port"], client,
                           c.get("iport", c["port"]), "igdtrigger lab t")

    async def add(c):
        g = await gw.add(await spec(c), c.get("lease", 60))
        return {"external_port": g.external_port, "lease": g.lease}

    async def run(c):
        op = c["op"]
        if op == "connect":
            i = await gw.connect()
            return {"local": i.local_address, "external": i.external_address,
                    "location": i.location, "protocol": i.protocol, "notes": list(i.notes)}
        if op == "add":
            return await add(c)
        if op == "delete":
            await gw.delete(Proto(c["proto"].upper()), c["port"])
            return {}
        if op == "list":
            return {"mappings": [[m.proto.value, m.external_port, m.internal_client,
                                  m.internal_port, m.lease_remaining] for m in await gw.list()]}
        if op == "stats":
            return {"epoch_resets": gw.epoch_resets, "announcements": gw.announcements,
                    "lost_state": gw.lost_state, "lost": lost, "epoch": gw.epoch.server,
                    "sent": gw.client.sent, "received": gw.client.received}
        if op == "latency":  # n add+delete pairs, one at a time: the add's latency
            times = []
            for i in range(c["n"]):
                s = dict(c, port=c["port"] + i)
                t0 = time.perf_counter()
                await add(s)
                times.append(time.perf_counter() - t0)
                await gw.delete(Proto(c["proto"].upper()), c["port"] + i)
            return {"median": statistics.median(times), "min": min(times), "max": max(times)}
        if op == "bulk":  # map (or delete) ports first..first+n-1 for both protocols
            cmds = [dict(c, proto=p, port=c["first"] + i) for p in ("tcp", "udp")
                    for i in range(c["n"])]
            action = add if c.get("action", "add") == "add" else (
                lambda s: gw.delete(Proto(s["proto"].upper()), s["port"]))
            t0 = time.perf_counter()
            if c["pipelined"]:
                results = await asyncio.gather(*(action(s) for s in cmds), return_exceptions=True)
            else:
                results = []
                for s in cmds:
                    try:
                        results.append(await action(s))
                    except IgdTriggerError as e:
                        results.append(e)
            elapsed = time.perf_counter() - t0
            errors = [f"{type(r).__name__}: {r}" for r in results if isinstance(r, BaseException)]
            return {"elapsed": elapsed, "errors": errors[:5], "failed": len(errors)}
        raise ValueError(op)

    out({"ready": True})
    while True:
        line = await reader.readline()
        if not line:
            break
        c = json.loads(line)
        if c["op"] == "quit":
            break
        try:
            reply = await run(c)
            reply["ok"] = True
        except IgdTriggerError as e:
            reply = {"ok": False, "error": type(e).__name__, "message": str(e),
                     "code": getattr(e, "code", None)}
        out(reply)
    await gw.close()

asyncio.run(main())
"""


class Driver:
    """One gateway object living in a LAN namespace; ``call`` runs a command there."""

    def __init__(self, lab: Lab, kind: str, ns: str | None = None, **kwargs: Any) -> None:
        self.proc = lab.popen(
            ns or lab.lan,
            [sys.executable, "-c", DRIVER, str(ROOT), kind, lab.router_lan_ip,
             json.dumps(kwargs)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        self.kind = kind
        assert self._read(20.0).get("ready"), "driver did not start"

    def _read(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            if not sel.select(timeout):
                raise AssertionError(f"driver silent for {timeout}s")
        line = self.proc.stdout.readline()
        if not line:
            err = self.proc.stderr.read() if self.proc.stderr else ""
            raise AssertionError(f"driver exited: {err[-2000:]}")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def call(self, op: str, timeout: float = 60.0, **kw: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, **kw}) + "\n")
        self.proc.stdin.flush()
        return self._read(timeout)

    def ok(self, op: str, **kw: Any) -> dict[str, Any]:
        reply = self.call(op, **kw)
        assert reply["ok"], reply
        return reply

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.write('{"op": "quit"}\n')
            self.proc.stdin.flush()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def drivers() -> Iterator[Callable[..., Driver]]:
    made: list[Driver] = []

    def make(lab: Lab, kind: str, ns: str | None = None, **kwargs: Any) -> Driver:
        d = Driver(lab, kind, ns, **kwargs)
        made.append(d)
        return d

    yield make
    for d in made:
        d.close()


def no_system_uptime(lab: Lab) -> None:
    """Restart the lab router without ``system_uptime=yes``: its epoch then counts from the
    daemon's start, so a restart resets it (as on a real router reboot)."""
    original = lab._miniupnpd_conf
    lab._miniupnpd_conf = lambda: original().replace("system_uptime=yes\n", "")  # type: ignore[method-assign]
    lab.restart_router()


KINDS = ["nat-pmp", "pcp"]


# -- mapping, probing, deleting ------------------------------------------------------------------


def test_natpmp_maps_udp_and_deletes(lab: Lab, drivers: Callable[..., Driver]) -> None:
    d = drivers(lab, "nat-pmp")
    info = d.ok("connect")
    assert info["local"] == lab.lan_ip
    assert info["external"] == lab.router_wan_ip
    assert info["location"] == f"{lab.router_lan_ip}:5351"
    assert not lab.probe("udp", 40000)
    granted = d.ok("add", proto="udp", port=40000, lease=60)
    assert granted == {"external_port": 40000, "lease": 60, "ok": True}
    assert lab.probe("udp", 40000)
    assert ("UDP", 40000, lab.lan_ip, 40000) in lab.nft_mappings()
    assert [m[:4] for m in d.ok("list")["mappings"]] == [["UDP", 40000, lab.lan_ip, 40000]]
    d.ok("delete", proto="udp", port=40000)
    assert not lab.probe("udp", 40000)
    assert lab.nft_mappings() == []
    assert d.ok("list")["mappings"] == []


def test_pcp_maps_tcp_and_deletes(lab: Lab, drivers: Callable[..., Driver]) -> None:
    d = drivers(lab, "pcp")
    info = d.ok("connect")
    assert (info["protocol"], info["local"], info["external"]) == ("pcp", lab.lan_ip,
                                                                   lab.router_wan_ip)
    granted = d.ok("add", proto="tcp", port=40001, lease=600)
    assert (granted["external_port"], granted["lease"]) == (40001, 600)
    assert lab.probe("tcp", 40001)
    # the router shows it as a PCP mapping (the description is the router's own)
    assert any(m[:2] == ("TCP", 40001) and m[4].startswith("PCP MAP")
               for m in lab.router_mappings())
    d.ok("delete", proto="tcp", port=40001)
    assert not lab.probe("tcp", 40001)
    assert lab.nft_mappings() == []


@pytest.mark.parametrize("kind", KINDS)
def test_internal_port_differs_from_external(lab: Lab, drivers: Callable[..., Driver],
                                             kind: str) -> None:
    d = drivers(lab, kind)
    d.ok("add", proto="udp", port=40002, iport=40003)
    assert lab.probe("udp", 40002, internal_port=40003)
    d.ok("delete", proto="udp", port=40002)
    assert not lab.probe("udp", 40002, internal_port=40003)


# -- lifetimes ----------------------------------------------------------------------------------


def test_lifetimes_granted(make_lab: Callable[..., Lab], drivers: Callable[..., Driver]) -> None:
    lab = make_lab(max_lifetime=3600)
    pcp = drivers(lab, "pcp")
    pmp = drivers(lab, "nat-pmp")
    # PCP: clamped to [min_lifetime=120, max_lifetime]
    assert pcp.ok("add", proto="tcp", port=40010, lease=30)["lease"] == 120
    assert pcp.ok("add", proto="tcp", port=40011, lease=7200)["lease"] == 3600
    # lease 0 (UPnP "permanent") is sent as 86400 s, never as 0 (which would delete)
    assert pcp.ok("add", proto="tcp", port=40012, lease=0)["lease"] == 3600
    assert lab.probe("tcp", 40012)
    # NAT-PMP: miniupnpd 2.3.1 grants what was asked, unclamped
    assert pmp.ok("add", proto="udp", port=40013, lease=30)["lease"] == 30
    assert pmp.ok("add", proto="udp", port=40014, lease=0)["lease"] == 86400
    assert lab.probe("udp", 40014)


def test_refresh_keeps_the_mapping(lab: Lab, drivers: Callable[..., Driver]) -> None:
    cases: list[tuple[str, LabProto, int]] = [("pcp", "tcp", 40020), ("nat-pmp", "udp", 40021)]
    for kind, proto, port in cases:
        d = drivers(lab, kind)
        d.ok("add", proto=proto, port=port, lease=300)
        d.ok("add", proto=proto, port=port, lease=300)
        assert lab.probe(proto, port)
        assert sum(1 for m in lab.nft_mappings() if m[1] == port) == 1
        d.ok("delete", proto=proto, port=port)
        assert not lab.probe(proto, port)


# -- refusals -----------------------------------------------------------------------------------


def test_pcp_third_party(make_lab: Callable[..., Lab], drivers: Callable[..., Driver]) -> None:
    strict = make_lab(lan_hosts=2)
    d = drivers(strict, "pcp")
    r = d.call("add", proto="tcp", port=40030, client=strict.lan_ips[1])
    assert (r["ok"], r["error"], r["code"]) == (False, "NotAuthorized", 5)  # UNSUPP_OPTION
    assert "pcp_allow_thirdparty" in r["message"]
    assert strict.nft_mappings() == []

    lab = make_lab(lan_hosts=2, pcp_allow_thirdparty=True)
    d = drivers(lab, "pcp")
    assert d.ok("add", proto="tcp", port=40030, client=lab.lan_ips[1])["lease"] == 120
    assert ("TCP", 40030, lab.lan_ips[1], 40030) in lab.nft_mappings()
    assert lab.probe("tcp", 40030, host=1)
    d.ok("delete", proto="tcp", port=40030)
    assert not lab.probe("tcp", 40030, host=1)


def test_pcp_client_address_mismatch(lab: Lab, drivers: Callable[..., Driver]) -> None:
    d = drivers(lab, "pcp", client_ip=lab.lan_ips[0].rsplit(".", 1)[0] + ".99")
    r = d.call("connect")
    assert r["ok"], r  # ANNOUNCE does not check the client address
    r = d.call("add", proto="tcp", port=40031, client=lab.lan_ip)
    assert (r["ok"], r["error"], r["code"]) == (False, "NotAuthorized", 12)
    assert "another NAT" in r["message"]


def test_natpmp_refuses_other_hosts_locally(lab: Lab, drivers: Callable[..., Driver]) -> None:
    d = drivers(lab, "nat-pmp")
    r = d.call("add", proto="udp", port=40032, client="192.168.77.11")
    assert (r["ok"], r["error"]) == (False, "NotAuthorized")
    assert "only map ports to the host that asks" in r["message"]
    assert d.ok("stats")["sent"] == 1  # only connect's address request


@pytest.mark.parametrize("kind", KINDS)
def test_permission_rules_refuse_low_ports(lab: Lab, drivers: Callable[..., Driver],
                                           kind: str) -> None:
    d = drivers(lab, kind)
    r = d.call("add", proto="tcp", port=80)
    assert (r["ok"], r["error"], r["code"]) == (False, "NotAuthorized", 2)


@pytest.mark.parametrize("kind", KINDS)
def test_port_held_by_another_host_is_a_conflict(make_lab: Callable[..., Lab],
                                                 drivers: Callable[..., Driver],
                                                 kind: str) -> None:
    lab = make_lab(lan_hosts=2)
    lab.add_foreign_mapping("tcp", 40040, lab.lan_ips[1])
    d = drivers(lab, kind)
    r = d.call("add", proto="tcp", port=40040)
    assert (r["ok"], r["error"]) == (False, "MappingConflict"), r
    assert "offered 40041" in r["message"]  # miniupnpd moves to the next free port
    # the mapping on the other port was deleted again; the foreign one is untouched
    assert lab.nft_mappings() == [("TCP", 40040, lab.lan_ips[1], 40040)]
    assert d.ok("list")["mappings"] == []


# -- router restarts and epochs ------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_epoch_reset_detected_after_router_restart(lab: Lab, drivers: Callable[..., Driver],
                                                   kind: str) -> None:
    no_system_uptime(lab)
    d = drivers(lab, kind)
    d.ok("add", proto="udp", port=40050, lease=600)
    time.sleep(3.5)  # let the router's epoch run ahead of what a restart resets it to
    d.ok("add", proto="udp", port=40051, lease=600)
    before = d.ok("stats")
    assert before["epoch_resets"] == 0
    assert before["epoch"] >= 3
    lab.restart_router()  # flush: like a reboot, every mapping is gone
    assert not lab.probe("udp", 40050)
    d.ok("add", proto="udp", port=40052, lease=600)  # the first reply after the restart
    after = d.ok("stats")
    assert after["epoch_resets"] == 1
    assert after["lost_state"]
    assert after["epoch"] <= 1
    assert "restarted or lost its mappings" in after["lost"][0]
    # the client no longer claims what the router lost; re-applying brings it back
    assert [m[1] for m in d.ok("list")["mappings"]] == [40052]
    d.ok("add", proto="udp", port=40050, lease=600)
    assert lab.probe("udp", 40050)


def test_stock_lab_restart_keeps_the_epoch(lab: Lab, drivers: Callable[..., Driver]) -> None:
    """With system_uptime=yes (the lab's and OpenWrt's setting) miniupnpd's epoch is the
    system uptime: a daemon restart that loses every mapping does not reset it."""
    d = drivers(lab, "pcp")
    d.ok("add", proto="udp", port=40053, lease=600)
    lab.restart_router()
    d.ok("add", proto="udp", port=40054, lease=600)
    stats = d.ok("stats")
    assert stats["epoch_resets"] == 0
    assert stats["epoch"] > 100  # seconds since the machine booted
    assert not lab.probe("udp", 40053)  # lost, and the epoch cannot tell


@pytest.mark.parametrize("kind", KINDS)
def test_restart_announcement_triggers_reapply(lab: Lab, drivers: Callable[..., Driver],
                                               kind: str) -> None:
    d = drivers(lab, kind, listen_announcements=True)
    d.ok("add", proto="udp", port=40055, lease=600)
    lab.restart_router()  # miniupnpd multicasts a PCP ANNOUNCE to 224.0.0.1:5350 on start
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        stats = d.ok("stats")
        if stats["lost_state"]:
            break
        time.sleep(0.05)
    assert stats["announcements"] >= 1
    assert stats["lost_state"]
    assert "announced a restart" in stats["lost"][0]
    assert d.ok("list")["mappings"] == []
    d.ok("add", proto="udp", port=40055, lease=600)
    assert lab.probe("udp", 40055)


# -- UPnP disabled, pipelining, latency ----------------------------------------------------------


def test_works_with_upnp_disabled(make_lab: Callable[..., Lab],
                                  drivers: Callable[..., Driver]) -> None:
    lab = make_lab(enable_upnp=False)
    cases: list[tuple[str, LabProto, int]] = [("nat-pmp", "udp", 40060), ("pcp", "tcp", 40061)]
    for kind, proto, port in cases:
        d = drivers(lab, kind)
        assert d.ok("connect")["external"] == lab.router_wan_ip
        d.ok("add", proto=proto, port=port)
        assert lab.probe(proto, port)
        d.ok("delete", proto=proto, port=port)
        assert not lab.probe(proto, port)


@pytest.mark.parametrize("kind", KINDS)
def test_pipelined_200_ports(make_lab: Callable[..., Lab], drivers: Callable[..., Driver],
                             kind: str) -> None:
    lab = make_lab(enable_upnp=False)
    d = drivers(lab, kind)
    d.ok("connect")
    r = d.ok("bulk", first=41000, n=100, pipelined=True, lease=600)
    assert r["failed"] == 0, r["errors"]
    assert len(lab.nft_mappings()) == 200
    assert len(d.ok("list")["mappings"]) == 200
    assert lab.probe("tcp", 41050)
    assert lab.probe("udp", 41099)
    r = d.ok("bulk", first=41000, n=100, pipelined=True, action="delete")
    assert r["failed"] == 0, r["errors"]
    assert lab.nft_mappings() == []


def test_measure_latency_and_pipelining(make_lab: Callable[..., Lab],
                                        drivers: Callable[..., Driver]) -> None:
    """Median single-map latency (n=50) and 200 ports sequential vs pipelined; printed
    (run with -s) and written to $IGDT_PMP_BENCH_OUT when set."""
    lab = make_lab(enable_upnp=False)
    results: dict[str, Any] = {}
    for kind, first in (("nat-pmp", 42000), ("pcp", 44000)):
        d = drivers(lab, kind)
        d.ok("connect")
        lat = d.ok("latency", proto="udp", port=first, n=50, lease=600)
        seq = d.ok("bulk", first=first + 100, n=100, pipelined=False, lease=600)
        d.ok("bulk", first=first + 100, n=100, pipelined=True, action="delete")
        pipe = d.ok("bulk", first=first + 300, n=100, pipelined=True, lease=600)
        d.ok("bulk", first=first + 300, n=100, pipelined=True, action="delete")
        assert seq["failed"] == pipe["failed"] == 0
        results[kind] = {
            "median_map_ms": round(lat["median"] * 1000, 3),
            "min_map_ms": round(lat["min"] * 1000, 3),
            "max_map_ms": round(lat["max"] * 1000, 3),
            "map_200_sequential_ms": round(seq["elapsed"] * 1000, 1),
            "map_200_pipelined_ms": round(pipe["elapsed"] * 1000, 1),
        }
        assert lat["median"] < 0.25  # one round trip, no retransmission
    assert lab.nft_mappings() == []
    print("\nNAT-PMP/PCP lab timings:", json.dumps(results))
    out = os.environ.get("IGDT_PMP_BENCH_OUT")
    if out:
        Path(out).write_text(json.dumps(results, indent=2) + "\n")
