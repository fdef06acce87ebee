"""`igdtrigger run` used the hostile way (the breaker's findings, issue 17's quick way): Ctrl-C
before the full command line took over, a listener that trickles its answer, environment
overrides spelled in another case, a config place this user may not look at. Each test fails
without its fix."""

from __future__ import annotations

import socket
import sys
import threading
from pathlib import Path

import pytest

from igdtrigger.cli import client as client_mod
from igdtrigger.cli import entry

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX sockets")


def test_ctrl_c_before_the_full_command_line_is_exit_130_without_a_traceback(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A SIGINT landing while the quick request is written or the full command line loads
    (seen: a KeyboardInterrupt traceback from collections' namedtuple) ends like one landing
    later: exit 130, nothing on stderr but what was said."""
    def interrupted(argv: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(entry, "presend", interrupted)
    monkeypatch.setattr(sys, "argv", ["igdtrigger", "run", "--rule", "demo", "--", "true"])
    assert entry.main() == 130
    assert "Traceback" not in capsys.readouterr().err


def test_a_trickled_answer_is_bounded_by_the_timeout_as_a_whole() -> None:
    """A loopback listener (anything that took 127.0.0.1:8731, or a wedged service) sending a
    header line every 0.3 s never let a 2 s read time out: `run` waited 32 s before the game
    started (it would wait hours on a slower trickle). The timeout bounds the whole answer."""
    ours, theirs = socket.socketpair()
    stop = threading.Event()

    def trickle() -> None:
        theirs.sendall(b"HTTP/1.1 201 Created\r\n")
        for _ in range(20):
            if stop.wait(0.3):
                break
            theirs.sendall(b"X-Slow: y\r\n")
        body = b'{"id": "a1"}'
        theirs.sendall(b"Content-Length: %d\r\n\r\n" % len(body) + body)

    t = threading.Thread(target=trickle, daemon=True)
    t.start()
    try:
        ours.settimeout(1.0)
        with pytest.raises(TimeoutError):
            client_mod._read_answer(ours)
    finally:
        stop.set()
        t.join(10)
        ours.close()
        theirs.close()


def test_an_answer_in_time_is_read_whole() -> None:
    ours, theirs = socket.socketpair()
    body = b'{"id": "a1"}'
    theirs.sendall(b"HTTP/1.1 201 Created\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    ours.settimeout(5.0)
    assert client_mod._read_answer(ours) == (201, body)
    ours.close()
    theirs.close()


@pytest.mark.parametrize("name", ["IGDTRIGGER_api__listen", "IGDTRIGGER_Api__Listen"])
def test_an_override_in_another_case_moves_the_quick_way_too(
        name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The config takes ``IGDTRIGGER_<section>__<key>`` in any case of section and key; the
    quick way read only the upper-case spelling and asked the service at the default address
    while the full way (no error said) would have used the override's."""
    from igdtrigger.config import load_config

    for var in ("IGDTRIGGER_CONFIG", "IGDTRIGGER_API__LISTEN", "IGDTRIGGER_SERVER"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "none"))
    monkeypatch.setenv("IGDTRIGGER_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv(name, "127.0.0.1:9999")
    config = load_config()
    assert (config.api.host, config.api.port) == ("127.0.0.1", 9999)
    where = entry._location(None)
    assert where is None or where[0] == "127.0.0.1:9999"
    monkeypatch.setenv("IGDTRIGGER_API__LISTEN", "127.0.0.1:9998")  # two spellings: abstain
    assert entry._location(None) is None


def test_a_config_place_that_cannot_be_looked_at_is_not_passed_over(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """$IGDTRIGGER_CONFIG naming a place the full way cannot look at (a name too long here;
    a directory this user may not enter alike) is refused by name there, and the full way uses
    the defaults; the quick way passed it over as absent and asked the service the next config
    file names (~/.config/igdtrigger/config.toml's listen): another service than the full
    way's."""
    from igdtrigger.config import load_config
    from igdtrigger.core.errors import ConfigError

    for var in ("IGDTRIGGER_API__LISTEN", "IGDTRIGGER_SERVER", "CONFIGURATION_DIRECTORY"):
        monkeypatch.delenv(var, raising=False)
    xdg = tmp_path / "xdg"
    (xdg / "igdtrigger").mkdir(parents=True)
    (xdg / "igdtrigger" / "config.toml").write_text('[api]\nlisten = "127.0.0.1:9999"\n')
    monkeypatch.setenv("XDG_CONFIG_HOME", str(xdg))
    monkeypatch.setenv("IGDTRIGGER_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("IGDTRIGGER_CONFIG", str(tmp_path / ("c" * 5000)))
    with pytest.raises(ConfigError):
        load_config()
    assert entry._location(None) is None  # the full way decides (and says what is wrong)
    monkeypatch.setenv("IGDTRIGGER_CONFIG", str(tmp_path / "absent.toml"))  # absent: next
    assert entry._location(None) == ("127.0.0.1:9999", None)
    assert load_config().api.port == 9999
