"""Command line: ``igdtrigger serve | run | activate | deactivate | status | gateway |
healthcheck | check-config | doctor``; without arguments, the usage.

Every bad input is one line on stderr naming it (never a traceback); durations everywhere use
:func:`igdtrigger.core.model.parse_duration`'s grammar.

Exit codes: 0 success, 1 failure, 2 usage or configuration error, 3 no service reachable;
``run`` returns the child's own status (128+N when signal N killed it).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from igdtrigger.config import Config, default_config_paths, load_config, parse_listen
from igdtrigger.core.errors import ConfigError, IgdTriggerError, UsageError
from igdtrigger.core.ports import (
    MAX_TTL,
    compress_ports,
    format_duration,
    parse_duration,
    parse_port_spec,
)
from igdtrigger.core.rules import Rule
from igdtrigger.core.settings import SIMULATE
from igdtrigger.core.version import __version__

if TYPE_CHECKING:
    from igdtrigger.cli.client import Client
    from igdtrigger.cli.entry import Presend, QuickRun

# Each subcommand imports its own module inside its cmd_ function (the in-function imports
# below, and only those): `igdtrigger run`, a game launcher's hook, then loads neither the
# service (aiohttp, zeroconf, sqlite3) nor the gateway backends; `bench --case trigger` checks it.

__all__ = [
    "COMMANDS", "DEMO_RULE", "build_parser", "cmd_activate", "cmd_check_config", "cmd_deactivate",
    "cmd_doctor", "cmd_gateway", "cmd_healthcheck", "cmd_run", "cmd_serve", "cmd_status", "main",
    "quick_args",
]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        sub = self.prog.removeprefix("igdtrigger").strip()
        raise UsageError(f"{sub + ': ' if sub else ''}{message} (see igdtrigger "
                         f"{sub + ' ' if sub else ''}--help)")


def _duration(text: str) -> float:
    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if seconds > MAX_TTL:  # the longest activation granted; keeps socket timeouts in range
        raise argparse.ArgumentTypeError(f"duration {text!r} is longer than {MAX_TTL / 86400:g}d")
    return seconds


def _rule_name(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not a rule name (empty)")
    return text


def _within(lo: float, hi: float) -> Callable[[str], float]:
    """An argparse type: a duration (``90``, ``1.5``, ``30m``) within ``lo``-``hi`` seconds;
    ``inf``, ``nan``, ``-1`` or ``1e309`` are refused with the bounds (a socket timeout of
    NaN ended the command in a traceback)."""

    def parse(text: str) -> float:
        value = _duration(text)
        if not (math.isfinite(value) and lo <= value <= hi):
            raise argparse.ArgumentTypeError(
                f"{text!r} is outside {format_duration(lo) if lo >= 1 else f'{lo:g}s'}"
                f"-{format_duration(hi)}")
        return value

    parse.__name__ = "duration"  # argparse names the type in its message
    return parse


_CLIENT_TIMEOUT = _within(0.1, 3600.0)
_TTL = _within(1.0, 7 * 86400.0)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The ``igdtrigger`` argument parser, every subcommand included; ``only``: that
    subcommand alone (``main`` builds just the one named on the command line: all nine took
    ~10 ms of a launcher hook's start-up, issue 17)."""
    p = _Parser(prog="igdtrigger", description="Router-grade port triggering: timed port "
                "mappings on your router (UPnP IGD, NAT-PMP, PCP) while a game needs them.",
                epilog="Try it without a router: igdtrigger serve --simulate, then, in another "
                "terminal, igdtrigger activate demo. Check a setup: igdtrigger doctor. "
                "Documentation: the project's README.md. Needs Python >= 3.11.",
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"igdtrigger {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)

    def want(name: str) -> bool:
        return only is None or name == only

    def common(sp: argparse.ArgumentParser, *, server: bool = True) -> None:
        sp.add_argument("--config", metavar="PATH", help="config file (TOML)")
        if server:
            sp.add_argument("--server", metavar="URL", help="service URL, or 'auto' to find it "
                            "by zeroconf (default: $IGDTRIGGER_SERVER, the config's [api] "
                            "listen, a service on this host, zeroconf, http://127.0.0.1:8731)")
            sp.add_argument("--token", help="admin token (default: $IGDTRIGGER_TOKEN or the "
                            "service's token file when readable)")
            sp.add_argument("--timeout", type=_CLIENT_TIMEOUT, metavar="DURATION",
                            help="give up on the service after this long (default 10s)")

    if want("serve"):
        s = sub.add_parser(
            "serve", help="run the service",
            description="Run the service: a rule's ports open when its trigger traffic (or "
            "process) is seen, and close idle_timeout after the trigger traffic and the "
            "inbound traffic stop; a live connection holds them however silent it is. "
            "SIGTERM, SIGINT (Ctrl-C), SIGHUP (a closed terminal; not a reload), SIGQUIT and "
            "any other signal that would end it all stop it cleanly: every mapping is deleted "
            "and the activations end (the next start restores nothing). Only a crash (kill -9, "
            "power loss) restores the activations still within their time.")
        common(s, server=False)
        s.add_argument("--simulate", action="store_true",
                       help="use a built-in simulated router on loopback (try it without a "
                       "router); its state is kept apart from the real service's")
        s.add_argument("--listen", metavar="HOST:PORT",
                       help="API address (overrides [api] listen)")
        s.add_argument("--log-level", default="info",
                       choices=["debug", "info", "warning", "error"])
        s.add_argument("--log-format", default="text", choices=["text", "json"])
        s.add_argument("--ready-file", help=argparse.SUPPRESS)

    if want("run"):
        r = sub.add_parser("run", help="run a command with a rule's ports open while it runs")
        common(r)
        which = r.add_mutually_exclusive_group(required=True)
        which.add_argument("--rule", type=_rule_name, help="rule to activate")
        which.add_argument("--infer", choices=["steam", "lutris", "heroic"],
                           help="name the rule from the launcher's environment (SteamAppId, "
                           "GAME_NAME, HEROIC_APP_NAME) via [launchers] or a rule of that name")
        r.add_argument("--ttl", type=_TTL, default=30.0,
                       help="heartbeat ttl: ports lapse this long after a killed wrapper (30s)")
        r.add_argument("--wait-process", action="append", default=[], metavar="NAME",
                       help="after COMMAND exits, keep the ports while a process NAME runs (a "
                       "launcher stub that starts the game and exits); repeatable")
        r.add_argument("--wait-start", type=_within(0.0, 86400.0), default=60.0,
                       metavar="DURATION",
                       help="how long that process may take to appear (60s)")
        r.add_argument("--quiet", "-q", action="store_true",
                       help="do not say which ports opened (warnings still go to stderr)")
        r.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")

    if want("activate"):
        a = sub.add_parser("activate", help="open a rule's ports now")
        common(a)
        a.add_argument("rule", nargs="?", type=_rule_name)
        a.add_argument("--open", action="append", metavar="PROTO/PORT[-PORT]",
                       help="ad-hoc ports instead of a rule (the service must set [api] "
                       "allow_adhoc); repeatable")
        a.add_argument("--for", dest="ttl", type=_TTL, metavar="DURATION",
                       help="how long (e.g. 30m, 2h; default: the rule's idle_timeout)")
        a.add_argument("--host", help="LAN host to open the ports for (admin token; default: this "
                       "host)")
        a.add_argument("--json", action="store_true")

    if want("deactivate"):
        d = sub.add_parser("deactivate", help="close a rule's ports now")
        common(d)
        d.add_argument("rule", type=_rule_name)
        d.add_argument("--host", help="only this host's activations")
        d.add_argument("--json", action="store_true")

    if want("status"):
        st = sub.add_parser("status", help="show gateway, activations and mappings")
        common(st)
        st.add_argument("--json", action="store_true")

    if want("gateway"):
        g = sub.add_parser("gateway", help="probe the router: protocols, external address, quirks")
        common(g, server=False)
        g.add_argument("--simulate", action="store_true",
                       help="probe the built-in simulated router (as serve --simulate)")
        g.add_argument("--json", action="store_true")
        g.add_argument("--timeout", type=_within(0.1, 600.0), default=3.0,
                       help="per-protocol probe bound")
        g.add_argument("--test", action="store_true",
                       help="map one random high port to this host for a moment to test leases")
        g.add_argument("--list", action="store_true",
                       help="list the router's whole mapping table, igdtrigger's entries "
                       "marked, and the IPv6 pinholes journaled on this machine (routers cannot "
                       "list those)")
        g.add_argument("--clean", action="store_true",
                       help="remove igdtrigger's leftover mappings that no running igdtrigger "
                       "holds (a lost state directory, a killed run), and close the IPv6 pinholes "
                       "this machine's journals hold for nothing running; never another program's")
        g.add_argument("--dry-run", action="store_true", help="with --clean: only say what goes")
    if want("healthcheck"):
        hc = sub.add_parser("healthcheck", help="exit 0 if the local service answers /healthz, "
                            "else 1 (Docker HEALTHCHECK)")
        hc.add_argument("--config", metavar="PATH", help="config file (TOML)")
        hc.add_argument("--server", metavar="URL", help="service URL (default: the config's "
                        "[api] listen on this host)")
        hc.add_argument("--ready", action="store_true",
                        help="also require the router to answer (/readyz)")
        hc.add_argument("--timeout", type=_CLIENT_TIMEOUT, default=3.0, metavar="DURATION")

    if want("check-config"):
        cc = sub.add_parser("check-config", help="validate a config file (no network) and say "
                            "what it sets up")
        cc.add_argument("path", nargs="?", metavar="PATH",
                        help="the file (default: the one serve would read)")
        cc.add_argument("--json", action="store_true")

    if want("doctor"):
        dr = sub.add_parser("doctor", help="check privileges, detectors, the router, the external "
                            "address and the API; say what to fix")
        common(dr)
    return p


# the README's example rule ("Use it for real"); tests/test_cli.py keeps the two equal
DEMO_RULE = Rule("demo", parse_port_spec("udp/27015") + parse_port_spec("tcp/27015-27030"),
                 parse_port_spec("udp/40000-40010") + parse_port_spec("both/3074"), 600.0)


def _config(args: argparse.Namespace) -> Config:
    return load_config(args.config)


def _client(args: argparse.Namespace, config: Config | None = None) -> Client:
    # the HTTP client only for the commands that talk to a service (see the note at the top)
    from igdtrigger.cli.client import Client, local_access, pick_token, resolve_server

    where = resolve_server(args.server, config)
    state_dir = config.state_dir if config else None
    token, guessed = pick_token(args.token, state_dir, where.trusted)
    sock, uid = local_access(where, state_dir)
    return Client(where.url, token=token, timeout=getattr(args, "timeout", None) or 10.0,
                  admin_socket=sock if not args.token else None, token_uid=uid,
                  token_guessed=guessed)


def cmd_serve(args: argparse.Namespace) -> int:
    """``igdtrigger serve``: run the service until SIGTERM/SIGINT; its exit status."""
    # asyncio, then the service (aiohttp, zeroconf, sqlite3): `serve` alone pays for them
    import asyncio

    # see above: the service's modules only for `serve`
    from igdtrigger.cli.serve import serve, setup_logging

    setup_logging(args.log_level, args.log_format)
    config = _config(args)
    if args.simulate:
        config = replace(config, gateway=replace(config.gateway, url=SIMULATE))
        if not config.rules:  # try-it-now: something to activate out of the box
            config = replace(config, rules=(DEMO_RULE,))
    if args.listen is not None:  # "" too: an empty $VAR is a mistake, not the default
        try:
            host, port = parse_listen(args.listen)
        except ValueError as exc:
            raise ConfigError(str(exc), field="--listen") from None
        # only the address: the rest of [api] (ad-hoc, zeroconf, allow, ...) stays as configured
        config = replace(config, api=replace(config.api, host=host, port=port))
    rc = asyncio.run(serve(config, ready_file=args.ready_file))
    if getattr(args, "fast_exit", False):
        # Every mapping is removed, the journal closed (service.stop), no thread of ours left:
        # leave now rather than sit through the interpreter's teardown of aiohttp, zeroconf &
        # co. (0.1-0.4 s under load, most of the exit after "stopped"). What os._exit skips is
        # done here: the atexit handlers (logging's flush and close, any a library added) and
        # the flush of stdout/stderr, which may be a closed pipe (`serve | head`). Only as the
        # program itself, never for an in-process caller of main().
        atexit._run_exitfuncs()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        os._exit(rc)
    return rc


def cmd_healthcheck(args: argparse.Namespace) -> int:
    """``igdtrigger healthcheck``: 0 when the service answers (with ``--ready``: and its router)."""
    # doctor's module only for the two commands it serves (see the note at the top)
    from igdtrigger.cli.doctor import healthcheck

    return healthcheck(args.config, args.server, ready=args.ready, timeout=args.timeout)


def cmd_doctor(args: argparse.Namespace) -> int:
    """``igdtrigger doctor``: check this machine's setup; 1 when a check failed."""
    # doctor's module only for the two commands it serves (see the note at the top)
    from igdtrigger.cli.doctor import doctor

    return doctor(args.config, args.server, args.token)


def cmd_run(args: argparse.Namespace) -> int:
    """``igdtrigger run --rule NAME -- CMD``: hold the rule while CMD runs (through the service,
    else standalone); CMD's own exit status."""
    # the launcher hook's modules only for `run` (see the note at the top)
    from igdtrigger.cli.client import Resolved, local_access, pick_token, resolve_server
    from igdtrigger.cli.run import infer_rule, run

    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    sent: Presend | None = args.presend  # the request the entry point already wrote (or None)
    if sent is not None and (args.infer or args.server or args.token
                             or not sent.matches(args.rule, args.ttl)):
        sent.close()  # not what this command line asks (cannot happen: entry.presend's subset)
        sent = None
    try:
        config = _config(args)
    except ConfigError as exc:
        if args.server:
            raise
        # a config that fails validation: said (file, field, value), and the game still
        # starts; a service reached through its admin socket was already asked for the rule
        # by its NAME (it holds the rule and its own validated config)
        print(f"igdtrigger: {exc}", file=sys.stderr)
        config = Config()
    if sent is not None:
        # this machine's service, asked through its admin socket or its loopback address
        # (entry.presend): as resolve_server and local_access would have found it
        where = Resolved(sent.url or config.api.url, "config")
        token, guessed = pick_token(None, config.state_dir, True)
        return run(command, rule=args.rule, config=config, server=where.url, token=token,
                   ttl=args.ttl, wait_process=args.wait_process, wait_start=args.wait_start,
                   quiet=args.quiet, token_guessed=guessed,
                   admin_socket=Path(sent.path) if sent.path else None,
                   token_uid=local_access(where, config.state_dir)[1], presend=sent)

    rule = args.rule
    if args.infer:
        rule = infer_rule(args.infer, config)
        if rule is None:  # said why; the game runs with nothing opened
            return run(command, rule=None, config=config, server=None, token=None)
    where = resolve_server(args.server, config if config.source != "<defaults>" else None,
                           discover_timeout=1.0)
    token, guessed = pick_token(args.token, config.state_dir, where.trusted)
    sock, uid = local_access(where, config.state_dir)
    return run(command, rule=rule, config=config, server=where.url, token=token,
               ttl=args.ttl, strict_rule=not args.infer, wait_process=args.wait_process,
               wait_start=args.wait_start, quiet=args.quiet, token_guessed=guessed,
               admin_socket=sock if not args.token else None, token_uid=uid)


def cmd_activate(args: argparse.Namespace) -> int:
    """``igdtrigger activate``: open a rule (or ad-hoc ``--open`` ports) for a TTL; 0 once open
    or pending."""
    config = _config(args) if args.config else None
    c = _client(args, config)
    if (args.rule is None) == (not args.open):
        raise UsageError("name a RULE, or ad-hoc ports with --open udp/34197 (not both)")
    body: dict[str, Any] = {"open": args.open} if args.open else {"rule": args.rule}
    if args.ttl is not None:
        body["ttl"] = args.ttl
    if args.host:
        body["host"] = args.host
    data = c.request("POST", "/api/v1/activations", body)
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        # the activation's rendering lives with `status` (cli/statuscmd.py)
        from igdtrigger.cli.statuscmd import print_activation

        print_activation(data)
    return 0 if data.get("state") in ("open", "pending") else 1


def cmd_deactivate(args: argparse.Namespace) -> int:
    """``igdtrigger deactivate RULE``: end the rule's live activations (``--host``: for that
    host only). Raises ``UsageError`` for a rule the service does not know."""
    config = _config(args) if args.config else None
    c = _client(args, config)
    acts = c.request("GET", "/api/v1/activations")["activations"]
    rules = {r["name"] for r in c.request("GET", "/api/v1/rules")["rules"]}
    if args.rule not in rules:
        raise UsageError(f"unknown rule {args.rule!r} (known rules: {', '.join(sorted(rules))})")
    ended = []
    for a in acts:
        if a["rule"] == args.rule and (args.host is None or a["host"] == args.host):
            ended.append(c.request("DELETE", f"/api/v1/activations/{a['id']}"))
    if args.json:
        print(json.dumps({"ended": ended}, indent=2))
    elif ended:
        for a in ended:
            print(f"{a['rule']} for {a['host']}: ended (id {a['id']})")
    else:
        print(f"{args.rule}: no live activation")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """``igdtrigger status``: the service's status, as text or ``--json``."""
    # the status rendering: its own module (cli/statuscmd.py)
    from igdtrigger.cli.statuscmd import cmd_status as status

    return status(args, lambda: _client(args, _config(args) if args.config else None))


def cmd_gateway(args: argparse.Namespace) -> int:
    """``igdtrigger gateway``: probe the router (``--table``: list and classify its mappings)."""
    # gatewaycmd loads the backends (runtime.compose): only `gateway` pays for them
    from igdtrigger.cli.gatewaycmd import main as gateway_main
    from igdtrigger.cli.gatewaycmd import table_main

    config = _config(args)
    if args.simulate:
        config = replace(config, gateway=replace(config.gateway, url=SIMULATE))
    if args.dry_run and not args.clean:
        raise UsageError("--dry-run goes with --clean")
    if args.list or args.clean:
        if args.test:
            raise UsageError("--test probes the router; use it without --list/--clean")
        return table_main(config, as_json=args.json, clean=args.clean,
                          dry_run=args.dry_run, timeout=args.timeout)
    return gateway_main(config, as_json=args.json, timeout=args.timeout, test=args.test)


def cmd_check_config(args: argparse.Namespace) -> int:
    """Parse and validate like ``serve`` does, without touching the network."""
    config = load_config(args.path)
    gw = config.gateway
    summary: dict[str, Any] = {
        "source": config.source,
        "rules": [r.to_json() for r in config.rules],
        "gateway": {"url": gw.url or "SSDP discovery", "protocol": gw.protocol,
                    "lease": gw.lease},
        "api": config.api.url,
        "detect": list(config.detect.methods),
        "state_dir": str(config.state_dir or "default"),
    }
    front = config.front
    if front.enabled:
        summary["front"] = front.to_json()
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    if config.source == "<defaults>":
        print("no config file found (looked in: "
              + ", ".join(str(p) for p in _default_paths()) + "); the defaults are valid")
    else:
        print(f"{config.source}: ok")
    print(f"  gateway: {summary['gateway']['url']} ({gw.protocol}), lease "
          f"{format_duration(gw.lease)}")
    print(f"  api: {config.api.url}   detect: {', '.join(config.detect.methods) or 'none'}")
    for r in config.rules:
        trig = ", ".join(str(t) for t in r.trigger) or "-"
        proc = f"; process {', '.join(r.process)}" if r.process else ""
        print(f"  rule {r.name}: open {compress_ports(str(p) for p in r.open)}; trigger "
              f"{trig}{proc}; idle {format_duration(r.idle_timeout)}")
    if front.enabled:
        print(f"  front: {front.summary()}")
    if not config.rules:
        print("  no rules: only the front's clients can open ports" if front.enabled
              else "  no rules: nothing can be opened until you add [[rules]]")
    return 0


def _default_paths() -> list[Any]:
    return list(default_config_paths())


COMMANDS = {
    "serve": cmd_serve,
    "run": cmd_run,
    "activate": cmd_activate,
    "deactivate": cmd_deactivate,
    "status": cmd_status,
    "gateway": cmd_gateway,
    "healthcheck": cmd_healthcheck,
    "doctor": cmd_doctor,
    "check-config": cmd_check_config,
}


def quick_args(quick: QuickRun) -> argparse.Namespace:
    """``run``'s arguments for a command line :func:`igdtrigger.cli.entry.parse_run` read,
    as ``build_parser("run")`` gives them (its defaults; ~4 ms of a launcher hook's start-up
    saved: ``tests/test_wrapper_quick.py`` holds the two equal)."""
    return argparse.Namespace(
        cmd="run", config=quick.config, server=None, token=None, timeout=None,
        rule=quick.rule, infer=None, ttl=30.0, wait_process=[], wait_start=60.0,
        quiet=quick.quiet, command=["--", *quick.command])


def main(argv: Sequence[str] | None = None, *, presend: Presend | None = None,
         quick: QuickRun | None = None, program: bool = False) -> int:
    """Run one subcommand, return its exit status (see the module's exit codes); errors are
    one line on stderr. ``presend``: ``run``'s activation request already written by the
    console entry point (:mod:`igdtrigger.cli.entry`), ``quick``: ``argv`` as it read it;
    ``program``: called as the program itself (the console script, ``python -m``), as when
    ``argv`` is None."""
    args_in = sys.argv[1:] if argv is None else list(argv)
    if not args_in:
        build_parser().print_help()
        return 2
    try:
        if quick is not None:  # the entry point read it (cli/entry.py): no parser to build
            args = quick_args(quick)
        else:
            args = build_parser(args_in[0] if args_in[0] in COMMANDS else None).parse_args(
                args_in)
        args.fast_exit = argv is None or program  # the program itself (console script, -m)
        args.presend, presend = presend, None  # handed to cmd_run, which owns it from here
        return COMMANDS[args.cmd](args)
    except IgdTriggerError as exc:
        print(f"igdtrigger: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # a file or socket the command needed: say which, no traceback
        where = f" {exc.filename}" if exc.filename else ""
        print(f"igdtrigger:{where} {exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        if presend is not None:  # never handed over (a usage error): the service lets it lapse
            presend.close()


if __name__ == "__main__":
    sys.exit(main())
