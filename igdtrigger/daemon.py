"""``igdtrigger serve``: the long-running service process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from dataclasses import replace
from typing import Any

from aiohttp import web

from .api import make_app
from .config import Config
from .detect.base import Detector
from .errors import IgdTriggerError
from .gateway.select import build_gateway
from .service import Service

log = logging.getLogger("igdtrigger")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    elif os.environ.get("JOURNAL_STREAM"):  # journald adds its own timestamps
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)-7s %(message)s", "%H:%M:%S")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def build_detectors(config: Config) -> list[Detector]:
    detectors: list[Detector] = []
    if "conntrack" in config.detect.methods:
        from .detect.conntrack import ConntrackDetector

        detectors.append(ConntrackDetector())
    return detectors


async def serve(config: Config, *, ready_file: str | None = None) -> int:
    sim = None
    url = config.gateway.url
    if config.gateway.simulate:
        from .gateway.simulated import SimulatedIgdServer

        sim = SimulatedIgdServer()
        await sim.start()
        url = sim.url
        log.info("simulated router (no real router is touched) at %s", url)
        config = replace(config, gateway=replace(config.gateway, url=url))
    gateway = build_gateway(url, backend=config.gateway.backend,
                            discover_timeout=config.gateway.discover_timeout)
    detectors = build_detectors(config)
    service = Service(config, gateway, detectors=detectors)
    for det in detectors:  # drop flows no rule cares about before they cost anything
        if hasattr(det, "wanted"):
            det.wanted = lambda proto, port: bool(service.engine.index.match(proto, port))
    app = make_app(service)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, config.api.host, config.api.port, reuse_address=True)
    try:
        await site.start()
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
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await service.start()
    log.info(
        "igdtrigger serving %d rule(s) on http://%s:%d (config %s)",
        len(config.rules), config.api.host, config.api.port, config.source,
    )
    if ready_file:
        with open(ready_file, "w") as fh:  # noqa: ASYNC230 (tiny, once)
            fh.write(str(os.getpid()))
    await stop.wait()
    t0 = time.monotonic()
    log.info("stopping: removing mappings")
    await site.stop()  # no new activations while we clean up
    removed = await service.stop()
    await runner.cleanup()
    if sim is not None:
        await sim.close()
    log.info("stopped in %.2fs (%d mapping(s) removed)", time.monotonic() - t0, removed)
    return 0
