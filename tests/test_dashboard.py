"""The dashboard in a real headless Chromium (Debian's ``chromium``), driven over the DevTools
protocol with aiohttp's websocket client (no Selenium, no browser download).

`igdtrigger serve --simulate` runs as a subprocess; the test opens a mapping through the API,
checks the page shows it, clicks the page's Deactivate button with a real mouse event, and checks
the ports close and the page follows (over server-sent events). Screenshots go to
tests/artifacts/. Without chromium the test skips, or fails with IGDTRIGGER_REQUIRE_LAB=1 (CI).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.fakes import free_port, wait_for
from tests.lab.netlab import REQUIRE_ENV, lab_required

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "tests" / "artifacts"
CONFIG = """
[gateway]
url = "simulate"

[detect]
methods = []

[[rules]]
name = "demo"
trigger = ["udp/27015"]
open = ["udp/40000-40002", "tcp/3074"]
idle_timeout = "10m"
"""


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if path := shutil.which(name):
            return path
    return None



def http(method: str, url: str, body: dict[str, Any] | None = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


@pytest.fixture
def browser_binary() -> str:
    path = chromium_path()
    if path is None:
        reason = "chromium not installed (Debian: apt-get install chromium)"
        if lab_required():
            pytest.fail(f"{reason}, but {REQUIRE_ENV}=1", pytrace=False)
        pytest.skip(reason)
    return path


class Serve:
    """`igdtrigger serve --simulate` on a loopback port; stop() and start() again."""

    def __init__(self, tmp_path: Path, port: int) -> None:
        self.tmp, self.port = tmp_path, port
        self.url = f"http://127.0.0.1:{port}"
        self.config = tmp_path / "config.toml"
        self.config.write_text(CONFIG)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Serve:
        ready = self.tmp / "ready"
        ready.unlink(missing_ok=True)
        env = {**os.environ, "IGDTRIGGER_STATE_DIR": str(self.tmp / "state"),
               "XDG_CONFIG_HOME": str(self.tmp), "PYTHONPATH": str(ROOT)}
        env.pop("IGDTRIGGER_CONFIG", None)
        with (self.tmp / "serve.log").open("ab") as log:
            self.proc = proc = subprocess.Popen(
                [sys.executable, "-m", "igdtrigger", "serve", "--config", str(self.config),
                 "--simulate", "--listen", f"127.0.0.1:{self.port}", "--ready-file",
                 str(ready)], env=env, stdout=log, stderr=subprocess.STDOUT)
        wait_for(lambda: ready.exists() or proc.poll() is not None, 20, "serve to start")
        assert proc.poll() is None, (self.tmp / "serve.log").read_text()
        return self

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Serve]:
    s = Serve(tmp_path, free_port()).start()
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture
def service(serve: Serve) -> str:
    """`igdtrigger serve --simulate` on a free loopback port; its base URL."""
    return serve.url


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


class DevTools:
    """A minimal Chrome DevTools Protocol client over one page's websocket."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.ids = itertools.count(1)
        self.events: list[dict[str, Any]] = []

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        msg_id = next(self.ids)
        await self.ws.send_json({"id": msg_id, "method": method, "params": params})
        async with asyncio.timeout(15):
            while True:
                msg = await self.ws.receive_json()
                if msg.get("id") == msg_id:
                    if "error" in msg:
                        raise RuntimeError(f"{method}: {msg['error']}")
                    return dict(msg.get("result", {}))
                if "method" in msg:
                    self.events.append(msg)

    async def js(self, expression: str) -> Any:
        res = await self.call("Runtime.evaluate", expression=expression, returnByValue=True,
                              awaitPromise=True)
        if "exceptionDetails" in res:
            raise RuntimeError(f"{expression}: {res['exceptionDetails']}")
        return res["result"].get("value")

    async def wait_js(self, expression: str, timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = await self.js(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                pytest.fail(f"timed out after {timeout}s waiting for the page: {what}")
            await asyncio.sleep(0.05)

    async def click(self, selector: str) -> None:
        """A real left click (mouse down + up) at the element's centre."""
        rect = await self.js(
            f"(() => {{ const r = document.querySelector({json.dumps(selector)})"
            ".getBoundingClientRect(); return {x: r.x + r.width / 2, y: r.y + r.height / 2}; })()")
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            await self.call("Input.dispatchMouseEvent", type=kind, x=rect["x"], y=rect["y"],
                            button="left", clickCount=1)

    async def screenshot(self, path: Path) -> None:
        data = await self.call("Page.captureScreenshot", format="png")
        await asyncio.to_thread(_write, path, base64.b64decode(data["data"]))


def launch_chromium(binary: str, profile: Path) -> tuple[subprocess.Popen[bytes], int]:
    """Start headless chromium with DevTools on a free loopback port; returns (proc, port)."""
    args = [binary, "--headless", "--disable-gpu", "--no-first-run",
            "--no-default-browser-check", "--disable-extensions", "--disable-sync",
            "--disable-background-networking", "--disable-component-update",
            "--hide-scrollbars", "--window-size=1280,1000",
            "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
            f"--user-data-dir={profile}", "about:blank"]
    if os.geteuid() == 0:
        args.insert(1, "--no-sandbox")  # Chromium refuses to run as root with its sandbox
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    port_file = profile / "DevToolsActivePort"
    try:
        wait_for(lambda: (port_file.exists() and port_file.read_text().strip() != "")
                 or proc.poll() is not None, 30, "chromium's DevTools port")
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        return proc, int(port_file.read_text().split()[0])
    except BaseException:
        stop_chromium(proc)
        raise


def stop_chromium(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    if proc.stderr is not None:
        proc.stderr.close()


@pytest.fixture
async def page(browser_binary: str, tmp_path: Path) -> AsyncIterator[DevTools]:
    proc, port = await asyncio.to_thread(launch_chromium, browser_binary, tmp_path / "profile")
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/json/list") as r:
                targets = await r.json()
            ws_url = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
            async with session.ws_connect(ws_url, max_msg_size=0) as ws:
                dt = DevTools(ws)
                await dt.call("Page.enable")
                await dt.call("Runtime.enable")
                await dt.call("Log.enable")  # CSP violations and network errors land here
                yield dt
    finally:
        await asyncio.to_thread(stop_chromium, proc)


async def test_dashboard_shows_a_mapping_and_a_click_deactivates_it(
        service: str, page: DevTools) -> None:
    act = await asyncio.to_thread(http, "POST", f"{service}/api/v1/activations",
                                  {"rule": "demo", "ttl": "5m"})
    assert act["state"] == "open", act
    t0 = time.monotonic()
    await page.call("Page.navigate", url=f"{service}/")
    await page.wait_js('document.querySelector(\'tr[data-mapping="udp/40000"]\') !== null', 10,
                       "the mapping udp/40000")
    load_time = time.monotonic() - t0
    await page.wait_js('document.querySelector("#live").textContent === "live"', 10,
                       "the event stream to connect")
    rows = await page.js('[...document.querySelectorAll("#mappings tr[data-mapping]")]'
                         '.map(r => r.getAttribute("data-mapping") + " " + '
                         'r.getAttribute("data-state"))')
    assert sorted(rows) == ["tcp/3074 active", "udp/40000 active", "udp/40001 active",
                            "udp/40002 active"]
    assert await page.js('document.querySelector("#gateway-external").textContent') \
        == "203.0.113.4"
    assert await page.js('document.querySelector("#gateway-protocol").textContent') \
        == "upnp-igd"
    countdown = await page.js(
        f'document.querySelector(\'tr[data-activation="{act["id"]}"] td.countdown\')'
        ".textContent")
    assert countdown.startswith("4m") or countdown.startswith("5m"), countdown
    await page.screenshot(ARTIFACTS / "dashboard.png")

    await page.click(f'button[data-deactivate="{act["id"]}"]')

    def closed() -> bool:
        return bool(http("GET", f"{service}/api/v1/activations")["activations"] == []
                    and http("GET", f"{service}/api/v1/mappings")["mappings"] == [])

    await asyncio.to_thread(wait_for, closed, 10, "the click to end the activation and close "
                            "its ports")
    await page.wait_js('document.querySelectorAll("#mappings tr[data-mapping]").length === 0',
                       10, "the page to drop the mappings")
    await page.wait_js('document.querySelector(\'#events li[data-event="deactivated"]\') '
                       "!== null", 10, "the deactivated event (over SSE)")
    assert "ended" in await page.js('document.querySelector("#message").textContent')
    await page.screenshot(ARTIFACTS / "dashboard-after-deactivate.png")
    errors = console_errors(page)
    assert errors == [], errors
    await asyncio.to_thread(_write, ARTIFACTS / "dashboard-timing.json", json.dumps(
        {"mapping_visible_after_navigate_s": round(load_time, 3)}).encode() + b"\n")
    assert load_time < 10


def is_error(event: dict[str, Any], *, allow_network: bool = False) -> bool:
    """A script error the page logged; with ``allow_network``, a failed request to a service
    that was stopped on purpose is not one."""
    method, params = event["method"], event["params"]
    if method == "Log.entryAdded":
        entry = params["entry"]
        return bool(entry.get("level") == "error"
                    and not (allow_network and entry.get("source") == "network"))
    return bool(method == "Runtime.exceptionThrown" or (
        method == "Runtime.consoleAPICalled" and params.get("type") == "error"))


def console_errors(page: DevTools, *, allow_network: bool = False) -> list[dict[str, Any]]:
    return [e for e in page.events if is_error(e, allow_network=allow_network)]


async def test_the_page_says_the_service_is_away_and_recovers_by_itself(
        serve: Serve, page: DevTools) -> None:
    """The service stops: the page no longer shows the router up, the activation open or any
    mapping active; it says the service is away and greys those out. The service comes back:
    the page shows its fresh state without a reload."""
    url = serve.url
    act = await asyncio.to_thread(http, "POST", f"{url}/api/v1/activations",
                                  {"rule": "demo", "ttl": "5m"})
    assert act["state"] == "open", act
    await page.call("Page.navigate", url=f"{url}/")
    await page.wait_js('document.querySelector("#live")?.textContent === "live"', 10,
                       "the event stream to connect")
    await page.wait_js('document.querySelectorAll(\'#mappings tr[data-state="active"]\')'
                       ".length === 4", 10, "four active mappings")
    assert await page.js('document.querySelector("#gateway-state").textContent') == "up"
    assert await page.js('document.querySelector("#away").hidden') is True

    await asyncio.to_thread(serve.stop)

    await page.wait_js('document.body.classList.contains("away")', 15,
                       "the page to notice the service went away")
    assert await page.js('document.querySelector("#away").hidden') is False
    assert await page.js('document.querySelector("#live").textContent') == "service away"
    gw = await page.js('document.querySelector("#gateway-state").textContent')
    assert gw.startswith("unknown") and "up" not in gw.split("(")[0], gw
    assert await page.js('document.querySelectorAll(\'#mappings tr[data-state="active"]\')'
                         ".length") == 0
    assert await page.js('document.querySelectorAll("#mappings tr[data-mapping]").length') == 4
    cells = await page.js('[...document.querySelectorAll("#mappings tr[data-mapping] td")]'
                          ".map(td => td.textContent)")
    assert not [c for c in cells if c == "active"], cells
    row = f'tr[data-activation="{act["id"]}"]'
    assert await page.js(f"document.querySelector('{row}').getAttribute('data-state')") \
        == "unknown"
    texts = await page.js(f"[...document.querySelectorAll('{row} td')].map(t => t.textContent)")
    assert "open" not in texts and any(t.startswith("unknown") for t in texts), texts
    assert not [t for t in texts if t.endswith(" open") and not t.startswith("last")], texts
    assert await page.js(f"document.querySelector('{row} button').disabled") is True
    opacity = await page.js('getComputedStyle(document.querySelector("#mappings")'
                            '.closest("section")).opacity')
    assert float(opacity) < 1
    countdown = await page.js(f"document.querySelector('{row} td:nth-child(5)').textContent")
    await page.screenshot(ARTIFACTS / "dashboard-service-away.png")

    await asyncio.sleep(1.5)  # countdowns no longer tick: nothing vouches for them
    assert await page.js(f"document.querySelector('{row} td:nth-child(5)').textContent") \
        == countdown

    await asyncio.to_thread(serve.start)
    again = await asyncio.to_thread(http, "POST", f"{url}/api/v1/activations",
                                    {"rule": "demo", "ttl": "5m"})
    await page.wait_js('!document.body.classList.contains("away")', 20,
                       "the page to recover when the service is back")
    await page.wait_js('document.querySelector("#live")?.textContent === "live"', 10,
                       "the event stream to reconnect")
    await page.wait_js(f'document.querySelector(\'tr[data-activation="{again["id"]}"]\') '
                       "!== null", 10, "the new activation")
    await page.wait_js('document.querySelectorAll(\'#mappings tr[data-state="active"]\')'
                       ".length === 4", 10, "the mappings active again")
    assert await page.js('document.querySelector("#gateway-state").textContent') == "up"
    assert await page.js('document.querySelector("#away").hidden') is True
    await page.screenshot(ARTIFACTS / "dashboard-service-back.png")
    assert console_errors(page, allow_network=True) == []


async def test_a_frozen_service_is_noticed_by_its_silence(serve: Serve, page: DevTools) -> None:
    """A service that stops without closing the connection (frozen; or the network between
    is gone) sends no keep-alive: past twice its heartbeat (15 s) the page says it is away,
    and it recovers by itself when the service resumes."""
    url = serve.url
    await asyncio.to_thread(http, "POST", f"{url}/api/v1/activations",
                            {"rule": "demo", "ttl": "5m"})
    await page.call("Page.navigate", url=f"{url}/")
    await page.wait_js('document.querySelector("#live")?.textContent === "live"', 10,
                       "the event stream to connect")
    await page.wait_js('document.querySelectorAll(\'#mappings tr[data-state="active"]\')'
                       ".length === 4", 10, "four active mappings")
    assert serve.proc is not None
    serve.proc.send_signal(signal.SIGSTOP)
    try:
        await page.wait_js('document.body.classList.contains("away")', 90,
                           "the page to notice the silence")
        assert await page.js('document.querySelectorAll(\'#mappings tr[data-state="active"]\')'
                             ".length") == 0
    finally:
        serve.proc.send_signal(signal.SIGCONT)
    await page.wait_js('!document.body.classList.contains("away")', 30,
                       "the page to recover when the service resumes")
    await page.wait_js('document.querySelectorAll(\'#mappings tr[data-state="active"]\')'
                       ".length === 4", 10, "the mappings active again")


async def test_dashboard_says_a_wrong_token_and_its_placeholder_activates(
        service: str, page: DevTools) -> None:
    """A wrong admin token kept in the browser is a 401 the page explains (not a silent "no
    token"); the duration the page shows as a placeholder is one the API takes."""
    await page.call("Page.navigate", url=f"{service}/")
    await page.wait_js('document.querySelector(\'tr[data-rule="demo"]\') !== null', 10,
                       "the rules table")
    await page.js('localStorage.setItem("igdtrigger-token", "not-the-token")')
    await page.call("Page.reload")
    # null-safe: the reloaded document may not be parsed yet
    await page.wait_js('(() => { const a = document.querySelector("#auth"); '
                       'const m = document.querySelector("#auth-message"); '
                       'return !!a && !a.hidden && !!m && '
                       'm.textContent.includes("wrong admin token"); })()', 10,
                       "the page to say the stored token is wrong")
    assert "wrong" in await page.js('document.querySelector("#message").textContent')
    await page.screenshot(ARTIFACTS / "dashboard-wrong-token.png")
    await page.click("#token-clear")
    await page.wait_js('document.querySelector("#gateway-state").textContent === "up"', 10,
                       "the page to read the service again without the token")
    placeholder = await page.js(
        'document.querySelector(\'tr[data-rule="demo"] input.for\').placeholder')
    assert placeholder == "10m 0s"  # what the page prints for the rule's idle timeout
    await page.js('(() => { const i = document.querySelector(\'tr[data-rule="demo"] '
                  "input.for'); i.value = i.placeholder; })()")
    await page.click('button[data-activate="demo"]')
    await page.wait_js('document.querySelector("#message").textContent.startsWith("demo for")',
                       10, "the activation's answer")
    message = await page.js('document.querySelector("#message").textContent')
    assert ": open," in message, message
    acts = (await asyncio.to_thread(http, "GET", f"{service}/api/v1/activations"))["activations"]
    assert [a["ttl"] for a in acts] == [600]


async def test_dashboard_fits_a_phone_screen(service: str, page: DevTools) -> None:
    """At 400 px wide (a phone on the LAN) the page does not run off the screen: a wide table
    scrolls inside its card, and each row's button can be reached there (was: the Deactivate
    and Activate buttons and the 'renews in' column past the right edge of the page)."""
    act = await asyncio.to_thread(http, "POST", f"{service}/api/v1/activations",
                                  {"rule": "demo", "ttl": "5m"})
    await page.call("Emulation.setDeviceMetricsOverride", width=400, height=900,
                    deviceScaleFactor=1, mobile=True)
    await page.call("Page.navigate", url=f"{service}/")
    button = f'button[data-deactivate="{act["id"]}"]'
    await page.wait_js(f"document.querySelector({json.dumps(button)}) !== null", 10,
                       "the activation's Deactivate button")
    await page.screenshot(ARTIFACTS / "dashboard-phone.png")
    # a mobile browser widens its layout viewport to the content: compare with the screen
    width = await page.js("[document.documentElement.scrollWidth, window.innerWidth]")
    assert width == [400, 400], width
    await page.js(f"document.querySelector({json.dumps(button)}).scrollIntoView()")
    right = await page.js(f"document.querySelector({json.dumps(button)})"
                          ".getBoundingClientRect().right")
    assert right <= 400, right
