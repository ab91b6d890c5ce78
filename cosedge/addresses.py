"""
Addresses and the configuration's error: what an origin host may be (the
seed document's rules: a domain name or an IPv4 address with an optional
port, never a scheme), shared by the bucket settings and the origin rules.
"""

from __future__ import annotations

import ipaddress
import re

from attrs import frozen

__all__ = ["ConfigError", "Origin", "parse_origin", "valid_hostname"]


class ConfigError(ValueError):
    """
    A configuration value is invalid.  The message names the field and says
    what is wrong with it, so an operator can fix it without reading code.
    """


# A DNS label: letters, digits and hyphens, not starting or ending with a hyphen.
# (``\Z``, not ``$``, which also matches before a trailing newline.)
_LABEL = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\Z")
_IPV4ISH = re.compile(r"^[0-9.]+$")


def valid_hostname(host: str) -> bool:
    if len(host) > 253:
        return False
    labels = host.split(".")
    if not all(_LABEL.match(label) for label in labels):
        return False
    # An all-numeric name that is not a valid IPv4 address (``999.1.1.1``,
    # ``10.10.10``) is a typo, not a domain: top-level domains are never numeric.
    return not labels[-1].isdigit()


@frozen
class Origin:
    """
    An origin server address as the seed document allows it: a domain name or
    an IPv4 address, optionally followed by ``:port``; never a scheme, path,
    query, user-info or whitespace.
    """

    host: str
    port: int = 80

    def __str__(self) -> str:
        return self.host if self.port == 80 else f"{self.host}:{self.port}"

    @property
    def netloc(self) -> bytes:
        """The authority as it goes into an ``http://`` URL."""
        return str(self).encode("ascii")


def parse_origin(value: object) -> Origin:
    """
    Parse and validate an origin address (``abc.example.com``,
    ``abc.example.com:8080``, ``10.10.10.10``, ``10.10.10.10:8080``).

    :raises ConfigError: with a message saying what is wrong.
    """
    if isinstance(value, Origin):
        return value
    if not isinstance(value, str):
        raise ConfigError(f"must be a string like 'abc.example.com:8080', not {value!r}")
    text = value
    hint = "expected a domain name or IPv4 address with an optional :port, like 'abc.example.com:8080'"
    if not text:
        raise ConfigError("is empty; " + hint)
    if "://" in text:
        raise ConfigError(f"{text!r} has a scheme; enter the address without 'http://'; " + hint)
    for bad, what in (("/", "a path"), ("?", "a query"), ("#", "a fragment"), ("@", "user-info")):
        if bad in text:
            raise ConfigError(f"{text!r} contains {what}; " + hint)
    if any(c.isspace() for c in text):
        raise ConfigError(f"{text!r} contains whitespace; " + hint)
    if text.startswith("[") or text.count(":") > 1:
        raise ConfigError(f"{text!r} looks like an IPv6 address, which is not supported; " + hint)
    host, sep, port_text = text.partition(":")
    port = 80
    if sep:
        if not port_text.isdigit() or not port_text.isascii() or len(port_text) > 5:
            raise ConfigError(f"{text!r} has an invalid port {port_text!r}; " + hint)
        port = int(port_text)
        if not 1 <= port <= 65535:
            raise ConfigError(f"{text!r} has port {port}, outside 1-65535; " + hint)
    host = host.lower()
    if not host.isascii():
        raise ConfigError(f"{text!r} is not ASCII; enter the punycode (xn--) form; " + hint)
    if _IPV4ISH.match(host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ConfigError(f"{text!r} is not a valid IPv4 address; " + hint) from None
    elif not valid_hostname(host):
        raise ConfigError(f"{text!r} is not a valid domain name or IPv4 address; " + hint)
    return Origin(host, port)
