"""The ``igdtrigger`` console entry point (and ``python -m igdtrigger``): ``run``'s quick way
to a running service, then the full command line (:mod:`igdtrigger.cli.main`).

``igdtrigger run --rule NAME -- CMD`` is a game launcher's hook: the time from exec to the
open port is the game's wait (issue 17). When this machine's service listens on loopback, the
activation request is written to it before anything else is loaded: through its admin socket
when this user may use it, else to its loopback address when this user holds no admin token
(the own-address rule lets any local client act for this host; a token is only ever sent by
the full way, after it checked who listens). This module needs ``os`` and ``_socket`` only,
reads just ``[api] listen`` and ``[service] state_dir`` from the config
(:func:`igdtrigger.paths.service_location`) and knows the rule by its NAME (the service holds
the rule and the validated config). Then the full command line runs as always with that
connection handed over: the config is validated (an error is one line on stderr naming the
file, the field and the value; the game still starts, the service already has the request),
the answer is read and reported, the child launched, the heartbeat kept. Anything this quick
way does not handle (other options, ``$IGDTRIGGER_SERVER``, a listen address beyond loopback,
a readable token without the admin socket, nothing answering, an unreadable or odd config)
takes the full way from the start, unchanged.
"""

from __future__ import annotations

import _socket
import os
import sys

from igdtrigger.paths import admin_socket, config_paths, service_location, token_readable

__all__ = [
    "RULE_CHARS", "Presend", "QuickRun", "activation_body", "main", "parse_run", "presend",
    "request_bytes",
]

TYPE_CHECKING = False  # typing is not imported here: ~3 ms of a launcher hook's start-up
if TYPE_CHECKING:
    from collections.abc import Sequence

RULE_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-")
_DEFAULT_LISTEN = "127.0.0.1:8731"  # core.settings.DEFAULT_LISTEN
_TTL = 30.0  # run's --ttl default (cli.main), what the quick way asks for
_MAX_CONFIG = 1 << 20  # config.MAX_CONFIG_BYTES: larger is refused by the full way


class Presend:
    """An activation request already written to the service, through its admin socket
    ``path`` or to its loopback ``url`` (no token): the connection (its answer not read yet),
    the ``rule`` and ``ttl`` asked for."""

    def __init__(self, sock: _socket.socket, path: str | None, url: str | None, rule: str,
                 ttl: float) -> None:
        self.sock = sock
        self.path = path
        self.url = url
        self.rule = rule
        self.ttl = ttl

    def matches(self, rule: str | None, ttl: float) -> bool:
        """Is this the request the parsed command line would make?"""
        return rule == self.rule and ttl == self.ttl

    def close(self) -> None:
        """Drop the connection (the service ends an activation nobody heartbeats)."""
        self.sock.close()


def request_bytes(method: str, path: str, host: str, headers: dict[str, str],
                  payload: bytes | None) -> bytes:
    """One HTTP/1.1 request: request line, ``Host``, ``headers``, ``Content-Length`` (always
    for POST/PUT/PATCH), the body."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}",
             *(f"{k}: {v}" for k, v in headers.items())]
    if payload is not None or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(payload or b'')}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (payload or b"")


def activation_body(rule: str, ttl: float, pid: int) -> bytes:
    """``run``'s activation request body, as ``json.dumps`` writes it (``rule`` is a rule name:
    letters, digits, ``_.-``, nothing to escape)."""
    return (f'{{"rule": "{rule}", "ttl": {ttl!r}, "source": "run", '
            f'"meta": {{"pid": "{pid}"}}}}').encode()


class QuickRun:
    """``run [--config P] --rule NAME [-q] -- CMD...`` as the full parser would read it: the
    config path (None: the usual places), the rule, ``--quiet``, the command (after ``--``)."""

    def __init__(self, config: str | None, rule: str, quiet: bool, command: list[str]) -> None:
        self.config = config
        self.rule = rule
        self.quiet = quiet
        self.command = command


def parse_run(argv: Sequence[str]) -> QuickRun | None:
    """``argv`` (``run`` first) read as a :class:`QuickRun`, or None for any other command line
    (the full parser handles it; ``tests/test_wrapper_quick.py`` holds the two equal)."""
    config, rule, quiet = None, None, False
    args = list(argv[1:]) if argv[:1] == ["run"] else []
    while args:
        arg = args.pop(0)
        if arg == "--":
            if rule is None or not args or not rule.strip():
                return None
            return QuickRun(config, rule, quiet, args)
        name, eq, value = arg.partition("=")
        if name not in ("--config", "--rule"):
            if arg in ("-q", "--quiet"):
                quiet = True
                continue
            return None
        if not eq:
            if not args or args[0].startswith("-"):
                return None
            value = args.pop(0)
        if name == "--config":
            config = value
        else:
            rule = value
    return None


def _read(path: str) -> str | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        import stat  # os loaded it already: free here, not at the top (typing-free module)

        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        raw = os.read(fd, _MAX_CONFIG + 1)
    except OSError:
        return None
    finally:
        os.close(fd)
    try:
        return raw.decode("utf-8") if len(raw) <= _MAX_CONFIG else None
    except UnicodeDecodeError:
        return None


def _location(config: str | None) -> tuple[str, str | None] | None:
    """``(listen, state_dir)`` the config names (the defaults without a file, the
    ``IGDTRIGGER_API__LISTEN``/``IGDTRIGGER_SERVICE__STATE_DIR`` overrides over it), or None
    when the full way should decide."""
    if config is None:
        for place in config_paths():  # as config.find_config looks: a place that cannot
            try:  # even be looked at is that config, refused by name by the full way
                os.stat(place)
            except OSError as exc:
                import errno  # built in: free here

                if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.EBADF):
                    continue  # what pathlib's exists() passes over
                return None
            config = place
            break
    listen, state = None, None
    if config is not None:
        text = _read(config)
        if text is None:
            return None
        found = service_location(text)
        if found is None:  # unusual TOML: parse it for real (still before the request)
            import tomllib  # only for a config the quick reading is unsure of

            try:
                data = tomllib.loads(text)
            except tomllib.TOMLDecodeError:
                return None
            api, svc = data.get("api", {}), data.get("service", {})
            listen = api.get("listen") if isinstance(api, dict) else None
            state = svc.get("state_dir") if isinstance(svc, dict) else None
        else:
            listen, state = found
    # the overrides as config.env_overrides reads them: section and key in any case
    seen: set[str] = set()
    for name, env in os.environ.items():
        if not name.startswith("IGDTRIGGER_") or "__" not in name:
            continue
        which = name[11:].upper()
        if which not in ("API__LISTEN", "SERVICE__STATE_DIR"):
            continue
        if which in seen:
            return None  # given twice (two spellings): the full way says which counts
        seen.add(which)
        if not env or env.strip()[:1] in ("'", '"', "[", "{") or env.strip() != env:
            return None
        if which == "API__LISTEN":
            listen = env
        else:
            state = env
    if (listen is not None and not isinstance(listen, str)) or (
            state is not None and not isinstance(state, str)):
        return None
    return listen or _DEFAULT_LISTEN, state or None


def presend(argv: Sequence[str]) -> Presend | None:
    """Write ``run``'s activation request to this machine's service, when the quick way can
    (see the module note); the connection, or None (nothing sent). Never raises."""
    parsed = parse_run(argv)
    if parsed is None or os.environ.get("IGDTRIGGER_SERVER", "").strip():
        return None
    config, rule = parsed.config, parsed.rule
    if not (0 < len(rule) <= 40 and set(rule) <= RULE_CHARS and rule[0].isalnum()):
        return None
    if not hasattr(_socket, "AF_UNIX"):
        return None  # not a POSIX system: the full way
    try:
        where = _location(config)
    except Exception:  # anything unusual: the full way reads the config and says what is wrong
        return None
    if where is None:
        return None
    listen, state = where
    target = _loopback(listen)
    if target is None:
        return None  # a service listening beyond this machine: the full way (token, zeroconf)
    payload = activation_body(rule, _TTL, os.getpid())
    path = admin_socket(state)
    if path is not None:  # the admin socket: no token needed, none can leak
        sock = _send(_socket.AF_UNIX, path, "localhost", payload)
        if sock is not None:
            return Presend(sock, path, None, rule, _TTL)
    # a loopback API without a token (a desktop user's game, the service running as another
    # user: the own-address rule lets it act for this host); with a token the full way checks
    # who listens before sending it. A stale admin socket (a killed service) lands here too.
    if os.environ.get("IGDTRIGGER_TOKEN") or token_readable(state):
        return None
    family, address, host = target
    sock = _send(family, address, host, payload)
    return Presend(sock, None, f"http://{host}", rule, _TTL) if sock is not None else None


def _send(family: int, address: str | tuple[str, int], host: str,
          payload: bytes) -> _socket.socket | None:
    """A connection with the activation request written on it, or None (nothing sent)."""
    sock = _socket.socket(family, _socket.SOCK_STREAM)
    try:
        sock.settimeout(2.0)  # run's Client timeout
        sock.connect(address)
        sock.sendall(request_bytes(
            "POST", "/api/v1/activations", host,
            {"Accept": "application/json", "Connection": "close",
             "Content-Type": "application/json"}, payload))
    except OSError:
        sock.close()
        return None
    return sock


def _loopback(listen: str) -> tuple[int, tuple[str, int], str] | None:
    """``(family, address, Host header)`` of an ``[api] listen`` on a loopback IP literal
    (``127.0.0.1:8731``, ``[::1]:8731``, a bare port), or None (the full way resolves it)."""
    if listen.isdecimal():
        host, port = "127.0.0.1", listen
    elif listen.startswith("["):
        host, sep, port = listen[1:].partition("]:")
        if not sep:
            return None
    else:
        host, _, port = listen.rpartition(":")
    if not (port.isascii() and port.isdecimal() and 0 < int(port) < 65536):
        return None
    parts = host.split(".")
    if host == "::1":
        family, shown = _socket.AF_INET6, "[::1]"
    elif (len(parts) == 4 and parts[0] == "127"
          and all(p.isascii() and p.isdecimal() and int(p) < 256 for p in parts)):
        family, shown = _socket.AF_INET, host
    else:
        return None
    number = int(port)
    return family, (host, number), shown if number == 80 else f"{shown}:{number}"


def main() -> int:
    """The console entry point: ``run``'s quick request, then the full command line."""
    argv = sys.argv[1:]
    sent = None
    try:
        quick = parse_run(argv)
        sent = presend(argv) if quick is not None else None
        # the full command line: loaded after the request went out
        from igdtrigger.cli.main import main as full_main
    except KeyboardInterrupt:  # Ctrl-C before the full command line took over: no traceback
        if sent is not None:
            sent.close()  # the service lets the activation lapse (nobody heartbeats it)
        return 130
    return full_main(argv, presend=sent, quick=quick, program=True)
