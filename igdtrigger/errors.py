"""One error hierarchy for the whole project.

Every error carries a message a person can act on. The CLI prints ``str(err)`` on one line and
exits with ``err.exit_code``; the HTTP API turns ``err.http_status`` into a JSON error.
"""

from __future__ import annotations

import errno
import os


class IgdTriggerError(Exception):
    """Root of every error igdtrigger raises on purpose."""

    exit_code: int = 1
    http_status: int = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


# --- configuration and usage -------------------------------------------------------------------


class ConfigError(IgdTriggerError):
    """The configuration (file, environment or arguments) is invalid. Exit code 2."""

    exit_code = 2
    http_status = 400

    def __init__(self, message: str, *, source: str | None = None, field: str | None = None):
        where = ": ".join(p for p in (source, field) if p)
        super().__init__(f"{where}: {message}" if where else message)
        self.source = source
        self.field = field


class UsageError(IgdTriggerError):
    """A command line or API request is malformed. Exit code 2, HTTP 400."""

    exit_code = 2
    http_status = 400


class RuleNotFound(UsageError):
    http_status = 404

    def __init__(self, name: str, known: list[str]) -> None:
        hint = f"known rules: {', '.join(sorted(known))}" if known else "no rules are configured"
        super().__init__(f"unknown rule {name!r} ({hint})")
        self.name = name


class ActivationNotFound(UsageError):
    http_status = 404


class AdhocRefused(UsageError):
    """Ports named by a request without a rule, refused by ``[api] allow_adhoc`` limits."""

    http_status = 403


class HostNotAllowed(UsageError):
    """The rule's ``hosts`` list does not include this host."""

    http_status = 403


class ActivationLimit(IgdTriggerError):
    """A bound on live activations (the service's, or a client's ``[api] max_per_host``)."""

    http_status = 429


class RuleHeld(IgdTriggerError):
    """The rule's ports are held by another host (``share = "first"``)."""

    http_status = 409


SECURE_MODE_HINT = (
    "the router only lets a host map ports to itself (miniupnpd secure_mode or a permission "
    "rule): run igdtrigger on the host that needs the ports, or allow this in the router's UPnP "
    "settings (secure_mode=no / an allow rule for that host and port)"
)


PINHOLE_SELF_HINT = (
    "a router opens an IPv6 pinhole only when the host it is for asks, over IPv6, from that "
    "very address: igdtrigger opens pinholes for the machine it runs on; run it on the host "
    "that needs the ports"
)


# --- gateway -----------------------------------------------------------------------------------


class GatewayError(IgdTriggerError):
    """Talking to the router failed."""

    http_status = 502


class GatewayNotFound(GatewayError):
    """No Internet Gateway Device answered."""


class GatewayUnreachable(GatewayError):
    """The cached IGD stopped answering (router restarted, moved port, or is down)."""


class LocalResourceError(GatewayError):
    """This machine could not even open a socket to the router (out of file descriptors or
    buffers: EMFILE, ENFILE, ENOBUFS, ENOMEM). The router was not asked, so this says
    nothing about it: not "gateway down", no lost mappings; the operation is retried."""


_LOCAL_ERRNOS = frozenset(getattr(errno, n) for n in ("EMFILE", "ENFILE", "ENOBUFS", "ENOMEM")
                          if hasattr(errno, n))


def descriptors_exhausted() -> bool:
    """Is this process out of file descriptors right now? (For libraries that report a socket
    failure without its errno, like miniupnpc.)"""
    try:
        fd = os.open(os.devnull, os.O_RDONLY)
    except OSError as exc:
        return exc.errno in _LOCAL_ERRNOS
    os.close(fd)
    return False


def socket_fault(exc: OSError, message: str) -> GatewayError:
    """The fault for an ``OSError`` while talking to the router: ``LocalResourceError`` when
    this machine ran out of descriptors or memory, else ``GatewayUnreachable``."""
    if exc.errno in _LOCAL_ERRNOS:
        return LocalResourceError(f"{message}: this machine is out of resources "
                                  f"({exc.strerror or exc}); the router was not asked")
    return GatewayUnreachable(f"{message}: {exc.strerror or exc}")


class ActionFailed(GatewayError):
    """The router answered a request with an error code (UPnP errorCode, NAT-PMP/PCP result)."""

    def __init__(self, action: str, code: int | None, description: str, hint: str = "") -> None:
        shown = f"{code} {description}" if code is not None else description
        text = f"router refused {action}: {shown}"
        super().__init__(f"{text}; {hint}" if hint else text)
        self.action = action
        self.code = code
        self.description = description


class MappingConflict(ActionFailed):
    """The port is already mapped to another host (718 / 729 / 501 on some routers)."""

    http_status = 409


class NotAuthorized(ActionFailed):
    """Secure mode or a permission rule refused the mapping (606 on IGDv2, 718 on IGDv1)."""

    http_status = 403


class LeaseRefused(ActionFailed):
    """The router refuses timed leases (725 OnlyPermanentLeasesSupported, 402 on some)."""


class NoSuchMapping(ActionFailed):
    """The router has no such mapping (714)."""


# --- detection ---------------------------------------------------------------------------------


class DetectionUnavailable(IgdTriggerError):
    """A detector cannot run here (missing privilege, kernel support or platform)."""


# --- client side -------------------------------------------------------------------------------


class ServiceUnavailable(IgdTriggerError):
    """No igdtrigger service answered at the given address."""

    exit_code = 3


class ServiceBusy(ServiceUnavailable):
    """The service accepted the connection but did not answer in time (overloaded, or waiting
    on a slow router): it is there, so a caller should retry it rather than act without it."""


class ApiError(IgdTriggerError):
    """The service answered a request with an error."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.exit_code = 2 if 400 <= status < 500 else 1
