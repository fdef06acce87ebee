"""Our own SOAP/asyncio IGD client against the real router, IGDv2 and IGDv1."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.lab.netlab import Lab

pytestmark = pytest.mark.lab
ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import asyncio, json, sys, time
sys.path.insert(0, {root!r})
from igdtrigger.gateway.upnp.soap import SoapGateway, discover
from igdtrigger.core.model import MappingSpec, Proto
from igdtrigger.core.errors import GatewayError

async def main():
    out = {{}}
    found = await discover(1.0, gateway={gw!r})
    out["discovered"] = [r.location for r, _ in found]
    g = SoapGateway(None if {use_ssdp} else {url!r})
    info = await g.connect()
    out["info"] = [info.local_address, info.external_address, info.service_type]
    spec = MappingSpec(Proto.UDP, 40000, info.local_address, 40000, "igdtrigger lab soaptest")
    t = time.perf_counter(); await g.add(spec, 600); out["add_ms"] = (time.perf_counter() - t) * 1e3
    m = await g.get(Proto.UDP, 40000)
    out["get"] = [m.internal_client, m.internal_port, m.description, m.lease_remaining]
    out["list"] = [(x.proto.value, x.external_port) for x in await g.list()]
    print(json.dumps(out), flush=True)
    sys.stdin.readline()  # the test probes from the WAN while the mapping exists
    await g.delete(Proto.UDP, 40000)
    out2 = {{"after": await g.get(Proto.UDP, 40000)}}
    try:
        await g.add(MappingSpec(Proto.UDP, 40001, "192.168.77.99", 40001, "x"), 600)
        out2["other"] = "accepted"
    except GatewayError as e:
        out2["other"] = f"{{type(e).__name__}}: {{e}}"
    print(json.dumps(out2), flush=True)

asyncio.run(main())
"""


@pytest.mark.parametrize("igd_v1", [False, True], ids=["igdv2", "igdv1"])
@pytest.mark.parametrize("use_ssdp", [False, True], ids=["url", "ssdp"])
def test_soap_gateway_maps_real_ports(make_lab: Callable[..., Lab], igd_v1: bool,
                                      use_ssdp: bool) -> None:
    lab = make_lab(igd_v1=igd_v1)
    code = SCRIPT.format(root=str(ROOT), url=lab.igd_url, gw=lab.router_lan_ip, use_ssdp=use_ssdp)
    p = lab.popen(lab.lan, [sys.executable, "-c", code], stdin=-1, stdout=-1, stderr=-1,
                  text=True)
    first = json.loads(p.stdout.readline() or "null") if p.stdout else None
    assert first is not None, p.communicate(timeout=10)
    assert first["discovered"] == [lab.igd_url]
    assert first["info"][0] == lab.lan_ip
    assert first["info"][1] == lab.router_wan_ip
    assert first["info"][2].endswith(":1" if igd_v1 else ":2")
    assert first["get"][:3] == [lab.lan_ip, 40000, "igdtrigger lab soaptest"]
    assert 0 < first["get"][3] <= 600
    assert ["UDP", 40000] in first["list"]
    assert lab.probe("udp", 40000)
    out, _ = p.communicate("\n", timeout=20)
    second = json.loads(out.strip().splitlines()[-1])
    assert second["after"] is None
    assert not lab.probe("udp", 40000)
    # secure mode: miniupnpd 2.3.1 answers 718 for another host's mapping
    assert second["other"].startswith("MappingConflict: router refused AddPortMapping: 718")
