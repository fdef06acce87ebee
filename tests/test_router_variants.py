"""Routers of the same kinds as issue 11's inputs, but not those inputs: the owner will try
"other routers of the same kinds", so each fault kind is met here by a variant the issue does
not list (invented from the same public reports, router-facts.md §2.13, §4, §10). Each runs
against every UPnP backend (``Rig``: miniupnpc, SOAP, the default fallback), and the router's
own record decides; ``status`` must say the same.
"""

from __future__ import annotations

import logging

import pytest

from .test_router_truth import HOST, Rig, rig

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
    assert svc.mapper.left_open == []
    assert svc.journal.mappings() == [] if svc.journal is not None else True


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
