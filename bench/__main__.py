"""igdtrigger benchmarks against a real router (Debian's miniupnpd in network namespaces).

    sudo .venv/bin/python -m bench [--quick] [--case NAME ...] [--trials N] [--json PATH]

Sets up the lab (LAN host, miniupnpd router, WAN host), runs every case, prints one table and
writes JSON (default bench/results/latest.json). Each case measures igdtrigger and its reference
in the same run, interleaved, and reports the ratio:

  trigger   trigger to open port: conntrack, API and wrapper paths vs one bare miniupnpc
            AddPortMapping (the floor); a script calling `upnpc -a` as the alternative
  range     a 200-port rule (100 TCP + 100 UDP) opened and closed through the service vs a bare
            miniupnpc loop; pre-check on/off, miniupnpc vs our SOAP backend; NAT-PMP pipelining
  ipv6      the same 200-port rule with IPv6 pinholes too (WANIPv6FirewallControl) vs the bare
            AddPinhole/DeletePinhole loop plus the bare miniupnpc loop; and vs IPv4 alone
  restart   router restart: time from miniupnpd answering again to all 200 mappings restored,
            vs a bare loop re-adding them
  idle      RSS and CPU of `igdtrigger serve` (100 rules, API, conntrack) with no traffic, vs a
            bare Python interpreter
  load      5,000 new non-matching flows/s from the LAN host: CPU of the service vs
            `conntrack -E` reading the same events; a matching flow in the middle still opens
  engine    (no lab) flow events matched per second with 1,000 rules and 10,000 activations vs
            a bare dict lookup; the cost of Engine.desired()
  hostile   (no lab) what a hostile LAN host can make the service hold: 150,000 forged trigger
            flows, tokenless POSTs again and again, a POST at the bound of live activations
  front     (double-NAT lab) a LAN app's NAT-PMP MAP through the IGD front (topology 1) to the
            first WAN packet at the app, vs the same request made on the ISP router itself

--quick runs fewer trials and shorter windows (under a minute in all).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from .common import ROOT, Bench, markdown, precompile, row, table

CASES = ["trigger", "range", "ipv6", "restart", "idle", "load", "engine", "detect", "hostile",
         "front"]
LAB_CASES = {"trigger", "range", "ipv6", "restart", "idle", "load", "front"}
# trigger: a LAN host with no firewall rule (the plain desktop): conntrack sees the trigger
# only through the nftables table the service loads itself
LAB_OPTIONS: dict[str, dict[str, Any]] = {"ipv6": {"ipv6": True},
                                          "trigger": {"lan_firewall": "none"}}


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="fewer trials, 10 s windows: the whole run in under a minute")
    ap.add_argument("--case", action="append", choices=CASES, metavar="NAME",
                    help=f"run only this case (repeatable): {', '.join(CASES)}")
    ap.add_argument("--trials", type=int, help="trials per measurement (default 30; quick 10)")
    ap.add_argument("--json", default=str(ROOT / "bench" / "results" / "latest.json"))
    ap.add_argument("--markdown", action="store_true", help="also print the table as Markdown")
    args = ap.parse_args()
    cases = [c for c in CASES if c in (args.case or CASES)]
    trials = args.trials or (10 if args.quick else 30)

    t0 = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="igdtrigger-bench-"))
    results: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    failed = False
    if LAB_CASES & set(cases):
        from tests.lab.netlab import lab_available

        reason = lab_available()
        if reason:
            print(f"bench needs the lab for {', '.join(sorted(LAB_CASES & set(cases)))}: "
                  f"{reason}", file=sys.stderr)
            return 2
    precompile(workdir)
    for name in cases:
        c0 = time.monotonic()
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        try:
            with contextlib.ExitStack() as stack:
                lab = None
                if name in LAB_CASES:
                    # a fresh lab per case: the router's nft cost per AddPortMapping grows with
                    # the operations done in its namespace, so no case inherits another's
                    from tests.lab.netlab import Lab

                    lab = stack.enter_context(Lab(**LAB_OPTIONS.get(name, {})))
                b = Bench(lab=lab, workdir=workdir / name, quick=args.quick, trials=trials)
                stack.callback(b.close)
                mod = importlib.import_module(f"bench.case_{name}")
                res = mod.run(b)
        except Exception as exc:
            failed = True
            traceback.print_exc()
            res = {"rows": [row(name, f"FAILED: {type(exc).__name__}: {exc}", None, "")],
                   "error": traceback.format_exc()}
        res["seconds"] = round(time.monotonic() - c0, 1)
        results[name] = res
        rows.extend(res["rows"])
        print(f"[bench] {name} done in {res['seconds']} s", file=sys.stderr, flush=True)
    if os.environ.get("BENCH_KEEP"):
        print(f"[bench] work dir kept: {workdir}", file=sys.stderr)
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    out = {
        "command": "python -m bench" + (" --quick" if args.quick else "")
        + "".join(f" --case {c}" for c in (args.case or []))
        + (f" --trials {args.trials}" if args.trials else ""),
        "machine": {"python": platform.python_version(), "kernel": platform.release(),
                    "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M:%S")},
        "seconds": round(time.monotonic() - t0, 1),
        "rows": rows,
        "cases": results,
    }
    print(table(rows))
    if args.markdown:
        print()
        print(markdown(rows))
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1, default=str) + "\n")
    print(f"JSON: {path}  ({out['seconds']} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
