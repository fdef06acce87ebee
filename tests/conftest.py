"""Shared pytest configuration for the whole test suite (keep each section small)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import pytest

from tests.fakes import FakeClock
from tests.lab.netlab import REQUIRE_ENV, lab_available, lab_required

if TYPE_CHECKING:
    from tests.test_pmp_pcp import FakeRouter

# ---------------------------------------------------------------------------------------------
# `lab` marker: tests that need root, network namespaces and Debian's miniupnpd (tests/lab).
# On a laptop they skip with the reason; with IGDTRIGGER_REQUIRE_LAB=1 (CI) they FAIL instead,
# so a broken CI image cannot silently skip the ground-truth tests.
# ---------------------------------------------------------------------------------------------


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("lab") is None:
        return
    reason = lab_available()
    if reason is None:
        return
    if lab_required():
        pytest.fail(f"lab unavailable but {REQUIRE_ENV}=1: {reason}", pytrace=False)
    pytest.skip(f"lab unavailable: {reason}")


# ---------------------------------------------------------------------------------------------
# `router`: the small NAT-PMP + PCP server of test_pmp_pcp.py on 127.0.0.1 (also met by the
# router-truth tests).
# ---------------------------------------------------------------------------------------------


@pytest.fixture
async def router() -> AsyncIterator[FakeRouter]:
    from tests.test_pmp_pcp import FakeRouter

    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(FakeRouter,
                                                           local_addr=("127.0.0.1", 0))
    yield proto
    transport.close()


# ---------------------------------------------------------------------------------------------
# `clock`: a settable clock (tests/fakes.py, starts at 1000.0), one per test; the service, the
# engine and the fake router of a test share it when the test passes it to each.
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()
