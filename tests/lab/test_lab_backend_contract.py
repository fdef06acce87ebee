"""The backend contract's core against the real miniupnpd (issue 11): add, verify, delete through
both UPnP backends (miniupnpc and our SOAP client), IGDv1 and IGDv2. The router's own record
decides: its DNAT chain (``nft_mappings``) and a packet from the WAN (``probe``). Both backends
must report the same gateway info and raise the same error type for the same refusal."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.lab.netlab import Lab

pytestmark = pytest.mark.lab
ROOT = Path(__file__).resolve().parents[2]

PORTS = {"miniupnpc": 40000, "soap": 40010}

SCRIPT = """
import asyncio, json, sys
sys.path.insert(0, {root!r})
from igdtrigger.core.errors import GatewayError
from igdtrigger.gateway.base import Capability
from igdtrigger.gateway.upnp.soap import SoapGateway
from igdtrigger.gateway.upnp.miniupnpc import MiniupnpcGateway
from igdtrigger.core.model import MappingSpec, Proto

PORTS = {ports!r}

async def main():
    gws = {{"miniupnpc": MiniupnpcGateway({url!r}), "soap": SoapGateway({url!r})}}
    out = {{}}
    for name, g in gws.items():
        info = await g.connect()
        port = PORTS[name]
        spec = MappingSpec(Proto.UDP, port, info.local_address, port, f"igdtrigger lab {{name}}")
        granted = await g.add(spec, 600)
        m = await g.get(Proto.UDP, port)
        try:
            await g.add(MappingSpec(Proto.UDP, port + 1, "192.168.77.99", port + 1, "x"), 600)
            other = "accepted"
        except GatewayError as e:
            other = [type(e).__name__, getattr(e, "code", None)]
        out[name] = {{
            "info": [info.local_address, info.external_address, info.service_type,
                     info.control_url, info.root_uuid],
            "caps": sorted(g.capabilities),
            "granted": [granted.external_port, granted.lease, granted.timed_lease_refused
                        is not None],
            "get": None if m is None else [m.internal_client, m.internal_port, m.lease_remaining],
            "listed": [x.external_port for x in await g.list()],
            "other": other,
        }}
    print(json.dumps(out), flush=True)
    sys.stdin.readline()  # the test checks the router's record and probes from the WAN
    after = {{}}
    for name, g in gws.items():
        await g.delete(Proto.UDP, PORTS[name])
        after[name] = await g.get(Proto.UDP, PORTS[name])
        await g.close()
    print(json.dumps(after), flush=True)

asyncio.run(main())
"""


@pytest.mark.parametrize("igd_v1", [False, True], ids=["igdv2", "igdv1"])
def test_both_upnp_backends_add_verify_delete_alike(make_lab: Callable[..., Lab],
                                                     igd_v1: bool) -> None:
    lab = make_lab(igd_v1=igd_v1)
    code = SCRIPT.format(root=str(ROOT), url=lab.igd_url, ports=PORTS)
    p = lab.popen(lab.lan, [sys.executable, "-c", code], stdin=-1, stdout=-1, stderr=-1,
                  text=True)
    line = p.stdout.readline() if p.stdout else ""
    assert line, p.communicate(timeout=20)
    first = json.loads(line)
    mini, soap = first["miniupnpc"], first["soap"]
    # one service choice: the same gateway info on both paths
    assert mini["info"] == soap["info"]
    assert mini["info"][:2] == [lab.lan_ip, lab.router_wan_ip]
    assert mini["info"][2].endswith(":1" if igd_v1 else ":2")
    assert mini["caps"] == soap["caps"]
    assert ("add-any" in mini["caps"]) is (not igd_v1)
    for name, port in PORTS.items():
        got = first[name]
        assert got["granted"] == [port, 600, False]
        assert got["get"][:2] == [lab.lan_ip, port]
        assert 0 < got["get"][2] <= 600
        assert port in got["listed"]
    # one fault taxonomy: secure mode refuses another host's mapping the same way on both
    assert mini["other"] == soap["other"]
    assert mini["other"][0] in ("MappingConflict", "NotAuthorized")
    # the router's own record: both mappings in its DNAT chain, and packets get through
    held = {(proto.upper(), eport) for proto, eport, _ip, _iport in lab.nft_mappings()}
    assert {("UDP", 40000), ("UDP", 40010)} <= held
    assert lab.probe("udp", 40000)
    assert lab.probe("udp", 40010)
    out, err = p.communicate("\n", timeout=30)
    after = json.loads(out.strip().splitlines()[-1])
    assert after == {"miniupnpc": None, "soap": None}, err
    held = {(proto.upper(), eport) for proto, eport, _ip, _iport in lab.nft_mappings()}
    assert not held & {("UDP", 40000), ("UDP", 40010), ("UDP", 40001), ("UDP", 40011)}
    assert not lab.probe("udp", 40000)
    assert not lab.probe("udp", 40010)
