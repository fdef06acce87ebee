"""`igdtrigger run` used the hostile way (the breaker's findings, issue 17's quick way): Ctrl-C
before the full command line took over, a listener that trickles its answer, environment
overrides spelled in another case, a config place this user may not look at. Each test fails
without its fix."""

from __future__ import annotations

import sys

import pytest

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
