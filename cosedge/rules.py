"""
Origin rules, as COS defines them (``PUT Bucket origin``): what a bucket does
about a missing key, per key prefix/suffix.

A :class:`Rule` is a frozen, validated value built from the table an operator
writes (the configuration file, the manhole's ``edge.set_rules``, the state
file), with the names those share::

    [[buckets."example-1250000000".rules]]
    priority = 1
    type = "mirror"          # "proxy" (302 + background copy), "mirror", "redirect"
    prefix = "images/"
    hosts = ["www.example.com", { host = "img2.example.com:8080", weight = 3 }]

Every error names the rule's priority and the field, so the bucket's section
(added by the caller) plus this message is enough to find the mistake.
:func:`rule_table` gives a rule back as such a table, with only the fields
that differ from their defaults.  What a rule *does* is the origin planner's
(:mod:`cosedge.origins`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any, Literal

import attrs
from attrs import field, frozen

from .addresses import ConfigError, parse_origin, valid_hostname

__all__ = ["MAX_RULES", "Rule", "RuleHost", "parse_rule", "parse_rules", "rule_table"]

#: Rules one bucket may have (COS allows 20 origin rules per bucket; we allow more).
MAX_RULES = 100
#: Hosts (and standby hosts) one rule may have.
MAX_HOSTS = 20
_TYPES = ("proxy", "mirror", "redirect")
_PROTOCOLS = ("http", "https", "follow")
_REDIRECT_CODES = (301, 302, 307)
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}\Z")
#: Headers a rule may neither pass nor set: they frame the request or name the origin.
_RESERVED = frozenset(
    {
        "host",
        "connection",
        "content-length",
        "transfer-encoding",
        "te",
        "trailer",
        "upgrade",
        "keep-alive",
        "proxy-connection",
        "expect",
        "range",
        "if-none-match",
        "if-modified-since",
        "if-match",
        "if-unmodified-since",
        "if-range",
        "accept-encoding",
        "x-cosedge-cluster",
        "x-cosedge-scheme",
    }
)
_MAX_TEXT = 1024


@frozen
class RuleHost:
    """One origin host of a rule: a domain name or IPv4 address, an optional port, a weight."""

    host: str
    port: int | None = None
    weight: int = 1

    def netloc(self, scheme: str) -> str:
        """``host[:port]``, the port left out when it is the scheme's default."""
        default = 443 if scheme == "https" else 80
        return self.host if self.port is None or self.port == default else f"{self.host}:{self.port}"

    def __str__(self) -> str:
        return self.host if self.port is None else f"{self.host}:{self.port}"


def _host(value: object, where: str, weighted: bool) -> RuleHost:
    if isinstance(value, RuleHost):
        return value
    weight: object = 1
    if isinstance(value, Mapping):
        extra = sorted(set(value) - ({"host", "weight"} if weighted else {"host"}))
        if extra:
            allowed = "host and weight" if weighted else "host"
            raise ConfigError(f"{where}: unknown key(s) {', '.join(map(str, extra))}; a host has {allowed}")
        weight = value.get("weight", 1)
        value = value.get("host")
    try:
        origin = parse_origin(value)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    if isinstance(weight, bool) or not isinstance(weight, int) or not 1 <= weight <= 100:
        raise ConfigError(f"{where}: weight must be a whole number from 1 to 100, not {weight!r}")
    explicit = isinstance(value, str) and ":" in value
    return RuleHost(origin.host, origin.port if explicit else None, weight)


def _hosts(value: object, name: str, weighted: bool) -> tuple[RuleHost, ...]:
    if isinstance(value, str | bytes) or not isinstance(value, list | tuple):
        raise ConfigError(f"{name} must be a list of hosts like ['www.example.com'], not {value!r}")
    if len(value) > MAX_HOSTS:
        raise ConfigError(f"{name} has {len(value)} hosts; at most {MAX_HOSTS}")
    hosts = tuple(_host(v, f"{name}[{i}]", weighted) for i, v in enumerate(value))
    seen = set()
    for h in hosts:
        if (h.host, h.port) in seen:
            raise ConfigError(f"{name}: host {h} is listed twice")
        seen.add((h.host, h.port))
    return hosts


def _text(value: object, name: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{name} must be a string, not {value!r}")
    if len(value) > _MAX_TEXT:
        raise ConfigError(f"{name} is {len(value)} characters long; at most {_MAX_TEXT}")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise ConfigError(f"{name} {value!r} contains a control character")
    return value


def _header_name(value: object, name: str) -> str:
    if not isinstance(value, str) or not _TOKEN.match(value):
        raise ConfigError(f"{name}: {value!r} is not a header name")
    if value.lower() in _RESERVED:
        raise ConfigError(f"{name}: {value} is set by cosedge itself and cannot be passed or set")
    return value.lower()


def _headers_pass(value: object) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, list | tuple):
        raise ConfigError(f"headers_pass must be a list of header names, not {value!r}")
    return tuple(_header_name(v, "headers_pass") for v in value)


def _headers_set(value: object) -> tuple[tuple[str, str], ...]:
    if isinstance(value, tuple) and all(isinstance(v, tuple) for v in value):
        value = dict(value)
    if not isinstance(value, Mapping):
        raise ConfigError(f"headers_set must be a table of header names and values, not {value!r}")
    out = []
    for k, v in value.items():
        header = _header_name(k, "headers_set")
        out.append((header, _text(v, f"headers_set.{k}")))
    return tuple(sorted(out))


def _choice(options: tuple[Any, ...]) -> Any:
    def check(instance: object, attribute: Any, value: object) -> None:
        if isinstance(value, bool) or value not in options:
            shown = ", ".join(repr(o) for o in options)
            raise ConfigError(f"{attribute.name} must be one of {shown}, not {value!r}")

    return check


def _flag(instance: object, attribute: Any, value: object) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{attribute.name} must be true or false, not {value!r}")


def _key_prefix(value: object) -> str | None:
    return None if value is None else _text(value, "key_prefix")


def _key_suffix(value: object) -> str | None:
    return None if value is None else _text(value, "key_suffix")


def _fixed_file(value: object) -> str | None:
    return None if value is None else _text(value, "fixed_file")


def _weighted_hosts(value: object) -> tuple[RuleHost, ...]:
    return _hosts(value, "hosts", True)


def _standby(value: object) -> tuple[RuleHost, ...]:
    return _hosts(value, "standby", False)


def _prefix(value: object) -> str:
    return _text(value, "prefix")


def _suffix(value: object) -> str:
    return _text(value, "suffix")


def _host_header(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not valid_hostname(value.lower()):
        raise ConfigError(f"host_header must be a domain name like 'www.example.com', not {value!r}")
    return value.lower()


def _ca_file(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ConfigError(f"ca_file must be the path of a PEM file of CA certificates, not {value!r}")
    try:
        with open(value, "rb") as f:
            head = f.read(1 << 20)
    except OSError as e:
        raise ConfigError(f"ca_file {value}: cannot read: {e.strerror or e}") from None
    if b"-----BEGIN CERTIFICATE-----" not in head:
        raise ConfigError(f"ca_file {value}: no PEM certificate in it (expected '-----BEGIN CERTIFICATE-----')")
    return os.path.abspath(value)


@frozen
class Rule:
    """One origin rule (see the module's docstring; every field is validated)."""

    priority: int = field()
    hosts: tuple[RuleHost, ...] = field(converter=_weighted_hosts)
    type: Literal["proxy", "mirror", "redirect"] = field(default="proxy", validator=_choice(_TYPES))
    prefix: str = field(default="", converter=_prefix)
    suffix: str = field(default="", converter=_suffix)
    standby: tuple[RuleHost, ...] = field(default=(), converter=_standby)
    protocol: Literal["http", "https", "follow"] = field(default="http", validator=_choice(_PROTOCOLS))
    follow_query_string: bool = field(default=True, validator=_flag)
    redirect_code: int = field(default=302, validator=_choice(_REDIRECT_CODES))
    follow_redirects: bool = field(default=False, validator=_flag)
    host_header: str | None = field(default=None, converter=_host_header)
    headers_pass: tuple[str, ...] = field(default=(), converter=_headers_pass)
    headers_set: tuple[tuple[str, str], ...] = field(default=(), converter=_headers_set)
    key_prefix: str | None = field(default=None, converter=_key_prefix)
    key_suffix: str | None = field(default=None, converter=_key_suffix)
    fixed_file: str | None = field(default=None, converter=_fixed_file)
    ca_file: str | None = field(default=None, converter=_ca_file)

    @priority.validator
    def _check_priority(self, attribute: object, value: object) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 10_000:
            raise ConfigError(f"priority must be a whole number from 1 to 10000, not {value!r}")

    def __attrs_post_init__(self) -> None:
        if not self.hosts:
            raise ConfigError("hosts must name at least one origin host")
        if self.fixed_file is not None:
            if not self.fixed_file.startswith("/") or "//" in self.fixed_file:
                raise ConfigError(f"fixed_file must be a path like '/index.html', not {self.fixed_file!r}")
            if self.key_prefix is not None or self.key_suffix is not None:
                raise ConfigError("fixed_file replaces the whole key; it cannot be combined with key_prefix/key_suffix")
        if self.key_suffix is not None and not self.suffix:
            raise ConfigError("key_suffix replaces the rule's suffix; set suffix too")
        if self.ca_file is not None and self.protocol == "http":
            raise ConfigError("ca_file applies to HTTPS origins; set protocol = 'https' or 'follow'")
        if self.type == "redirect" and (self.headers_pass or self.headers_set or self.host_header):
            raise ConfigError(
                "a redirect rule sends the client elsewhere; headers_pass, headers_set and host_header"
                " apply to proxy and mirror fetches only"
            )

    def matches(self, key: str) -> bool:
        """Whether this rule's conditions hold for ``key``."""
        return (
            len(key) >= len(self.prefix) + len(self.suffix)
            and key.startswith(self.prefix)
            and key.endswith(self.suffix)
        )

    def origin_path(self, key: str) -> str:
        """The key as the origin knows it, after this rule's rewrite (without the leading slash)."""
        if self.fixed_file is not None:
            return self.fixed_file[1:]
        if self.key_prefix is not None:
            key = self.key_prefix + key[len(self.prefix) :]
        if self.key_suffix is not None:
            key = key[: len(key) - len(self.suffix)] + self.key_suffix
        return key

    @property
    def label(self) -> str:
        """How logs and metrics name this rule: ``<priority>:<type>``."""
        return f"{self.priority}:{self.type}"


_FIELDS = tuple(a.name for a in attrs.fields(Rule))


def parse_rule(table: object) -> Rule:
    """A rule from its table; errors name the priority (when known) and the field."""
    if isinstance(table, Rule):
        return table
    where = "rule"
    if not isinstance(table, Mapping):
        raise ConfigError(f"a rule must be a table of settings, not {table!r}")
    if "priority" in table:
        where = f"rule priority {table['priority']!r}"
    unknown = sorted(set(map(str, table)) - set(_FIELDS))
    if unknown:
        raise ConfigError(f"{where}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(_FIELDS))}")
    for required in ("priority", "hosts"):
        if required not in table:
            raise ConfigError(f"{where}: {required} is required")
    try:
        return Rule(**table)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from None


def parse_rules(value: object) -> tuple[Rule, ...]:
    """A bucket's rules, sorted by priority; priorities must be unique."""
    if isinstance(value, str | bytes | Mapping) or not isinstance(value, list | tuple):
        raise ConfigError(f"rules must be a list of rule tables, not {value!r}")
    if len(value) > MAX_RULES:
        raise ConfigError(f"rules: {len(value)} rules; at most {MAX_RULES}")
    rules = sorted((parse_rule(r) for r in value), key=lambda r: r.priority)
    for a, b in zip(rules, rules[1:], strict=False):
        if a.priority == b.priority:
            raise ConfigError(f"rules: priority {a.priority} is used twice; each rule needs its own")
    return tuple(rules)


def _plain_host(host: RuleHost, weighted: bool) -> object:
    if weighted and host.weight != 1:
        return {"host": str(host), "weight": host.weight}
    return str(host)


def rule_table(rule: Rule) -> dict[str, Any]:
    """The rule as a table (JSON/TOML-able), with only the fields that differ from their defaults."""
    out: dict[str, Any] = {"priority": rule.priority, "type": rule.type}
    for a in attrs.fields(Rule):
        value = getattr(rule, a.name)
        if a.name in out or (a.default is not attrs.NOTHING and value == a.default):
            continue
        if a.name in ("hosts", "standby"):
            value = [_plain_host(h, a.name == "hosts") for h in value]
        elif a.name == "headers_set":
            value = dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[a.name] = value
    return out
