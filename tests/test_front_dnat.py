"""The front's inner DNAT (topology 1): the nft transaction, read-back, sweep, the forward
chain check; against the real nft in a network namespace of the test's own when it can."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import socket
import subprocess
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

from igdtrigger import nftnl
from igdtrigger.core.errors import ConfigError, NetlinkError
from igdtrigger.core.model import Proto
from igdtrigger.front.dnat import (
    COMMENT,
    DnatForwarder,
    DnatRule,
    InnerDnat,
    forward_check,
    parse_chain,
    read_forward_drops,
)
from igdtrigger.front.topology import topology_checks, topology_status
from igdtrigger.nftcmd import NftResult, Runner

A = DnatRule(Proto.UDP, 40000, "10.8.0.10", 40001)
B = DnatRule(Proto.TCP, 40002, "10.8.0.11", 40002)


def test_script_redefines_the_table_and_our_accept_rules() -> None:
    d = InnerDnat("eth0", forward_chain="inet filter forward", nft="nft")
    script = d.script([A, B, A], stale_handles=[7])
    assert script.startswith("table ip igdtrigger_front {}\ndelete table ip igdtrigger_front\n")
    assert script.count("dnat to") == 2
    assert 'iifname "eth0" fib daddr type local udp dport 40000 dnat to 10.8.0.10:40001' in script
    assert "delete rule inet filter forward handle 7" in script
    assert ('add rule inet filter forward iifname "eth0" ip daddr 10.8.0.11 tcp dport 40002 '
            f'ct status dnat accept comment "{COMMENT}"') in script
    assert "ct status dnat ip daddr 10.8.0.11 tcp dport 40002 counter" in script
    assert "ip saddr 10.8.0.10 udp sport 40001 counter" in script
    assert "add rule" not in InnerDnat("eth0", nft="nft").script([A])  # no accept rules


@pytest.mark.parametrize("bad", ["filter forward", "inet filter", "foo filter forward",
                                 "inet filter forward;flush", "inet a b c"])
def test_bad_forward_chain_is_named(bad: str) -> None:
    with pytest.raises(ConfigError, match="forward_chain"):
        parse_chain(bad)


def test_bad_rules_and_interfaces_are_refused() -> None:
    with pytest.raises(ValueError, match="IPv4"):
        DnatRule(Proto.UDP, 1, "::1", 1)
    with pytest.raises(ValueError, match="external port"):
        DnatRule(Proto.UDP, 0, "10.0.0.1", 1)
    with pytest.raises(ConfigError, match="interface"):
        InnerDnat('eth0"; flush ruleset')


def test_failed_transaction_raises_with_nft_s_reason_and_keeps_state() -> None:
    calls: list[Sequence[str]] = []

    def runner(argv: Sequence[str], script: str) -> NftResult:
        calls.append(argv)
        return NftResult(1, "", "Error: Could not process rule: Operation not permitted")

    d = InnerDnat("eth0", nft="nft", runner=runner)
    with pytest.raises(OSError, match="CAP_NET_ADMIN"):
        d.add(A)
    assert d.rules == frozenset() and not d.installed
    no_nft = InnerDnat("eth0", nft="nft", runner=runner)
    no_nft.nft = None
    with pytest.raises(OSError, match="install nftables"):
        no_nft.add(A)
    assert len(calls) == 1


def _ruleset(policy: str, rules: list[dict[str, object]]) -> str:
    items: list[dict[str, object]] = [
        {"chain": {"family": "inet", "table": "filter", "name": "forward", "hook": "forward",
                   "type": "filter", "prio": 0, "policy": policy}},
        {"chain": {"family": "inet", "table": "filter", "name": "input", "hook": "input",
                   "type": "filter", "prio": 0, "policy": "drop"}},
    ]
    items += [{"rule": {"family": "inet", "table": "filter", "chain": "forward", **r}}
              for r in rules]
    return json.dumps({"nftables": items})


CT_STATUS = {"match": {"op": "in", "left": {"ct": {"key": "status"}}, "right": "dnat"}}
UDP_1 = {"match": {"op": "==", "left": {"payload": {"protocol": "udp", "field": "dport"}},
                   "right": 1}}
CT_DNAT: dict[str, object] = {"expr": [CT_STATUS, {"accept": None}]}
NARROW: dict[str, object] = {"expr": [UDP_1, CT_STATUS, {"accept": None}]}


def test_forward_check_names_the_dropping_chain() -> None:
    drops = forward_check(_ruleset("drop", []))
    assert [d.chain for d in drops] == ["inet filter forward"]  # the input chain is not ours
    assert "ct status dnat accept" in drops[0].text and "forward_chain" in drops[0].text
    assert forward_check(_ruleset("drop", [CT_DNAT])) == []
    assert forward_check(_ruleset("accept", [])) == []
    assert len(forward_check(_ruleset("drop", [NARROW]))) == 1  # one port is not every flow
    assert forward_check(_ruleset("drop", []), forward_chain="inet filter forward") == []
    assert forward_check("not json") == []


# --- the real nft, in a namespace of our own ----------------------------------------------------


@pytest.fixture
def netns() -> Iterator[str]:
    if os.geteuid() != 0 or shutil.which("nft") is None or shutil.which("ip") is None:
        if os.environ.get("IGDTRIGGER_REQUIRE_LAB") == "1":
            pytest.fail("root, ip and nft are needed (IGDTRIGGER_REQUIRE_LAB=1)")
        pytest.skip("needs root, ip and nft")
    name = f"igdt-dnat-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", name, "sh", "-ec",
                        "ip link add eth0 type veth peer name eth1; ip link set eth0 up; "
                        "nft add table inet filter; nft 'add chain inet filter forward "
                        "{ type filter hook forward priority 0; policy drop; }'"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def _in(ns: str) -> Runner:
    def runner(argv: Sequence[str], script: str) -> NftResult:
        p = subprocess.run(["ip", "netns", "exec", ns, *argv], input=script,
                           capture_output=True, text=True, timeout=10, check=False)
        return NftResult(p.returncode, p.stdout, p.stderr)
    return runner


def test_real_nft_add_remove_sweep_and_clear(netns: str) -> None:
    runner = _in(netns)
    d = InnerDnat("eth0", forward_chain="inet filter forward", runner=runner)
    assert [x.chain for x in read_forward_drops(runner=runner) or []] == ["inet filter forward"]
    d.add(A)
    d.add(B)
    assert d.loaded() == sorted([A, B])
    assert len(d.our_accept_handles()) == 2
    d.remove(A)
    assert d.loaded() == [B] and len(d.our_accept_handles()) == 1
    # a crashed run's table and accept rules: the next instance's first apply sweeps them
    fresh = InnerDnat("eth0", forward_chain="inet filter forward", runner=runner)
    fresh.apply([A])
    assert fresh.loaded() == [A] and len(fresh.our_accept_handles()) == 1
    fresh.clear()
    assert fresh.loaded() == [] and fresh.our_accept_handles() == []
    listing = subprocess.run(["ip", "netns", "exec", netns, "nft", "list", "ruleset"],
                             capture_output=True, text=True, check=True).stdout
    assert "igdtrigger" not in listing and "chain forward" in listing  # theirs untouched


def test_topology_status_and_doctor_lines() -> None:
    host = topology_status(None, None)
    assert host["kind"] == "host" and "secure mode off" in host["router"]
    assert topology_checks(host)[0][:2] == ("ok", "front topology")
    fwd = DnatForwarder(InnerDnat("eth0", nft="nft"), "127.0.0.1")
    drops = forward_check(_ruleset("drop", []))
    gw = topology_status(fwd, drops)
    assert gw["kind"] == "gateway" and gw["upstream_interface"] == "eth0"
    levels = [(c[0], c[1]) for c in topology_checks(gw)]
    assert ("FAIL", "front forwarding") in levels
    assert ("warn", "front forwarding") in [(c[0], c[1]) for c in
                                            topology_checks(topology_status(fwd, None))]
    assert [c[0] for c in topology_checks(topology_status(fwd, []))] == ["ok"]
    assert topology_checks({}) == []


async def test_forwarder_follows_the_mappings(netns: str) -> None:
    from igdtrigger.front.manager import (
        ClientRequest,
        FrontMapping,
        FrontProtocol,
        Grant,
    )

    def mapping(port: int, client: str) -> FrontMapping:
        req = ClientRequest(FrontProtocol.NATPMP, client, client, port, port, Proto.UDP, 60.0)
        return FrontMapping(req, Grant(port, 60.0, ""), 0.0, 0.0, 60.0)

    fwd = DnatForwarder(InnerDnat("eth0", runner=_in(netns)), "127.0.0.1")
    await fwd.restore([mapping(40000, "10.8.0.10")])  # a crashed run's table: swept to this
    await fwd.add(Proto.UDP, 40001, "10.8.0.11", 40001)
    assert [r.external_port for r in fwd.dnat.loaded()] == [40000, 40001]
    await fwd.remove(Proto.UDP, 40000)
    await fwd.sync([mapping(40001, "10.8.0.11"), mapping(40002, "10.8.0.12")])
    assert [r.external_port for r in fwd.dnat.loaded()] == [40001, 40002]
    await fwd.close()
    assert fwd.dnat.loaded() == []


def test_packets_counted_per_client_port_both_directions() -> None:
    def rule(field: str, addr: str, port_field: str, port: int, packets: int) -> dict[str, object]:
        return {"rule": {"family": "ip", "table": "igdtrigger_front", "chain": "used", "expr": [
            {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": field}},
                       "right": addr}},
            {"match": {"op": "==", "left": {"payload": {"protocol": "udp",
                                                        "field": port_field}}, "right": port}},
            {"counter": {"packets": packets, "bytes": packets * 30}}]}}

    listing = json.dumps({"nftables": [rule("daddr", "10.8.0.10", "dport", 40001, 3),
                                       rule("saddr", "10.8.0.10", "sport", 40001, 4),
                                       rule("saddr", "10.8.0.11", "sport", 40002, 0)]})

    def runner(argv: Sequence[str], script: str) -> NftResult:
        assert list(argv[-3:]) == ["ip", "igdtrigger_front", "used"]
        return NftResult(0, listing)

    counts = InnerDnat("eth0", nft="nft", runner=runner, opener=None).packets()
    assert counts == {(Proto.UDP, "10.8.0.10", 40001): 7, (Proto.UDP, "10.8.0.11", 40002): 0}


# --- one change over nf_tables netlink: the same rules nft writes --------------------------------

CLONE_NEWNET = 0x40000000


def _opener(ns: str) -> nftnl.Opener:
    """Open the netlink socket inside namespace ``ns`` (a socket keeps the namespace it was
    made in; this thread steps in and back out)."""
    def open_in() -> socket.socket:
        libc = ctypes.CDLL(None, use_errno=True)
        with open("/proc/thread-self/ns/net") as home, open(f"/run/netns/{ns}") as target:
            assert libc.setns(target.fileno(), CLONE_NEWNET) == 0
            try:
                return nftnl.open_socket()
            finally:
                assert libc.setns(home.fileno(), CLONE_NEWNET) == 0
    return open_in


def _chains(ns: str) -> dict[str, list[list[Any]]]:
    """Our table's rules per chain, as ``nft -j`` lists them (handles and counts left out)."""
    out = subprocess.run(["ip", "netns", "exec", ns, "nft", "-j", "list", "table", "ip",
                          "igdtrigger_front"], capture_output=True, text=True, check=True).stdout
    chains: dict[str, list[list[Any]]] = {}
    for item in json.loads(out)["nftables"]:
        rule = item.get("rule")
        if rule is not None:
            exprs = [{"counter": None} if "counter" in e else e for e in rule["expr"]]
            chains.setdefault(rule["chain"], []).append(exprs)
    return chains


def test_netlink_writes_the_rules_nft_writes_and_deletes_them_by_handle(netns: str) -> None:
    by_nft = InnerDnat("eth0", runner=_in(netns), opener=None)
    by_nft.apply([])
    by_nft.add(A)
    by_nft.add(B)
    want = _chains(netns)
    assert len(want["prerouting"]) == 2 and len(want["used"]) == 4
    by_nft.clear()
    listed: list[Sequence[str]] = []

    def runner(argv: Sequence[str], script: str) -> NftResult:
        listed.append(argv)
        return _in(netns)(argv, script)

    nl = InnerDnat("eth0", runner=runner, opener=_opener(netns))
    nl.apply([])  # start: the table, whole (nft)
    assert nl.add_fast(A) and nl.add_fast(B)
    assert nl.netlink_changes == 2 and nl.netlink_failed == ""
    assert _chains(netns) == want  # same match, same dnat target, same counting rules
    assert nl.loaded() == sorted([A, B]) and nl.rules == {A, B}
    listed.clear()
    counts = nl.packets()  # over netlink: a rule dump matched by the handles we hold
    assert listed == []  # no nft listing
    assert counts == by_nft.packets() == {(Proto.UDP, "10.8.0.10", 40001): 0,
                                          (Proto.TCP, "10.8.0.11", 40002): 0}
    assert nl.remove_fast(A)  # by the handles NEWRULE echoed
    assert nl.loaded() == [B] and len(_chains(netns)["used"]) == 2
    nl.remove(B)  # the nft path deletes a netlink-added rule by the same handles
    assert nl.loaded() == [] and _chains(netns) == {}
    assert nl.add_fast(A) and nl.loaded() == [A]
    nl.apply([A, B])  # a rewrite (start, repair) still makes exactly the set
    assert nl.loaded() == sorted([A, B])
    subprocess.run(["ip", "netns", "exec", netns, "nft", "flush", "ruleset"], check=True)
    assert nl.packets() is None  # our table gone (a firewall reload): said, for the repair
    nl.clear()


def _forward_rules(ns: str) -> list[dict[str, Any]]:
    out = subprocess.run(["ip", "netns", "exec", ns, "nft", "-j", "list", "chain", "inet",
                          "filter", "forward"], capture_output=True, text=True, check=True).stdout
    return [{k: v for k, v in item["rule"].items() if k != "handle"}
            for item in json.loads(out)["nftables"] if "rule" in item]


def test_the_accept_rules_in_the_users_forward_chain_go_by_netlink_too(netns: str) -> None:
    by_nft = InnerDnat("eth0", forward_chain="inet filter forward", runner=_in(netns),
                       opener=None)
    by_nft.apply([A])
    want = _forward_rules(netns)
    assert len(want) == 1 and want[0]["comment"] == COMMENT
    by_nft.clear()
    nl = InnerDnat("eth0", forward_chain="inet filter forward", runner=_in(netns),
                   opener=_opener(netns))
    nl.apply([])
    assert nl.add_fast(A) and nl.netlink_changes == 1
    assert _forward_rules(netns) == want  # same matches, same accept, same comment
    assert len(nl.our_accept_handles()) == 1  # found as ours by its comment
    assert nl.remove_fast(A)
    assert _forward_rules(netns) == [] and nl.loaded() == []
    nl.clear()


def test_netlink_is_not_used_where_it_cannot_do_the_change(netns: str) -> None:
    fresh = InnerDnat("eth0", runner=_in(netns), opener=_opener(netns))
    assert not fresh.add_fast(A)  # no table yet: the whole table, with nft
    fresh.apply([A])
    assert not fresh.add_fast(DnatRule(Proto.UDP, 40000, "10.8.0.99", 1))  # retarget: rewrite
    fresh.clear()
    bridge = InnerDnat("eth0", forward_chain="bridge filter forward", runner=_in(netns),
                       opener=_opener(netns))
    bridge.installed = True  # (as after an apply) a bridge-family chain: nft writes it
    assert not bridge.add_fast(A) and bridge.netlink_changes == 0


async def test_a_netlink_failure_falls_back_to_nft_and_says_why(
        netns: str, caplog: pytest.LogCaptureFixture) -> None:
    def refused() -> socket.socket:
        raise NetlinkError(errno.EPERM, "Operation not permitted")

    fwd = DnatForwarder(InnerDnat("eth0", runner=_in(netns), opener=refused), "127.0.0.1")
    await fwd.restore([])
    await fwd.add(Proto.UDP, 40000, "10.8.0.10", 40001)
    assert fwd.dnat.loaded() == [A] and fwd.dnat.netlink_changes == 0
    assert "Operation not permitted" in fwd.dnat.netlink_failed
    assert "using the nft command" in caplog.text
    await fwd.remove(Proto.UDP, 40000)
    assert fwd.dnat.loaded() == []
    await fwd.close()


def test_a_rule_dump_reads_each_rules_counter(netns: str) -> None:
    subprocess.run(["ip", "netns", "exec", netns, "nft", "-f", "-"], check=True, text=True,
                   input="table ip t {\nchain c {\ncounter packets 7 bytes 70\n"
                         "ip daddr 10.0.0.1 counter packets 2 bytes 9\nip daddr 10.0.0.2\n}\n}\n")
    counts = nftnl.rule_counters(nftnl.NFPROTO_IPV4, "t", "c", opener=_opener(netns))
    assert sorted(counts.values()) == [0, 2, 7] and all(h > 0 for h in counts)
    assert nftnl.rule_counters(nftnl.NFPROTO_IPV4, "t", "nochain", opener=_opener(netns)) == {}
