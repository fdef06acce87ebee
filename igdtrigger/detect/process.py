"""Process detector: rules with ``process = ["eldenring.exe", "cs2"]`` hold while such a process
runs on this host (launcher stubs exit at once; the game lives on).

Each poll reports a :class:`ProcessSeen` with the watched names that are running now (lower
case); the engine keeps the rule's activation alive while they are, and lets it lapse
``idle_timeout`` after the last sighting.

Matching is by executable name, case-insensitive, with or without a directory: a watched
``eldenring.exe`` matches a Wine/Proton process whose ``argv[0]`` is
``Z:\\...\\Game\\eldenring.exe``, and ``cs2`` matches ``/home/u/.steam/.../cs2``. On Linux the
scan reads ``/proc/<pid>/comm`` (one small read per process; ``cmdline`` only when the 15-byte
``comm`` is a truncated prefix of a watched name, or a Wine loader's); elsewhere psutil's
``process_iter``. No privileges needed: other users' process names are readable too.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable

from igdtrigger.core.errors import DetectionUnavailable
from igdtrigger.core.model import ProcessSeen
from igdtrigger.detect.base import FlowSink

__all__ = [
    "COMM_LEN", "Matcher", "ProcessDetector", "default_scanner", "exe_name", "scan_family",
    "scan_proc", "scan_psutil",
]

log = logging.getLogger("igdtrigger.detect")

COMM_LEN = 15  # Linux truncates a task's comm to 15 bytes
# processes whose argv[0] names the real program (Wine/Proton run Windows games this way)
_LOADERS = {"wine", "wine64", "wine-preloader", "wine64-preloader", "wineserver"}


def exe_name(path: str) -> str:
    """The executable's file name from a path, POSIX or Windows style, lower case."""
    return path.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1].strip().lower()


class Matcher:
    """Which watched names a process (by comm/name and argv[0]) is."""

    def __init__(self, names: Iterable[str]) -> None:
        self.names = frozenset(exe_name(n) for n in names if n.strip())
        self.prefixes = {n[:COMM_LEN] for n in self.names if len(n) > COMM_LEN}

    def needs_cmdline(self, comm: str) -> bool:
        """Must ``comm`` be resolved through the command line (truncated names, interpreters)?"""
        return comm in self.prefixes or comm in _LOADERS

    def match(self, comm: str, argv0: str = "") -> str | None:
        """The watched name this process is (by ``comm``, else by ``argv0``'s executable name), or
        ``None``."""
        comm = comm.strip().lower()
        if comm in self.names:
            return comm
        if argv0:
            name = exe_name(argv0)
            if name in self.names:
                return name
        return None


def _pids(root: str) -> list[str]:
    try:
        with os.scandir(root) as entries:
            return [e.name for e in entries if e.name.isdecimal()]
    except OSError as exc:
        raise DetectionUnavailable(f"cannot list processes in {root}: {exc}") from None


def _proc_match(matcher: Matcher, root: str, pid: str, comm: str) -> str | None:
    """The watched name process ``pid`` (whose ``comm`` is known) is, reading its argv[0]
    only when the 15-byte comm cannot tell. Raises OSError when it is gone."""
    comm = comm.strip().lower()
    hit = matcher.match(comm)
    if hit is None and matcher.needs_cmdline(comm):
        with open(f"{root}/{pid}/cmdline", "rb") as fh:
            argv0 = fh.read(4096).split(b"\0", 1)[0].decode("utf-8", "replace")
        hit = matcher.match(comm, argv0)
    return hit


def scan_proc(matcher: Matcher, root: str = "/proc") -> set[str]:
    """Watched names running now, from procfs (Linux)."""
    found: set[str] = set()
    for pid in _pids(root):
        try:
            with open(f"{root}/{pid}/comm", "rb") as fh:
                hit = _proc_match(matcher, root, pid, fh.read().decode("utf-8", "replace"))
        except OSError:  # gone meanwhile, or a kernel thread
            continue
        if hit is not None:
            found.add(hit)
    return found


def scan_family(matcher: Matcher, ancestor: int, root: str = "/proc"
                ) -> tuple[set[str], set[str]]:
    """(watched names among ``ancestor``'s descendants, watched names anywhere), from procfs
    (Linux): one pass over ``/proc/<pid>/stat`` for the parent links."""
    parents: dict[int, int] = {}
    hits: dict[int, str] = {}
    for name in _pids(root):
        try:
            with open(f"{root}/{name}/stat", "rb") as fh:
                stat = fh.read(1024)
            fields = stat[stat.rfind(b")") + 2:].split()
            if fields[0] in (b"Z", b"X"):  # exited, not yet reaped
                continue
            parents[int(name)] = int(fields[1])
            comm = stat[stat.find(b"(") + 1:stat.rfind(b")")].decode("utf-8", "replace")
            hit = _proc_match(matcher, root, name, comm)
        except (OSError, ValueError, IndexError):  # gone meanwhile, or unreadable
            continue
        if hit is not None:
            hits[int(name)] = hit
    ours: set[str] = set()
    for pid, found in hits.items():
        seen: set[int] = set()
        p = parents.get(pid, 0)
        while p > 1 and p not in seen:
            if p == ancestor:
                ours.add(found)
                break
            seen.add(p)
            p = parents.get(p, 0)
    return ours, set(hits.values())


def scan_psutil(matcher: Matcher) -> set[str]:
    """Watched names running now, through psutil (macOS, Windows, BSD)."""
    import psutil  # a dependency only off Linux (pyproject), where this path runs

    found: set[str] = set()
    for proc in psutil.process_iter(["name", "cmdline"]):
        info = proc.info
        argv = info.get("cmdline") or []
        hit = matcher.match(str(info.get("name") or ""), str(argv[0]) if argv else "")
        if hit is not None:
            found.add(hit)
    return found


def default_scanner() -> Callable[[Matcher], set[str]]:
    """``/proc`` on Linux, psutil elsewhere."""
    return scan_proc if sys.platform.startswith("linux") else scan_psutil


class ProcessDetector:
    """Polls the process table for the executables the rules name."""

    name = "process"

    def __init__(self, names: Iterable[str], interval: float = 1.0, *,
                 scanner: Callable[[Matcher], set[str]] | None = None) -> None:
        self.matcher = Matcher(names)
        self.interval = interval
        self.scanner = scanner or default_scanner()
        self.polls = 0
        self.poll_seconds = 0.0  # CPU time spent scanning, all polls together
        self.running: frozenset[str] = frozenset()

    def check(self) -> None:
        """Raises ``DetectionUnavailable`` when no rule names a process or the process table is
        unreadable."""
        if not self.matcher.names:
            raise DetectionUnavailable("no rule names a process")
        try:
            self.scanner(self.matcher)
        except ImportError:
            raise DetectionUnavailable(
                "the process detector needs psutil on this platform (pip install psutil)"
            ) from None
        except DetectionUnavailable:
            raise
        except Exception as exc:
            raise DetectionUnavailable(f"cannot list processes: {exc}") from None

    def poll(self) -> ProcessSeen:
        """One scan: the watched names running now (starts and ends are logged, the scan's CPU
        time counted)."""
        t0 = time.thread_time()
        try:
            found = frozenset(self.scanner(self.matcher))
        finally:
            self.poll_seconds += time.thread_time() - t0
            self.polls += 1
        if found != self.running:
            for name in sorted(found - self.running):
                log.info("process %s is running", name)
            for name in sorted(self.running - found):
                log.info("process %s is gone", name)
        self.running = found
        return ProcessSeen(found)

    async def run(self, sink: FlowSink) -> None:
        """Poll every ``interval`` seconds, handing each scan to ``sink``; raises
        ``DetectionUnavailable`` after 10 failures in a row."""
        failures = 0
        while True:
            try:
                seen = await asyncio.to_thread(self.poll)
                failures = 0
                sink(seen)
            except DetectionUnavailable:
                raise
            except Exception as exc:
                failures += 1
                if failures >= 10:
                    raise DetectionUnavailable(f"process table unreadable: {exc}") from None
                log.debug("process poll failed: %s", exc)
            await asyncio.sleep(self.interval)
