"""
The origin-rule commands of the ``edge`` façade: a bucket's COS origin rules
(:mod:`cosedge.rules`) shown, set, added, removed, and read or written as
COS's ``<OriginConfiguration>`` XML (:mod:`cosedge.cosxml`).

Rules are kept in the state file as the bucket's ``rules`` field (the list
of rule tables): like every live change they are validated first, saved,
applied to the next request and audited, or refused with nothing changed.

``origin_pull`` is COS's status switch.  Rules given to a bucket that could
not pull before (no origin and no rules) turn it on, unless an operator
switched it off; removing the last rule of a bucket without an origin turns
it off (nothing is left to pull from).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..config import ConfigError
from ..cosxml import rules_from_xml, rules_to_xml
from ..rules import Rule, RuleHost, parse_rule, parse_rules, rule_table
from .context import LiveAdmin
from .errors import AdminError
from .state import State
from .values import Message, Table

__all__ = ["RuleCommands"]

#: The columns of ``edge.rules()``; the rule's other non-default fields go into ``other``.
_SHOWN = ("priority", "type", "prefix", "suffix", "hosts", "standby", "protocol")


def _host(host: RuleHost) -> str:
    return str(host) if host.weight == 1 else f"{host} (weight {host.weight})"


def _value(value: object) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, dict):
        return ", ".join(f"{k}: {v}" for k, v in value.items())
    if isinstance(value, list):
        return ", ".join(map(str, value))
    return str(value)


def _row(rule: Rule) -> dict[str, Any]:
    other = {k: v for k, v in rule_table(rule).items() if k not in _SHOWN}
    return {
        "priority": rule.priority,
        "type": rule.type,
        "prefix": rule.prefix or None,
        "suffix": rule.suffix or None,
        "hosts": ", ".join(map(_host, rule.hosts)),
        "standby": ", ".join(map(str, rule.standby)) or None,
        "protocol": rule.protocol,
        "other": "; ".join(f"{k}={_value(v)}" for k, v in other.items()) or None,
    }


class RuleCommands:
    """The rule commands, mixed into :class:`~cosedge.admin.shell.Edge`."""

    _live: LiveAdmin

    def _bucket(self, bucket: object) -> str:
        raise NotImplementedError

    def _change(self, state: State, subject: str, note: str = "") -> Message:
        raise NotImplementedError

    def rules(self, bucket: str) -> Table:
        """
        The origin rules of ``bucket``, in priority order: priority, type,
        prefix, suffix, hosts (with weights), standby hosts, protocol, and
        the rule's other settings that differ from their defaults.
        """
        name = self._bucket(bucket)
        return Table(_row(rule) for rule in self._live.config.buckets[name].rules)

    def set_rules(self, bucket: str, rules: list[dict[str, Any]]) -> Message:
        """
        Replace the origin rules of ``bucket`` with ``rules``, a list of
        tables with the keys of the configuration file
        (``[{'priority': 1, 'type': 'mirror', 'hosts': ['www.example.com']}]``);
        ``[]`` removes them all.
        """
        name = self._bucket(bucket)
        return self._set_rules(name, self._parse("set_rules", name, lambda: parse_rules(rules)))

    def add_rule(self, bucket: str, rule: dict[str, Any]) -> Message:
        """Add one origin rule to ``bucket``; refused if its priority is taken."""
        name = self._bucket(bucket)
        new = self._parse("add_rule", name, lambda: (parse_rule(rule),))[0]
        current = self._live.config.buckets[name].rules
        for old in current:
            if old.priority == new.priority:
                raise AdminError(
                    f"add_rule refused for bucket {name}: rule priority {new.priority}: the priority is taken by"
                    f" its {old.type} rule for keys '{old.prefix}*{old.suffix}'; choose another, or"
                    f" edge.remove_rule({name!r}, {new.priority}) first; nothing changed"
                )
        return self._set_rules(name, self._parse("add_rule", name, lambda: parse_rules([*current, new])))

    def remove_rule(self, bucket: str, priority: int) -> Message:
        """Remove the origin rule of ``bucket`` with this priority."""
        name = self._bucket(bucket)
        current = self._live.config.buckets[name].rules
        if isinstance(priority, bool) or priority not in [r.priority for r in current]:
            have = ", ".join(str(r.priority) for r in current) or "none"
            raise AdminError(
                f"remove_rule refused: bucket {name} has no rule with priority {priority!r}"
                f" (its rules' priorities: {have}); nothing changed"
            )
        return self._set_rules(name, tuple(r for r in current if r.priority != priority))

    def rules_xml(self, bucket: str) -> Message:
        """The origin rules of ``bucket`` as COS ``<OriginConfiguration>`` XML (as ``GET Bucket origin`` gives)."""
        name = self._bucket(bucket)
        return Message(rules_to_xml(self._live.config.buckets[name].rules).decode("utf-8").rstrip("\n"))

    def set_rules_xml(self, bucket: str, xml: str | bytes) -> Message:
        """
        Replace the origin rules of ``bucket`` with those of a COS
        ``<OriginConfiguration>`` document (the body of ``PUT Bucket
        origin``); an element cosedge does not support is refused by name.
        """
        name = self._bucket(bucket)
        data = xml.encode("utf-8") if isinstance(xml, str) else xml
        return self._set_rules(name, self._parse("set_rules_xml", name, lambda: rules_from_xml(data)))

    # -- helpers --

    @staticmethod
    def _parse(call: str, name: str, parse: Callable[[], tuple[Rule, ...]]) -> tuple[Rule, ...]:
        try:
            parsed = parse()
        except ConfigError as e:
            raise AdminError(f"{call} refused for bucket {name}: {e}; nothing changed") from None
        return parsed

    def _set_rules(self, name: str, rules: tuple[Rule, ...]) -> Message:
        """Make ``rules`` the rules of bucket ``name``, with origin-pull switched as the module says."""
        bucket = self._live.config.buckets[name]
        switch = self._live.state.buckets.get(name, {}).get("origin_pull")
        state = self._live.state.with_fields(name, rules=[rule_table(r) for r in rules])
        notes = []
        if bucket.origin is None and not rules:
            if switch is True:  # nothing to pull from: the state's apply turns it off
                state = state.without_fields(name, "origin_pull")
        elif bucket.origin is None and not bucket.rules and switch is not False:
            state = state.with_fields(name, origin_pull=True)
        elif rules and not bucket.origin_pull:
            notes.append(
                f"origin-pull of {name} is off, so its rules do not apply yet;"
                f" turn it on with edge.enable_origin_pull({name!r})"
            )
        if rules and bucket.origin is not None and not bucket.rules:
            notes.append(f"the rules decide every miss: origin {bucket.origin} is used by none of them")
        return self._change(state, f"rules of {name}", "; ".join(notes))
