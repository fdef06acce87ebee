"""The IGD front used the hostile way in the double-NAT lab (the breaker's session): many
quick add/delete cycles from two clients at once (every inner DNAT rule and upstream mapping
goes away), a kill -9 in the middle of them and a restart (nothing stale once stopped)."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.lab.doublenat import DoubleNat, FrontServe, wait_until
from tests.lab.test_lab_front import (  # noqa: F401 - net, front: the fixtures
    front,
    natpmp_map,
    net,
    upnp_add,
)

pytestmark = pytest.mark.lab


def _cycles(lan: DoubleNat, client: int, ports: range, errors: list[str]) -> None:
    """Map and unmap each port at once, NAT-PMP and UPnP in turn."""
    for i, port in enumerate(ports):
        if i % 2:
            granted = natpmp_map(lan, client, port)
            p = lan.natpmpc(client, "-a", str(port), str(port), "udp", "0")
            if p.returncode != 0:
                errors.append(f"natpmpc delete {port}: {p.stdout}{p.stderr}")
        else:
            granted, out = upnp_add(lan, client, port, lease=0)
            p = lan.upnpc(client, "-d", str(granted or port), "UDP")
            if granted is None:
                errors.append(f"upnpc add {port}: {out}")
        if granted is None:
            errors.append(f"client {client} port {port}: not granted")


def test_quick_add_delete_cycles_from_two_clients_leave_no_rule(
        net: DoubleNat, front: Callable[..., FrontServe]) -> None:  # noqa: F811
    s = front()
    errors: list[str] = []
    threads = [threading.Thread(target=_cycles, args=(net, c, range(41000 + 100 * c,
                                                                    41006 + 100 * c), errors))
               for c in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors[:5]
    wait_until(lambda: not net.home_dnat() and not net.upstream(), 30,
               "every inner DNAT rule and upstream mapping to go", s.logtext)
    assert s.status()["front"]["mappings"] == []
    assert s.stop(signal.SIGTERM) == 0
    assert "Traceback" not in s.logtext()


def test_kill_9_mid_cycles_then_restart_and_stop_leave_nothing(
        net: DoubleNat, front: Callable[..., FrontServe],  # noqa: F811
        tmp_path: Path) -> None:
    s = front()
    errors: list[str] = []
    t = threading.Thread(target=_cycles, args=(net, 0, range(42000, 42020), errors))
    t.start()
    wait_until(lambda: bool(net.home_dnat()) or not t.is_alive(), 60,
               "a cycle's inner DNAT rule", s.logtext, step=0.02)
    s.stop(signal.SIGKILL)
    t.join(300)  # the rest of the cycles meet no front: refused, said by the clients
    s2 = FrontServe(net, tmp_path).start()
    try:
        assert natpmp_map(net, 1, 42100) == 42100  # the restarted front serves
        assert s2.stop(signal.SIGTERM) == 0
        assert "Traceback" not in s2.logtext()
    finally:
        s2.close()
    assert net.upstream() == []
    assert net.home_dnat() == []
    assert "igdtrigger_front" not in net.home_ruleset()
