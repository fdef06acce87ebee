"""Running as a system service: sd_notify (READY/STATUS/WATCHDOG/STOPPING) and logs for journald.

A unix datagram socket made by the test stands in for systemd's $NOTIFY_SOCKET.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from igdtrigger.cli.sdnotify import Notifier
from igdtrigger.cli.serve import JsonFormatter, setup_logging, stderr_is_journal
from tests.fakes import free_port, wait_ready

ROOT = Path(__file__).resolve().parent.parent
CONFIG = """
[gateway]
url = "simulate"

[detect]
methods = []

[[rules]]
name = "demo"
open = ["udp/40000"]
"""


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket at an abstract address, as systemd uses ('@' in NOTIFY_SOCKET)."""
    name = f"igdt-test-{os.getpid()}-{time.monotonic_ns()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.settimeout(10)
    yield sock, "@" + name
    sock.close()


def messages(sock: socket.socket, until: str, timeout: float = 15) -> list[str]:
    out: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            data = sock.recv(4096).decode()
        except TimeoutError:
            break
        out.append(data)
        if until in data:
            return out
    pytest.fail(f"no {until!r} within {timeout}s; got {out}")


def test_notifier_path_and_abstract_sockets(tmp_path: Path,
                                            notify_socket: tuple[socket.socket, str]) -> None:
    sock, addr = notify_socket
    n = Notifier({"NOTIFY_SOCKET": addr})
    assert n.enabled and n.watchdog_interval is None
    assert n.ready("serving 1 rule")
    assert sock.recv(4096) == b"READY=1\nSTATUS=serving 1 rule"
    assert n.stopping()
    assert sock.recv(4096) == b"STOPPING=1"
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(str(path))
        assert Notifier({"NOTIFY_SOCKET": str(path)}).status("hello")
        assert s.recv(4096) == b"STATUS=hello"
    off = Notifier({})
    assert not off.enabled and not off.ready()  # no systemd: nothing happens
    assert not Notifier({"NOTIFY_SOCKET": "@igdt-nobody-listens-here"}).ready()  # no raise


def test_odd_systemd_variables_are_ignored_not_a_crash_at_start() -> None:
    for usec in ("²", "-5", "0", "1e6", ""):
        assert Notifier({"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": usec}).watchdog_interval \
            is None, usec


def test_watchdog_pings_at_half_the_interval(notify_socket: tuple[socket.socket, str]) -> None:
    sock, addr = notify_socket
    n = Notifier({"NOTIFY_SOCKET": addr, "WATCHDOG_USEC": "200000"})
    assert n.watchdog_interval == pytest.approx(0.1)

    async def run() -> None:
        task = asyncio.create_task(n.watchdog())
        await asyncio.sleep(0.35)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(run())
    sock.settimeout(0.2)
    pings = []
    with contextlib.suppress(TimeoutError):
        while True:
            pings.append(sock.recv(100))
    assert pings and set(pings) == {b"WATCHDOG=1"}
    assert 3 <= len(pings) <= 5
    other = Notifier({"NOTIFY_SOCKET": addr, "WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"})
    assert other.watchdog_interval is None  # meant for another process


def _serve(tmp_path: Path, env_extra: dict[str, str], *args: str,
           stderr: int | object = subprocess.PIPE) -> subprocess.Popen[bytes]:
    config = tmp_path / "config.toml"
    config.write_text(CONFIG)
    env = {**os.environ, "IGDTRIGGER_STATE_DIR": str(tmp_path / "state"),
           "PYTHONPATH": str(ROOT), **env_extra}
    if "JOURNAL_STREAM" not in env_extra:
        env.pop("JOURNAL_STREAM", None)
    return subprocess.Popen(
        [sys.executable, "-m", "igdtrigger", "serve", "--config", str(config), "--simulate",
         "--listen", "127.0.0.1:0", *args], env=env, stdout=subprocess.DEVNULL,
        stderr=stderr)  # type: ignore[arg-type]


def test_serve_speaks_sd_notify(tmp_path: Path, notify_socket: tuple[socket.socket, str]) -> None:
    sock, addr = notify_socket
    proc = _serve(tmp_path, {"NOTIFY_SOCKET": addr, "WATCHDOG_USEC": "300000"})
    try:
        got = messages(sock, "READY=1")
        ready = got[-1]
        assert re.search(r"^STATUS=\d+ activation\(s\), \d+ mapping\(s\); ", ready, re.M), ready
        pings = messages(sock, "WATCHDOG=1", timeout=3) + messages(sock, "WATCHDOG=1", 3)
        assert sum("WATCHDOG=1" in m for m in pings) >= 2
        proc.send_signal(signal.SIGTERM)
        messages(sock, "STOPPING=1", timeout=10)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


# --- logs ------------------------------------------------------------------------------------


def test_stderr_is_journal_compares_device_and_inode(tmp_path: Path) -> None:
    with (tmp_path / "journal").open("w") as f, (tmp_path / "other").open("w") as g:
        st = os.fstat(f.fileno())
        value = f"{st.st_dev}:{st.st_ino}"
        assert stderr_is_journal({"JOURNAL_STREAM": value}, f.fileno())
        assert not stderr_is_journal({"JOURNAL_STREAM": value}, g.fileno())  # redirected
        assert not stderr_is_journal({}, f.fileno())
        assert not stderr_is_journal({"JOURNAL_STREAM": "garbage"}, f.fileno())


def test_json_formatter_fields() -> None:
    rec = logging.LogRecord("igdtrigger", logging.WARNING, __file__, 1, "hello %s", ("x",), None)
    with_ts = json.loads(JsonFormatter().format(rec))
    assert with_ts["msg"] == "hello x" and with_ts["level"] == "warning"
    assert isinstance(with_ts["ts"], float)
    assert "ts" not in json.loads(JsonFormatter(timestamps=False).format(rec))


TIME = re.compile(r"\b\d\d:\d\d:\d\d\b")


@pytest.mark.parametrize("fmt", ["text", "json"])
@pytest.mark.parametrize("journal", [False, True])
def test_serve_logs_without_timestamps_under_journald(tmp_path: Path, fmt: str,
                                                      journal: bool) -> None:
    log = tmp_path / "stderr.log"
    with log.open("wb") as f:
        st = os.fstat(f.fileno())
        extra = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"} if journal else {}
        ready = tmp_path / "ready"
        proc = _serve(tmp_path, extra, "--log-format", fmt, "--ready-file", str(ready),
                      stderr=f)
        try:
            wait_ready(proc, ready, why=log.read_text)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(15) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    lines = [ln for ln in log.read_text().splitlines() if ln.strip()]
    assert any("igdtrigger serving" in ln for ln in lines), lines
    if fmt == "json":
        records = [json.loads(ln) for ln in lines]
        assert all(("ts" in r) is not journal for r in records), records
        assert {r["level"] for r in records} <= {"debug", "info", "warning", "error"}
    else:
        stamped = [ln for ln in lines if TIME.match(ln)]
        if journal:
            assert stamped == [], stamped
            assert all(ln.split()[0] in {"INFO", "WARNING", "ERROR", "DEBUG"} for ln in lines)
        else:
            assert len(stamped) == len(lines), lines


def test_setup_logging_replaces_handlers() -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        setup_logging("warning", "json")
        assert len(root.handlers) == 1
        assert isinstance(root.handlers[0].formatter, JsonFormatter)
        assert root.level == logging.WARNING
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


def test_ctrl_c_without_loop_signal_handlers_still_removes_mappings(tmp_path: Path) -> None:
    """Windows has no loop.add_signal_handler: Ctrl-C cancels asyncio.run's task instead. The
    service must still delete its mappings before it exits."""
    port = free_port()
    config = tmp_path / "config.toml"
    config.write_text(CONFIG)
    ready = tmp_path / "ready"
    as_on_windows = (
        "import asyncio.unix_events, sys\n"
        "def unsupported(self, *a, **k): raise NotImplementedError\n"
        "asyncio.unix_events._UnixSelectorEventLoop.add_signal_handler = unsupported\n"
        "from igdtrigger.cli.main import main\n"
        "sys.exit(main(sys.argv[1:]))\n")
    env = {**os.environ, "IGDTRIGGER_STATE_DIR": str(tmp_path / "state"),
           "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", as_on_windows, "serve", "--config", str(config), "--simulate",
         "--listen", f"127.0.0.1:{port}", "--ready-file", str(ready)], env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_ready(proc, ready, why=proc.communicate)
        act = subprocess.run([sys.executable, "-m", "igdtrigger", "activate", "demo", "--server",
                              f"http://127.0.0.1:{port}"], env=env, capture_output=True,
                             text=True, timeout=30)
        assert act.returncode == 0, act.stdout + act.stderr
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
        assert "(1 mapping(s) removed)" in err, err
        assert proc.returncode == 0  # a clean stop, as after SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
