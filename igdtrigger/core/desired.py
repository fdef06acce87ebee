"""The mappings that should exist now, kept up to date as activations come and go. Pure.

Ports are owned first come, first served: when activations want the same external port, the
oldest (by creation, then sequence) holds it, as routers do it; a rule with
``share = "latest"`` lets its newest activation take the port from the same rule's older ones,
never from another rule's. Every activation of one rule wants the same ports, so the holder of
a port is decided among the *rules* opening it: the rule whose oldest activation is oldest
wins, and gives the port to that oldest activation (``first``) or to its newest (``latest``).

:class:`DesiredMap` keeps, per rule, its live activations in precedence order, and per port the
rules with live activations opening it (reference-counted: a port two rules share stays indexed
until neither has an activation). A change (an activation added, removed, or its host mapping the
ports itself) recomputes only the ports of that activation's rule: the cost of one change is
``rule ports x rules sharing each port``, independent of how many activations are live.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Mapping

from igdtrigger.core.activation import Activation, description_for, mapping_target
from igdtrigger.core.model import MappingKey, MappingSpec
from igdtrigger.core.rules import External, Rule, Share

__all__ = ["DesiredMap", "precedence", "waiting_for"]


def precedence(act: Activation) -> tuple[float, int]:
    """Older first: (created, seq). ``seq`` is unique per engine, so the order is total."""
    return (act.created, act.seq)


def waiting_for(act: Activation, desired: Mapping[MappingKey, MappingSpec]) -> set[str]:
    """Hosts that hold ports ``act`` wants in ``desired`` (empty when it holds all of them)."""
    holders: set[str] = set()
    for key in _keys(act.rule):
        spec = desired.get(key)
        if spec is not None and spec.internal_client != act.host:
            holders.add(spec.internal_client)
    return holders


class _Group:
    """One rule's live activations, oldest first: every one (for :meth:`DesiredMap.owner`), and
    those whose ports we map (not ``self_mapped``)."""

    __slots__ = ("all", "mapped", "rule")

    def __init__(self, rule: Rule) -> None:
        self.rule = rule
        self.all: list[Activation] = []
        self.mapped: list[Activation] = []

    def ends(self) -> tuple[Activation | None, Activation | None]:
        """What the rule's ports depend on: its oldest mapped activation (its precedence against
        other rules) and the one it gives its ports to (the oldest, or under ``latest`` the
        newest). A change that leaves both alone changes no port."""
        if not self.mapped:
            return (None, None)
        first = self.mapped[0]
        return (first, self.mapped[-1] if self.rule.share is Share.LATEST else first)


def _insert(acts: list[Activation], act: Activation) -> None:
    bisect.insort(acts, act, key=precedence)


def _discard(acts: list[Activation], act: Activation) -> None:
    i = bisect.bisect_left(acts, precedence(act), key=precedence)
    if i < len(acts) and acts[i] is act:
        del acts[i]


def _keys(rule: Rule) -> Iterator[MappingKey]:
    for rng in rule.open:
        for port in rng:
            yield MappingKey(rng.proto, port)


class DesiredMap:
    """Which activation holds each opened port, and the mapping spec it wants there.

    ``add``/``remove``/``set_mapped`` are called by the engine as activations change; ``specs``
    is the current ``{MappingKey: MappingSpec}`` (read-only for callers; ``snapshot`` copies it).
    """

    def __init__(self, tag: str) -> None:
        self.tag = tag
        # rule name -> its group (present while the rule has a live activation)
        self._groups: dict[str, _Group] = {}
        # port -> the groups of rules with live activations that open it (insertion-ordered)
        self._rules_at: dict[MappingKey, dict[str, _Group]] = {}
        self.specs: dict[MappingKey, MappingSpec] = {}
        self._holder: dict[MappingKey, Activation] = {}  # who holds each key in ``specs``

    def snapshot(self) -> dict[MappingKey, MappingSpec]:
        """A copy of the mappings that should exist now."""
        return dict(self.specs)

    def add(self, act: Activation) -> None:
        """A new live activation (or one restored)."""
        group = self._groups.get(act.rule.name)
        if group is None:
            group = self._groups[act.rule.name] = _Group(act.rule)
            for key in _keys(act.rule):
                self._rules_at.setdefault(key, {})[act.rule.name] = group
        _insert(group.all, act)
        if not act.self_mapped:
            before = group.ends()
            _insert(group.mapped, act)
            self._update(group, before)

    def remove(self, act: Activation) -> None:
        """A live activation ended (lapsed or deactivated)."""
        group = self._groups.get(act.rule.name)
        if group is None:
            return
        before = group.ends()
        _discard(group.all, act)
        _discard(group.mapped, act)
        if not group.all:
            del self._groups[act.rule.name]
            for key in _keys(act.rule):
                at = self._rules_at.get(key)
                if at is not None:
                    at.pop(act.rule.name, None)
                    if not at:
                        del self._rules_at[key]
        self._update(group, before)

    def set_mapped(self, act: Activation) -> None:
        """``act.self_mapped`` changed: its host maps the ports itself, or wants us to again."""
        group = self._groups.get(act.rule.name)
        if group is None:
            return
        before = group.ends()
        if act.self_mapped:
            _discard(group.mapped, act)
        else:
            _insert(group.mapped, act)
        self._update(group, before)

    def owner(self, key: MappingKey) -> Activation | None:
        """The activation holding ``key`` counting those whose host maps its ports itself (an
        inbound flow on that port is its use)."""
        return self._winner(key, mapped=False)

    def _winner(self, key: MappingKey, *, mapped: bool) -> Activation | None:
        best: list[Activation] | None = None
        best_rule: Rule | None = None
        for group in self._rules_at.get(key, {}).values():
            acts = group.mapped if mapped else group.all
            if acts and (best is None or precedence(acts[0]) < precedence(best[0])):
                best, best_rule = acts, group.rule
        if best is None or best_rule is None:
            return None
        return best[-1] if best_rule.share is Share.LATEST else best[0]

    def _update(self, group: _Group, before: tuple[Activation | None, Activation | None]) -> None:
        """Decide again every port ``group``'s rule opens, unless the change left the group's
        :meth:`_Group.ends` as they were ``before`` (then no port changes hands)."""
        after = group.ends()
        if after[0] is before[0] and after[1] is before[1]:
            return
        rule = group.rule
        for key in _keys(rule):
            act = self._winner(key, mapped=True)
            held = self._holder.get(key)
            if act is held:
                continue
            if act is None:
                del self._holder[key]
                del self.specs[key]
                continue
            self._holder[key] = act
            port = key.external_port
            client, iport = mapping_target(act, port)  # front: a client's own target
            self.specs[key] = MappingSpec(
                proto=key.proto, external_port=port, internal_client=client, internal_port=iport,
                description=description_for(act.rule.name, self.tag),
                external_any=act.rule.external is External.ANY)
