"""A standalone `igdtrigger run` remembers the router it discovered (issue 17): the next run
asks it first instead of waiting on SSDP, only while it is still this machine's default
gateway, and discovers at once when it is not usable there."""

from __future__ import annotations

from pathlib import Path

import pytest

from igdtrigger.gateway.select import FallbackGateway
from igdtrigger.gateway.upnp.soap import SoapGateway
from igdtrigger.runtime import compose

URL = "http://192.168.1.1:5000/rootDesc.xml"


@pytest.fixture
def gateway_is(monkeypatch: pytest.MonkeyPatch) -> list[str | None]:
    now: list[str | None] = ["192.168.1.1"]
    monkeypatch.setattr(compose, "default_gateway", lambda: now[0])
    return now


def test_the_router_found_is_asked_first_next_time(tmp_path: Path,
                                                   gateway_is: list[str | None]) -> None:
    assert compose.remembered_router(tmp_path) is None  # nothing yet: discover
    compose.remember_router(tmp_path / "new", URL)  # the state directory is made if needed
    assert compose.remembered_router(tmp_path / "new") == URL
    assert [p.name for p in (tmp_path / "new").iterdir()] == [compose.ROUTER_FILE]


def test_another_network_means_discovery(tmp_path: Path, gateway_is: list[str | None]) -> None:
    compose.remember_router(tmp_path, URL)
    gateway_is[0] = "10.0.0.1"  # the laptop moved: that URL belongs to another network
    assert compose.remembered_router(tmp_path) is None
    gateway_is[0] = None  # no default route
    assert compose.remembered_router(tmp_path) is None


@pytest.mark.parametrize("text", [
    "https://192.168.1.1:5000/rootDesc.xml",
    "http://192.168.1.2:5000/rootDesc.xml",  # a LAN host, not the gateway
    "http://192.168.1.1:5000/root Desc.xml",
    "http://[bad/x.xml",
    "http://192.168.1.1/" + "x" * 3000,
    "\xff\xfe",
])
def test_a_remembered_router_that_does_not_stand_is_not_asked(
        tmp_path: Path, gateway_is: list[str | None], text: str) -> None:
    (tmp_path / compose.ROUTER_FILE).write_text(text, encoding="latin-1")
    assert compose.remembered_router(tmp_path) is None


def test_remembering_the_same_router_writes_nothing(tmp_path: Path,
                                                    gateway_is: list[str | None]) -> None:
    compose.remember_router(tmp_path, URL)
    path = tmp_path / compose.ROUTER_FILE
    before = path.stat().st_mtime_ns
    path.chmod(0o444)  # a write would replace it (rename): the inode would change
    inode = path.stat().st_ino
    compose.remember_router(tmp_path, URL)
    assert (path.stat().st_ino, path.stat().st_mtime_ns) == (inode, before)


def test_an_unwritable_state_dir_is_no_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    compose.remember_router(tmp_path / "file" / "below", URL)  # not a directory: nothing


def test_priming_reaches_every_upnp_backend_but_a_pinned_one() -> None:
    found, other, pinned = SoapGateway(), SoapGateway(), SoapGateway(URL)
    gw = FallbackGateway([("a", FallbackGateway([("x", found), ("y", other)])),
                          ("b", pinned)])
    compose.prime_location(gw, URL)
    assert found._take_hint() == URL and other._take_hint() == URL
    assert pinned._take_hint() is None  # gateway.url pins it: never another location
