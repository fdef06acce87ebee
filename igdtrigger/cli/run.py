"""``igdtrigger run --rule NAME -- CMD...``: ports open exactly while CMD runs.

- With a service running: one API activation held by heartbeat (so a killed wrapper's ports lapse
  on their own after the ttl), ended when the child exits.
- Without one: the wrapper maps the rule's ports itself for the child's lifetime, on short leases
  so a crash leaves nothing open for long.
- Fail open: if the router or service is down the game still starts; only a usage mistake (an
  unknown rule) stops before launching.
- The child gets argv unchanged, the environment, cwd and stdio. Signals sent to the wrapper are
  forwarded; the child's exit status comes back unchanged (128+N when signal N killed it).
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from igdtrigger.cli.client import Client
from igdtrigger.config import Config, default_state_dir
from igdtrigger.core.errors import (
    ApiError,
    IgdTriggerError,
    RuleNotFound,
    ServiceBusy,
    ServiceUnavailable,
    UsageError,
)
from igdtrigger.core.ports import compress_ports, format_duration, parse_port_spec
from igdtrigger.core.rules import Rule

if TYPE_CHECKING:  # asyncio only for the standalone holder: `run` with a service starts faster
    import asyncio

    from igdtrigger.cli.child import ProcessWaiter
    from igdtrigger.cli.entry import Presend
    from igdtrigger.core.ports import PortRange

__all__ = [
    "HEARTBEAT_TTL",
    "INFER_ENV",
    "LATE_RETRY",
    "STOP_TIMEOUT",
    "WAIT_START",
    "Holder",
    "ServiceHolder",
    "StandaloneHolder",
    "infer_rule",
    "opened_line",
    "ports_env",
    "run",
    "slug",
]

HEARTBEAT_TTL = 30.0
STOP_TIMEOUT = 4.0  # s: the standalone wrapper's wait for the router to delete at the end


def _warn(message: str) -> None:
    print(f"igdtrigger: {message}", file=sys.stderr, flush=True)


_info = _warn  # the wrapper's only channel is stderr: the game owns stdout
LATE_RETRY = 2.0  # s between activation attempts while the service has not answered yet
WAIT_START = 60.0  # --wait-start default: how long the game may take to appear after the stub


@dataclass
class Holder:
    """Keeps the ports open in the background; ``stop()`` closes them."""

    done: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def stop(self, timeout: float = 5.0) -> None:
        """Stop holding and wait up to ``timeout`` seconds for the thread."""
        self.done.set()
        if self.thread is not None:
            self.thread.join(timeout)


class ServiceHolder(Holder):
    """Holds a rule through the running service: one activation, renewed by a heartbeat thread,
    ended on ``stop``."""
    def __init__(self, client: Client, rule: str, ttl: float,
                 announce: Callable[[str], None] | None = None) -> None:
        super().__init__()
        self.client = client
        self.rule = rule
        self.ttl = ttl
        self.act_id: str | None = None
        self.response: dict[str, Any] | None = None
        self.announce = announce
        # set when this PC maps the ports itself (secure mode): every heartbeat says so, so
        # the service's status and dashboard show it ("mapped by the PC itself")
        self.self_mapped = False
        self._kick = threading.Event()

    def report_self_mapped(self) -> None:
        """Tell the service now (from any thread) that this PC maps the ports itself."""
        self.self_mapped = True
        self._kick.set()

    def _sleep(self, seconds: float) -> bool:
        """Wait ``seconds`` or until kicked; True when it is time to stop."""
        self._kick.wait(seconds)
        self._kick.clear()
        return self.done.is_set()

    def activate(self, sent: socket.socket | None = None) -> dict[str, Any]:
        """Ask the service for the activation; its JSON answer. ``sent``: the request was
        already written on this connection (the console entry point's quick way), read its
        answer. Raises ``ApiError`` when refused."""
        data = self.client.answer(sent) if sent is not None else self.client.request(
            "POST", "/api/v1/activations",
            {"rule": self.rule, "ttl": self.ttl, "source": "run",
             "meta": {"pid": str(os.getpid())}},
        )
        if not isinstance(data, dict) or not isinstance(data.get("id"), str):
            raise ServiceUnavailable("service answered without an activation id")
        self.act_id = data["id"]
        self.response = data
        return data

    def start(self) -> None:
        """Start the heartbeat thread that keeps the activation alive."""
        self.thread = threading.Thread(target=self._beat, name="heartbeat", daemon=True)
        self.thread.start()

    def _beat(self) -> None:
        """Refresh every ttl/3; without an activation (the service was busy or away when the
        game started, or it restarted) ask for one every ``LATE_RETRY`` s until it answers."""
        warned = False
        while not self._sleep(self.ttl / 3 if self.act_id is not None else LATE_RETRY):
            try:
                if self.act_id is None:
                    late = self.response is None
                    data = self.activate()
                    if late:
                        _info("the service answered: " + (
                            opened_line(data) if self.announce is not None
                            else f"rule {self.rule} {data.get('state')}"))
                else:
                    body: dict[str, Any] = {"ttl": self.ttl}
                    if self.self_mapped:
                        body["self_mapped"] = True
                    self.client.request("POST", f"/api/v1/activations/{self.act_id}/refresh",
                                        body, timeout=3)
                warned = False
            except ApiError as exc:
                if exc.status == 404 and self.act_id is not None:
                    self.act_id = None  # lapsed (service restarted?): activate again
                    continue
                if not warned:
                    _warn(f"heartbeat failed: {exc}")
                    warned = True
            except IgdTriggerError as exc:
                if not warned:
                    _warn(f"heartbeat failed: {exc}; ports lapse unless the service returns")
                    warned = True

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the heartbeat and end the activation (once, whatever happens)."""
        self._kick.set()
        super().stop(timeout)
        act_id, self.act_id = self.act_id, None  # ended once, whatever happens
        if act_id is not None:
            try:
                self.client.request("DELETE", f"/api/v1/activations/{act_id}", timeout=3)
            except ApiError as exc:
                if exc.status != 404:  # 404: already gone
                    _warn(f"could not end the activation ({exc}); it lapses after "
                          f"{format_duration(self.ttl)} without heartbeats")
            except IgdTriggerError as exc:
                _warn(f"could not end the activation ({exc}); it lapses after "
                      f"{format_duration(self.ttl)} without heartbeats")


class StandaloneHolder(Holder):
    """No service: map the rule's ports from this process, on short leases."""

    def __init__(self, config: Config, rule: Rule,
                 announce: Callable[[str], None] | None = None,
                 on_mapped: Callable[[], None] | None = None) -> None:
        super().__init__()
        self.config = config
        self.rule = rule
        self.ready = threading.Event()
        self.announce = announce
        self.on_mapped = on_mapped  # called once some ports are open (secure-mode fallback)
        self.loop: asyncio.AbstractEventLoop | None = None
        self._stop_async: asyncio.Event | None = None
        self.beacon: socket.socket | None = None  # leftovers.hold_beacon(), while mapping

    def start(self) -> None:
        """Start the pipeline on its own thread and event loop (fail open: errors are warnings)."""
        self.thread = threading.Thread(target=self._main, name="standalone", daemon=True)
        self.thread.start()

    def _main(self) -> None:
        # asyncio only when no service answered (the common hook path never starts a loop)
        import asyncio

        try:
            asyncio.run(self._amain())
        except Exception as exc:  # fail open: the game keeps running
            _warn(f"could not open ports: {exc}")

    async def _amain(self) -> None:
        # in-function imports: only a standalone `run` (no service) pays for the pipeline
        import asyncio

        # the pipeline and the backends, for a standalone `run` only (see above)
        from igdtrigger.runtime import compose
        from igdtrigger.runtime.journal import Journal, no_boot_clock
        from igdtrigger.runtime.leftovers import dead_runs, hold_beacon, own_run_dir, remove_run_dir
        from igdtrigger.runtime.mapper import MapState
        from igdtrigger.runtime.pipeline import Pipeline, Settings

        self.loop = asyncio.get_running_loop()
        self._stop_async = asyncio.Event()
        if self.config.gateway.simulate:
            _warn("gateway.url = \"simulate\" needs a running service; not opening ports")
            return
        gateway = compose.gateway_from_config(self.config)
        # held until the process ends: says "alive" to any igdtrigger sharing this network
        # namespace, whatever its pid namespace (leftovers.py)
        self.beacon = hold_beacon()
        state_dir = self.config.state_dir or default_state_dir()
        # the router the last standalone run discovered: asked first, SSDP at once if it is
        # not there (discovery waits for answers: 100 ms at least, issue 17)
        discovering = self.config.gateway.url is None
        known = compose.remembered_router(state_dir) if discovering else None
        if known is not None:
            compose.prime_location(gateway, known)
        # What this wrapper maps is journaled in its own run directory (a kill -9 on a router
        # that only takes permanent leases would leave it forever); what dead wrappers left is
        # taken over and removed: the service's pipeline, with the standalone lease. The
        # journal (sqlite: ~6 ms of disk) opens on a worker thread while the router is asked,
        # and is open before anything is mapped (issue 17); in a state directory that exists
        # already: a run that finds no router creates none.
        run_dir = own_run_dir(state_dir)
        opening = (self.loop.run_in_executor(None, Journal.open, run_dir)
                   if state_dir.is_dir() else None)
        try:
            info = await gateway.connect()
        except IgdTriggerError as exc:
            _warn(f"router unavailable, running without open ports: {exc}")
            if opening is not None:
                with contextlib.suppress(IgdTriggerError, OSError):  # nothing was mapped
                    remove_run_dir(await opening, run_dir)
            return
        if discovering and info.protocol == "upnp-igd":
            compose.remember_router(state_dir, info.location)
        upnp = info.protocol == "upnp-igd"
        pipeline = Pipeline(
            [self.rule], gateway, await opening if opening else Journal.open(run_dir),
            settings=Settings.from_config(self.config.gateway, standalone=True),
            clock=self.loop.time, wall=time.time, boot=no_boot_clock, tag=f"run{os.getpid()}",
            pinhole_client=compose.firewall_client(lambda: info.location) if upnp else None,
            ipv6_addresses=compose.ipv6_addresses, local_address=lambda: info.local_address,
            abandon=self.done.is_set)
        pipeline.restore(dead_runs(state_dir))
        pipeline.engine.activate(self.rule.name, info.local_address, ttl=7 * 86400.0)
        await pipeline.round()
        mapper, desired = pipeline.mapper, pipeline.desired()
        n_ok = mapper.count(MapState.ACTIVE)
        if n_ok < len(desired) and not self.done.is_set():
            _warn(f"opened {n_ok} of {len(desired)} port(s) for rule {self.rule.name}; "
                  + "; ".join(sorted({a.error for a in mapper.applied.values() if a.error})))
        if n_ok:
            opened = [str(a.spec.key) for a in sorted(mapper.applied.values(),
                                                      key=lambda a: a.spec.key)
                      if a.state is MapState.ACTIVE]
            if self.announce is not None:
                self.announce(_opened(opened, info.external_address))
            if self.on_mapped is not None:
                self.on_mapped()
        self.ready.set()
        keeper = pipeline.pinholes
        if keeper is not None:  # IPv6 after IPv4: the game is not kept waiting for it
            await keeper.reconcile(pipeline.desired_pinholes())
            if keeper.reason:
                _warn(f"IPv6 ports not opened: {keeper.reason}")
        pipeline.start()
        await self._stop_async.wait()
        await pipeline.stop_tasks()
        await pipeline.remove_all(STOP_TIMEOUT)
        for left in mapper.left_open:
            _warn(left.describe())
        if pipeline.removal_timed_out:
            _warn(f"router did not answer; mappings lapse within {mapper.lease:g}s (or the "
                  "next igdtrigger run or serve removes them)")
        remove_run_dir(pipeline.journal, run_dir)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the pipeline (its mappings removed) and wait up to ``timeout`` seconds."""
        self.done.set()
        loop, ev = self.loop, self._stop_async
        if loop is not None and ev is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed in between: nothing to stop
                loop.call_soon_threadsafe(ev.set)
        if self.thread is not None:
            self.thread.join(timeout)


def _opened(ports: Sequence[str], external: str) -> str:
    return (f"{compress_ports(ports)} open on {external or 'the router'} for this PC while the "
            "game runs")


def opened_line(activation: dict[str, Any]) -> str:
    """What ``run`` says once on stderr: ``udp/40000-40010 open on 203.0.113.4 for this PC
    while the game runs`` (or which ports did not open, and why, once)."""
    ports = [p for p in activation.get("ports", []) if isinstance(p, dict)]
    opened = [str(p.get("port")) for p in ports if p.get("state") == "active"]
    line = _opened(opened, str(activation.get("external_address") or "")) if opened else (
        f"rule {activation.get('rule')}: no port open ({activation.get('state')})")
    if len(opened) < len(ports):
        errors = sorted({str(p.get("error") or p.get("state")) for p in ports
                         if p.get("state") != "active"})
        if activation.get("message"):
            errors = [str(activation["message"])]
        line += f"; {len(ports) - len(opened)} not open: " + "; ".join(errors)
    return line


class _Both(Holder):
    """Secure-mode fallback: this PC maps its ports itself (standalone) while the service's
    activation stays alive by heartbeat, reporting "mapped by the PC itself"."""

    def __init__(self, service: ServiceHolder, own: StandaloneHolder) -> None:
        super().__init__()
        self.service = service
        self.own = own

    def start(self) -> None:
        self.own.start()
        self.service.start()

    def stop(self, timeout: float = 5.0) -> None:
        self.own.stop(timeout)
        self.service.stop(timeout)


def _server_rule(name: str, activation: dict[str, Any], ttl: float) -> Rule | None:
    """The service's rule as its answer lists it (the same ports, nothing more)."""
    ranges: list[PortRange] = []
    for p in activation.get("ports", []):
        try:
            ranges.extend(parse_port_spec(str(p.get("port"))))
        except (ValueError, AttributeError):
            return None
    return Rule(name, (), tuple(ranges), ttl) if ranges else None


def ports_env(activation: dict[str, Any]) -> str:
    """``IGDTRIGGER_PORTS`` for the child: the open ports, ``udp/40000`` when the router kept
    the port number, ``udp/40001=51234`` when it gave another external port
    (``external = "any"``), so a game or server can advertise the right one."""
    out = []
    for p in activation.get("ports", []):
        if not isinstance(p, dict) or p.get("state") != "active":
            continue
        name = str(p.get("port", ""))
        ext = p.get("external_port")
        internal = name.rpartition("/")[2]
        out.append(name if ext is None or str(ext) == internal else f"{name}={ext}")
    return ",".join(out)


# launcher -> the environment variables that name the game, in order of preference
INFER_ENV: dict[str, tuple[str, ...]] = {
    "steam": ("SteamAppId", "SteamGameId"),
    "lutris": ("GAME_NAME", "LUTRIS_GAME_UUID"),
    "heroic": ("HEROIC_APP_NAME", "HEROIC_GAME_APP_NAME"),
}


def slug(text: str) -> str:
    """A rule name from a game name: ``Quake Champions`` -> ``quake-champions``."""
    out = re.sub(r"[^a-z0-9_.]+", "-", text.strip().lower()).strip("-.")
    return out[:40].rstrip("-.")


def infer_rule(launcher: str, config: Config,
               environ: Mapping[str, str] | None = None) -> str | None:
    """The rule for the game a launcher is starting, or None (with a warning) if unknown.

    The launcher's variables (``INFER_ENV``) give an id; ``[launchers] "steam:730" = "cs2"`` in
    the config maps it to a rule. Without an entry, a rule named like the id (as is, or as a
    slug: ``GAME_NAME=Quake Champions`` -> ``quake-champions``) is used; without a local config
    that name is sent to the service as it is.
    """
    env = os.environ if environ is None else environ
    names = INFER_ENV[launcher]
    ident = next((env[n].strip() for n in names if env.get(n, "").strip()), "")
    if not ident:
        _warn(f"--infer {launcher}: none of {', '.join(names)} is set (not started by "
              f"{launcher}?); running without opening ports")
        return None
    table = dict(config.launchers)
    for key in (f"{launcher}:{ident}", f"{launcher}:{slug(ident)}"):
        if key in table:
            return table[key]
    for candidate in (ident, slug(ident)):
        if config.rule(candidate) is not None:
            return candidate
    if config.rules:
        _warn(f"--infer {launcher}: no rule for {launcher}:{ident}; add "
              f"[launchers] \"{launcher}:{ident}\" = \"RULE\" to {config.source}; running "
              "without opening ports")
        return None
    return slug(ident) or None


def _passthrough(command: Sequence[str]) -> int:
    """Run the command with nothing open (fail open), status and signals as usual."""
    return _launch(command, dict(os.environ), None)


def run(
    command: Sequence[str],
    *,
    rule: str | None,
    config: Config,
    server: str | None,
    token: str | None,
    ttl: float = HEARTBEAT_TTL,
    strict_rule: bool = True,
    wait_process: Sequence[str] = (),
    wait_start: float = WAIT_START,
    quiet: bool = False,
    token_guessed: bool = False,
    admin_socket: Path | None = None,
    token_uid: int | None = None,
    presend: Presend | None = None,
) -> int:
    """``strict_rule=False`` (``--infer``): an unknown rule is a warning, not a usage error.
    ``wait_process``: after the command exits, keep the ports while a process of one of these
    names runs (a launcher stub that starts the game and exits at once); it must appear within
    ``wait_start`` seconds. ``presend``: the activation request the console entry point
    already wrote to the service's admin socket (its answer is read here)."""
    if not command:
        raise UsageError("no command to run: write igdtrigger run --rule NAME -- COMMAND [ARGS...]")
    if rule is None:
        return _passthrough(command)
    holder: Holder | None = None
    env = dict(os.environ)
    client = Client(server, token=token, timeout=2.0, admin_socket=admin_socket,
                    token_uid=token_uid, token_guessed=token_guessed)
    announce = None if quiet else _info
    try:
        sh = ServiceHolder(client, rule, ttl, announce=announce)
        data = sh.activate(socket.socket(fileno=presend.sock.detach()) if presend else None)
        holder = sh
        env["IGDTRIGGER_PORTS"] = ports_env(data)
        env["IGDTRIGGER_ACTIVATION"] = str(data.get("id", ""))
        own = (_server_rule(rule, data, ttl) if data.get("reason") == "router_self_only"
               else None)
        if own is not None:
            # the router refuses this PC's ports to the service (secure mode): map them from
            # here, the same ports the service's rule names, and tell the service
            _info(f"rule {rule}: the router only lets a host map ports to itself (UPnP "
                  "secure mode), so the service cannot open them for this PC: mapping them "
                  "from this PC (the service's rule, reported back to it)")
            holder = _Both(sh, StandaloneHolder(config, own, announce=announce,
                                                on_mapped=sh.report_self_mapped))
        elif data.get("state") == "waiting":
            _warn(f"rule {rule}: waiting"
                  + (f" (held by {', '.join(data['held_by'])})" if data.get("held_by") else ""))
        elif data.get("state") == "pending":
            _warn(f"rule {rule}: pending (the router has not answered yet)")
        else:
            line = opened_line(data)
            if data.get("state") != "open":
                _warn(line)
            elif announce is not None:
                announce(line)
    except ApiError as exc:
        if exc.status == 404 and strict_rule:  # unknown rule: a mistake to fix, not an outage
            raise UsageError(str(exc)) from None
        _warn(f"service refused the activation: {exc}; running without open ports")
    except ServiceBusy as exc:
        # the service is there but slow: never map around it (that would race its mappings);
        # the game starts now and the ports open as soon as the service answers
        _warn(f"{exc}; starting without open ports, they open once it answers")
        holder = sh
    except ServiceUnavailable as exc:
        rule_cfg = config.rule(rule)
        if rule_cfg is not None:
            holder = StandaloneHolder(config, rule_cfg, announce=announce)
        elif strict_rule and config.rules:  # this machine has rules and not this one: a typo
            raise RuleNotFound(rule, [r.name for r in config.rules]) from None
        else:
            # the rule lives on the service (this machine has none): the game must not wait
            # for it; keep asking, the ports open when it is back
            _warn(f"{exc}; no rule {rule!r} in this machine's config either: starting without "
                  "open ports, they open if the service comes back")
            holder = sh
    # the child's modules (subprocess & co.) once the activation is asked for: off the way
    # from exec to the open port (issue 17)
    from igdtrigger.cli.child import ProcessWaiter

    waiter = (ProcessWaiter(wait_process, wait_start) if wait_process and holder is not None
              else None)
    return _launch(command, env, holder, waiter)


def _launch(command: Sequence[str], env: dict[str, str], holder: Holder | None,
            waiter: ProcessWaiter | None = None) -> int:
    """Run the child with signals forwarded; ``holder`` keeps the ports open meanwhile."""
    # see run(): the child's modules load after the activation was asked for
    import signal
    import subprocess

    # see run(): the child's modules load after the activation was asked for
    from igdtrigger.cli.child import (
        FORWARDED,
        SIGTIMEDWAIT,
        become_subreaper,
        exit_status,
        pauser,
        wait_forwarding,
    )

    sigs = {getattr(signal, n) for n in FORWARDED if hasattr(signal, n)}
    blocking = SIGTIMEDWAIT
    if blocking:
        signal.pthread_sigmask(signal.SIG_BLOCK, sigs | {signal.SIGCHLD})

    def unblock() -> None:
        signal.pthread_sigmask(signal.SIG_SETMASK, set())

    if waiter is not None and waiter.family is not None:
        become_subreaper()
    try:
        try:
            child = subprocess.Popen(list(command), env=env,
                                     preexec_fn=unblock if blocking else None)
        except OSError as exc:  # the holder stops once, below
            _warn(f"cannot run {command[0]!r}: {exc.strerror}")
            return 127 if isinstance(exc, FileNotFoundError) else 126
        if isinstance(holder, ServiceHolder | StandaloneHolder | _Both):
            holder.start()
        rc = wait_forwarding(child, sigs)
        if waiter is not None:
            waiter.wait(pauser(sigs))
    finally:
        if holder is not None:
            holder.stop()
        if blocking:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, sigs | {signal.SIGCHLD})
    return exit_status(rc)
