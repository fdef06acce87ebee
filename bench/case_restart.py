"""Case 3, router restart recovery: from miniupnpd answering again to all 200 mappings restored.

The service holds a 200-port rule (100 TCP + 100 UDP, backend auto, default check_interval).
The router is restarted like a reboot (miniupnpd killed, its nft chains and lease file emptied,
started again); "back" is when it answers HTTP again (Lab.restart_router returns), "restored"
when its DNAT chain holds all 200 mappings again (read with nft, which costs miniupnpd nothing).

Reference, interleaved: the same restart with the service holding nothing, and a bare miniupnpc
loop on the LAN host re-adding the 200 mappings the moment the router is back: what a client that
knew instantly could do.
"""

from __future__ import annotations

import random
import time
from typing import Any

from .common import Bench, ServiceUnderTest, row, rule_toml, stats

NAME = "restart"
API_PORT = 8751
FIRST = 43000
COUNT = 100
PORTS: list[list[str | int]] = [["TCP", FIRST, FIRST + COUNT - 1],
                                ["UDP", FIRST, FIRST + COUNT - 1]]
N = 2 * COUNT
CHECK_INTERVAL = 2.0  # the service's default [gateway] check_interval
WANT = {(p, port) for p in ("TCP", "UDP") for port in range(FIRST, FIRST + COUNT)}


def _count(lab: Any) -> int:
    return sum(1 for proto, port, _c, _i in lab.nft_mappings() if (proto, port) in WANT)


def _wait_restored(lab: Any, t_back: float, timeout: float = 20.0) -> tuple[float, float]:
    """(first mapping seen, all seen), as seconds after t_back."""
    first = None
    deadline = t_back + timeout
    while time.monotonic() < deadline:
        n = _count(lab)
        now = time.monotonic()
        if n and first is None:
            first = now - t_back
        if n >= N:
            return first or 0.0, now - t_back
        time.sleep(0.002)
    raise RuntimeError(f"only {_count(lab)} of {N} mappings back after {timeout:g} s")


def run(b: Bench) -> dict[str, Any]:
    assert b.lab is not None
    lab = b.lab
    driver = b.agent("driver")
    rules = rule_toml("restart", ["udp/27998"], [f"tcp/{FIRST}-{FIRST + COUNT - 1}",
                                                f"udp/{FIRST}-{FIRST + COUNT - 1}"])
    svc = ServiceUnderTest(b, "restart", api_port=API_PORT, rules=rules, detect=False)
    rounds = 2 if b.quick else max(5, b.trials // 4)
    ours: list[float] = []
    detect: list[float] = []
    reapply: list[float] = []
    floor: list[float] = []
    act_id = ""
    rng = random.Random(7)

    def activate() -> str:
        out = driver.ask(op="range_api_open", api_port=API_PORT, rule="restart", count=N)
        return str(out["id"])

    try:
        for i in range(rounds):
            for mode in (("ours", "floor") if i % 2 == 0 else ("floor", "ours")):
                if mode == "ours":
                    act_id = activate()
                    # the restart lands anywhere in the service's check cycle, as in life
                    time.sleep(rng.uniform(0.0, CHECK_INTERVAL))
                    lab.restart_router(flush=True)
                    t_back = time.monotonic()
                    first, done = _wait_restored(lab, t_back)
                    ours.append(done)
                    detect.append(first)
                    reapply.append(done - first)
                    driver.ask(op="api", port=API_PORT, method="DELETE",
                               path=f"/api/v1/activations/{act_id}")
                    driver.ask(op="api_wait_empty", port=API_PORT)
                else:
                    lab.restart_router(flush=True)
                    t_back = time.monotonic()
                    driver.ask(op="add_many", ports=PORTS)
                    _first, done = _wait_restored(lab, t_back)
                    floor.append(done)
                    driver.ask(op="delete_many", ports=PORTS)
    finally:
        svc.stop()
    so, sf = stats(ours), stats(floor)
    fm = sf.get("median")
    om = so.get("median")
    rows = [
        row(NAME, "floor: bare loop re-adds 200 the moment the router is back", sf, "ms"),
        row(NAME, "service: router back -> all 200 mappings restored", so, "ms", ref="floor",
            ref_median=fm, ratio=None if not fm or om is None else om / fm,
            note=f"check_interval 2 s; detection {stats(detect).get('median', 0):.0f} ms + "
                 f"re-apply {stats(reapply).get('median', 0):.0f} ms (medians)", key=True),
        row(NAME, "service: router back -> first mapping re-applied (detection)", stats(detect),
            "ms"),
        row(NAME, "service: first -> last mapping re-applied", stats(reapply), "ms",
            ref="floor", ref_median=fm,
            ratio=None if not fm or not reapply else stats(reapply)["median"] / fm, key=True),
    ]
    return {"rows": rows, "detail": {"rounds": rounds, "ours_s": ours, "detect_s": detect,
                                     "reapply_s": reapply, "floor_s": floor}}
