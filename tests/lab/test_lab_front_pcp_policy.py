"""PCP never takes over another app's mapping, in the double-NAT lab (issue 14; RFC 6887 §11.3):
Debian's ``upnpc`` maps a port lease 0 through the front; a PCP MAP (and a PCP delete) for the
same internal address, protocol and port is refused NOT_AUTHORIZED with the UPnP mapping's
lifetime, and the UPnP mapping stays exactly as it was: listed with its description, mapped
upstream, WAN packets still arriving."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from igdtrigger.core.model import Proto
from igdtrigger.gateway.natpmp.codec import build_pcp_map
from tests.lab.doublenat import DoubleNat, FrontServe, wait_until
from tests.lab.netlab import Lab
from tests.lab.test_lab_front import need_tools, pcp_exchange, upnp_add, upstream_ports

pytestmark = pytest.mark.lab

PORT = 40060


@pytest.fixture
def net(lab: Lab) -> DoubleNat:
    need_tools()
    return DoubleNat(lab).build()


@pytest.fixture
def served(net: DoubleNat, tmp_path: Path) -> Iterator[FrontServe]:
    s = FrontServe(net, tmp_path).start()
    try:
        yield s
    finally:
        s.close()


def test_a_pcp_map_for_a_upnp_mapped_internal_port_is_refused_and_changes_nothing(
        net: DoubleNat, served: FrontServe) -> None:
    got, out = upnp_add(net, 0, PORT, lease=0)
    assert got == PORT, out
    before = net.upstream()
    me = net.client_ips[0]
    replies: list[Any] = pcp_exchange(
        net, 0, build_pcp_map(b"\x07" * 12, Proto.UDP, PORT, PORT, 120, me),
        build_pcp_map(b"\x07" * 12, Proto.UDP, PORT, 0, 120, me),  # any external port
        build_pcp_map(b"\x07" * 12, Proto.UDP, PORT, PORT, 0, me))  # a delete
    for reply in replies:
        assert reply.result == 2  # NOT_AUTHORIZED
        assert reply.lifetime == 3600  # the UPnP mapping's (lease 0 -> max_lease 1h)
    assert net.upstream() == before and upstream_ports(net) == {("UDP", PORT)}
    listing = net.upnpc(0, "-l").stdout
    assert re.search(rf"UDP\s+{PORT}->{re.escape(me)}:{PORT}\s+'lab client 0'", listing), \
        listing
    (m,) = served.status()["front"]["mappings"]
    assert (m["protocol"], m["lease_asked"]) == ("upnp", 0)
    assert wait_until(lambda: net.probe("udp", PORT, timeout=0.5), 10, "a WAN packet") >= 0
    got, out = upnp_add(net, 0, PORT, lease=0)  # the UPnP app's own renewal still works
    assert got == PORT, out
