"""The wrapped command's side of ``igdtrigger run``: spawning it, passing signals on, waiting
for it (and, with ``--wait-process``, for the game its launcher stub left behind).

- Signals sent to the wrapper alone are forwarded to the child; those the terminal sent to the
  whole foreground group are not repeated (Linux tells them apart by ``si_code``).
- The child's exit status comes back unchanged (128+N when signal N killed it).
- Imports nothing heavy: this is the launcher hook's start-up path.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

__all__ = [
    "FORWARDED",
    "SIGTIMEDWAIT",
    "ProcessWaiter",
    "become_subreaper",
    "exit_status",
    "pauser",
    "wait_forwarding",
]

# every signal whose default would end the wrapper (and leave its ports open) goes to the game
FORWARDED = ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGWINCH",
              "SIGALRM", "SIGPWR")


def _warn(message: str) -> None:
    print(f"igdtrigger: {message}", file=sys.stderr, flush=True)


_info = _warn  # the wrapper's only channel is stderr: the game owns stdout


def exit_status(returncode: int) -> int:
    """The shell's exit status for ``returncode``: 128+N when signal N killed the child."""
    return 128 - returncode if returncode < 0 else returncode


# Linux tells a signal sent to us alone (kill) from one the terminal sent to the whole
# foreground group (the child got that one itself) by its si_code, read with sigtimedwait.
SIGTIMEDWAIT = hasattr(signal, "sigtimedwait") and hasattr(signal, "pthread_sigmask")
# Without it (macOS): these come from the terminal to the whole group, so we do not repeat them;
# the others are forwarded by a plain handler.
_TTY_SIGNALS = ("SIGINT", "SIGQUIT", "SIGWINCH")


def wait_forwarding(child: subprocess.Popen[bytes], sigs: set[signal.Signals]) -> int:
    """Wait for the child, forwarding signals sent to us (not the tty's: it got those itself)."""
    if not SIGTIMEDWAIT:
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


def pauser(sigs: set[signal.Signals]) -> Callable[[float], bool]:
    """Sleep for ``s`` seconds; True if one of ``sigs`` arrived (time to stop waiting)."""
    if SIGTIMEDWAIT:  # the signals are still blocked: take them synchronously
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


def become_subreaper() -> bool:
    """Make this process the child subreaper (Linux ``PR_SET_CHILD_SUBREAPER``): what the
    wrapped command starts and leaves behind (a launcher stub's game) is re-parented here, so
    it stays our descendant. False where that is not possible."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes  # Linux only (prctl), and only when a child is spawned

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
        from igdtrigger.runtime.compose import process_scan  # `run` alone pays for it

        self.names = list(names)
        self.matcher, default_scan, scan_family = process_scan(list(names))
        self.scan = scan or default_scan
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
