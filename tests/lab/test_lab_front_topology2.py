"""The IGD front's topology 2 in the lab (issue 14): igdtrigger on a LAN host, the upstream
mapping pointing at the client directly (here the host's own app, which a secure-mode router
accepts). "In use" is a flow to OR from the mapped internal port: an app that only sends out
from its mapped port (a game server, a torrent client talking first) keeps its lease-0 mapping
past ``idle_timeout``; one nobody uses is removed, and so is the first once its app stops.

    WAN host 11.22.33.2 ── ISP router (miniupnpd, secure mode) ── LAN host 192.168.77.10
                           AddPortMapping(40007 → 192.168.77.10)   igdtrigger serve [front]
                                                                   + the app (upnpc, sender)

Run twice: on a LAN host whose own firewall makes the kernel track flows, and on a plain
desktop with no rule at all (igdtrigger's own table then makes the kernel track).
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.lab.doublenat import DoubleNat, FrontServe, wait_until
from tests.lab.netlab import HOST_IF, Lab, lab_required

pytestmark = pytest.mark.lab

USED, IDLE = 40007, 40006

SENDER = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[2])))
while True:
    s.sendto(b"x", (sys.argv[1], 9))  # unconnected, outbound only: nothing ever comes back
    time.sleep(0.5)
"""


@pytest.fixture(params=["ct", "none"])
def lab(request: pytest.FixtureRequest, make_lab: Callable[..., Lab]) -> Lab:
    """The LAN host with a stateful firewall (the kernel tracks), or a plain desktop with no
    rule at all (the kernel tracks nothing until igdtrigger's own table asks it to)."""
    return make_lab(lan_firewall=request.param)


@pytest.fixture
def serve(lab: Lab, tmp_path: Path) -> Iterator[FrontServe]:
    if shutil.which("upnpc") is None:
        why = "Debian package missing: miniupnpc (upnpc)"
        if lab_required():
            pytest.fail(why, pytrace=False)
        pytest.skip(why)
    # never built: no client LAN, no forwarding; its "home" is the lab's LAN host itself
    s = FrontServe(DoubleNat(lab), tmp_path, interface=HOST_IF, idle="6s").start()
    try:
        yield s
    finally:
        s.close()


def test_an_app_sending_only_from_its_mapped_port_keeps_its_lease_0_mapping(
        lab: Lab, serve: FrontServe) -> None:
    front = serve.status()["front"]
    assert front["topology"]["kind"] == "host"  # no forwarding here: topology 2
    (url,) = [u for u in front["upnp"] if lab.lan_ip in u]
    for port in (IDLE, USED):  # lease 0: "permanent", kept only while in use
        p = lab.run(lab.lan, ["upnpc", "-u", url, "-a", lab.lan_ip, str(port), str(port),
                              "UDP", "0"], timeout=60)
        assert p.returncode == 0 and "is redirected to internal" in p.stdout, p.stdout
    # the upstream mapping points at the client directly
    assert {("UDP", IDLE, lab.lan_ip, IDLE), ("UDP", USED, lab.lan_ip, USED)} <= set(
        lab.nft_mappings())
    sender = lab.popen(lab.lan, [sys.executable, "-c", SENDER, lab.wan_ip, str(USED)])

    def ports() -> set[int]:
        return {eport for _p, eport, _c, _i in lab.nft_mappings()}

    def detail() -> str:
        return f"{lab.nft_mappings()} {serve.logtext()[-3000:]}"

    try:
        wait_until(lambda: IDLE not in ports(), 40, "the unused mapping to be removed", detail,
                   step=0.5)
        assert USED in ports(), detail()
        for _ in range(16):  # 8 s more: well past idle_timeout (6 s), still in use
            assert USED in ports(), detail()
            time.sleep(0.5)
    finally:
        sender.kill()
        sender.wait(10)
    # the app stopped sending: no longer in use, removed after idle_timeout
    wait_until(lambda: USED not in ports(), 40, "the mapping to go once its app stopped",
               detail, step=0.5)
