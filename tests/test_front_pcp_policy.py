"""A PCP MAP for an internal address, protocol and port that already has a mapping made another
way (UPnP IGD, NAT-PMP: no nonce) or with another nonce (issue 14's open policy question).

RFC 6887 §11.3, Simple Threat Model (a home router's, §18.1): "if the internal port, protocol,
and internal address match an existing explicit dynamic mapping, but the mapping nonce does not
match, the request MUST be rejected with a NOT_AUTHORIZED error with the lifetime of the error
indicating duration of that existing mapping". The PCP client gets NOT_AUTHORIZED and how long
to wait; the other app's mapping stays exactly as it was (owner, lease, upstream), and its own
renewals keep working. miniupnpd replaces such a rule instead (one table, no owner per rule).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from igdtrigger.core.activation import Source
from igdtrigger.core.model import Proto
from igdtrigger.front.manager import FrontManager, FrontProtocol, Grant
from igdtrigger.front.pcp import PcpMapRequest, PcpResult, map_conflict, parse_request
from igdtrigger.front.pcpserver import PortMapService
from igdtrigger.gateway.natpmp.codec import build_pcp_map, build_pmp_map_request, decode_pcp_reply

from .fakes import FakeClock, FakeGateway
from .test_front_manager import A, make, req

NONCE = bytes(range(12))


def pcp(port: int, lifetime: int = 120, *, nonce: bytes = NONCE, external: int | None = None,
        proto: Proto = Proto.UDP) -> bytes:
    return build_pcp_map(nonce, proto, port, port if external is None else external, lifetime, A)


@pytest.fixture
async def front(tmp_path: Path) -> AsyncIterator[tuple[FrontManager, PortMapService,
                                                         FakeGateway]]:
    clock = FakeClock()
    gw = FakeGateway(clock, local_address="192.168.1.10", external_address="100.64.0.7")
    svc = make(tmp_path, gw, clock)
    await svc.start()
    mgr = FrontManager(svc, svc.config.front, wall=lambda: clock.now + 1.7e9)
    svc.front_observer = mgr.observe
    mgr.attach()
    yield mgr, PortMapService(mgr), gw
    await svc.stop()


async def ask(pms: PortMapService, data: bytes) -> tuple[int, int, int]:
    """(result, external port, lifetime) of the answer to ``data`` from A."""
    reply = decode_pcp_reply(await pms.handle(data, A) or b"")
    assert reply is not None
    return reply.result, reply.external_port or 0, reply.lifetime


def _map(port: int, nonce: bytes = NONCE) -> PcpMapRequest:
    got = parse_request(pcp(port, nonce=nonce), A, 0)
    assert isinstance(got, PcpMapRequest)
    return got


def test_the_rule_in_one_place() -> None:
    assert map_conflict(_map(40000), []) is None  # nothing there: a new mapping
    assert map_conflict(_map(40000), [(NONCE, 120.0)]) is None  # its own: a renewal
    assert map_conflict(_map(40000), [(None, 3600.0)]) == 3600  # UPnP's / NAT-PMP's
    assert map_conflict(_map(40000), [(b"z" * 12, 300.0)]) == 300  # another nonce's
    assert map_conflict(_map(40000), [(None, 50.0), (b"z" * 12, 300.5)]) == 300  # the last
    assert map_conflict(_map(40000), [(None, 50.0), (NONCE, 120.0)]) is None  # its own too
    assert map_conflict(_map(40000), [(None, 0.2)]) == 1  # never "0": that reads as "none"
    assert map_conflict(_map(40000), [(None, float("inf"))]) == 0xFFFFFFFF
    everything = replace(_map(40000), protocol=0, proto=None, internal_port=0, lifetime=0)
    assert map_conflict(everything, [(None, 3600.0)]) is None  # "delete all mine": not refused


async def test_pcp_never_takes_over_a_upnp_mapping_of_the_same_internal_port(
        front: tuple[FrontManager, PortMapService, FakeGateway]) -> None:
    mgr, pms, gw = front
    assert await mgr.add(req(port=40000, lease=0)) == Grant(40000, 3600.0, "100.64.0.7")
    for asked in (pcp(40000), pcp(40000, external=40100), pcp(40000, external=0),
                  pcp(40000, lifetime=0)):  # the same port, another, any, or a delete
        assert await ask(pms, asked) == (PcpResult.NOT_AUTHORIZED, asked_port(asked), 3600)
    (m,) = mgr.mappings()  # the app's UPnP mapping, untouched
    assert m.request.protocol is FrontProtocol.UPNP and m.request.nonce is None
    assert m.request.lease == 0 and m.grant.lease == 3600.0
    act = mgr.service.pipeline.engine.activations[m.activation_id]
    assert act.source is Source.UPNP
    assert gw.ports() == {"udp/40000": A}
    assert await mgr.add(req(port=40000, lease=0)) == Grant(40000, 3600.0, "100.64.0.7")
    # another protocol, or another internal port, of the same host is another mapping
    assert (await ask(pms, pcp(40000, proto=Proto.TCP)))[0] == PcpResult.SUCCESS
    assert (await ask(pms, pcp(40001)))[0] == PcpResult.SUCCESS
    # the UPnP app deletes its mapping: now PCP may have the port
    assert await mgr.delete(FrontProtocol.UPNP, A, 40000, Proto.UDP) is None
    assert await ask(pms, pcp(40000)) == (PcpResult.SUCCESS, 40000, 120)


def asked_port(data: bytes) -> int:
    got = parse_request(data, A, 0)
    assert isinstance(got, PcpMapRequest)
    return got.external_port  # an error echoes the suggestion (§11.4)


async def test_a_natpmp_mapping_is_not_pcp_s_either_and_pcp_s_own_stays_its_own(
        front: tuple[FrontManager, PortMapService, FakeGateway]) -> None:
    mgr, pms, gw = front
    await pms.handle(build_pmp_map_request(Proto.UDP, 40002, 40002, 3600), A)
    (pmp,) = mgr.mappings()
    assert pmp.request.protocol is FrontProtocol.NATPMP
    result, _port, lifetime = await ask(pms, pcp(40002))
    assert result == PcpResult.NOT_AUTHORIZED and lifetime == int(pmp.grant.lease)
    assert [m.request.protocol for m in mgr.mappings()] == [FrontProtocol.NATPMP]
    # a PCP mapping first: another nonce is refused, its own nonce renews and deletes
    assert await ask(pms, pcp(40003)) == (PcpResult.SUCCESS, 40003, 120)
    assert await ask(pms, pcp(40003, nonce=b"z" * 12)) == (PcpResult.NOT_AUTHORIZED, 40003,
                                                              120)
    assert await ask(pms, pcp(40003, lifetime=600)) == (PcpResult.SUCCESS, 40003, 600)
    assert (await ask(pms, pcp(40003, lifetime=0)))[0] == PcpResult.SUCCESS
    assert "udp/40003" not in gw.ports()
