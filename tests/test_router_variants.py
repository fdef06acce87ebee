"""Routers of the same kinds as issue 11's inputs, but not those inputs: the owner will try
"other routers of the same kinds", so each fault kind is met here by a variant the issue does
not list (invented from the same public reports, router-facts.md §2.13, §4, §10). Each runs
against every UPnP backend (``Rig``: miniupnpc, SOAP, the default fallback), and the router's
own record decides; ``status`` must say the same.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest

from igdtrigger.core.activation import Source
from igdtrigger.core.errors import DEVICE_DENIED_HINT, SECURE_MODE_HINT, GatewayError, TableFull
from igdtrigger.gateway.base import RouterChangeKind
from igdtrigger.gateway.natpmp.backend import NatPmpGateway, PcpGateway
from igdtrigger.gateway.natpmp.codec import pcp_error, pmp_error
from igdtrigger.gateway.select import build_gateway
from igdtrigger.gateway.upnp.codec import UpnpFault, fault_error
from igdtrigger.gateway.upnp.codec import UpnpFault as UPnPFault
from igdtrigger.gateway.upnp.ssdp import NotifyTracker
from igdtrigger.runtime.journal import Journal
from igdtrigger.sim.device import SimulatedRouter
from igdtrigger.sim.router import SimulatedIgdServer
from igdtrigger.sim.table import SIMULATED_EXTERNAL

from .fakes import FakeClock
from .test_pmp_pcp import FakeRouter
from .test_router_quirks import other_host_holds
from .test_router_truth import (
    BACKENDS,
    HOST,
    Rig,
    activate,
    lease_test_on,
    pmp_service,
    rig,
)

__all__ = ["rig"]  # the parametrized fixture (every backend)


def held(r: Rig, port: int = 40000) -> bool:
    return any(p == port for p, _, _ in r.ours())


# --- lies about leases: a router that caps every lease (and says nothing) --------------------


async def test_capped_lease_is_renewed_before_the_router_drops_it(
        rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    """The router grants at most 120 s whatever is asked (a shorter lease than the 600 s asked,
    no error): the mapping must never lapse on the router while the rule holds, status shows
    the lease the router granted, and renewals follow it (not one re-add per check)."""
    rig.router.lease_cap = 120
    caplog.set_level(logging.WARNING)
    svc = await rig.start()
    await rig.activate()
    [m] = rig.status_mappings()
    assert (m["lease"], m["lease_asked"], m["verified"]) == (120, 600, True)
    gaps = 0
    for _ in range(150):  # 10 minutes, 4 s at a time: five lease lengths
        await rig.run_for(4, step=4)
        gaps += not held(rig)
    assert gaps == 0
    lost = [r.message for r in caplog.records if "no longer holds" in r.message]
    assert lost == []  # never lapsed on the router (today: lost and re-added every 300 s)
    assert svc.status()["gateway"]["learned"]["lease_cap"] == 120
    [m] = rig.status_mappings()
    assert m["lease"] == 120
    assert rig.router.calls["AddPortMapping"] <= 12  # renewed at half of 120 s, no storm
    rig.agrees()
    assert await svc.stop() == 1
    assert rig.ours() == []


# --- lies about refresh: 718 to our own re-add (Open.NAT#14) -------------------------------


async def test_refresh_answered_718_keeps_our_mapping_and_removes_it_at_stop(
        rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    """Re-adding a mapping we hold is answered 718 ConflictInMappingEntry and the lease is not
    extended: the mapping is ours (the router's record says so), so it is re-created (delete,
    add), never marked a conflict and abandoned on the router."""
    caplog.set_level(logging.WARNING)
    rig.router.refresh_conflict = True
    svc = await rig.start()
    await rig.activate()
    for _ in range(90):  # 15 minutes: past the first lease's end
        await rig.run_for(10, step=10)
        assert held(rig), rig.router.mappings()
    [m] = svc.status()["mappings"]
    assert m["state"] == "active", m
    rig.agrees()
    assert await svc.stop() == 1
    assert rig.ours() == []


# --- lies about delete: a delete that works only on the second try ---------------------------


async def test_delete_that_works_on_a_later_try_while_running(rig: Rig) -> None:
    rig.router.deletes_ignored = 1
    svc = await rig.start()
    await rig.activate()
    await rig.end_activations()
    assert held(rig)  # answered, not done
    await rig.run_for(10)
    assert rig.ours() == []  # seen still there, deleted again
    assert svc.status()["gateway"]["left_open"] == []
    assert svc.status()["journal"]["orphans_pending"] == 0
    await svc.stop()


async def test_delete_that_works_on_a_later_try_at_stop(rig: Rig) -> None:
    rig.router.deletes_ignored = 1
    svc = await rig.start(open_="udp/40000-40002")
    await rig.activate()
    assert await svc.stop() == 3  # each deleted again after the router showed it still there
    assert rig.ours() == []
    assert svc.pipeline.mapper.left_open == []
    assert svc.pipeline.journal.mappings() == [] if svc.pipeline.journal is not None else True


# --- cannot report mappings as ours: a table that cuts descriptions -------------------------


@pytest.mark.parametrize("limit", [16, 20])
async def test_router_cutting_descriptions_still_shows_our_mapping(rig: Rig, limit: int) -> None:
    """The router keeps only the first characters of NewPortMappingDescription: our own
    mapping (our host, our internal port, a prefix of our description) is still ours, so it
    is verified, never taken for someone else's, and deleted at stop."""
    rig.router.description_limit = limit
    svc = await rig.start()
    await rig.activate()
    await rig.run_for(130, step=10)  # past two periodic verifications
    [m] = svc.status()["mappings"]
    assert (m["state"], m["verified"]) == ("active", True), m
    rig.agrees()
    assert await svc.stop() == 1
    assert rig.ours() == []


async def test_cut_description_of_another_program_is_not_ours(rig: Rig) -> None:
    """Same host and port and a prefix of our description, on a router not known to cut
    descriptions: someone else's (another program, an older tool), left alone."""
    rig.router.call("AddPortMapping", {
        "NewRemoteHost": "", "NewExternalPort": "40000", "NewProtocol": "UDP",
        "NewInternalPort": "40000", "NewInternalClient": HOST, "NewEnabled": "1",
        "NewPortMappingDescription": "igdtrigger game", "NewLeaseDuration": "0"})
    svc = await rig.start()
    await rig.activate()
    [m] = svc.status()["mappings"]
    assert m["state"] == "conflict"
    await svc.stop()
    assert [p for p, _, _ in rig.ours()] == [40000]  # still there: not ours to delete


# --- lies about delete: "no such entry" (714) to a delete, mapping kept -----------------------
# IGDv1 miniupnpd answers 714 to a delete it refuses in secure mode (router-facts §1.5); a 714
# is a claim like any other.


def delete_answers_714(r: Rig, times: int | None = None) -> list[int]:
    """DeletePortMapping answered 714 NoSuchEntryInArray without deleting (``times`` times)."""
    count = [0]

    def hook(action: str, args: Mapping[str, str]) -> UPnPFault | None:
        if action != "DeletePortMapping" or (times is not None and count[0] >= times):
            return None
        count[0] += 1
        return UPnPFault.of(714)

    r.router.action_hook = hook
    return count


async def test_714_to_a_delete_while_the_router_still_holds_it_is_not_removed(
        rig: Rig) -> None:
    svc = await rig.start()
    await rig.activate()
    delete_answers_714(rig)
    assert await svc.stop() == 0  # never "removed 1" for what is still there
    assert held(rig)
    [left] = svc.pipeline.mapper.left_open
    assert str(left.spec.key) == "udp/40000"
    journal = Journal.open(rig.tmp_path)
    assert [m.external_port for m in journal.mappings()] == [40000]  # the next start retries
    journal.close()


async def test_714_once_then_the_delete_works(rig: Rig) -> None:
    svc = await rig.start()
    await rig.activate()
    delete_answers_714(rig, times=1)
    assert await svc.stop() == 1
    assert rig.ours() == []
    assert svc.pipeline.mapper.left_open == []


# --- cannot report mappings: a table read that errors midway (IGDv1, no GetListOfPortMappings)


async def test_listing_that_fails_midway_falls_back_to_lookups(rig: Rig) -> None:
    """GetGenericPortMappingEntry answers 606 from index 2 on (a table read cut short): the
    batch check of a 12-port range and the stop's confirmation fall back to one look-up per
    port; nothing is taken as gone or as free from a partial listing."""
    rig.router.igd_version = 1

    def hook(action: str, args: Mapping[str, str]) -> UPnPFault | None:
        if action == "GetGenericPortMappingEntry" and int(args["NewPortMappingIndex"]) >= 2:
            return UPnPFault.of(606)
        return None

    rig.router.action_hook = hook
    other_host_holds(rig.router, 40005)  # another host holds one port of the range
    svc = await rig.start(open_="udp/40000-40011")
    await rig.activate()
    states = {m["external_port"]: m["state"] for m in svc.status()["mappings"]}
    assert states.pop(40005) == "conflict"  # never taken over
    assert set(states.values()) == {"active"}
    rig.agrees()
    assert await svc.stop() == 11
    assert rig.ours() == []
    assert [m.internal_client for m in rig.router.mappings()] == ["192.168.1.99"]


# --- PCP / NAT-PMP grant a shorter lifetime than asked -------------------------------------


@pytest.mark.parametrize("cls", [NatPmpGateway, PcpGateway])
async def test_shorter_lifetime_granted_is_reported_and_renewed_in_time(
        router: FakeRouter, cls: type[NatPmpGateway] | type[PcpGateway],
        tmp_path: Path) -> None:
    router.fixed_lifetime = 120  # asked 600 (miniupnpd PCP clamps to its max_lifetime)
    clock = FakeClock()
    svc = pmp_service(router, cls, {"name": "g", "open": ["udp/40000"], "idle_timeout": "1h"},
                      clock, tmp_path)
    await svc.start()
    await activate(svc, "g")
    [m] = svc.status()["mappings"]
    assert (m["state"], m["lease"], m["lease_asked"]) == ("active", 120, 600)
    times: list[float] = []
    start, sent = clock.now, len(router.requests)
    for _ in range(300):  # 5 minutes
        clock.advance(1)
        await svc.pipeline.mapper.reconcile(svc.desired())
        if len(router.requests) > sent:
            times.append(clock.now)
            sent = len(router.requests)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert times and times[0] - start <= 120 and all(g < 120 for g in gaps), times
    assert 3 <= len(times) <= 8  # at half of 120 s, no storm
    assert await svc.stop() == 1
    assert router.mappings == {}


# --- NAT-PMP gateway restarts mid-hold (epoch goes back) ---------------------------------


@pytest.mark.parametrize("cls", [NatPmpGateway, PcpGateway])
async def test_gateway_restart_seen_by_epoch_re_adds(
        router: FakeRouter, cls: type[NatPmpGateway] | type[PcpGateway],
        tmp_path: Path) -> None:
    clock = FakeClock()
    svc = pmp_service(router, cls, {"name": "g", "open": ["udp/40000"], "idle_timeout": "1h"},
                      clock, tmp_path)
    await svc.start()
    await activate(svc, "g")
    clock.advance(100)
    await svc.pipeline.mapper.reconcile(svc.desired())
    router.mappings.clear()  # restarted: table gone, epoch from 0
    router.epoch_base, router.t0 = 0, clock.now
    for _ in range(400):
        clock.advance(1)
        await svc.pipeline.mapper.reconcile(svc.desired())
        if (17, 40000) in router.mappings:
            break
    assert (17, 40000) in router.mappings  # re-added (at the latest by the renewal)
    [m] = svc.status()["mappings"]
    assert m["state"] == "active"
    assert await svc.stop() == 1
    assert router.mappings == {}


# --- NOTIFY: our own root announced at two locations every round ---------------------------


def test_our_root_announced_at_two_locations_every_round_moves_at_most_once() -> None:
    """One IGD root (one UDN) whose description is served, and announced, at two URLs every
    round (an IGD:1 and an IGD:2 description of the same device): not a move each round."""
    from .test_ssdp_notify import GW, LOC, NTS, UUID, notify
    second = f"http://{GW}:49000/igd2desc.xml"
    for tracker in (NotifyTracker(GW, LOC, [UUID]), NotifyTracker(GW, LOC)):
        kinds = []
        for _ in range(5):
            for loc in (LOC, second):
                for nt in NTS:
                    change = tracker.feed(notify(nt, location=loc), GW)
                    if change is not None:
                        kinds.append(change.kind)
        assert kinds.count(RouterChangeKind.MOVED) <= 1, kinds
        assert RouterChangeKind.RESTARTED not in kinds
        # a real move to a URL never announced before is still followed
        new = f"http://{GW}:40123/rootDesc.xml"
        moved = [tracker.feed(notify(nt, location=new), GW) for nt in NTS]
        assert [c.kind for c in moved if c is not None] == [RouterChangeKind.MOVED]
        # and a reboot still counts
        assert [c.kind for nt in NTS if (c := tracker.feed(notify(nt, location=new, boot="101"),
                                                            GW)) is not None] == [
            RouterChangeKind.RESTARTED]


def test_watcher_follows_a_move_on_the_same_router_and_keeps_what_it_heard() -> None:
    """After the service follows a move (reconnects at the new URL), the watcher is kept: an
    announcement at the old URL of the same root is no move back."""
    from igdtrigger.gateway.upnp.ssdpwatch import NotifyWatcher

    from .test_ssdp_notify import GW, LOC, NTS, UUID, notify
    changes: list[RouterChangeKind] = []
    w = NotifyWatcher(LOC, "192.168.1.20", lambda c: changes.append(c.kind), root_uuid=UUID)
    second = f"http://{GW}:49000/igd2desc.xml"
    for loc in (LOC, second):
        for nt in NTS:
            change = w.tracker.feed(notify(nt, location=loc), GW)
            if change is not None:
                changes.append(change.kind)
                assert w.follow(change.location)  # what the service does after the move
    for _ in range(3):
        for loc in (LOC, second):
            for nt in NTS:
                assert w.tracker.feed(notify(nt, location=loc), GW) is None
    assert changes == [RouterChangeKind.MOVED]
    assert not w.follow("http://192.168.1.2:5000/rootDesc.xml")  # another host: a new watcher


# --- igdtrigger gateway --test on these routers: what the router did --------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("quirk", "value", "says"), [
    ("lease_cap", 30, "asked 60s, the router set 30s"),
    ("refresh_conflict", True, "a renewal (the same add again) is refused (718"),
    ("deletes_ignored", 1, "gone after delete 2"),
    ("description_limit", 16, "description cut to 'igdtrigger gatew'"),
])
async def test_gateway_test_on_the_variants_says_what_the_router_did(
        backend: str, quirk: str, value: object, says: str) -> None:
    out, sim = await lease_test_on(backend, quirk, value)
    assert says in out["verdict"], out
    assert out.get("delete_confirmed") is True
    assert sim.router.mappings() == []  # the test leaves no port open


async def test_gateway_test_on_a_router_that_never_deletes_says_so() -> None:
    out, _ = await lease_test_on("soap", "delete_noop", True)
    assert "still there after 3 deletes: it stays open until its lease ends (60s)" in \
        out["verdict"], out
    assert out["delete_confirmed"] is False


# --- refuses deletes: a transient refusal at stop (router busy) ---------------------------------


@pytest.mark.parametrize("code", [501, 606])
async def test_delete_refused_once_at_stop_is_retried_in_the_same_stop(
        rig: Rig, code: int) -> None:
    """501 Action Failed (busy) or 606 to the first delete: retried after the others within
    the stop, so nothing is left open until the next start."""
    svc = await rig.start()
    await rig.activate()
    rig.router.fail_next(code, 1, action="DeletePortMapping")
    assert await svc.stop() == 1
    assert rig.ours() == []
    assert svc.pipeline.mapper.left_open == []


# --- 725/402 ambiguity: "permanent only" router whose table is full ---------------------------


@pytest.mark.parametrize("mode", ["permanent_only_725", "permanent_only_402"])
async def test_full_table_on_a_permanent_only_router(rig: Rig, mode: str) -> None:
    """The lease-0 retry fails too (table full): nothing is learned, the error says the table
    is full; once space frees the mapping is made with lease 0 and the router is then known
    to refuse timed leases."""
    rig.router.igd_version = 1
    rig.router.lease_mode = mode  # type: ignore[assignment]
    rig.router.max_mappings = 1
    other_host_holds(rig.router, 50000)
    svc = await rig.start()
    await rig.activate()
    [m] = svc.status()["mappings"]
    assert m["state"] == "failed"
    assert svc.status()["gateway"]["permanent_leases"] is False
    rig.router.call("DeletePortMapping", {"NewRemoteHost": "", "NewExternalPort": "50000",
                                          "NewProtocol": "UDP"}, requester="192.168.1.99")
    await rig.run_for(10)
    assert rig.ours() == [(40000, HOST, 0)]
    assert svc.status()["gateway"]["permanent_leases"] is True
    rig.agrees()
    assert await svc.stop() == 1
    assert rig.ours() == []


async def test_402_to_every_add_is_not_permanent_only_and_no_storm(rig: Rig) -> None:
    """402 whatever the lease (a router that dislikes some other argument): not 'permanent
    only', the mapping fails with back-off, not once per round."""
    rig.router.action_hook = lambda action, args: (UPnPFault.of(402)
                                                   if action == "AddPortMapping" else None)
    svc = await rig.start()
    await rig.activate()
    await rig.run_for(60)
    [m] = svc.status()["mappings"]
    assert m["state"] == "failed" and "402" in m["error"]
    assert svc.status()["gateway"]["permanent_leases"] is False
    assert rig.router.calls["AddPortMapping"] <= 16  # back-off: 2 per attempt, ~7 attempts
    await svc.stop()


# --- denies for self vs secure mode -----------------------------------------------------------


@pytest.mark.parametrize("version", [1, 2])
async def test_606_for_the_requesting_host_itself_is_not_called_secure_mode(
        rig: Rig, version: int) -> None:
    """A FRITZ-like router answering 606 on its IGDv1 URL too (not only IGDv2)."""
    rig.router.igd_version = version
    rig.router.action_hook = lambda action, args: (UPnPFault.of(606)
                                                   if action == "AddPortMapping" else None)
    svc = await rig.start()
    await rig.activate()
    [m] = svc.status()["mappings"]
    assert m["state"] == "failed"
    assert DEVICE_DENIED_HINT in m["error"] and SECURE_MODE_HINT not in m["error"]
    await svc.stop()


async def test_secure_mode_for_another_host_says_secure_mode(rig: Rig) -> None:
    rig.router.secure_mode = True
    svc = await rig.start()
    gen = svc.pipeline.engine.generation
    await svc.activate("game", "192.168.1.50", ttl=3600, source=Source.API)
    await svc._wait_applied(gen + 1, 5)
    [m] = svc.status()["mappings"]
    assert m["state"] == "failed"
    assert SECURE_MODE_HINT in m["error"] and DEVICE_DENIED_HINT not in m["error"]
    assert rig.router.mappings() == []
    await svc.stop()


# --- multiple WAN services: both connected, the first behind another NAT ---------------------


async def test_connected_first_wan_with_a_private_address_loses_to_a_public_one(
        rig: Rig) -> None:
    dead = rig.router.add_first_wan(connection_status="Connected", external_ip="10.0.0.2")
    svc = await rig.start()
    if rig.backend == "miniupnpc":  # it would take the first: refused, said, nothing mapped
        await svc.activate("game", HOST, ttl=3600, source=Source.API)
        await rig.run_for(3)
        assert dead.mappings() == [] and rig.ours() == []
        gw = svc.status()["gateway"]
        assert gw["up"] is False and "miniupnpc cannot be pointed at it" in gw["error"]
        await svc.stop()
        return
    await rig.activate()
    assert dead.mappings() == []
    assert [p for p, _, _ in rig.ours()] == [40000]
    assert svc.status()["gateway"]["external_address"] == SIMULATED_EXTERNAL
    await svc.stop()
    assert rig.ours() == []


# --- assigns its own port: a NAT-PMP/PCP gateway moving a fixed-port rule ---------------------


@pytest.mark.parametrize("cls", [NatPmpGateway, PcpGateway])
async def test_own_port_for_a_fixed_port_rule_is_not_kept(
        router: FakeRouter, cls: type[NatPmpGateway] | type[PcpGateway],
        tmp_path: Path) -> None:
    """The rule asks for external port 40000 exactly; the gateway maps another one: that port
    is no rule's, so it is given back, and status says why."""
    router.own_ports = True
    clock = FakeClock()
    svc = pmp_service(router, cls, {"name": "g", "open": ["udp/40000"], "idle_timeout": "1h"},
                      clock, tmp_path)
    await svc.start()
    gen = svc.pipeline.engine.generation
    await svc.activate("g", HOST, ttl=3600, source=Source.API)
    await svc._wait_applied(gen + 1, 5)
    [m] = svc.status()["mappings"]
    assert m["state"] != "active" and m.get("error"), m
    assert router.mappings == {}  # nothing held on a port no rule allows
    await svc.stop()
    assert router.mappings == {}


# --- lies about add (in time): the mapping shows up a moment after the add is answered ------


async def test_mapping_shown_a_moment_late_does_not_teach_permanent_leases(rig: Rig) -> None:
    """The router installs the mapping a moment after answering (a firewall reload): the first
    look-up misses it. That is not "drops timed leases" (lease 0 for good, persisted) nor
    "cannot report its mappings": timed leases stay, the mapping is verified."""
    rig.router.late_visible = 1
    svc = await rig.start()
    await rig.activate()
    [m] = rig.status_mappings()
    assert (m["lease"], m["lease_asked"], m["verified"]) == (600, 600, True)
    learned = svc.status()["gateway"]["learned"]
    assert (learned["keeps_timed"], learned["reports_mappings"]) == (True, True)
    assert svc.status()["gateway"]["permanent_leases"] is False
    assert [left > 0 for _, _, left in rig.ours()] == [True]  # a timed lease on the router
    await svc.stop()
    assert rig.ours() == []


async def test_late_router_that_also_drops_timed_leases_is_still_caught(rig: Rig) -> None:
    rig.router.late_visible = 1
    rig.router.lease_mode = "drops_timed"
    svc = await rig.start()
    await rig.activate()
    assert rig.ours() == [(40000, HOST, 0)]
    learned = svc.status()["gateway"]["learned"]
    assert (learned["keeps_timed"], learned["reports_mappings"]) == (False, True)
    [m] = rig.status_mappings()
    assert m["verified"] is True
    assert await svc.stop() == 1
    assert rig.ours() == []


# --- a router whose external address is empty / 0.0.0.0, or private --------------------------


@pytest.mark.parametrize(("external", "says", "reachable"), [
    ("0.0.0.0", "reports no external address", None),  # Netopia 3347NWG (weupnp#4)
    ("", "reports no external address", None),  # a mesh repeater (Mono.Nat#35)
    ("10.0.0.2", "external address 10.0.0.2 is not public", False),  # double NAT
])
async def test_external_address_unknown_is_said_unknown_not_double_nat(
        rig: Rig, external: str, says: str, reachable: bool | None) -> None:
    """Mappings still work (the router accepts them); status, the dashboard's JSON and
    ``gateway`` say what the address tells: unknown is unknown, private is double NAT."""
    rig.router.external_ip = external
    svc = await rig.start()
    await rig.activate()
    assert [p for p, _, _ in rig.ours()] == [40000]
    st = svc.status()
    assert st["gateway"]["external_reachable"] is reachable
    [warning] = [w for w in st["warnings"] if "external address" in w]
    assert says in warning
    if reachable is None:
        assert "not public" not in warning and "not reachable" not in warning
    await svc.stop()
    assert rig.ours() == []


@pytest.mark.parametrize(("external", "says"), [
    ("0.0.0.0", "reports no external address"),
    ("10.0.0.2", "double NAT / CGNAT: the router's external address (10.0.0.2) is not public"),
])
async def test_gateway_report_on_an_unknown_or_private_external_address(
        external: str, says: str) -> None:
    from igdtrigger.cli.gatewaycmd import ProbeResult, report

    sim = SimulatedIgdServer(SimulatedRouter(external_ip=external))
    await sim.start()
    gw = build_gateway(sim.url, backend="soap")
    try:
        info = await gw.connect()
    finally:
        await gw.close()
        await sim.close()
    result = ProbeResult("upnp-igd", True, 0.01, info)
    assert says in report([result])
    assert result.to_json()["external_reachable"] is (None if external == "0.0.0.0" else False)


# --- the table shows another host's entry under our description -----------------------------


async def test_entry_of_another_host_with_our_description_is_not_swept(rig: Rig) -> None:
    """The same instance tag on another machine (a copied state directory, a cloned image),
    or a listing that shows other hosts' rows under our description: the start-up sweep of
    stale mappings removes only ours (this host, or in the journal), never that host's."""
    svc = await rig.start()
    desc = f"igdtrigger game {svc.tag}"
    await svc.stop()
    for port, host in ((45000, "192.168.1.11"), (45001, HOST)):
        assert rig.router.call("AddPortMapping", {
            "NewRemoteHost": "", "NewExternalPort": str(port), "NewProtocol": "UDP",
            "NewInternalPort": str(port), "NewInternalClient": host, "NewEnabled": "1",
            "NewPortMappingDescription": desc, "NewLeaseDuration": "0"}, requester=host) == {}
    svc = await rig.start()  # same state dir: same tag
    await rig.run_for(2)
    assert [(m.external_port, m.internal_client) for m in rig.router.mappings()] == [
        (45000, "192.168.1.11")]  # this host's stale one swept, the other host's kept
    assert svc.pipeline.mapper.stale_removed == 1
    await svc.stop()


# --- NAT-PMP vs PCP vs UPnP wording: one kind, one type ---------------------------------------


@pytest.mark.parametrize("make", [
    lambda: fault_error("AddPortMapping", UpnpFault(728, "NoPortMapsAvailable")),
    lambda: pmp_error("NAT-PMP map udp/40000", 4),
    lambda: pcp_error("PCP MAP udp/40000", 8),
    lambda: pcp_error("PCP MAP udp/40000", 10),  # USER_EX_QUOTA: this host's share is used up
], ids=["upnp-728", "natpmp-4", "pcp-no-resources", "pcp-user-quota"])
def test_no_room_on_the_router_is_table_full_in_every_protocol(
        make: Callable[[], GatewayError]) -> None:
    assert type(make()) is TableFull


# --- timeouts vs refusals: a NAT-PMP/PCP gateway that stops answering at stop ----------------


@pytest.mark.parametrize("cls", [NatPmpGateway, PcpGateway])
async def test_gateway_silent_at_stop_is_reported_with_its_lease_end(
        router: FakeRouter, cls: type[NatPmpGateway] | type[PcpGateway], tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """The NAT-PMP/PCP gateway stops answering (no refusal): the stop names the mapping with
    its lease end; NAT-PMP/PCP let only the run that made a mapping delete it (PCP: by its
    nonce), so neither the stop nor the next start claims a later run will delete it."""
    caplog.set_level(logging.WARNING)
    clock = FakeClock()
    rule = {"name": "g", "open": ["udp/40000"], "idle_timeout": "1h"}
    svc = pmp_service(router, cls, rule, clock, tmp_path)
    await svc.start()
    await activate(svc, "g")
    router.drop = 10_000  # no answer at all from now on: not a refusal
    assert await svc.stop() == 0
    [left] = svc.pipeline.mapper.left_open
    assert "did not answer" in left.why and "the next start deletes it" in left.why
    assert left.lease_remaining == 600 and left.until_wall is not None
    assert (17, 40000) in router.mappings
    router.drop = 0
    svc2 = pmp_service(router, cls, {**rule, "name": "other", "open": ["udp/41000"]},
                       clock, tmp_path)
    await svc2.start()
    for _ in range(3):
        clock.advance(1)
        await svc2.pipeline.mapper.reconcile(svc2.desired())
    assert not any("cannot be deleted over" in r.message for r in caplog.records)
    assert (17, 40000) not in router.mappings  # the journal's row (and nonce) deleted it
    await svc2.stop()


# --- forces leases: every mapping made permanent whatever is asked ---------------------------


async def test_router_making_every_lease_permanent_is_reported_and_cleaned(rig: Rig) -> None:
    rig.router.forced_lease = 0
    svc = await rig.start()
    await rig.activate()
    [m] = rig.status_mappings()
    assert (m["lease"], m["lease_asked"], m["verified"]) == (0, 600, True)
    assert svc.status()["gateway"]["learned"]["forced_lease"] == 0
    await rig.run_for(700, step=50)
    assert rig.router.calls["AddPortMapping"] <= 3  # nothing to renew on a permanent one
    assert await svc.stop() == 1
    assert rig.ours() == []


@pytest.mark.parametrize(("first", "main"), [
    ("WANIPConnection", "WANPPPConnection"),  # PPPoE line after a dead IP WAN
    ("WANPPPConnection", "WANIPConnection"),  # a dead PPP WAN first
])
async def test_connected_service_of_another_type_is_chosen(
        rig: Rig, first: str, main: str) -> None:
    """IGDv1, two WANDevices: the first service (disconnected, no address, accepting adds)
    and the connected one are of different types (WANIPConnection / WANPPPConnection)."""
    rig.router.igd_version = 1
    rig.router.service_name = main
    dead = rig.router.add_first_wan()
    dead.service_name = first
    svc = await rig.start()
    await svc.activate("game", HOST, ttl=3600, source=Source.API)
    await rig.run_for(3)
    if rig.backend == "miniupnpc" and svc.status()["gateway"]["up"] is False:
        # miniupnpc would take the dead one: refused and said, nothing mapped anywhere
        assert "miniupnpc cannot be pointed at it" in svc.status()["gateway"]["error"]
        await svc.stop()
        assert dead.mappings() == [] and rig.ours() == []
        return
    assert dead.mappings() == []
    assert [p for p, _, _ in rig.ours()] == [40000]
    assert svc.status()["gateway"]["service_type"].endswith(f"{main}:1")
    rig.agrees()
    assert await svc.stop() == 1
    assert rig.ours() == []


# --- the record names another internal client for our mapping --------------------------------


async def test_mapping_shown_for_another_client_is_left_alone_and_named_at_stop(
        rig: Rig) -> None:
    """The router's record says another host for the port we just mapped (taken over, or a
    router that reports the wrong client): never deleted (it may not be ours), status says
    so, and the stop names it instead of saying nothing about a port we opened."""
    svc = await rig.start()
    await rig.activate()
    rig.router.reported_client = "192.168.1.77"
    await rig.run_for(70, step=10)  # a periodic verification
    [m] = svc.status()["mappings"]
    assert m["state"] == "conflict" and "192.168.1.77" in m["error"]
    assert await svc.stop() == 0
    assert [p for p, _, _ in rig.ours()] == [40000]  # left alone
    [left] = svc.pipeline.mapper.left_open
    assert str(left.spec.key) == "udp/40000" and "192.168.1.77" in left.why
