"""The IGD front's flow hold in the double-NAT lab (issue 14, topology 1): a client mapping is
in use while a connection through it lives, however silent, as a rule's activation is held by a
live connection. A WAN peer opens one TCP connection to the client's lease-0 mapping and sends
nothing: the mapping stays well past ``idle_timeout`` (a second mapping of the same client that
nobody uses goes meanwhile); the peer closes it: the mapping goes ``idle_timeout`` later.

    WAN host 11.22.33.2 ── ISP router (miniupnpd) ── home router (igdtrigger serve [front],
    (TCP client, silent)   40010 → home router        conntrack follows the connection)
                                                      ── client 10.8.0.10 (TCP server on 40010)
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.lab.doublenat import DoubleNat, FrontServe, wait_until
from tests.lab.netlab import Lab
from tests.lab.test_lab_front import need_tools, upnp_add, upstream_ports

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


def test_a_silent_tcp_connection_holds_the_mapping_until_it_closes(
        net: DoubleNat, serve: FrontServe) -> None:
    for port in (HELD, UNUSED):  # lease 0: kept only while in use
        got, out = upnp_add(net, 0, port, proto="TCP", lease=0)
        assert got == port, out
    server = net.lab.popen(net.clients[0], [sys.executable, "-c", SERVER, str(HELD)])
    client = net.lab.popen(net.lab.wan, [sys.executable, "-c", CLIENT, net.external_ip,
                                         str(HELD)],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def detail() -> str:
        return f"upstream {sorted(upstream_ports(net))}\n{serve.logtext()[-3000:]}"

    try:
        assert client.stdout is not None and client.stdin is not None
        line = client.stdout.readline()
        assert line.startswith("connected"), line + detail()
        wait_until(lambda: ("TCP", UNUSED) not in upstream_ports(net), 60,
                   "the unused mapping to be removed after idle_timeout", detail, step=0.5)
        # the connection has been silent since it opened; 3x idle_timeout more, still mapped
        for _ in range(36):
            assert ("TCP", HELD) in upstream_ports(net), detail()
            time.sleep(0.5)
        flows = serve.status()["front"]["flows"]
        assert flows["holding"] >= 1, flows
        assert net.home_dnat(), "the held mapping's inner DNAT is still there"
        client.stdin.close()  # the peer closes: FIN through both routers
        client.wait(30)
        wait_until(lambda: ("TCP", HELD) not in upstream_ports(net), 60,
                   "the mapping to be removed idle_timeout after its connection closed",
                   detail, step=0.5)
        wait_until(lambda: not net.home_dnat(), 20, "its inner DNAT to go",
                   lambda: str(net.home_dnat()))
    finally:
        for proc in (client, server):
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
