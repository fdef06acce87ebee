"""UPnP IGD backend on miniupnpc.

miniupnpc's calls block (C library doing its own HTTP), so every call runs on one dedicated worker
thread: the event loop never blocks, and the router sees one request at a time. The IGD found by
discovery (or given as ``gateway.url``) is kept; it is only looked up again after the router
stops answering.

What is shared with the SOAP backend, so the two behave the same: the service choice
(``soap.find_wan_service``: the connected WAN service with a usable external address; a router
where miniupnpc would use another service is refused, so ``backend = "auto"`` uses our client),
the fault table (``igd.fault_error``: miniupnpc's Python binding reports UPnP errors as a plain
``Exception`` carrying ``strupnperror(code)`` text; ``miniupnpc_code`` turns that text back into
the code once, here), and the lease fallback (``base.add_with_lease_fallback``).

The check before an add and the add are one job on the worker thread (``add_if_free``): the
lookup goes out with our SOAP codec on a blocking socket (miniupnpc's own lookup answers
``None`` for "no such entry" and for a failed request alike), and AddPortMapping follows it at
once when the port is free, with no event-loop hop between them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from igdtrigger.core import trace
from igdtrigger.core.errors import (
    GatewayError,
    GatewayNotFound,
    GatewayTimeout,
    GatewayUnreachable,
    LocalResourceError,
    MalformedReply,
    UnsupportedAction,
    descriptors_exhausted,
)
from igdtrigger.core.model import MappingSpec, Proto, RouterMapping
from igdtrigger.gateway.base import (
    Capability,
    CheckedAdd,
    GatewayInfo,
    Granted,
    add_checked,
    add_with_lease_fallback,
    looked_up,
    metered,
    unsupported,
)
from igdtrigger.gateway.upnp.codec import (
    IgdDescription,
    IgdService,
    UpnpFault,
    fault_error,
    mapping_args,
    reserved_port,
)
from igdtrigger.gateway.upnp.soap import (
    GET_SPECIFIC,
    ChosenServiceState,
    discover,
    find_wan_service,
    read_mapping,
    read_mapping_blocking,
    read_table,
    soap_call,
)

__all__ = [
    "CLOSE_GRACE", "MiniupnpcGateway", "miniupnpc_code", "miniupnpc_error",
]

log = logging.getLogger("igdtrigger.gateway.upnp.miniupnpc")
T = TypeVar("T")

# strupnperror() texts (miniupnpc upnperrors.c, as in the 2.3 binding) -> code. Negative codes
# are miniupnpc's own (UPNPCOMMAND_*, UPNPDISCOVER_SOCKET_ERROR).
_UPNP_TEXTS: dict[str, int] = {
    "miniupnpc unknown error": -1,
    "miniupnpc invalid arguments": -2,
    "miniupnpc http error": -3,
    "miniupnpc invalid response": -4,
    "miniupnpc memory allocation error": -5,
    "miniupnpc socket error": -101,
    "invalid action": 401,
    "invalid args": 402,
    "action failed": 501,
    "argument value invalid": 600,
    "argument value out of range": 601,
    "optional action not implemented": 602,
    "out of memory": 603,
    "human intervention required": 604,
    "string argument too long": 605,
    "action not authorized": 606,
    "pinholespacexhausted": 701,
    "firewalldisabled": 702,
    "inboundpinholenotallowed": 703,
    "nosuchentry": 704,
    "protocolnotsupported": 705,
    "internalportwildcardingnotallowed": 706,
    "protocolwildcardingnotallowed": 707,
    "invalidlayer2address": 708,
    "notrafficreceived": 709,
    "specifiedarrayindexinvalid": 713,
    "nosuchentryinarray": 714,
    "wildcardnotpermittedinsrcip": 715,
    "wildcardnotpermittedinextport": 716,
    "conflictinmappingentry": 718,
    "sameportvaluesrequired": 724,
    "onlypermanentleasessupported": 725,
    "remotehostonlysupportswildcard": 726,
    "externalportonlysupportswildcard": 727,
    "noportmapsavailable": 728,
    "conflictwithothermechanisms": 729,
    "portmappingnotfound": 730,
    "readonly": 731,
    "wildcardnotpermittedinintport": 732,
    "inconsistentparameter": 733,
    "inconsistentparameters": 733,
}


def miniupnpc_code(text: str) -> int | None:
    """The code behind a miniupnpc exception's ``strupnperror()`` text; ``None`` for text
    miniupnpc does not produce (and for "UnknownError": a code its table lacks)."""
    low = " ".join(text.strip().lower().split())
    code = _UPNP_TEXTS.get(low)
    if code is None:
        code = _UPNP_TEXTS.get(low.replace(" ", ""))
    return code


def miniupnpc_error(action: str, exc: BaseException, *, lease: int | None = None,
                    for_self: bool | None = None, igd_version: int | None = None
                    ) -> GatewayError:
    """The typed error for an exception out of miniupnpc, through the one fault table."""
    text = str(exc).strip() or type(exc).__name__
    code = miniupnpc_code(text)
    if code is not None and code > 0:
        return fault_error(action, UpnpFault(code, text), lease=lease, for_self=for_self,
                           igd_version=igd_version)
    if code in (-3, -101, -5):
        if descriptors_exhausted():  # miniupnpc does not say why its socket failed
            return LocalResourceError(
                f"{action}: this machine is out of file descriptors; the router was not asked")
        return GatewayUnreachable(
            f"router did not answer {action} ({text}); it may have restarted")
    if code == -4:
        return MalformedReply(action, f"miniupnpc could not parse the router's reply ({text})")
    return fault_error(action, UpnpFault(None, text), lease=lease, for_self=for_self,
                       igd_version=igd_version)


CLOSE_GRACE = 0.3  # s close() waits for a request still on the worker thread


class MiniupnpcGateway(ChosenServiceState):
    """A UPnP IGD reached through miniupnpc, with all calls on one worker thread."""

    protocol = "upnp-igd"

    def __init__(
        self,
        url: str | None = None,
        *,
        discover_timeout: float = 2.0,
        timeout: float = 10.0,
        on_call: Callable[[str, float, bool], None] | None = None,
    ) -> None:
        self.url = url
        self.discover_timeout = discover_timeout
        self.timeout = timeout  # per call; miniupnpc's own socket timeouts are longer
        self.on_call = on_call  # (action, seconds, ok) for metrics
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="miniupnpc")
        self._upnp: Any = None
        self._info: GatewayInfo | None = None
        self._service: IgdService | None = None
        self.description: IgdDescription | None = None
        self._warned_double_nat = False
        self._hint: str | None = None
        self._inflight: concurrent.futures.Future[Any] | None = None  # the worker's last call

    def _timed(self, action: str, fn: Callable[[], T]) -> T:
        """Run one router request on the worker, timed there (the router's time, not the
        queue's: ``metered()``) and reported to ``on_call``."""
        t0 = time.perf_counter()
        ok = False
        if trace.ON:
            trace.stamp("call")
        try:
            result = fn()
            ok = True
            if trace.ON:
                trace.stamp("reply")
            return result
        finally:
            if self.on_call is not None:
                self.on_call(action, time.perf_counter() - t0, ok)

    async def _call(self, action: str, fn: Callable[[], T], *, lease: int | None = None,
                    for_self: bool | None = None, requests: int = 1) -> T:
        """Run ``fn`` on the worker thread; miniupnpc's exceptions become typed errors.
        ``requests``: how many router requests ``fn`` makes itself, each ``_timed`` (1: ``fn``
        is one request, timed here as ``action``); the deadline is ``timeout`` per request."""
        loop = asyncio.get_running_loop()
        if trace.ON:
            trace.stamp("queued")
        fut = self._pool.submit(self._timed, action, fn) if requests == 1 else self._pool.submit(fn)
        self._inflight = fut
        try:
            async with asyncio.timeout(self.timeout * requests):
                result = await asyncio.wrap_future(fut, loop=loop)
            if trace.ON:
                trace.stamp("resumed")
            return result
        except TimeoutError:
            self._info = None
            raise GatewayTimeout(f"router did not answer {action} within {self.timeout:g}s",
                                 action=action, timeout=self.timeout) from None
        except GatewayUnreachable:
            self._info = None  # a lookup with our codec (add_if_free): rediscover next time
            raise
        except GatewayError:
            raise
        except Exception as exc:
            if type(exc) is not Exception:
                raise  # miniupnpc reports the router with plain Exception; anything else is a bug
            svc = self._service
            err = miniupnpc_error(action, exc, lease=lease, for_self=for_self,
                                  igd_version=svc.version if svc is not None else None)
            if isinstance(err, GatewayUnreachable):
                self._info = None  # force a new connect (and discovery) next time
            raise err from None

    async def connect(self) -> GatewayInfo:
        """Discover (our SSDP) or use ``url``, let miniupnpc read the description, choose the WAN
        service; raises ``GatewayNotFound`` or ``GatewayUnreachable``."""
        if self._info is not None:
            return self._info
        location = self.url
        if (hint := self._take_hint()) is not None:
            try:
                return await self._connect_at(hint)
            except GatewayError as exc:
                log.info("router's announced IGD %s is not usable (%s): discovering", hint, exc)
        if location is None:
            # Our own SSDP search, not miniupnpc's: it only trusts a description URL on the
            # replying host or the default gateway (a hostile LAN device could otherwise point
            # us at any URL), unicasts to the gateway first and asks several search targets.
            found = await discover(self.discover_timeout)
            if not found:
                raise GatewayNotFound(
                    f"no UPnP router answered SSDP discovery within {self.discover_timeout:g}s; "
                    "enable UPnP on the router, or set gateway.url to its description URL")
            location = found[0][0].location
        return await self._connect_at(location)

    async def _connect_at(self, location: str) -> GatewayInfo:
        found = await find_wan_service(location, min(self.timeout, 3.0))
        theirs = found.description.miniupnpc_service()
        chosen = found.chosen.service
        if theirs is None or theirs.control_url != chosen.control_url:
            used = (f"{theirs.service_type} at {theirs.control_url}, "
                    f"{next((p.status for p in found.probes if p.service == theirs), '')!r}"
                    if theirs is not None else "none of its services")
            raise GatewayNotFound(
                f"miniupnpc would use {used} at {location}, but the usable WAN service is "
                f"{chosen.service_type} at {chosen.control_url} "
                f"({found.chosen.status}, external address "
                f"{found.chosen.external_address or 'unknown'}): miniupnpc cannot be pointed at "
                "it, so igdtrigger's own UPnP client is used (gateway.backend = \"soap\" or "
                "\"auto\")")
        await self._call("connect", lambda: self._connect_sync(location))
        self._service = chosen
        self.description = found.description
        info = found.info(self.protocol, "miniupnpc")
        self._info = info
        warning = info.external_warning()
        if warning is not None and not self._warned_double_nat:
            self._warned_double_nat = True
            log.warning("%s", warning)
        log.info(
            "using %s at %s (external address %s, we are %s)",
            info.service_type or "IGD", info.control_url, info.external_address or "unknown",
            info.local_address,
        )
        return info

    def _connect_sync(self, location: str) -> None:
        import miniupnpc  # imported lazily: a C extension the CLI client paths never need

        u = miniupnpc.UPnP()
        try:
            u.selectigd(location)
        except Exception as exc:
            hint = ("check the address, or remove gateway.url to discover the router by SSDP"
                    if self.url else "the router's description could not be used")
            raise GatewayUnreachable(f"no IGD answers at {location} ({exc}); {hint}") from None
        # miniupnpc can "select" a description it did not understand (e.g. only legacy
        # urn:dslforum-org services): it then posts to the bare host URL and reports success
        # for actions that did nothing. A status query that fails unmasks that.
        try:
            u.statusinfo()
        except Exception as exc:
            raise GatewayNotFound(
                f"miniupnpc found no usable WAN connection service at {self.url or 'the IGD'} "
                f"({exc})"
            ) from None
        self._upnp = u

    async def add(self, spec: MappingSpec, lease: int) -> Granted:
        """``AddPortMapping``; a timed lease refused (725, or 402 on some routers) is retried
        once as permanent (``base.add_with_lease_fallback``)."""
        u = await self._ready()
        return await add_with_lease_fallback(lambda asked: self._add_once(u, spec, asked), lease)

    def _adder(self, u: Any, spec: MappingSpec, asked: int) -> Callable[[], Granted]:
        def call() -> Granted:
            u.addportmapping(spec.external_port, spec.proto.value, spec.internal_client,
                             spec.internal_port, spec.description, "", int(asked))
            return Granted(spec.external_port, int(asked))

        return call

    async def _add_once(self, u: Any, spec: MappingSpec, asked: int) -> Granted:
        return await self._call("AddPortMapping", self._adder(u, spec, asked), lease=asked,
                                for_self=self._for_self(spec))

    async def add_if_free(self, spec: MappingSpec, lease: int) -> CheckedAdd:
        """``base.add_if_free`` as one job on the worker thread: GetSpecificPortMappingEntry
        with our SOAP codec on a blocking socket (fault 714 "no such entry" told from a failed
        request, which raises: nothing is added), then miniupnpc's AddPortMapping right after
        it, with no event-loop hop in between (issue 17: the check cost ~0.6 ms of hops)."""
        u = await self._ready()
        svc = self._service
        if svc is None:
            raise GatewayUnreachable("no WAN connection service chosen for AddPortMapping")

        def job(asked: int) -> Callable[[], CheckedAdd]:
            def both() -> CheckedAdd:  # on the worker thread
                try:
                    found: RouterMapping | UnsupportedAction | None = self._timed(
                        GET_SPECIFIC, lambda: read_mapping_blocking(
                            svc, spec.proto, spec.external_port, timeout=self.timeout))
                except UnsupportedAction as exc:
                    found = exc
                return looked_up(found) or CheckedAdd(
                    granted=self._timed("AddPortMapping", self._adder(u, spec, asked)))

            return both

        return await add_checked(
            lambda asked: self._call("AddPortMapping", job(asked), lease=asked,
                                     for_self=self._for_self(spec), requests=2),
            lambda asked: self._add_once(u, spec, asked), lease)

    async def add_any(self, spec: MappingSpec, lease: int) -> Granted:
        """IGDv2 AddAnyPortMapping: the router picks the external port if ours is taken.

        Sent with our SOAP codec to the same service: miniupnpc's binding always asks lease 0
        for this action (a week on IGDv2), which would outlive a crash."""
        await self._ready()
        svc = self._service
        if svc is None or Capability.ADD_ANY not in self.capabilities:
            raise unsupported("AddAnyPortMapping", f"{svc.service_type if svc else 'the IGD'} "
                              "has no AddAnyPortMapping (IGDv2 only)")

        async def once(asked: int) -> Granted:
            out = await self._via_soap("AddAnyPortMapping", lambda svc: soap_call(
                svc, "AddAnyPortMapping", mapping_args(
                    spec.proto.value, spec.external_port, spec.internal_port,
                    spec.internal_client, spec.description, asked),
                timeout=self.timeout, lease=asked, for_self=self._for_self(spec)))
            return Granted(reserved_port(out), asked)

        return await add_with_lease_fallback(once, lease)

    async def delete(self, proto: Proto, external_port: int) -> None:
        """``DeletePortMapping``; raises ``NoSuchMapping`` when the router has none (faults 713,
        714, 730)."""
        u = await self._ready()

        def call() -> None:
            u.deleteportmapping(external_port, proto.value)

        await self._call("DeletePortMapping", call)

    async def get(self, proto: Proto, external_port: int) -> RouterMapping | None:
        """Read with our SOAP codec on the same service: miniupnpc's binding answers ``None``
        for "no such entry" and for "router down" alike, which would take an unreachable
        router for one that lost our mapping."""
        await self._ready()
        return await self._via_soap(GET_SPECIFIC,
                                lambda svc: read_mapping(svc, proto, external_port,
                                                         timeout=self.timeout))

    async def list(self, limit: int = 4096) -> list[RouterMapping]:
        """Read with our SOAP codec (miniupnpc's binding answers ``None`` for the end of the
        table and for a failure alike)."""
        await self._ready()
        return await self._via_soap("GetGenericPortMappingEntry",
                                lambda svc: read_table(svc, limit, timeout=self.timeout))

    async def _via_soap(self, action: str, op: Callable[[IgdService], Awaitable[T]]) -> T:
        """An action sent with our SOAP codec to the chosen service (what miniupnpc's binding
        cannot express or report), metered like the others."""
        svc = self._service
        if svc is None:
            raise GatewayUnreachable(f"no WAN connection service chosen for {action}")
        try:
            return await metered(self.on_call, action, op(svc))
        except GatewayUnreachable:
            self._info = None
            raise

    async def _ready(self) -> Any:
        if self._info is None or self._upnp is None:
            await self.connect()
        return self._upnp

    async def close(self) -> None:
        """Stop the worker thread (a call in flight gets a moment to end)."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        fut = self._inflight
        if fut is not None and not fut.done():
            # a call still on the worker (a stop right after start): let it end for a moment
            # rather than cut the router off mid-request; never longer than CLOSE_GRACE
            waiter = asyncio.wrap_future(fut)
            done, _ = await asyncio.wait({waiter}, timeout=CLOSE_GRACE)
            if done:
                waiter.exception()  # retrieved: the caller that wanted it is gone
            else:
                waiter.cancel()
