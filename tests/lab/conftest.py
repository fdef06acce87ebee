"""Fixtures for the real-router lab (see tests/lab/README.md).

* ``lab``: a fresh lab per test (IGDv2, secure_mode on, one LAN host). Setup + teardown cost
  about 0.15 s, and every test starts from an empty router mapping table.
* ``make_lab(**options)``: build labs with other options (see ``Lab``); all are closed at the
  end of the test.

Both skip (or fail, with IGDTRIGGER_REQUIRE_LAB=1) when the lab cannot run here, even in tests
that forgot the ``lab`` marker.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Protocol

import pytest

from tests.lab.netlab import REQUIRE_ENV, Lab, cleanup_stale, lab_available, lab_required


@pytest.fixture(scope="session")
def _lab_session() -> None:
    reason = lab_available()
    if reason is not None:
        if lab_required():
            pytest.fail(f"lab unavailable but {REQUIRE_ENV}=1: {reason}", pytrace=False)
        pytest.skip(f"lab unavailable: {reason}")
    cleanup_stale()  # namespaces left behind by a crashed earlier run


@pytest.fixture
def make_lab(_lab_session: None) -> Iterator[Callable[..., Lab]]:
    labs: list[Lab] = []

    def factory(**options: Any) -> Lab:
        lab = Lab(**options)
        labs.append(lab)
        return lab.start()

    yield factory
    for lab in reversed(labs):
        lab.close()


@pytest.fixture
def lab(make_lab: Callable[..., Lab]) -> Lab:
    return make_lab()


class _Closable(Protocol):
    def close(self) -> None: ...


@pytest.fixture
def started() -> Iterator[list[_Closable]]:
    """Services a test started (``Serve`` objects): stopped at the end, whatever happened."""
    services: list[_Closable] = []
    yield services
    for s in services:
        s.close()
