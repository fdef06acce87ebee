"""``igdtrigger serve``: the long-running service process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Iterable, Mapping
from typing import Any

from aiohttp import web

from igdtrigger.api.access import ADMIN_SOCKET
from igdtrigger.api.app import make_app
from igdtrigger.api.httpguard import (
    Acceptor,
    ConnectionGuard,
    ConnectionLimits,
    admin_socket,
    listen_socket,
    raise_fd_limit,
    start_servers,
)
from igdtrigger.api.metrics import Metrics
from igdtrigger.cli.discovery import Advertiser  # light: zeroconf loads only when it starts
from igdtrigger.cli.sdnotify import Notifier
from igdtrigger.config import Config, check_state_dir, default_state_dir
from igdtrigger.core.activation import FRONT_SOURCES
from igdtrigger.core.errors import IgdTriggerError
from igdtrigger.core.version import __version__
from igdtrigger.runtime import compose
from igdtrigger.runtime.logthrottle import PerKindThrottle, QuietBadRequests
from igdtrigger.runtime.service import Service

__all__ = [
    "STOP_SIGNALS",
    "JsonFormatter",
    "serve",
    "setup_logging",
    "stderr_is_journal",
]

log = logging.getLogger("igdtrigger")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (unless journald stamps it), level, logger, msg[, exc]."""

    def __init__(self, *, timestamps: bool = True) -> None:
        super().__init__()
        self.timestamps = timestamps

    def format(self, record: logging.LogRecord) -> str:
        """One JSON object per record: ``ts`` (seconds, unless journald stamps), ``level``,
        ``logger``, ``msg``, and ``exc`` for a traceback."""
        out: dict[str, Any] = {}
        if self.timestamps:
            out["ts"] = round(record.created, 3)
        out.update(level=record.levelname.lower(), logger=record.name, msg=record.getMessage())
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def stderr_is_journal(environ: Mapping[str, str] | None = None, fd: int = 2) -> bool:
    """True when stderr is the journal stream systemd handed us (``$JOURNAL_STREAM`` names its
    device and inode; a child whose stderr was redirected inherits the variable but not the
    stream, so both are compared, as sd_journal_stream_fd(3) advises)."""
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    dev, sep, ino = value.partition(":")
    if not sep or not dev.isdecimal() or not ino.isdecimal():
        return False
    try:
        st = os.fstat(fd)
    except OSError:
        return False
    return st.st_dev == int(dev) and st.st_ino == int(ino)


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    """Log to stderr at ``level``, as text or JSON (``fmt``), rate-limited per kind; no
    timestamps under journald (it adds its own)."""
    handler = logging.StreamHandler(sys.stderr)
    journal = stderr_is_journal()  # journald adds its own timestamps
    if fmt == "json":
        handler.setFormatter(JsonFormatter(timestamps=not journal))
    elif journal:
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)-7s %(message)s", "%H:%M:%S")
        )
    handler.addFilter(PerKindThrottle())  # a flood must not flood the journal
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    server_log = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, QuietBadRequests) for f in server_log.filters):
        server_log.addFilter(QuietBadRequests())


# Every signal that would otherwise end the process ends in the same clean stop: mappings
# removed, activations ended. SIGHUP is a closed terminal or a dropped SSH session (not a reload);
# SIGPWR is init's power failure; SIGUSR1/2 and SIGALRM, unhandled, would kill us just the same.
STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT",
                                                  "SIGUSR1", "SIGUSR2", "SIGALRM", "SIGPWR")
                     if hasattr(signal, n))


def _stop_on(stop: asyncio.Event, sig: signal.Signals) -> None:
    if not stop.is_set():
        log.info("%s received", sig.name)
    stop.set()


def front_for(config: Config, service: Service, detectors: Iterable[Any]) -> Any:
    """The IGD front's runner (``front.serving``) when ``[front]`` is on, else ``None``: then
    the client mappings a crash left in the journal are ended. The front's modules load only
    when one of the two is needed (about 2 MB of an idle service's RSS otherwise)."""
    if config.front.enabled:
        from igdtrigger.front.serving import build_front  # only with [front] on (RSS)
        return build_front(service, detectors)
    if any(a.source in FRONT_SOURCES for a in service.sorted_activations()):
        from igdtrigger.front.serving import drop_front  # only for a crash's leftovers (RSS)
        drop_front(service)
    return None


async def serve(config: Config, *, ready_file: str | None = None) -> int:
    """Run the service (API, detectors, pipeline; the simulator with ``gateway.url =
    "simulate"``) until a stop signal; the exit status. ``ready_file`` is written once the
    API listens. Raises ``ConfigError`` when the state directory cannot be used."""
    check_state_dir(config.state_dir or default_state_dir())
    sim = None
    if config.gateway.simulate:
        config, sim = await compose.start_simulator(config)
        log.info("simulated router (no real router is touched) at %s", sim.url)
    metrics = Metrics()
    gateway = compose.gateway_from_config(config, on_call=metrics.on_router_call)
    detectors = compose.build_detectors(config)
    tracking = compose.tracking_for(config, detectors)
    # a simulated router's journal and tag live apart: the real service never restores (or
    # cleans up) what a demo did, nor the demo what the real service holds
    journal_dir = (config.state_dir or default_state_dir()) / "simulate" if sim else None
    service = Service(config, gateway, detectors=detectors, journal_dir=journal_dir,
                      on_router_call=metrics.on_router_call, tracking=tracking)
    service.wire_detectors()  # drop flows no rule cares about before they cost anything
    # front: the IGD front (issue 14), when [front] enabled; loaded only when it is on or a
    # crash left client mappings to end (it is ~2 MB of an idle service's RSS otherwise)
    front = front_for(config, service, detectors)
    advertise = config.api.zeroconf == "on" or (
        config.api.zeroconf == "auto" and not config.api.loopback_only)
    guard = ConnectionGuard(ConnectionLimits().within_fd_limit(raise_fd_limit()))
    app = make_app(service, metrics=metrics, guard=guard,
                   allowed_hosts=[*config.api.allowed_hosts, f"igdtrigger-{service.tag}.local"])
    # keepalive_timeout: aiohttp's timer from connect (or the last response) to the next
    # request's headers, not reset by a trickle of bytes: the header-read timeout
    runner = web.AppRunner(app, access_log=None, handle_signals=False,
                           keepalive_timeout=guard.limits.header_timeout)
    await runner.setup()
    try:
        servers = await _listen(runner, guard, config, service)
    except OSError as exc:
        await runner.cleanup()
        if sim is not None:
            await sim.close()
        raise IgdTriggerError(
            f"cannot listen on {config.api.host}:{config.api.port} ({exc.strerror}); is another "
            "igdtrigger running? change [api] listen"
        ) from None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, _stop_on, stop, sig)
    failure: Exception | None = None
    side_tasks: list[asyncio.Task[Any]] = []
    advertiser = None
    notifier = Notifier()
    try:
        await service.start()
        if front is not None:  # front: serve once the service runs (restored journal)
            await front.start()
        log.info(
            "igdtrigger serving %d rule(s) on http://%s:%d (config %s)",
            len(config.rules), config.api.host, config.api.port, config.source,
        )
        notifier.ready(_status_line(service, config))
        side_tasks.append(asyncio.create_task(notifier.watchdog(), name="sd-watchdog"))
        if advertise:  # in the background: its ~2 s of mDNS probing must not delay a stop
            advertiser = _advertiser(config, service)
            side_tasks.append(asyncio.create_task(_advertise(advertiser), name="zeroconf"))
        if notifier.enabled:
            side_tasks.append(asyncio.create_task(_status_updates(notifier, service, config)))
        if ready_file:
            with open(ready_file, "w") as fh:  # noqa: ASYNC230 (tiny, once)
                fh.write(str(os.getpid()))
        await stop.wait()
    except asyncio.CancelledError:
        # Windows has no loop signal handlers: Ctrl-C cancels this task (asyncio.run). The
        # mappings are removed all the same; asyncio.run then raises KeyboardInterrupt.
        log.info("interrupted")
    except Exception as exc:
        # start-up failed half-way: stop as cleanly as on a signal (mappings, detector threads
        # that would keep the process alive), then say why
        failure = exc
    t0 = time.monotonic()
    log.info("stopping: removing mappings")
    notifier.stopping("removing mappings")
    for task in side_tasks:
        task.cancel()
    for task in side_tasks:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
    if advertiser is not None:
        await advertiser.close()
    for server in servers:  # no new activations while we clean up
        server.close()
    with contextlib.suppress(OSError):
        (service.state_dir / ADMIN_SOCKET).unlink()
    service.hub.close_all()  # end event streams so the runner need not wait for them
    if front is not None:  # front: no new client requests while the mappings go
        await front.stop()
    removed = await service.stop()
    await runner.cleanup()
    if sim is not None:
        await sim.close()
    log.info("stopped in %.2fs (%d mapping(s) removed)", time.monotonic() - t0, removed)
    if failure is not None:
        raise failure
    return 0


async def _listen(runner: web.AppRunner, guard: ConnectionGuard, config: Config,
                  service: Service) -> list[Acceptor]:
    """The API's TCP socket, and the local admin socket in the state directory (a warning,
    never fatal, when that cannot be made)."""
    assert runner.server is not None
    socks = [listen_socket(config.api.host, config.api.port)]
    if hasattr(socket, "AF_UNIX"):
        path = service.state_dir / ADMIN_SOCKET
        try:
            socks.append(admin_socket(path))
        except OSError as exc:
            log.warning("no local admin socket at %s (%s): the local CLI uses the admin token "
                        "over TCP", path, exc.strerror or exc)
    try:
        return await start_servers(runner.server, guard, socks)
    except BaseException:
        for sock in socks:
            sock.close()
        raise


def _advertiser(config: Config, service: Service) -> Advertiser:
    return Advertiser(listen_host=config.api.host, port=config.api.port, version=__version__,
                      instance=service.tag, token_needed=not config.api.public_read)


async def _advertise(adv: Advertiser) -> None:
    """Start zeroconf advertisement; a failure is a warning, never fatal."""
    try:
        await adv.start()
    except Exception as exc:
        log.warning("zeroconf advertisement failed (%s); clients need --server", exc)
        await adv.close()


def _status_line(service: Service, config: Config) -> str:
    gw = "router up" if service.gateway_up else (
        f"router down: {service.gateway_error}" if service.gateway_error
        else "looking for the router")
    activations, mappings = service.counts()
    return (f"{activations} activation(s), {mappings} mapping(s); {gw}; "
            f"API {config.api.url}")[:200]


async def _status_updates(notifier: Notifier, service: Service, config: Config) -> None:
    """Keep ``systemctl status`` current (STATUS=), only sending when it changed."""
    last = ""
    while True:
        line = _status_line(service, config)
        if line != last:
            notifier.status(line)
            last = line
        await asyncio.sleep(2.0)
