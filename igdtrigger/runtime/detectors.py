"""The detectors of a running service: started (or put on standby), watched, replaced.

A detector that cannot run here is reported (``DetectorStatus.reason``) and its stand-in (the
socket table for conntrack) takes over; conntrack is reported active only once the kernel is
known to track the trigger flows (our nftables table, or this machine's own rules), and watched
every ``TRACKING_CHECK`` seconds: events lost or the table removed make it inactive again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from igdtrigger.core.errors import DetectionUnavailable
from igdtrigger.core.model import PortRange
from igdtrigger.detect.base import Detector
from igdtrigger.runtime import compose

if TYPE_CHECKING:
    from igdtrigger.runtime.compose import KernelTracking
    from igdtrigger.runtime.service import Service

__all__ = ["TRACKING_CHECK", "DetectorStatus", "Detectors"]

log = logging.getLogger("igdtrigger")

TRACKING_CHECK = 15.0  # our nftables table is checked (and conntrack's events counted) this often


@dataclass(slots=True)
class DetectorStatus:
    """``active``: the detector runs *and* can see what it is for; ``reason``: why not;
    ``detail``: what an active one's claim rests on (conntrack: the kernel tracks the flows)."""

    name: str
    active: bool
    reason: str = ""
    detail: str = ""


class Detectors:
    """The service's detectors and what is known of each (``status``); their tasks go into
    ``tasks`` (the service's, cancelled at its stop)."""

    def __init__(self, svc: Service, detectors: list[Detector], tracking: KernelTracking | None,
                 tasks: list[asyncio.Task[None]]) -> None:
        self.svc = svc
        self.detectors = detectors
        # makes the kernel track trigger flows for the conntrack detector (nfttrack.py); None:
        # not managed here (tests), the conntrack detector is then taken at its word
        self.tracking = tracking
        self.tracked_flows: int | None = None  # new trigger flows our nft counters saw
        self.detector_status: list[DetectorStatus] = []
        self.tasks = tasks
        self._events_at_start = 0  # conntrack events_seen when its visibility was established
        self._tracking_watched = False  # conntrack runs with a KernelTracking: check it
        # others following the flows detectors report (the IGD front): told to let go of them
        # when a flow-holding detector stops; each returns how many it let go
        self.on_release: list[Callable[[], int]] = []

    async def start(self) -> None:
        """Start every detector that can run here (or stand by), and the tracking watch."""
        for det in self.detectors:
            standby = getattr(det, "standby_for", "")
            if standby and any(st.name == standby and st.active for st in self.detector_status):
                self.detector_status.append(DetectorStatus(
                    det.name, False, f"standby: {standby} is active; this one stands in if "
                    f"{standby} stops or stops seeing flows"))
                continue
            if det.name == "conntrack" and self.tracking is not None:
                det.tracking_managed = True  # type: ignore[attr-defined]
            try:
                det.check()
            except DetectionUnavailable as exc:
                self.detector_status.append(DetectorStatus(det.name, False, str(exc)))
                if det.name == "process" and not any(r.process for r in self.svc.config.rules):
                    log.info("detector process idle: no rule names a process")
                    continue
                if not self.svc.config.detect.explicit and any(
                        getattr(d, "standby_for", "") == det.name for d in self.detectors):
                    # the default set: the socket table stands in, as it is meant to; one calm
                    # line (status and doctor carry the reason and the fix)
                    log.info("detector %s not available here; the socket table stands in "
                             "(`igdtrigger doctor` says why and how to enable it)", det.name)
                    continue
                log.warning(
                    "detector %s unavailable: %s; explicit activations (run, activate, API) "
                    "still work", det.name, exc
                )
                continue
            st = DetectorStatus(det.name, True)
            if det.name == "conntrack" and self.tracking is not None:
                st = await self._conntrack_visibility(det)
            self.detector_status.append(st)
            # a conntrack that cannot see flows yet still listens: they may come later
            self.tasks.append(asyncio.create_task(self._run_detector(det), name=det.name))
        if self._tracking_watched:
            self.tasks.append(asyncio.create_task(self._watch_tracking(), name="tracking"))
    def _front_tracks(self) -> bool:
        """The IGD front runs: its clients' flows to and from their mapped ports are use, and
        those ports are not known in advance, so the kernel must track every flow (issue 14:
        on a plain desktop nothing else makes it track)."""
        return self.svc.config.front.enabled

    def _tracked_ports(self) -> tuple[list[PortRange], list[PortRange]]:
        rules = self.svc.config.rules
        return ([r for rule in rules for r in rule.trigger],
                [r for rule in rules for r in rule.open])

    async def _conntrack_visibility(self, det: Detector) -> DetectorStatus:
        """Make the kernel track the trigger flows (or find out whether it does): conntrack
        is reported active only on that ground."""
        assert self.tracking is not None
        trigger, opened = self._tracked_ports()
        front = self._front_tracks()
        vis = await asyncio.to_thread(
            self.tracking.establish, trigger, opened,
            lambda proto, port: bool(self.svc.pipeline.engine.index.match(proto, port)),
            track_all=front)
        self._events_at_start = getattr(det, "events_seen", 0)
        self._tracking_watched = True
        if vis.seen:
            return DetectorStatus(det.name, True, detail=vis.text)
        if not trigger and not front:  # nothing to watch for: not a fault (rules for
            # run/activate/API only)
            log.info("detector conntrack idle: no rule has a trigger port")
        else:
            log.warning("detector conntrack: %s; the socket table stands in", vis.text)
        return DetectorStatus(det.name, False, vis.text)

    async def retrack(self) -> None:
        """The rules changed: load the nftables table again for their trigger ports."""
        if self.tracking is not None and self.tracking.enabled:
            await asyncio.to_thread(self.tracking.install, *self._tracked_ports(),
                                    track_all=self._front_tracks())

    async def _watch_tracking(self) -> None:
        """Keep our nftables table in place, count what it saw, and report conntrack active
        once it really sees flows (an event arrived), or inactive if tracking was lost."""
        assert self.tracking is not None
        tracking = self.tracking
        det = next(d for d in self.detectors if d.name == "conntrack")
        unannounced = 0  # consecutive checks where our counters saw trigger flows, events none
        while True:
            await asyncio.sleep(TRACKING_CHECK)
            st = next((s for s in self.detector_status if s.name == "conntrack"), None)
            if st is None or not any(t.get_name() == "conntrack" and not t.done()
                                     for t in self.tasks):
                continue  # not running (it stopped): nothing to vouch for
            if tracking.installed:
                counted = await asyncio.to_thread(tracking.check)
                if counted is not None:
                    self.tracked_flows = counted
                if not tracking.installed and st.active:  # removed, and cannot be put back
                    table = compose.tracking_table()
                    self._conntrack_blind(st, f"the kernel no longer tracks trigger flows: "
                                              f"nftables table {table} was removed and "
                                              f"{tracking.reason}")
                reported = getattr(det, "flows_reported", None)
                # the kernel counted trigger flows, conntrack announced none: events are lost
                # (nf_conntrack_events=0, a full socket buffer...). Two checks in a row, so
                # an event still in flight at the first is not mistaken for a lost one.
                unannounced = unannounced + 1 if (counted and reported == 0) else 0
                if unannounced >= 2 and st.active:
                    self._conntrack_blind(st, f"the kernel counted {counted} new trigger "
                                              "flow(s) but no conntrack event announced one "
                                              "(events lost or disabled: sysctl "
                                              "net.netfilter.nf_conntrack_events)")
                elif (not st.active and st.reason.startswith("the kernel counted")
                      and isinstance(reported, int) and reported > 0):
                    st.active, st.reason = True, ""
                    st.detail = f"conntrack announced {reported} trigger flow(s)"
            events = getattr(det, "events_seen", 0) - self._events_at_start
            if not st.active and st.reason.startswith("listening") and events > 0:
                st.active, st.reason = True, ""
                st.detail = f"conntrack events seen ({events} since start)"
                log.info("detector conntrack: %s", st.detail)

    def _conntrack_blind(self, st: DetectorStatus, reason: str) -> None:
        """conntrack stays subscribed but cannot be vouched for: say why; a stand-in runs."""
        st.active, st.detail, st.reason = False, "", reason
        log.warning("detector conntrack: %s; the socket table stands in", reason)
        self._start_standins("conntrack")

    async def _run_detector(self, det: Detector) -> None:
        try:
            await det.run(self.svc.observe)
        except asyncio.CancelledError:
            raise
        except DetectionUnavailable as exc:
            log.warning("detector %s stopped: %s", det.name, exc)
        except Exception:
            log.exception("detector %s crashed; explicit activations still work", det.name)
        for st in self.detector_status:
            if st.name == det.name:
                st.active = False
                st.reason = st.reason or "stopped (see log)"
        engine = self.svc.pipeline.engine
        if getattr(det, "holds_flows", False) and (released := engine.release_flows() + sum(
                release() for release in self.on_release)):
            log.warning("detector %s stopped: %d live flow(s) no longer hold their activations; "
                        "they close after their idle timeout unless seen again", det.name,
                        released)
            self.svc.wake()
        if self.svc.stopping:
            return
        self._start_standins(det.name)

    def _start_standins(self, name: str) -> None:
        """A stand-in waiting for detector ``name`` takes over."""
        for other in self.detectors:
            if getattr(other, "standby_for", "") != name:
                continue
            for st in self.detector_status:
                if st.name == other.name and not st.active and st.reason.startswith("standby"):
                    log.warning("detector %s takes over from %s", other.name, name)
                    st.active, st.reason = True, ""
                    self.tasks.append(asyncio.create_task(self._run_detector(other),
                                                           name=other.name))
