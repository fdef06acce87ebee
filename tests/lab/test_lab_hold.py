"""The trigger holds while the connection lives, as a router's does (issue 18).

Against miniupnpd in the lab: a long UDP flow, a silent TCP connection, inbound traffic on the
opened port, the socket-table detector, and a flow that began before `serve`. "Open" is read
from the router's own table (a WAN probe would itself be inbound use and hold the ports), and
one real WAN probe per test proves the mapping carries packets. Timings are generous bounds
(the machine is shared); the closing delay after the traffic stops is printed for the record.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.fakes import wait_for
from tests.lab.netlab import Lab
from tests.lab.test_lab_detect import Serve, config
from tests.lab.test_lab_service import ours

pytestmark = pytest.mark.lab

IDLE = 4.0
MARGIN = 4.0  # closing is expected within IDLE + 2 s; the bound leaves room for a loaded box
RULE_UDP = f'trigger = ["udp/27015"]\nidle_timeout = "{IDLE:g}s"'
RULE_TCP = f'trigger = ["tcp/27016"]\nidle_timeout = "{IDLE:g}s"'

UDP_SENDER = """
import socket, sys, time
host, port, seconds, connect = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
if connect == "1":
    s.connect((host, port))
end = time.monotonic() + seconds
while True:  # one packet a second from one socket: one flow
    try:  # nothing listens on the WAN host: a connected socket hears ICMP unreachable
        s.sendto(b"game", (host, port)) if connect != "1" else s.send(b"game")
    except ConnectionRefusedError:
        pass
    if time.monotonic() >= end:
        break
    time.sleep(1.0)
s.close()
"""

TCP_SERVER = """
import socket, sys, time
l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("0.0.0.0", int(sys.argv[1]))); l.listen()
conns = []
while True:
    c, _ = l.accept(); conns.append(c)
"""

TCP_CLIENT = """
import socket, sys, time
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
c.sendall(b"hello")
print("connected", flush=True)
time.sleep(3600)  # silent until killed: the kernel then closes it (FIN)
"""


def is_open(lab: Lab) -> bool:
    return len(ours(lab)) == 2


def held_for(lab: Lab, seconds: float, what: str) -> None:
    """The mappings stay on the router for ``seconds`` (read every quarter second)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        assert is_open(lab), f"mappings gone while {what}"
        time.sleep(0.25)


def closes_after(lab: Lab, stopped: float, what: str) -> float:
    wait_for(lambda: not ours(lab), IDLE + MARGIN + 30, f"mappings removed after {what}")
    took = time.monotonic() - stopped
    print(f"closed {took:.1f}s after {what} (idle_timeout {IDLE:g}s)")
    # the detector dates the last packet from its once-a-second look at the flow, and the
    # test's `stopped` is taken after the sender has finished: up to ~1.5 s apart
    assert took >= IDLE - 1.5, f"closed {took:.1f}s after {what}: before the idle timeout"
    assert took <= IDLE + MARGIN, f"closed {took:.1f}s after {what}"
    return took


def udp_sender(lab: Lab, seconds: float, *, connect: bool = False) -> subprocess.Popen[bytes]:
    return lab.popen(lab.lan, [sys.executable, "-c", UDP_SENDER, lab.wan_ip, "27015",
                               str(seconds), "1" if connect else "0"])


def finish(proc: subprocess.Popen[bytes], timeout: float) -> float:
    proc.wait(timeout)
    return time.monotonic()


def tcp_connection(lab: Lab) -> tuple[subprocess.Popen[bytes], subprocess.Popen[bytes]]:
    server = lab.popen(lab.wan, [sys.executable, "-c", TCP_SERVER, "27016"])
    time.sleep(0.5)
    client = lab.popen(lab.lan, [sys.executable, "-c", TCP_CLIENT, lab.wan_ip, "27016"],
                       stdout=subprocess.PIPE)
    assert client.stdout is not None
    assert client.stdout.readline().strip() == b"connected"
    return server, client


def end(*procs: subprocess.Popen[bytes]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()


def serve_with(make_lab: Callable[..., Lab], tmp_path: Path, started: list[Serve], method: str,
               rule: str) -> tuple[Lab, Serve]:
    """A lab (conntrack in the LAN host only for that detector) and `serve` with one detector."""
    lab = make_lab(lan_conntrack=method == "conntrack")
    s = Serve(lab, lab.lan, config(lab, tmp_path, f'methods = ["{method}"]\n'
                                   'socket_interval = "500ms"', rule))
    started.append(s)
    return lab, s


@pytest.mark.parametrize("method", ["conntrack", "sockets"])
def test_long_udp_flow_holds_then_closes_after_it_stops(
        make_lab: Callable[..., Lab], tmp_path: Path, started: list[Serve], method: str) -> None:
    """1 (and 4): one UDP flow, a packet a second for 3x idle_timeout: open throughout."""
    lab, s = serve_with(make_lab, tmp_path, started, method, RULE_UDP)
    sender = udp_sender(lab, 3 * IDLE + 4, connect=method == "sockets")
    try:
        wait_for(lambda: is_open(lab), 10, "mappings after the first packet")
        assert lab.probe("udp", 40000, timeout=1.0)
        held_for(lab, 3 * IDLE, "the flow kept sending")
        act = s.status()["activations"][0]
        assert act["hold"] and act["live_flows"] >= 1, act
        stopped = finish(sender, 3 * IDLE)
    finally:
        end(sender)
    closes_after(lab, stopped, "the UDP flow stopped")


@pytest.mark.parametrize("method", ["conntrack", "sockets"])
def test_silent_tcp_connection_holds_until_closed(
        make_lab: Callable[..., Lab], tmp_path: Path, started: list[Serve], method: str) -> None:
    """2 (and 4): a TCP connection to the trigger port, open and silent for 3x idle_timeout."""
    lab, s = serve_with(make_lab, tmp_path, started, method, RULE_TCP)
    server, client = tcp_connection(lab)
    try:
        wait_for(lambda: is_open(lab), 10, "mappings after the connection")
        assert lab.probe("tcp", 40005, timeout=1.0)
        wait_for(lambda: s.status()["activations"][0]["expires_in"] is None, 10,
                 "the activation held by the live connection")
        act = s.status()["activations"][0]
        assert act["hold"] == "1 live flow", act
        held_for(lab, 3 * IDLE, "the connection was open and silent")
        client.kill()
        stopped = finish(client, 5)
    finally:
        end(client, server)
    closes_after(lab, stopped, "the connection closed")


def test_inbound_traffic_on_the_opened_port_holds(
        make_lab: Callable[..., Lab], tmp_path: Path, started: list[Serve]) -> None:
    """3: one trigger packet, then the WAN host sends to the opened port every second."""
    lab = make_lab()
    s = Serve(lab, lab.lan, config(lab, tmp_path, 'methods = ["conntrack"]', RULE_UDP))
    started.append(s)
    sender = udp_sender(lab, 0)  # a single packet
    finish(sender, 10)
    wait_for(lambda: is_open(lab), 10, "mappings after the trigger packet")
    end_at = time.monotonic() + 3 * IDLE
    stopped = time.monotonic()
    while time.monotonic() < end_at:  # each probe is a fresh flow from the WAN host
        stopped = time.monotonic()  # the last packet is sent right after this
        assert lab.probe("udp", 40000, timeout=1.0), "the opened port closed while in use"
        time.sleep(max(0.0, 1.0 - (time.monotonic() - stopped)))
    counts = s.status()["counts"]
    assert counts["flows_inbound"] >= 3 * IDLE - 2, counts
    closes_after(lab, stopped, "the inbound traffic stopped")


def test_a_flow_that_began_before_serve_holds(
        make_lab: Callable[..., Lab], tmp_path: Path, started: list[Serve]) -> None:
    """5: the game was already talking when the service started."""
    lab = make_lab()
    cfg = config(lab, tmp_path, 'methods = ["conntrack"]', RULE_UDP)
    sender = udp_sender(lab, 3 * IDLE + 8)
    try:
        time.sleep(2.0)
        s = Serve(lab, lab.lan, cfg)
        started.append(s)
        wait_for(lambda: is_open(lab), 10, "mappings for the flow from before")
        assert lab.probe("udp", 40000, timeout=1.0)
        held_for(lab, 2 * IDLE, "the flow from before kept sending")
        stopped = finish(sender, 3 * IDLE + 8)
    finally:
        end(sender)
    closes_after(lab, stopped, "the flow from before stopped")
