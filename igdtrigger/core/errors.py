"""One error hierarchy for the whole project.

Every error carries a message a person can act on. The CLI prints ``str(err)`` on one line and
exits with ``err.exit_code``; the HTTP API turns ``err.http_status`` into a JSON error.
"""

from __future__ import annotations

import errno
import os

__all__ = [
    "DEVICE_DENIED_HINT", "PINHOLE_SELF_HINT", "SECURE_MODE_HINT", "ActionFailed",
    "ActivationLimit", "ActivationNotFound", "AdhocRefused", "ApiError", "ConfigError",
    "DetectionUnavailable", "Forbidden", "GatewayError", "GatewayNotFound", "GatewayTimeout",
    "GatewayUnreachable", "HostNotAllowed", "IgdTriggerError", "InvalidArgs", "JournalError",
    "LeaseRefused", "LocalResourceError", "MalformedReply", "MappingConflict", "NetlinkError",
    "NetworkFailure", "NoSuchMapping", "NotAuthorized", "NotReady", "ProtocolUnsupported",
    "RequestTimeout", "RuleNotFound", "ServiceBusy", "ServiceUnavailable", "TableFull", "TooMany",
    "TooManySubscribers", "Unauthorized", "UnsupportedAction", "UnsupportedMedia", "UsageError",
    "descriptors_exhausted", "socket_fault",
]


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
    """No configured rule is called ``name`` (HTTP 404); the message lists the known ones."""

    http_status = 404

    def __init__(self, name: str, known: list[str]) -> None:
        hint = f"known rules: {', '.join(sorted(known))}" if known else "no rules are configured"
        super().__init__(f"unknown rule {name!r} ({hint})")
        self.name = name


class ActivationNotFound(UsageError):
    """No live activation has this id: it never existed or has lapsed (HTTP 404)."""

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


SECURE_MODE_HINT = (
    "the router only lets a host map ports to itself (miniupnpd secure_mode or a permission "
    "rule): run igdtrigger on the host that needs the ports, or allow this in the router's UPnP "
    "settings (secure_mode=no / an allow rule for that host and port)"
)


DEVICE_DENIED_HINT = (
    "the router refuses UPnP port mappings for this device or port even though the mapping is "
    "for the device asking (not secure mode): allow port mappings for this device in the "
    "router (FRITZ!Box: Internet > Permit Access > this device > \"Permit independent port "
    "sharing for this device\"; elsewhere: the UPnP allow list or permission rules)"
)


PINHOLE_SELF_HINT = (
    "a router opens an IPv6 pinhole only when the host it is for asks, over IPv6, from that "
    "very address: igdtrigger opens pinholes for the machine it runs on; run it on the host "
    "that needs the ports"
)


# --- gateway -----------------------------------------------------------------------------------
#
# One taxonomy for every backend (miniupnpc, our SOAP client, NAT-PMP, PCP). A backend turns what
# its router said into one of these types once, at its edge (UPnP error codes through
# ``gateway.igd.fault_error``, NAT-PMP/PCP result codes through ``gateway.pmp.pmp_error`` /
# ``pcp_error``); everything above decides on the type, never on the message text.
#
#   GatewayError
#   +-- GatewayNotFound        no router answered discovery / no usable WAN service
#   +-- GatewayUnreachable     the router stopped answering (connection refused/reset, HTTP 404)
#   |   +-- GatewayTimeout     ... within our deadline: the request may have arrived
#   +-- ProtocolUnsupported    NAT-PMP/PCP version or opcode not spoken: try another protocol
#   +-- ActionFailed           the router answered with an error (UPnP code, NAT-PMP/PCP result)
#       +-- MappingConflict    718/729 (501 on some), PCP CANNOT_PROVIDE_EXTERNAL
#       +-- NotAuthorized      606, 718-as-denial on IGDv1, NAT-PMP 2, PCP NOT_AUTHORIZED
#       +-- LeaseRefused       725 OnlyPermanentLeasesSupported
#       +-- InvalidArgs        402 (also: timed lease refused by ARRIS, table full on IGDv1)
#       +-- NoSuchMapping      714/730, PCP/NAT-PMP "no such mapping"
#       +-- UnsupportedAction  401/602: the router does not implement this action
#       +-- TableFull          728 NoPortMapsAvailable, NAT-PMP 4, PCP NO_RESOURCES/USER_EX_QUOTA
#       +-- NetworkFailure     NAT-PMP 3 / PCP NETWORK_FAILURE: no usable WAN address
#       +-- MalformedReply     garbled, truncated, oversized, or not matching the request


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


class GatewayTimeout(GatewayUnreachable):
    """The router did not answer within our deadline. Unlike a refused connection, the request
    may have reached the router: an add may have happened, a delete may not have."""

    def __init__(self, message: str, *, action: str = "", timeout: float = 0.0) -> None:
        super().__init__(message)
        self.action = action
        self.timeout = timeout


class ProtocolUnsupported(GatewayError):
    """The router does not speak this protocol version or opcode: try the other protocol."""

    def __init__(self, message: str, *, code: int | None = None,
                 server_version: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.server_version = server_version


class ActionFailed(GatewayError):
    """The router answered a request with an error code (UPnP errorCode, NAT-PMP/PCP result).

    ``code``: the UPnP error code or NAT-PMP/PCP result (``None`` when the router gave none);
    ``description``: the router's own words; ``hint``: what the user can do, or ""."""

    def __init__(self, action: str, code: int | None, description: str, hint: str = "") -> None:
        self.action = action
        self.code = code
        self.description = description
        self.hint = hint
        super().__init__(self.with_hint(hint))

    def with_hint(self, hint: str) -> str:
        """The message with another hint (a caller that knows more than the backend did)."""
        shown = f"{self.code} {self.description}" if self.code is not None else self.description
        text = f"router refused {self.action}: {shown}"
        return f"{text}; {hint}" if hint else text


class MappingConflict(ActionFailed):
    """The port is already mapped to another host (718 / 729 / 501 on some routers)."""

    http_status = 409


class NotAuthorized(ActionFailed):
    """Secure mode or a permission rule refused the mapping (606 on IGDv2, 718 on IGDv1), or a
    router that denies UPnP to this very device (FRITZ!Box, ``DEVICE_DENIED_HINT``)."""

    http_status = 403


class LeaseRefused(ActionFailed):
    """The router refuses timed leases (725 OnlyPermanentLeasesSupported). A 402 is *not* this
    by itself: only a lease-0 retry that succeeds says so (``gateway.base.add_with_lease_fallback``
    then reports it as ``Granted.timed_lease_refused``)."""


class InvalidArgs(ActionFailed):
    """402 Invalid Args: a bad argument, a timed lease refused (ARRIS), or a full table (some
    IGDv1 routers). Which one is only known by what a retry does."""


class NoSuchMapping(ActionFailed):
    """The router has no such mapping (714)."""


class UnsupportedAction(ActionFailed):
    """The router does not implement this action (401 Invalid Action, 602 Not Implemented):
    an optional operation (AddAnyPortMapping, listing) it lacks."""


class TableFull(ActionFailed):
    """No room for another mapping (728 NoPortMapsAvailable, NAT-PMP 4, PCP NO_RESOURCES)."""


class NetworkFailure(ActionFailed):
    """NAT-PMP result 3 / PCP NETWORK_FAILURE: the router has no usable WAN address."""


class MalformedReply(ActionFailed):
    """The router's reply is garbled, truncated, oversized or does not match the request.

    ``action``: what was asked (an action name, or e.g. ``"device description"``)."""

    def __init__(self, action: str, description: str, hint: str = "") -> None:
        super().__init__(action, None, description, hint)

    def with_hint(self, hint: str) -> str:
        """As ``ActionFailed.with_hint``, worded for a reply that could not be used."""
        text = (f"unusable reply to {self.action}: {self.description}" if self.action
                else self.description)
        return f"{text}; {hint}" if hint else text


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


# --- the journal -------------------------------------------------------------------------------


class JournalError(ConfigError):
    """The journal cannot be used as it is (corrupt, or written by a newer igdtrigger)."""


# --- the HTTP API's refusals (each answered with its ``http_status``) --------------------------


class Forbidden(IgdTriggerError):
    """This client may not do that (not in ``[api] allow``, or a read without ``public_read``)."""

    http_status = 403


class Unauthorized(IgdTriggerError):
    """The request needs the admin token and carries none, or a wrong one."""

    http_status = 401


class NotReady(IgdTriggerError):
    """The service is starting or stopping: ask again shortly."""

    http_status = 503


class TooMany(IgdTriggerError):
    """A client's request rate or count bound was hit (``[api] rate_limit``, ``max_per_host``)."""

    http_status = 429


class TooManySubscribers(TooMany):
    """No more event streams may be opened now (per client or in total)."""


class UnsupportedMedia(IgdTriggerError):
    """The request body is not ``application/json``."""

    http_status = 415


class RequestTimeout(IgdTriggerError):
    """The request body did not arrive in time."""

    http_status = 408


# --- the kernel --------------------------------------------------------------------------------


class NetlinkError(OSError):
    """The kernel refused a netlink request (``errno`` set), or netlink is not available. An
    ``OSError``: callers handle it with the other socket errors."""
