"""The UPnP backends send HTTP through an injectable ``Requester`` (gateway/upnp/http.py): a
router answered in memory, with no socket, behaves as the same router over the network."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import pytest

from igdtrigger.core.errors import GatewayError, GatewayUnreachable
from igdtrigger.core.model import MappingSpec, Proto
from igdtrigger.gateway.upnp.http import HttpReply
from igdtrigger.gateway.upnp.soap import SoapGateway
from igdtrigger.sim.device import SimulatedRouter

LOCATION = "http://192.0.2.1:5000/rootDesc.xml"  # never contacted: the requester answers


class InMemory:
    """A ``Requester`` that hands each request to a simulated router's ``handle_http``."""

    def __init__(self, router: SimulatedRouter) -> None:
        self.router = router
        self.sent: list[tuple[str, str]] = []

    async def request(self, url: str, method: str = "GET", *, body: bytes = b"",
                      headers: Mapping[str, str] | None = None, timeout: float = 3.0,
                      connect_to: str | None = None, local_addr: str | None = None
                      ) -> HttpReply:
        self.sent.append((method, url))
        lower = {k.lower(): v for k, v in (headers or {}).items()}
        path = url.split("://", 1)[-1].partition("/")[2]
        answer = self.router.handle_http(method, "/" + path, lower, body,
                                         requester="192.168.1.10")
        return HttpReply(answer.status, {"server": self.router.server_header}, answer.body,
                         "192.168.1.10")


def test_soap_gateway_maps_through_an_injected_requester() -> None:
    router = SimulatedRouter()
    fake = InMemory(router)

    async def go() -> None:
        gw = SoapGateway(LOCATION, requester=fake)
        info = await gw.connect()
        assert info.external_address == "203.0.113.4" and info.external_reachable
        assert info.local_address == "192.168.1.10"
        spec = MappingSpec(Proto.UDP, 40000, "192.168.1.10", 40000, "game")
        granted = await gw.add(spec, 3600)
        assert granted.external_port == 40000
        assert [m.external_port for m in router.mappings()] == [40000]
        await gw.delete(Proto.UDP, 40000)
        assert router.mappings() == []
        await gw.close()

    asyncio.run(go())
    assert fake.sent[0] == ("GET", LOCATION)
    assert all(url.startswith("http://192.0.2.1:5000/") for _, url in fake.sent)


def test_a_requester_failure_is_the_backends_error() -> None:
    class Down:
        async def request(self, url: str, method: str = "GET", *, body: bytes = b"",
                          headers: Mapping[str, str] | None = None, timeout: float = 3.0,
                          connect_to: str | None = None, local_addr: str | None = None
                          ) -> HttpReply:
            raise GatewayUnreachable(f"{url}: connection refused")

    with pytest.raises(GatewayError, match="connection refused"):
        asyncio.run(SoapGateway(LOCATION, requester=Down()).connect())
