"""The IGD front's flow hold in the lab (issue 14, topologies 1 and 2): a client mapping is
in use while a connection through it lives, however silent, as a rule's activation is held by a
live connection. A WAN peer opens one TCP connection to the client's lease-0 mapping and sends
nothing: the mapping stays well past ``idle_timeout`` (a second mapping of the same client that
nobody uses goes meanwhile); the peer closes it: the mapping goes ``idle_timeout`` later.
Topology 1 (below) and topology 2 (igdtrigger on the LAN host whose own app is the server).

    WAN host 11.22.33.2 ── ISP router (miniupnpd) ── home router (igdtrigger serve [front],
    (TCP client, silent)   40010 → home router        conntrack follows the connection)
                                                      ── client 10.8.0.10 (TCP server on 40010)
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.lab.doublenat import DoubleNat, FrontServe, wait_until
from tests.lab.netlab import HOST_IF, Lab
from tests.lab.test_lab_front import need_tools, upnp_add

pytestmark = pytest.mark.lab

HELD, UNUSED = 40010, 40011

SERVER = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(1)
conn, _ = s.accept()
conn.recv(1)  # silent until the peer closes
"""

CLIENT = """
import socket, sys, time
deadline = time.monotonic() + 30
while True:
    try:
        c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)
        break
    except OSError as exc:
        if time.monotonic() > deadline:
            print("failed", exc, flush=True)
            sys.exit(1)
        time.sleep(0.5)
print("connected", flush=True)
sys.stdin.read()  # silent (no keepalive) until told to close
c.close()
"""


@pytest.fixture
def net(lab: Lab) -> DoubleNat:
    need_tools()
    return DoubleNat(lab, clients=1).build()


@pytest.fixture
def serve(net: DoubleNat, tmp_path: Path) -> Iterator[FrontServe]:
    s = FrontServe(net, tmp_path, idle="6s").start()
    try:
        yield s
    finally:
        s.close()


def held_until_closed(lab: Lab, serve: FrontServe, server_ns: str,
                      inner: Callable[[], list[str]] | None = None) -> None:
    """``HELD`` and ``UNUSED`` are mapped (TCP, lease 0) for a host in ``server_ns``: a WAN
    peer connects to ``HELD`` and stays silent; ``UNUSED`` goes after idle_timeout, ``HELD``
    stays 3x idle_timeout more; the peer closes: ``HELD`` (and its ``inner`` DNAT) goes."""
    server = lab.popen(server_ns, [sys.executable, "-c", SERVER, str(HELD)])
    client = lab.popen(lab.wan, [sys.executable, "-c", CLIENT, lab.router_wan_ip, str(HELD)],
                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def ports() -> set[tuple[str, int]]:
        return {(proto, eport) for proto, eport, _c, _i in lab.nft_mappings()}

    def detail() -> str:
        return f"upstream {sorted(ports())}\n{serve.logtext()[-3000:]}"

    try:
        assert client.stdout is not None and client.stdin is not None
        line = client.stdout.readline()
        assert line.startswith("connected"), line + detail()
        wait_until(lambda: ("TCP", UNUSED) not in ports(), 60,
                   "the unused mapping to be removed after idle_timeout", detail, step=0.5)
        # the connection has been silent since it opened; 3x idle_timeout more, still mapped
        for _ in range(36):
            assert ("TCP", HELD) in ports(), detail()
            time.sleep(0.5)
        flows = serve.status()["front"]["flows"]
        assert flows["holding"] >= 1, flows
        if inner is not None:
            assert inner(), "the held mapping's inner DNAT is still there"
        client.stdin.close()  # the peer closes: FIN through the router(s)
        client.wait(30)
        wait_until(lambda: ("TCP", HELD) not in ports(), 60,
                   "the mapping to be removed idle_timeout after its connection closed",
                   detail, step=0.5)
        if inner is not None:
            wait_until(lambda: not inner(), 20, "its inner DNAT to go", lambda: str(inner()))
    finally:
        for proc in (client, server):
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)


def test_topology_1_a_silent_tcp_connection_holds_the_mapping_until_it_closes(
        net: DoubleNat, serve: FrontServe) -> None:
    """igdtrigger is the home gateway: its conntrack follows the forwarded connection."""
    for port in (HELD, UNUSED):  # lease 0: kept only while in use
        got, out = upnp_add(net, 0, port, proto="TCP", lease=0)
        assert got == port, out
    held_until_closed(net.lab, serve, net.clients[0], net.home_dnat)


@pytest.mark.parametrize("firewall", ["ct", "none"])
def test_topology_2_a_silent_tcp_connection_to_the_hosts_own_app_holds_its_mapping(
        make_lab: Callable[..., Lab], tmp_path: Path, firewall: str) -> None:
    """igdtrigger on a LAN host (with a stateful firewall, or a plain desktop with no rule):
    the host's own app's mapping points at the host; the connection arrives here."""
    if shutil.which("upnpc") is None:
        need_tools()
    lab = make_lab(lan_firewall=firewall)
    serve = FrontServe(DoubleNat(lab), tmp_path, interface=HOST_IF, idle="6s").start()
    try:
        front = serve.status()["front"]
        assert front["topology"]["kind"] == "host"
        (url,) = [u for u in front["upnp"] if lab.lan_ip in u]
        for port in (HELD, UNUSED):
            p = lab.run(lab.lan, ["upnpc", "-u", url, "-a", lab.lan_ip, str(port), str(port),
                                  "TCP", "0"], timeout=60)
            assert p.returncode == 0 and "is redirected to internal" in p.stdout, p.stdout
        held_until_closed(lab, serve, lab.lan)
    finally:
        serve.close()
