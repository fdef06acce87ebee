"""Running the ``nft`` command: where it is, one invocation's result, and why it failed in
words a person can act on. Shared by the conntrack tracking table (detect/nfttrack) and the IGD
front's inner DNAT (front/dnat); no state."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = ["NftResult", "Runner", "find_nft", "nft_why", "run_nft"]

_NFT_PATHS = ("/usr/sbin/nft", "/sbin/nft", "/usr/bin/nft", "/bin/nft")

Runner = Callable[[Sequence[str], str], "NftResult"]
"""Runs ``argv`` with ``script`` on stdin (injectable for tests)."""


@dataclass(frozen=True, slots=True)
class NftResult:
    """What one ``nft`` invocation did: its exit status and output."""

    returncode: int
    stdout: str = ""
    stderr: str = ""


def find_nft() -> str | None:
    """The ``nft`` binary: on ``$PATH``, else in the usual sbin directories (a service's PATH
    may lack them)."""
    found = shutil.which("nft")
    if found:
        return found
    return next((p for p in _NFT_PATHS if os.access(p, os.X_OK)), None)


def run_nft(argv: Sequence[str], script: str) -> NftResult:
    """Run ``argv`` with ``script`` on stdin, at most 10 s; a missing binary or a timeout is
    status 127 with the reason as stderr (never raises)."""
    try:
        p = subprocess.run(list(argv), input=script, capture_output=True, text=True,
                           timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return NftResult(127, "", str(exc))
    return NftResult(p.returncode, p.stdout, p.stderr)


def nft_why(result: NftResult) -> str:
    """Why ``result`` failed, one sentence (a missing CAP_NET_ADMIN named as such)."""
    text = " ".join(result.stderr.split())[:300] or f"exit status {result.returncode}"
    if "Operation not permitted" in text or "Permission denied" in text:
        return ("not allowed to load nftables rules (needs CAP_NET_ADMIN: run as root or "
                "with AmbientCapabilities=CAP_NET_ADMIN)")
    return f"nft failed: {text}"
