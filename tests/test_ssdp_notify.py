"""The router's SSDP NOTIFYs turned into restart/move events (sans-I/O: igd.NotifyTracker)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from igdtrigger.gateway.base import RouterChangeKind
from igdtrigger.gateway.upnp.ssdp import NotifyTracker, parse_ssdp_notify

GW = "192.168.1.1"
LOC = f"http://{GW}:5000/rootDesc.xml"
UUID = "uuid:4c7ae4a8-79f2-4e8d-9156-f35f59b5d6b2"
# miniupnpd 2.3.1 announces these (one NOTIFY each) after every start
NTS = ["upnp:rootdevice", "urn:schemas-upnp-org:device:InternetGatewayDevice:2", UUID,
       "urn:schemas-upnp-org:device:WANConnectionDevice:2",
       "urn:schemas-upnp-org:service:WANIPConnection:2"]


def notify(nt: str = NTS[1], *, alive: bool = True, boot: str | None = "100",
           location: str = LOC, uuid: str = UUID) -> bytes:
    lines = ["NOTIFY * HTTP/1.1", "HOST: 239.255.255.250:1900", f"NT: {nt}",
             f"USN: {uuid}::{nt}", f"NTS: ssdp:{'alive' if alive else 'byebye'}"]
    if alive:
        lines += ["CACHE-CONTROL: max-age=120", f"LOCATION: {location}",
                  "SERVER: Debian/12 UPnP/1.1 MiniUPnPd/2.3.1"]
    if boot is not None:
        lines.append(f"BOOTID.UPNP.ORG: {boot}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def burst(tracker: NotifyTracker, **kw: object) -> list[RouterChangeKind]:
    out = []
    for nt in NTS:
        change = tracker.feed(notify(nt, **kw), GW)  # type: ignore[arg-type]
        if change is not None:
            out.append(change.kind)
    return out


def test_periodic_announcements_change_nothing() -> None:
    t = NotifyTracker(GW, LOC)
    assert burst(t) == []
    assert burst(t) == []


def test_new_bootid_is_one_restart_per_burst() -> None:
    t = NotifyTracker(GW, LOC)
    burst(t, boot="100")
    assert burst(t, boot="101") == [RouterChangeKind.RESTARTED]
    assert burst(t, boot="101") == []


def test_byebye_then_alive_is_a_restart_even_without_bootid() -> None:
    """IGDv1 routers (UPnP 1.0) send no BOOTID: a byebye followed by alive is the sign."""
    t = NotifyTracker(GW, LOC)
    burst(t, boot=None)
    assert burst(t, alive=False, boot=None) == [RouterChangeKind.LEAVING]
    assert burst(t, boot=None) == [RouterChangeKind.RESTARTED]


def test_new_location_is_a_move_to_follow() -> None:
    """The connected root (its UDN from the description) announced at a new URL: follow."""
    t = NotifyTracker(GW, LOC, [UUID])
    new = f"http://{GW}:40123/rootDesc.xml"
    changes = [t.feed(notify(nt, location=new), GW) for nt in NTS]
    moved = [c for c in changes if c is not None]
    assert [c.kind for c in moved] == [RouterChangeKind.MOVED]
    assert moved[0].location == new


def test_new_location_of_a_root_heard_at_ours_is_a_move() -> None:
    """Without the UDN, the root heard at our location is learned and followed when it moves."""
    t = NotifyTracker(GW, LOC)
    burst(t)
    new = f"http://{GW}:40123/rootDesc.xml"
    assert burst(t, location=new) == [RouterChangeKind.MOVED]
    assert burst(t, location=new) == []


OTHER = "uuid:0b7f6a52-1c3e-4f0e-9d62-7a1d2c3b4e5f"
OTHER_LOC = f"http://{GW}:5001/igd2/rootDesc.xml"


def test_two_igd_roots_announced_every_round_move_nothing() -> None:
    """A router announcing two IGD roots at two locations (a second WAN, or a second UPnP
    stack) every round: only the connected one's root counts, so nothing is re-applied."""
    for t in (NotifyTracker(GW, LOC, [UUID]), NotifyTracker(GW, LOC)):
        for _ in range(5):
            assert burst(t) == []
            assert [t.feed(notify(nt, location=OTHER_LOC, uuid=OTHER, boot="7"), GW)
                    for nt in NTS] == [None] * len(NTS)
        # ... and the other root's byebye is not ours going down
        assert t.feed(notify(alive=False, uuid=OTHER), GW) is None
        # while our own root's reboot still is
        assert burst(t, boot="101") == [RouterChangeKind.RESTARTED]


def test_other_root_heard_first_is_not_taken_for_ours() -> None:
    t = NotifyTracker(GW, LOC)
    assert burst(t, location=OTHER_LOC, uuid=OTHER) == []
    assert burst(t) == []
    assert burst(t, location=OTHER_LOC, uuid=OTHER) == []


def test_other_hosts_cannot_fake_a_restart() -> None:
    t = NotifyTracker(GW, LOC)
    burst(t, boot="100")
    assert t.feed(notify(boot="999"), "192.168.1.66") is None
    assert t.feed(notify(alive=False), "192.168.1.66") is None
    # the gateway's address, but a description on another host: not the gateway's own IGD
    assert t.feed(notify(boot="999", location="http://192.168.1.66/x.xml"), GW) is None
    assert burst(t, boot="100") == []


def test_non_igd_devices_on_the_router_are_ignored() -> None:
    t = NotifyTracker(GW, LOC)
    burst(t, boot="100")
    media = notify("urn:schemas-upnp-org:device:MediaServer:1", boot="7",
                   location=f"http://{GW}:8200/desc.xml")
    assert t.feed(media, GW) is None


def test_search_responses_and_garbage_are_not_notifies() -> None:
    assert parse_ssdp_notify(b"HTTP/1.1 200 OK\r\nST: upnp:rootdevice\r\n\r\n") is None
    assert parse_ssdp_notify(b"NOTIFY * HTTP/1.1\r\nNTS: ssdp:alive\r\n\r\n") is None  # no USN
    assert parse_ssdp_notify(notify() + b"x" * 9000) is None  # oversized
    assert parse_ssdp_notify(notify(location="file:///etc/passwd")) is None


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.binary(max_size=600) | st.sampled_from(
    [notify(), notify(alive=False), notify(boot="5"), notify(location="http://x/")]),
    st.sampled_from([GW, "10.0.0.9"])), max_size=20))
def test_any_datagram_sequence_is_handled(seq: list[tuple[bytes, str]]) -> None:
    t = NotifyTracker(GW, LOC)
    for data, src in seq:
        change = t.feed(data, src)
        assert change is None or src == GW


def test_tracker_without_location_learns_the_first_root_it_hears() -> None:
    """Made with neither a location nor a UDN, the first alive from the gateway sets the
    baseline: that root's later move, reboot and leave are reported, another root's are not."""
    t = NotifyTracker(GW)
    assert burst(t) == []
    assert t.location == LOC
    assert burst(t, location=OTHER_LOC, uuid=OTHER) == []
    assert burst(t, boot="101") == [RouterChangeKind.RESTARTED]
    new = f"http://{GW}:40123/rootDesc.xml"
    assert burst(t, location=new, boot="101") == [RouterChangeKind.MOVED]
    assert t.location == new
    assert t.feed(notify(alive=False, uuid=OTHER), GW) is None
    assert t.feed(notify(alive=False), GW) is not None


def test_a_root_served_at_two_urls_moves_once_then_never_again() -> None:
    """Announced every round at both of its description URLs: the second URL is one move,
    then both are remembered however many rounds go by (duplicates do not push one out)."""
    t = NotifyTracker(GW, LOC, [UUID])
    second = f"http://{GW}:5000/igd2.xml"
    assert burst(t) == []
    assert burst(t, location=second) == [RouterChangeKind.MOVED]
    for _ in range(3):  # rounds of uneven length: repeats must not crowd the other URL out
        assert burst(t, location=second) == []
        assert burst(t, location=second) == []
        assert burst(t) == []
