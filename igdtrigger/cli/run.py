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
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from igdtrigger.cli.client import Client
from igdtrigger.config import Config
from igdtrigger.core.errors import (
    ApiError,
    IgdTriggerError,
    RuleNotFound,
    ServiceBusy,
    ServiceUnavailable,
    UsageError,
)
from igdtrigger.core.model import format_duration
from igdtrigger.core.rules import Rule

if TYPE_CHECKING:  # asyncio only for the standalone holder: `run` with a service starts faster
    import asyncio

    from igdtrigger.core.model import MappingKey, MappingSpec, PinholeSpec, PortRange
    from igdtrigger.gateway.base import GatewayInfo
    from igdtrigger.runtime.journal import Journal
    from igdtrigger.runtime.pinholes import PinholeKeeper

log = logging.getLogger("igdtrigger.run")

HEARTBEAT_TTL = 30.0
STANDALONE_LEASE = 300.0
# every signal whose default would end the wrapper (and leave its ports open) goes to the game
_FORWARDED = ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGWINCH",
              "SIGALRM", "SIGPWR")


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
        self.done.set()
        if self.thread is not None:
            self.thread.join(timeout)


class ServiceHolder(Holder):
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

    def activate(self) -> dict[str, Any]:
        data = self.client.request(
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
        self.thread = threading.Thread(target=self._main, name="standalone", daemon=True)
        self.thread.start()

    def _main(self) -> None:
        import asyncio

        try:
            asyncio.run(self._amain())
        except Exception as exc:  # fail open: the game keeps running
            _warn(f"could not open ports: {exc}")

    async def _amain(self) -> None:
        import asyncio

        from igdtrigger.config import default_state_dir
        from igdtrigger.core.engine import Engine
        from igdtrigger.gateway.select import build_gateway
        from igdtrigger.runtime.journal import Journal
        from igdtrigger.runtime.leftovers import (
            dead_run_tag,
            dead_runs,
            hold_beacon,
            own_run_dir,
            remove_run_dir,
            take_over,
        )
        from igdtrigger.runtime.mapper import Mapper, MapState

        self.loop = asyncio.get_running_loop()
        self._stop_async = asyncio.Event()
        gw_cfg = self.config.gateway
        if gw_cfg.simulate:
            _warn("gateway.url = \"simulate\" needs a running service; not opening ports")
            return
        gateway = build_gateway(gw_cfg.url, backend=gw_cfg.backend, protocol=gw_cfg.protocol,
                                discover_timeout=gw_cfg.discover_timeout)
        clock = self.loop.time
        tag = f"run{os.getpid()}"
        # held until the process ends: says "alive" to any igdtrigger sharing this network
        # namespace, whatever its pid namespace (leftovers.py)
        self.beacon = hold_beacon()
        engine = Engine([self.rule], clock=clock, tag=tag)
        lease = min(STANDALONE_LEASE, gw_cfg.lease)
        try:
            info = await gateway.connect()
        except IgdTriggerError as exc:
            _warn(f"router unavailable, running without open ports: {exc}")
            return
        # What this wrapper maps is journaled (a kill -9 on a router that only takes permanent
        # leases would leave it forever); what dead wrappers left is taken over and removed.
        state_dir = self.config.state_dir or default_state_dir()
        run_dir = own_run_dir(state_dir)
        journal = Journal.open(run_dir)
        take_over(journal, dead_runs(state_dir))
        mapper = Mapper(gateway, clock=clock, tag=tag, lease=lease,
                        verify_interval=gw_cfg.verify_interval,
                        check_before_add=gw_cfg.check_before_add, journal=journal,
                        reclaim=dead_run_tag, abandon=self.done.is_set)
        mapper.adopt_orphans([m.spec for m in journal.mappings()])
        engine.activate(self.rule.name, info.local_address, ttl=7 * 86400.0)
        desired = engine.desired()
        await mapper.reconcile(desired)
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
        holes, keeper = self._pinholes(info, desired, clock, lease, journal)
        if keeper is not None:  # IPv6 after IPv4: the game is not kept waiting for it
            await keeper.reconcile(holes)
            if keeper.reason:
                _warn(f"IPv6 ports not opened: {keeper.reason}")
        while not self._stop_async.is_set():
            deadlines = [d for d in (mapper.next_deadline(),
                                     keeper.next_deadline() if keeper else None) if d]
            delay = 30.0 if not deadlines else max(0.05, min(deadlines) - clock())
            try:
                await asyncio.wait_for(self._stop_async.wait(), delay)
            except TimeoutError:
                await mapper.reconcile(desired)
                if keeper is not None:
                    await keeper.reconcile(holes)
        try:
            await asyncio.wait_for(mapper.remove_all(), 4.0)
            for left in mapper.left_open:
                _warn(left.describe())
            if keeper is not None:
                await asyncio.wait_for(keeper.remove_all(), 4.0)
        except TimeoutError:
            _warn(f"router did not answer; mappings lapse within {lease:g}s (or the next "
                  "igdtrigger run or serve removes them)")
        await gateway.close()
        remove_run_dir(journal, run_dir)

    def _pinholes(self, info: GatewayInfo, desired: dict[MappingKey, MappingSpec],
                  clock: Callable[[], float], lease: float, journal: Journal,
                  ) -> tuple[set[PinholeSpec], PinholeKeeper | None]:
        """The same ports over IPv6 to this machine, when the router's firewall takes them."""
        if not self.config.gateway.ipv6_pinholes or info.protocol != "upnp-igd":
            return set(), None
        from igdtrigger.gateway.upnp.pinhole import FirewallClient, global_ipv6_addresses
        from igdtrigger.runtime.pinholes import PinholeKeeper

        client = FirewallClient(lambda: info.location)
        iface = client.interface()
        addrs = global_ipv6_addresses(iface) if iface else []
        if not addrs:
            return set(), None
        from igdtrigger.core.model import PinholeSpec

        holes = {PinholeSpec(a, s.proto, s.internal_port) for s in desired.values()
                 for a in addrs}
        return holes, PinholeKeeper(client, clock=clock, lease=lease, journal=journal)

    def stop(self, timeout: float = 5.0) -> None:
        self.done.set()
        loop, ev = self.loop, self._stop_async
        if loop is not None and ev is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed in between: nothing to stop
                loop.call_soon_threadsafe(ev.set)
        if self.thread is not None:
            self.thread.join(timeout)


def _opened(ports: Sequence[str], external: str) -> str:
    from igdtrigger.core.model import compress_ports

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
    from igdtrigger.core.model import parse_port_spec

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


def _exit_status(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


# Linux tells a signal sent to us alone (kill) from one the terminal sent to the whole
# foreground group (the child got that one itself) by its si_code, read with sigtimedwait.
_SIGTIMEDWAIT = hasattr(signal, "sigtimedwait") and hasattr(signal, "pthread_sigmask")
# Without it (macOS): these come from the terminal to the whole group, so we do not repeat them;
# the others are forwarded by a plain handler.
_TTY_SIGNALS = ("SIGINT", "SIGQUIT", "SIGWINCH")


def _wait_forwarding(child: subprocess.Popen[bytes], sigs: set[signal.Signals]) -> int:
    """Wait for the child, forwarding signals sent to us (not the tty's: it got those itself)."""
    if not _SIGTIMEDWAIT:
        return _wait_with_handlers(child, sigs)
    waited = sigs | {signal.SIGCHLD}
    while True:
        rc = child.poll()
        if rc is not None:
            return rc
        info = signal.sigtimedwait(waited, 1.0)
        if info is None or info.si_signo == signal.SIGCHLD:
            continue
        # si_code <= 0: sent by kill()/sigqueue()/tkill() to us alone, so pass it on. A positive
        # code (SI_KERNEL) came from the terminal to the whole foreground group, child included.
        if info.si_code <= 0:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, info.si_signo)


def _wait_with_handlers(child: subprocess.Popen[bytes], sigs: set[signal.Signals]) -> int:
    """macOS (no sigtimedwait) and Windows: handlers pass signals on while we wait."""
    previous: dict[signal.Signals, Any] = {}

    def forward(signum: int, _frame: Any) -> None:
        with contextlib.suppress(ProcessLookupError, OSError):
            os.kill(child.pid, signum)

    if os.name == "posix":
        tty = {getattr(signal, n) for n in _TTY_SIGNALS if hasattr(signal, n)}
        for sig in sigs:
            with contextlib.suppress(OSError, ValueError):
                previous[sig] = signal.signal(sig, signal.SIG_IGN if sig in tty else forward)
    try:
        while True:
            try:
                return child.wait()
            except KeyboardInterrupt:  # Windows: Ctrl-C reached the child too
                continue
    finally:
        for sig, handler in previous.items():
            with contextlib.suppress(OSError, ValueError, TypeError):
                signal.signal(sig, handler)


def _pauser(sigs: set[signal.Signals]) -> Callable[[float], bool]:
    """Sleep for ``s`` seconds; True if one of ``sigs`` arrived (time to stop waiting)."""
    if _SIGTIMEDWAIT:  # the signals are still blocked: take them synchronously
        def pause(seconds: float) -> bool:
            return signal.sigtimedwait(sigs, seconds) is not None
        return pause
    stop = threading.Event()
    if os.name == "posix" and threading.current_thread() is threading.main_thread():
        for sig in sigs:
            if sig.name == "SIGWINCH":
                continue
            with contextlib.suppress(OSError, ValueError):
                signal.signal(sig, lambda *_: stop.set())

    def pause_event(seconds: float) -> bool:
        try:
            return stop.wait(seconds)
        except KeyboardInterrupt:
            return True
    return pause_event


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
) -> int:
    """``strict_rule=False`` (``--infer``): an unknown rule is a warning, not a usage error.
    ``wait_process``: after the command exits, keep the ports while a process of one of these
    names runs (a launcher stub that starts the game and exits at once); it must appear within
    ``wait_start`` seconds."""
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
        data = sh.activate()
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
    waiter = (ProcessWaiter(wait_process, wait_start) if wait_process and holder is not None
              else None)
    return _launch(command, env, holder, waiter)


def become_subreaper() -> bool:
    """Make this process the child subreaper (Linux ``PR_SET_CHILD_SUBREAPER``): what the
    wrapped command starts and leaves behind (a launcher stub's game) is re-parented here, so
    it stays our descendant. False where that is not possible."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(36, 1, 0, 0, 0) == 0)  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        return False


def _reap_orphans() -> None:
    """Collect exited processes re-parented to us (we are their subreaper)."""
    if not hasattr(os, "WNOHANG"):
        return
    with contextlib.suppress(ChildProcessError, OSError):
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass


class ProcessWaiter:
    """``run --wait-process``: hold on while the named process runs after the command exits.

    The process is looked for among the wrapped command's descendants first (this wrapper is
    their subreaper, so a game its launcher stub left behind still counts); only when none of
    them has the name does any process of that name hold the ports, with a warning (another
    user's copy, or one a running launcher such as Steam started for us)."""

    def __init__(self, names: Sequence[str], start_grace: float,
                 scan: Callable[[Any], set[str]] | None = None,
                 family: Callable[[Any], tuple[set[str], set[str]]] | None = None) -> None:
        from igdtrigger.detect.process import Matcher, default_scanner, scan_family

        self.names = list(names)
        self.matcher = Matcher(names)
        self.scan = scan or default_scanner()
        if family is None and scan is None and sys.platform.startswith("linux"):
            me = os.getpid()
            family = lambda m: scan_family(m, me)  # noqa: E731
        self.family = family
        self.start_grace = start_grace
        self._ours_seen = False
        self._warned_any = False

    def running(self) -> set[str]:
        """The watched names that hold the ports now (see the class docstring)."""
        if self.family is None:
            found = self.scan(self.matcher)
            if found and not self._warned_any:
                _warn("cannot tell this command's own processes here: holding the ports while "
                      f"any process named {', '.join(sorted(found))} runs")
                self._warned_any = True
            return found
        _reap_orphans()
        ours, anywhere = self.family(self.matcher)
        if ours or self._ours_seen:
            self._ours_seen = self._ours_seen or bool(ours)
            return ours
        if anywhere and not self._warned_any:
            _warn(f"{', '.join(sorted(anywhere))} runs, but not as a child of the command: "
                  "holding the ports while any process of that name runs")
            self._warned_any = True
        return anywhere

    def wait(self, pause: Callable[[float], bool], interval: float = 1.0) -> None:
        """Until the process is gone (or never came); ``pause(s)`` is True when a signal asks us
        to stop early."""
        deadline = time.monotonic() + self.start_grace
        seen = False
        said = False
        while True:
            try:
                running = self.running()
            except Exception as exc:  # fail open: release the ports rather than hang
                _warn(f"cannot list processes ({exc}); releasing the ports")
                return
            if running:
                seen = True
                if not said:
                    _info(f"holding the ports while {', '.join(sorted(running))} runs")
                    said = True
            elif seen:
                return
            elif time.monotonic() >= deadline:
                _warn(f"{' or '.join(self.names)} did not start within "
                      f"{self.start_grace:g}s; releasing the ports")
                return
            if pause(interval):
                return


def _launch(command: Sequence[str], env: dict[str, str], holder: Holder | None,
            waiter: ProcessWaiter | None = None) -> int:
    """Run the child with signals forwarded; ``holder`` keeps the ports open meanwhile."""
    sigs = {getattr(signal, n) for n in _FORWARDED if hasattr(signal, n)}
    blocking = _SIGTIMEDWAIT
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
        rc = _wait_forwarding(child, sigs)
        if waiter is not None:
            waiter.wait(_pauser(sigs))
    finally:
        if holder is not None:
            holder.stop()
        if blocking:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, sigs | {signal.SIGCHLD})
    return _exit_status(rc)
