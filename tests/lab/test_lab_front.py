"""The IGD front in a double-NAT lab (issue 14's Proof): clients nobody here wrote (Debian's
``natpmpc`` and ``upnpc``) ask the home router running ``igdtrigger serve`` with ``[front]``; the
real mappings are made on the ISP router (miniupnpd, secure mode on), and WAN packets really
arrive at the client while mapped, and stop after."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.lab.doublenat import DoubleNat, FrontServe, missing_tools, wait_until
from tests.lab.netlab import Lab, lab_required

pytestmark = pytest.mark.lab

MAPPED = re.compile(r"Mapped public port (\d+) protocol (UDP|TCP) to local port (\d+)")


def need_tools() -> None:
    """Skip without Debian's upnpc/natpmpc, or fail with IGDTRIGGER_REQUIRE_LAB=1 (CI)."""
    missing = missing_tools()
    if missing:
        why = f"Debian package(s) missing: {', '.join(missing)}"
        if lab_required():
            pytest.fail(why, pytrace=False)
        pytest.skip(why)


@pytest.fixture
def net(lab: Lab) -> DoubleNat:
    need_tools()
    return DoubleNat(lab).build()


@pytest.fixture
def front(net: DoubleNat, tmp_path: Path) -> Iterator[Callable[..., FrontServe]]:
    started: list[FrontServe] = []

    def factory(**cfg: Any) -> FrontServe:
        s = FrontServe(net, tmp_path, **cfg).start()
        started.append(s)
        return s

    yield factory
    for s in started:
        s.close()


def natpmp_map(net: DoubleNat, client: int, port: int, proto: str = "udp",
               lifetime: int = 60) -> int | None:
    """``natpmpc -a``: the public port granted, or None when refused."""
    p = net.natpmpc(client, "-a", str(port), str(port), proto, str(lifetime))
    m = MAPPED.search(p.stdout)
    return int(m.group(1)) if p.returncode == 0 and m else None


def upstream_ports(net: DoubleNat) -> set[tuple[str, int]]:
    return {(proto, eport) for proto, eport, _c, _i in net.upstream()}


def test_natpmpc_maps_through_both_routers_and_lifetime_0_closes(
        net: DoubleNat, front: Callable[..., FrontServe]) -> None:
    s = front()
    assert not net.probe("udp", 40002, timeout=0.3), "reachable before any mapping"
    p = net.natpmpc(0, "-a", "40002", "40002", "udp", "60")
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"Public IP address : {net.external_ip}" in p.stdout  # the ISP router's address
    assert "Mapped public port 40002 protocol UDP to local port 40002" in p.stdout
    # upstream: the ISP router maps to the home router's own address (secure mode accepts it)
    assert ("UDP", 40002, net.home_wan_ip, 40002) in net.upstream()
    assert len(net.home_dnat()) == 1
    assert wait_until(lambda: net.probe("udp", 40002, timeout=0.5), 10,
                      "a WAN packet at the client") >= 0
    p = net.natpmpc(0, "-a", "40002", "40002", "udp", "0")
    assert p.returncode == 0, p.stdout + p.stderr
    wait_until(lambda: ("UDP", 40002) not in upstream_ports(net), 10, "the upstream delete",
               lambda: str(net.upstream()))
    assert net.home_dnat() == []
    assert not net.probe("udp", 40002, timeout=0.5)
    # the rule went in and out over nf_tables netlink (front/dnat.py), not the nft fallback
    assert "using the nft command" not in s.logtext(), s.logtext()[-3000:]


def test_policy_refusals_map_nothing_upstream(
        net: DoubleNat, front: Callable[..., FrontServe]) -> None:
    # client 2 may not map at all; client 1 only 1024-49151
    front(allow=["allow 1024-49151 10.8.0.10/32 1024-65535", "deny 0-65535 0.0.0.0/0 0-65535"])
    p = net.natpmpc(1, "-a", "40010", "40010", "udp", "60")
    assert p.returncode != 0 and "Mapped public port" not in p.stdout, p.stdout
    assert upstream_ports(net) == set() and net.home_dnat() == []
    # 50000 is a port the ISP router would accept but the allow lines do not: NAT-PMP's
    # suggested port is a hint (RFC 6886 §3.3), so the client gets an allowed one instead
    got = natpmp_map(net, 0, 50000)
    assert got is not None and 1024 <= got <= 49151
    assert upstream_ports(net) == {("UDP", got)}
    assert natpmp_map(net, 0, 40010) == 40010  # an allowed one goes through as asked


def test_two_clients_same_port_the_second_gets_another(
        net: DoubleNat, front: Callable[..., FrontServe]) -> None:
    front()
    first = natpmp_map(net, 0, 40004)
    second = natpmp_map(net, 1, 40004)
    assert first == 40004
    assert second is not None and second != 40004  # NAT-PMP: an alternative, never a clash
    assert upstream_ports(net) == {("UDP", 40004), ("UDP", second)}
    assert wait_until(lambda: net.probe("udp", 40004, client=0, timeout=0.5), 10, "client 1")
    assert wait_until(lambda: net.probe("udp", second, client=1, internal_port=40004,
                                        timeout=0.5), 10, "client 2 on its port")
    assert not net.probe("udp", 40004, client=1, timeout=0.3)  # the first keeps its mapping


SENDER = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[2])))
while True:
    s.sendto(b"x", (sys.argv[1], 9))
    time.sleep(0.5)
"""


@pytest.mark.parametrize(("how", "direction"), [("natpmp", "outbound"), ("upnp", "inbound")])
def test_idle_mapping_is_removed_one_in_use_stays(
        net: DoubleNat, front: Callable[..., FrontServe], how: str, direction: str) -> None:
    """NAT-PMP with a 1 h lifetime, or UPnP with lease 0 ("permanent"): either way a mapping
    nobody uses goes after idle_timeout; one in use stays: its client keeps sending out from
    the mapped port (outbound), or a WAN peer keeps sending in through it (inbound)."""
    s = front(idle="6s")
    for client, port in ((0, 40006), (1, 40007)):
        got = natpmp_map(net, client, port, lifetime=3600) if how == "natpmp" else \
            upnp_add(net, client, port, lease=0)[0]
        assert got == port
    sender = None
    if direction == "outbound":
        sender = net.lab.popen(net.clients[1], [sys.executable, "-c", SENDER, net.lab.wan_ip,
                                                "40007"])
    delivered = 0

    def idle_gone() -> bool:
        nonlocal delivered
        if direction == "inbound":
            delivered += net.probe("udp", 40007, client=1, timeout=0.5)
        return ("UDP", 40006) not in upstream_ports(net)

    try:
        wait_until(idle_gone, 40, "the idle mapping to be removed", s.logtext, step=0.5)
        assert delivered > 0 or direction == "outbound"
        assert ("UDP", 40007) in upstream_ports(net), s.logtext()[-3000:]
        wait_until(lambda: len(net.home_dnat()) == 1, 10, "the idle mapping's inner rule to go",
                   lambda: str(net.home_dnat()))
        for _ in range(8):  # well past idle_timeout, still in use: still there
            if direction == "inbound":
                net.probe("udp", 40007, client=1, timeout=0.5)
            time.sleep(0.5)
        assert ("UDP", 40007) in upstream_ports(net), s.logtext()[-3000:]
    finally:
        if sender is not None:
            sender.kill()
            sender.wait(10)


def test_sigterm_removes_every_upstream_mapping_and_inner_rule(
        net: DoubleNat, front: Callable[..., FrontServe]) -> None:
    s = front()
    assert natpmp_map(net, 0, 40020) == 40020
    assert natpmp_map(net, 1, 40021, "tcp") == 40021
    assert upnp_add(net, 0, 40022, lease=0)[0] == 40022
    assert len(net.upstream()) == 3 and len(net.home_dnat()) == 3
    assert s.stop(signal.SIGTERM) == 0, s.logtext()[-3000:]
    assert net.upstream() == []
    assert "igdtrigger_front" not in net.home_ruleset()


def test_a_firewall_reload_that_drops_our_table_is_repaired(
        net: DoubleNat, front: Callable[..., FrontServe]) -> None:
    """``nft flush ruleset`` on the home router (a firewall reload) takes the inner DNAT with
    it: the front loads its table again within seconds and the client is reachable again."""
    s = front()
    assert natpmp_map(net, 0, 40060) == 40060
    assert wait_until(lambda: net.probe("udp", 40060, timeout=0.5), 10, "mapped") >= 0
    net.lab.run(net.home, ["nft", "flush", "ruleset"], check=True)
    wait_until(lambda: len(net.home_dnat()) == 1, 15, "our table back", s.logtext)
    assert wait_until(lambda: net.probe("udp", 40060, timeout=0.5), 10, "reachable again") >= 0
    assert "removed by someone else" in s.logtext()


def test_kill_9_and_restart_leave_nothing_stale(
        net: DoubleNat, front: Callable[..., FrontServe], tmp_path: Path) -> None:
    s = front()
    assert natpmp_map(net, 0, 40030) == 40030
    assert upnp_add(net, 1, 40031, lease=0)[0] == 40031
    s.stop(signal.SIGKILL)
    # restarted: the journal's mapping comes back whole (upstream AND inner rule) or not at all
    s2 = FrontServe(net, tmp_path).start()
    try:
        def whole() -> bool:  # each mapping: on both routers, or on neither
            up = upstream_ports(net)
            inner = [d for d in net.home_dnat() if '"right": 40030' in d or
                     '"right": 40031' in d]
            return len(inner) == len(up & {("UDP", 40030), ("UDP", 40031)})
        wait_until(whole, 20, "upstream and inner rules to agree", s2.logtext)
        # our choice of the two the issue allows: restored (listed, forwarding), not dropped
        assert {("UDP", 40030), ("UDP", 40031)} <= upstream_ports(net), s2.logtext()[-3000:]
        assert len(s2.status()["front"]["mappings"]) == 2
        for client, port in ((0, 40030), (1, 40031)):
            def reaches(c: int = client, p: int = port) -> bool:
                return net.probe("udp", p, client=c, timeout=0.5)
            assert wait_until(reaches, 10, "the restored mapping to reach its client") >= 0
        assert s2.stop(signal.SIGTERM) == 0
    finally:
        s2.close()
    assert net.upstream() == []
    assert "igdtrigger_front" not in net.home_ruleset()


# --- UPnP IGD, driven by Debian's upnpc (SSDP discovery on the client LAN) ----------------------

UPNP_ADDED = re.compile(r"external (\S+):(\d+) (UDP|TCP) is redirected to internal (\S+):(\d+)")


def upnp_add(net: DoubleNat, client: int, port: int, *, internal: str | None = None,
             proto: str = "UDP", lease: int | None = None, any_port: bool = False,
             ) -> tuple[int | None, str]:
    """``upnpc -a`` (or ``-n``, AddAnyPortMapping): the external port granted (None: refused)
    and upnpc's output (its exit code is unreliable: 0 on some failures)."""
    args = ["-n" if any_port else "-a", internal or net.client_ips[client], str(port), str(port),
            proto]
    if lease is not None:
        args.append(str(lease))
    p = net.upnpc(client, "-e", f"lab client {client}", *args)
    m = UPNP_ADDED.search(p.stdout)
    return (int(m.group(2)) if m else None), p.stdout + p.stderr


def test_upnpc_maps_lists_and_deletes_through_both_routers(
        net: DoubleNat, front: Callable[..., FrontServe]) -> None:
    front()
    got, out = upnp_add(net, 0, 40000, lease=0)
    assert got == 40000, out
    assert f"external {net.external_ip}:40000 UDP" in out  # the ISP router's address
    assert ("UDP", 40000, net.home_wan_ip, 40000) in net.upstream()
    status = net.upnpc(0, "-s").stdout
    assert f"ExternalIPAddress = {net.external_ip}" in status, status
    listing = net.upnpc(0, "-l").stdout
    assert re.search(r"UDP\s+40000->10\.8\.0\.10:40000", listing), listing
    assert wait_until(lambda: net.probe("udp", 40000, timeout=0.5), 10,
                      "a WAN packet at the client") >= 0
    p = net.upnpc(0, "-d", "40000", "UDP")
    assert "failed" not in p.stdout, p.stdout
    wait_until(lambda: upstream_ports(net) == set(), 10, "the upstream delete",
               lambda: str(net.upstream()))
    assert net.home_dnat() == []
    assert not net.probe("udp", 40000, timeout=0.5)


def test_upnp_refusals_606_and_718_map_nothing_upstream(
        net: DoubleNat, front: Callable[..., FrontServe]) -> None:
    front(allow=["allow 1024-49151 10.8.0.0/24 1024-65535", "deny 0-65535 0.0.0.0/0 0-65535"])
    got, out = upnp_add(net, 0, 50000)  # the ISP router would take it; [front] allow does not
    assert got is None and "606" in out, out
    got, out = upnp_add(net, 0, 40001, internal=net.client_ips[1])  # another client's address
    assert got is None and "718" in out, out
    assert upstream_ports(net) == set() and net.home_dnat() == []


def test_upnp_two_clients_same_port_718_or_another_via_addany(
        net: DoubleNat, front: Callable[..., FrontServe]) -> None:
    front()
    assert upnp_add(net, 0, 40004)[0] == 40004
    got, out = upnp_add(net, 1, 40004)
    assert got is None and "718" in out, out
    other, out = upnp_add(net, 1, 40004, any_port=True)
    assert other is not None and other != 40004, out
    assert upstream_ports(net) == {("UDP", 40004), ("UDP", other)}
    assert wait_until(lambda: net.probe("udp", 40004, client=0, timeout=0.5), 10, "client 1")
    assert wait_until(lambda: net.probe("udp", other, client=1, internal_port=40004,
                                        timeout=0.5), 10, "client 2 on its port")


def test_a_dropping_forward_chain_is_named_and_forward_chain_fixes_it(
        lab: Lab, tmp_path: Path) -> None:
    """Topology 1 behind a firewall whose forward policy drops DNATed packets: the upstream
    mapping is made but nothing arrives; status/doctor name the chain; with [front]
    forward_chain set to it igdtrigger adds (and at stop removes) its accept rule."""
    need_tools()
    net = DoubleNat(lab, clients=1, forward_policy="drop").build()
    chain = "ip igdt_home forward"
    (tmp_path / "a").mkdir()
    s = FrontServe(net, tmp_path / "a").start()
    try:
        topo = s.status()["front"]["topology"]
        assert topo["kind"] == "gateway" and topo["upstream_address"] == net.home_wan_ip
        assert any(chain in t for t in topo["forward_drops"]), topo
        doctor = s.cli("doctor")
        assert chain in doctor.stdout and "forward_chain" in doctor.stdout, doctor.stdout
        assert f"NAT-PMP/PCP on {net.home_lan_ip}:5351" in doctor.stdout, doctor.stdout
        assert natpmp_map(net, 0, 40040) == 40040
        assert s.status()["front"]["natpmp_pcp_requests"]["pmp_ok"] >= 2  # address + map
        assert ("UDP", 40040) in upstream_ports(net)
        assert not net.probe("udp", 40040, timeout=0.5)  # dropped by the home firewall
        assert s.stop() == 0
    finally:
        s.close()
    (tmp_path / "b").mkdir()
    s = FrontServe(net, tmp_path / "b", forward_chain=chain).start()
    try:
        assert s.status()["front"]["topology"]["forward_drops"] == []
        assert natpmp_map(net, 0, 40041) == 40041
        assert "igdtrigger-front" in net.home_ruleset()
        assert wait_until(lambda: net.probe("udp", 40041, timeout=0.5), 10,
                          "the WAN packet through the accept rule") >= 0
        # a reload of the user's firewall that drops our accept rule: it comes back
        net.lab.run(net.home, ["nft", "flush", "chain", *chain.split()], check=True)
        net.lab.run(net.home, ["nft", "add", "rule", *chain.split(), "ct", "state",
                               "established,related", "accept"], check=True)
        wait_until(lambda: "igdtrigger-front" in net.home_ruleset(), 20,
                   "our accept rule back", s.logtext)
        assert wait_until(lambda: net.probe("udp", 40041, timeout=0.5), 10,
                          "delivered again") >= 0
        assert s.stop() == 0
    finally:
        s.close()
    ruleset = net.home_ruleset()
    assert "igdtrigger" not in ruleset and "chain forward" in ruleset  # the user's chain stays
    assert net.upstream() == []


# --- PCP (no Debian PCP client: our own client codec, from the client's namespace) ---------------

PCP_ASK = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(5)
for payload in sys.argv[2:]:
    s.sendto(bytes.fromhex(payload), (sys.argv[1], 5351))
    print(s.recv(1100).hex(), flush=True)
"""


def pcp_exchange(net: DoubleNat, client: int, *payloads: bytes) -> list[Any]:
    from igdtrigger.gateway.natpmp.codec import decode_pcp_reply

    p = net.run(client, [sys.executable, "-c", PCP_ASK, net.home_lan_ip,
                         *(x.hex() for x in payloads)])
    assert p.returncode == 0, p.stderr
    return [decode_pcp_reply(bytes.fromhex(line)) for line in p.stdout.split()]


def test_pcp_map_nonce_prefer_failure_and_delete(
        net: DoubleNat, front: Callable[..., FrontServe]) -> None:
    from igdtrigger.core.model import Proto
    from igdtrigger.gateway.natpmp.codec import build_pcp_announce, build_pcp_map

    front()
    me, other = net.client_ips
    n1, n2 = b"\x01" * 12, b"\x02" * 12
    (ann, mapped, thief) = pcp_exchange(
        net, 0, build_pcp_announce(me), build_pcp_map(n1, Proto.UDP, 40050, 40050, 120, me),
        build_pcp_map(n2, Proto.UDP, 40050, 40050, 0, me))
    assert ann.result == 0 and ann.epoch is not None
    assert (mapped.result, mapped.external_port, mapped.external_ip) == \
        (0, 40050, net.external_ip)
    assert 0 < mapped.lifetime <= 120
    assert thief.result == 2  # NOT_AUTHORIZED: another nonce may not delete it
    assert ("UDP", 40050) in upstream_ports(net)
    assert wait_until(lambda: net.probe("udp", 40050, timeout=0.5), 10, "the PCP mapping")
    # the second client: PREFER_FAILURE on a taken port fails, without it another port
    (fail, alt) = pcp_exchange(
        net, 1, build_pcp_map(n2, Proto.UDP, 40050, 40050, 120, other, prefer_failure=True),
        build_pcp_map(n2, Proto.UDP, 40050, 40050, 120, other))
    assert fail.result == 11  # CANNOT_PROVIDE_EXTERNAL
    assert alt.result == 0 and alt.external_port not in (0, 40050)
    (done,) = pcp_exchange(net, 0, build_pcp_map(n1, Proto.UDP, 40050, 0, 0, me))
    assert done.result == 0 and done.lifetime == 0
    wait_until(lambda: ("UDP", 40050) not in upstream_ports(net), 10, "the PCP delete",
               lambda: str(net.upstream()))
    assert not net.probe("udp", 40050, timeout=0.5)


ANNOUNCE_LISTEN = """
import socket, struct, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("224.0.0.1", 5350))
s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
             socket.inet_aton("224.0.0.1") + socket.inet_aton(sys.argv[1]))
s.settimeout(float(sys.argv[2]))
print("ready", flush=True)
seen = set()
try:
    while len(seen) < 2:
        data, src = s.recvfrom(1100)
        print(src[0], data.hex(), flush=True)
        seen.add(data[0])
except TimeoutError:
    pass
"""


def test_start_announces_to_the_all_hosts_group(net: DoubleNat, tmp_path: Path) -> None:
    """On start the front multicasts the NAT-PMP address announcement (with the ISP router's
    external address) and a PCP ANNOUNCE to 224.0.0.1:5350 (RFC 6886 §3.2.1, RFC 6887
    §14.1.3): clients learn of the restart and re-create their mappings."""
    from igdtrigger.gateway.natpmp.codec import decode_pcp_reply, decode_pmp_reply

    listener = net.lab.popen(net.clients[0], [sys.executable, "-c", ANNOUNCE_LISTEN,
                                              net.client_ips[0], "20"],
                             stdout=subprocess.PIPE, text=True)
    assert listener.stdout is not None
    assert listener.stdout.readline().strip() == "ready"
    s = FrontServe(net, tmp_path).start()
    try:
        out, _ = listener.communicate(timeout=30)
    finally:
        s.close()
    got = [line.split() for line in out.splitlines()]
    assert {src for src, _ in got} == {net.home_lan_ip}, out
    pmp = [decode_pmp_reply(bytes.fromhex(h)) for _, h in got if h.startswith("00")]
    pcp = [decode_pcp_reply(bytes.fromhex(h)) for _, h in got if h.startswith("02")]
    assert pmp and pmp[0] is not None and pmp[0].external_ip == net.external_ip, out
    assert pcp and pcp[0] is not None and (pcp[0].opcode, pcp[0].result) == (0, 0), out
