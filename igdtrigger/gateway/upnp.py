"""UPnP IGD backend on miniupnpc.

miniupnpc's calls block (C library doing its own HTTP), so every call runs on one dedicated worker
thread: the event loop never blocks, and the router sees one request at a time. The IGD found by
discovery (or given as ``gateway.url``) is kept; it is only looked up again after the router
stops answering.

miniupnpc's Python binding reports UPnP errors as a plain ``Exception`` carrying the text of
``strupnperror(code)``; ``_classify`` turns that text back into a code and our error types.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

from ..errors import (
    SECURE_MODE_HINT,
    ActionFailed,
    GatewayError,
    GatewayNotFound,
    GatewayUnreachable,
    LeaseRefused,
    MappingConflict,
    NoSuchMapping,
    NotAuthorized,
)
from ..model import MappingSpec, Proto, RouterMapping
from .base import GatewayInfo, Granted, is_public_address

log = logging.getLogger("igdtrigger.gateway.upnp")
T = TypeVar("T")

# strupnperror() texts (miniupnpc upnperrors.c) -> UPnP error code.
_UPNP_TEXTS: dict[str, int] = {
    "invalid action": 401,
    "invalid args": 402,
    "action failed": 501,
    "action not authorized": 606,
    "pinholespacexhausted": 701,
    "firewalldisabled": 702,
    "inboundpinholenotallowed": 703,
    "nosuchentry": 704,
    "protocolnotsupported": 705,
    "internalportwildcardingnotallowed": 706,
    "protocolwildcardingnotallowed": 707,
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



def _classify(action: str, exc: BaseException, *, v1: bool) -> GatewayError:
    text = str(exc).strip()
    low = text.lower()
    code = _UPNP_TEXTS.get(low.replace(" ", "") if low not in _UPNP_TEXTS else low)
    if code is None and low.startswith("unknownerror"):
        digits = "".join(c for c in low if c.isdecimal() or c == "-")
        code = int(digits) if digits.lstrip("-").isdecimal() else None
    if code is None:
        if "http" in low or "socket" in low or "connect" in low or "invalid response" in low:
            return GatewayUnreachable(
                f"router did not answer {action} ({text or 'no reply'}); it may have restarted"
            )
        return ActionFailed(action, None, text or type(exc).__name__)
    name = text
    if code == 718:
        # IGDv1 miniupnpd also uses 718 for secure-mode/permission denials (router-facts §0).
        hint = "the port is mapped to another host, or (IGDv1) " + SECURE_MODE_HINT if v1 else ""
        return MappingConflict(action, code, name, hint)
    if code == 606:
        return NotAuthorized(action, code, name, SECURE_MODE_HINT)
    if code == 725:
        return LeaseRefused(action, code, name)
    if code == 729:
        return MappingConflict(action, code, name)
    if code in (714, 730):
        return NoSuchMapping(action, code, name)
    return ActionFailed(action, code, name)


CLOSE_GRACE = 0.3  # s close() waits for a request still on the worker thread


class MiniupnpcGateway:
    """A UPnP IGD reached through miniupnpc, with all calls on one worker thread."""

    protocol = "upnp-igd"

    def __init__(
        self,
        url: str | None = None,
        *,
        discover_timeout: float = 2.0,
        on_call: Callable[[str, float, bool], None] | None = None,
    ) -> None:
        self.url = url
        self.discover_timeout = discover_timeout
        self.on_call = on_call  # (action, seconds, ok) for metrics
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="miniupnpc")
        self._upnp: Any = None
        self._info: GatewayInfo | None = None
        self._v1 = False
        self._warned_double_nat = False
        self._hint: str | None = None  # where the router last announced its IGD (SSDP NOTIFY)
        self._inflight: concurrent.futures.Future[Any] | None = None  # the worker's last call

    @property
    def info(self) -> GatewayInfo | None:
        return self._info

    async def _call(self, action: str, fn: Callable[[], T]) -> T:
        loop = asyncio.get_running_loop()

        def run() -> T:
            t0 = time.perf_counter()
            ok = False
            try:
                result = fn()
                ok = True
                return result
            finally:
                if self.on_call is not None:
                    self.on_call(action, time.perf_counter() - t0, ok)

        fut = self._pool.submit(run)
        self._inflight = fut
        try:
            return await asyncio.wrap_future(fut, loop=loop)
        except GatewayError:
            raise
        except Exception as exc:  # miniupnpc raises plain Exception
            err = _classify(action, exc, v1=self._v1)
            if isinstance(err, GatewayUnreachable):
                self._info = None  # force a new connect (and discovery) next time
            raise err from None

    def forget(self, location: str | None = None) -> None:
        """Reconnect on the next call (the router rebooted or moved); ``location``: where it
        now announces its description (used unless ``gateway.url`` pins one)."""
        self._info = None
        if location and self.url is None:
            self._hint = location

    async def connect(self) -> GatewayInfo:
        if self._info is not None:
            return self._info
        location = self.url
        if location is None and self._hint is not None:
            hint, self._hint = self._hint, None
            try:
                return await self._connect_at(hint)
            except GatewayError as exc:
                log.info("router's announced IGD %s is not usable (%s): discovering", hint, exc)
        if location is None:
            # Our own SSDP search, not miniupnpc's: it only trusts a description URL on the
            # replying host or the default gateway (a hostile LAN device could otherwise point
            # us at any URL), unicasts to the gateway first and asks several search targets.
            from .soap import discover

            found = await discover(self.discover_timeout)
            if not found:
                raise GatewayNotFound(
                    f"no UPnP router answered SSDP discovery within {self.discover_timeout:g}s; "
                    "enable UPnP on the router, or set gateway.url to its description URL")
            location = found[0][0].location
        return await self._connect_at(location)

    async def _connect_at(self, location: str) -> GatewayInfo:
        info = await self._call("connect", lambda: self._connect_sync(location))
        self._info = info
        if not info.external_reachable and not self._warned_double_nat:
            self._warned_double_nat = True
            log.warning(
                "router's external address is %s: ports opened here are not reachable from the "
                "internet (double NAT or carrier-grade NAT)", info.external_address or "unknown"
            )
        log.info(
            "using %s at %s (external address %s, we are %s)",
            info.service_type or "IGD", info.location, info.external_address or "unknown",
            info.local_address,
        )
        return info

    def _connect_sync(self, location: str) -> GatewayInfo:
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
        try:
            external = str(u.externalipaddress() or "")
        except Exception:
            external = ""
        try:
            conn = str(u.connectiontype() or "")
        except Exception:
            conn = ""
        self._upnp = u
        service_type = ""
        self._v1 = False
        return GatewayInfo(
            protocol=self.protocol,
            location=location,
            local_address=str(u.lanaddr),
            external_address=external,
            service_type=service_type,
            server=f"miniupnpc ({conn})" if conn else "miniupnpc",
            notes=() if is_public_address(external) else ("external address not public",),
        )

    async def add(self, spec: MappingSpec, lease: int) -> Granted:
        u = await self._ready()

        def call() -> Granted:
            u.addportmapping(
                spec.external_port,
                spec.proto.value,
                spec.internal_client,
                spec.internal_port,
                spec.description,
                "",
                int(lease),
            )
            return Granted(spec.external_port, int(lease))

        return await self._call("AddPortMapping", call)

    async def delete(self, proto: Proto, external_port: int) -> None:
        u = await self._ready()

        def call() -> None:
            u.deleteportmapping(external_port, proto.value)

        await self._call("DeletePortMapping", call)

    async def get(self, proto: Proto, external_port: int) -> RouterMapping | None:
        u = await self._ready()

        def call() -> RouterMapping | None:
            r = u.getspecificportmapping(external_port, proto.value)
            if r is None:
                return None
            client, iport, desc, enabled, lease = r
            return RouterMapping(
                proto=proto,
                external_port=external_port,
                internal_client=str(client),
                internal_port=int(iport),
                description=str(desc),
                enabled=bool(int(enabled)) if str(enabled).isdecimal() else bool(enabled),
                lease_remaining=int(lease),
            )

        try:
            return await self._call("GetSpecificPortMappingEntry", call)
        except NoSuchMapping:
            return None

    async def list(self, limit: int = 4096) -> list[RouterMapping]:
        u = await self._ready()

        def call() -> list[RouterMapping]:
            out: list[RouterMapping] = []
            for i in range(limit):
                try:
                    r = u.getgenericportmapping(i)
                except Exception as exc:
                    if "specifiedarrayindexinvalid" in str(exc).lower().replace(" ", ""):
                        break
                    raise
                if r is None:
                    break
                eport, proto, (client, iport), desc, enabled, _rhost, lease = r
                p = Proto(str(proto).upper()) if str(proto).upper() in ("TCP", "UDP") else None
                if p is None:
                    continue
                out.append(
                    RouterMapping(
                        proto=p,
                        external_port=int(eport),
                        internal_client=str(client),
                        internal_port=int(iport),
                        description=str(desc),
                        enabled=str(enabled) not in ("0", "False"),
                        lease_remaining=int(lease),
                    )
                )
            return out

        return await self._call("GetGenericPortMappingEntry", call)

    async def _ready(self) -> Any:
        if self._info is None or self._upnp is None:
            await self.connect()
        return self._upnp

    async def close(self) -> None:
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
