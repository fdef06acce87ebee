"""``igdtrigger status`` and how an activation is shown (``status``, ``activate``): its ports
grouped by state, the lease the router granted, the countdown."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from igdtrigger.core.ports import compress_ports, format_duration

if TYPE_CHECKING:
    from igdtrigger.cli.client import Client

__all__ = ["cmd_status", "lease_text", "port_groups", "print_activation"]


def port_groups(ports: list[dict[str, Any]],
                 mappings: dict[tuple[str, str], dict[str, Any]], host: str,
                 ) -> list[tuple[str, list[str]]]:
    """An activation's ports as lines: ports with the same state and message together (an
    error shown once for all the ports it hit)."""
    groups: dict[str, list[str]] = {}
    for p in ports:
        port = str(p.get("port", "?"))
        m = mappings.get((port, host), {})
        state = str(p.get("state", "?"))
        ext = p.get("external_port")
        moved = ext is not None and str(ext) != port.rpartition("/")[2]
        extra = p.get("error") or (f"held by {p['held_by']}" if p.get("held_by") else "")
        if state == "active" and m:
            extra = lease_text(m).strip()  # "lease 1h00m (asked 2h00m)", "unverified ..."
        key = state + (f" (external port {ext})" if moved else "") + (
            f" - {extra}" if extra else "")
        groups.setdefault(key, []).append(port)
    return [(key, names) for key, names in groups.items()]


def print_activation(data: dict[str, Any],
                      mappings: dict[tuple[str, str], dict[str, Any]] | None = None,
                      indent: str = "") -> None:
    """Print one activation (``status``, ``activate``): a line with its state and countdown,
    then its ports grouped by state; ``mappings`` (by (port, host)) adds each lease."""
    ports = data.get("ports", [])
    opened = [p["port"] for p in ports if p.get("state") == "active"]
    state = data.get("state")
    expires = data.get("expires_in")
    hold = data.get("hold")
    if expires is None and hold:  # a live connection holds it
        when = (f"held by {hold}, closes {format_duration(float(data.get('ttl', 0)))} after "
                "they end")
    else:
        when = f"closes in {format_duration(float(expires or 0))}" + (f" ({hold})" if hold
                                                                         else "")
    if state == "self":
        line = (f"{data.get('rule')} for {data.get('host')}: mapped by that PC itself "
                f"({len(ports)} port(s)), {when} (id {data.get('id')})")
    else:
        line = (f"{data.get('rule')} for {data.get('host')}: {state}, "
                f"{len(opened)}/{len(ports)} port(s) open, {when} (id {data.get('id')})")
    print(indent + line)
    if data.get("message"):
        print(f"{indent}  {data['message']}")
    if state == "self":
        return
    for key, names in port_groups(ports, mappings or {}, str(data.get("host"))):
        print(f"{indent}  {compress_ports(names)}: {key}")


def cmd_status(args: argparse.Namespace, client: Callable[[], Client]) -> int:
    """``igdtrigger status``: the service's status, as text or ``--json``."""
    data = client().request("GET", "/api/v1/status")
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    gw = data["gateway"]
    state = "up" if gw["up"] else f"DOWN ({gw.get('error')})"
    print(f"igdtrigger {data['version']}  instance {data['instance']}  "
          f"up {format_duration(data['uptime'])}")
    print(f"gateway {state}: {gw.get('protocol') or '-'} at {gw.get('location') or '-'}; "
          f"external {gw.get('external_address') or 'unknown'}; we are "
          f"{gw.get('local_address') or 'unknown'}")
    for d in data["detectors"]:
        if d["active"]:
            detail = f" - {d['detail']}" if d.get("detail") else ""
            print(f"detector {d['name']}: active{detail}")
        else:
            print(f"detector {d['name']}: inactive - {d.get('reason') or 'stopped'}")
    for w in data["warnings"]:
        print(f"warning: {w}")
    holes = data.get("pinholes") or {}
    print(f"rules: {len(data['rules'])}   activations: {len(data['activations'])}   "
          f"mappings: {data['counts']['mappings_active']}"
          + (f"   ipv6 pinholes: {data['counts'].get('pinholes_active', 0)}"
             if holes.get("entries") else ""))
    by_port: dict[tuple[str, str], dict[str, Any]] = {}
    for m in data["mappings"]:
        by_port[(f"{m['protocol'].lower()}/{m['internal_port']}", m["internal_client"])] = m
    claimed: set[tuple[str, str]] = set()
    for a in data["activations"]:  # each with its ports, grouped, and its countdown
        print_activation(a, by_port, indent="  ")
        claimed.update((str(p.get("port")), str(a.get("host"))) for p in a.get("ports", []))
    rest = [m for key, m in by_port.items() if key not in claimed]
    if rest:  # being removed, or left by an earlier run
        print("  mappings of no live activation:")
        for m in rest:
            print(f"    {m['protocol'].lower()}/{m['external_port']} -> {m['internal_client']}:"
                  f"{m['internal_port']}  {m['state']}" + lease_text(m)
                  + (f"  {m['error']}" if "error" in m else ""))
    errors: dict[str, list[str]] = {}
    for h in holes.get("entries", []):
        name = f"ipv6 {h['proto'].lower()}/{h['port']} -> [{h['address']}]"
        errors.setdefault(f"{h['state']}" + (f"  {h['error']}" if "error" in h else ""),
                          []).append(name)
    for key, names in errors.items():
        print(f"  {', '.join(names)}  {key}")
    return 0


def lease_text(m: dict[str, Any]) -> str:
    """``  lease 1d (asked 1m)``: what the router granted, and what was asked when it differs;
    ``unverified`` for a mapping the router cannot show."""
    if m.get("state") != "active":
        return ""

    def lease(sec: int) -> str:
        return format_duration(sec) if sec else "permanent"

    out = f"  lease {lease(int(m.get('lease', 0)))}"
    asked = m.get("lease_asked")
    if asked is not None and asked != m.get("lease"):
        out += f" (asked {lease(int(asked))})"
    if m.get("verified") is False:
        out += "  unverified (the router cannot show it)"
    return out
