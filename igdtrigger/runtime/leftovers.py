"""What a dead ``igdtrigger run`` left: found by its journal, or by its tag on the router.

A wrapper without a service maps the rule's ports itself (tag ``run<pid>`` in the description,
``igdtrigger <rule> run<pid>``) and journals them, with the same journal as the service, in
``<state_dir>/run/<pid>-<start>/`` (``<start>``: the process's start time in clock ticks since
boot, from ``/proc/<pid>/stat``, so a reused pid is not taken for the wrapper). A ``kill -9``
of the wrapper, on a router that only takes permanent leases, would leave those mappings
forever; the next ``run`` or ``serve`` on this machine removes them:

- ``dead_runs(state_dir)``: the journal directories of wrappers no longer running;
- ``take_over(journal, dirs)``: their mappings and pinholes move into the caller's journal (so
  a crash of the caller in between loses nothing), and the directories go;
- ``dead_run_tag(description)``: a router entry tagged by a wrapper that is not running (the
  mapper reclaims such an entry when it is to this host: ours, whatever its journal says).

Whether a wrapper runs is not judged by its pid alone: a service in a container (Docker with
the host's network, so the same LAN address on the router) has its own pid namespace, where a
live wrapper's pid is absent or another process's. So each wrapper holds a *beacon*, a Linux
abstract unix socket ``@igdtrigger/run/<pid>`` (``hold_beacon``): abstract sockets belong to
the network namespace, which is exactly what the wrapper and anything that shares its router
address have in common, and the kernel drops it when the wrapper dies, ``kill -9`` included. A
wrapper counts as dead only when nobody holds its beacon *and* this pid namespace does not show
it running either (a wrapper of an older igdtrigger, without a beacon).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
from pathlib import Path

from igdtrigger.runtime.journal import Journal

__all__ = ["RUN_DIR", "RUN_TAG", "beacon_held", "dead_run_tag", "dead_runs", "hold_beacon",
           "own_run_dir", "process_start", "remove_run_dir", "run_alive", "take_over"]

log = logging.getLogger("igdtrigger.runtime.leftovers")

RUN_DIR = "run"
RUN_TAG = "run"


def process_start(pid: int) -> str | None:
    """The process's start time (clock ticks since boot, field 22 of ``/proc/<pid>/stat``), or
    None where that cannot be read (no such process, not Linux)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, UnicodeDecodeError):
        return None
    fields = stat.rpartition(")")[2].split()
    return fields[19] if len(fields) > 19 else None


def _running(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def _beacon_name(pid: int) -> bytes:
    return f"\0igdtrigger/run/{pid}".encode()


def hold_beacon(pid: int | None = None) -> socket.socket | None:
    """Bind this wrapper's beacon (see the module docstring); keep the socket for as long as
    the wrapper holds mappings. None where it cannot be bound (not Linux, or a wrapper with the
    same pid in another pid namespace holds it: then that one's liveness covers the tag)."""
    if not hasattr(socket, "AF_UNIX"):  # pragma: no cover - not on Linux
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.bind(_beacon_name(os.getpid() if pid is None else pid))
    except OSError as exc:
        sock.close()
        log.debug("run beacon not held: %s", exc)
        return None
    return sock


def beacon_held(pid: int) -> bool | None:
    """Whether a live wrapper with this pid holds its beacon in this network namespace (True),
    nobody does (False), or this cannot be told here (None)."""
    if not hasattr(socket, "AF_UNIX"):  # pragma: no cover - not on Linux
        return None
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(_beacon_name(pid))
        except (ConnectionRefusedError, FileNotFoundError):
            return False
        except OSError:
            return None
    return True


def run_alive(pid: int, start: str) -> bool:
    """Is the wrapper that wrote ``<pid>-<start>`` still running? Its beacon answers for it
    in any pid namespace; else this namespace's ``/proc`` (a pid reused since is not it)."""
    if beacon_held(pid):
        return True
    if not _running(pid):
        return False
    now = process_start(pid)
    return now is None or start in ("", "0") or now == start


def own_run_dir(state_dir: Path) -> Path:
    """This process's journal directory under ``state_dir``."""
    pid = os.getpid()
    return state_dir / RUN_DIR / f"{pid}-{process_start(pid) or 0}"


def dead_runs(state_dir: Path) -> list[Path]:
    """Journal directories of wrappers that are not running any more."""
    try:
        entries = list((state_dir / RUN_DIR).iterdir())
    except OSError:
        return []
    out = []
    for d in entries:
        pid, sep, start = d.name.partition("-")
        if sep and pid.isdecimal() and start.isdecimal() and not run_alive(int(pid), start):
            out.append(d)
    return sorted(out)


def take_over(journal: Journal, dirs: list[Path]) -> int:
    """Move the mappings and pinholes journaled in ``dirs`` (dead wrappers') into ``journal``,
    then remove the directories. Returns how many mappings were taken over; the caller deletes
    them from the router (they are now its orphans). A directory that cannot be read is left."""
    count = 0
    for d in dirs:
        old = Journal.open(d)
        try:
            maps, holes = old.mappings(), old.pinholes()
        finally:
            old.close()
        if old.degraded and not maps and not holes:
            continue
        journal.mappings_copy(maps)  # their PCP nonces too: needed to delete them
        journal.pinholes_requested(holes)
        if maps or holes:
            log.info("taking over %d mapping(s) and %d pinhole(s) left by a dead igdtrigger "
                     "run (%s)", len(maps), len(holes), d.name)
        count += len(maps)
        with contextlib.suppress(OSError):
            shutil.rmtree(d)
    return count


def remove_run_dir(journal: Journal, run_dir: Path) -> None:
    """Close this wrapper's journal; its directory goes when nothing is left in it."""
    left = journal.mappings() or journal.pinholes()
    journal.close()
    if not left:
        with contextlib.suppress(OSError):
            shutil.rmtree(run_dir)


def dead_run_tag(description: str) -> bool:
    """True for ``igdtrigger <rule> run<pid>`` when no igdtrigger runs as ``<pid>`` now."""
    parts = description.strip().split(" ")
    if len(parts) != 3 or parts[0] != "igdtrigger" or not parts[2].startswith(RUN_TAG):
        return False
    pid = parts[2][len(RUN_TAG):]
    if not pid.isdecimal():
        return False
    if int(pid) == os.getpid() or beacon_held(int(pid)):
        return False
    if not _running(int(pid)):
        return True
    try:  # running here: is it still an igdtrigger run (not a process that got the pid since)?
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return not (any(b"igdtrigger" in a for a in args) and b"run" in args)
