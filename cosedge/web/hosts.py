"""Which bucket a request's Host names, under the configured domains."""

from __future__ import annotations

from ..config import Config

__all__ = ["BucketHosts"]

#: Host headers whose bucket is remembered, at most.
_MAX_HOSTS = 1024


class BucketHosts:
    """
    The bucket a Host header names (``<bucket>.<domain>``, any port, any
    case, a trailing dot), remembered per host: the answer depends only on
    the host and the configured domains, so the memory is dropped whole on
    any change of configuration.
    """

    def __init__(self) -> None:
        self._config: Config | None = None
        self._hosts: dict[bytes, str | None] = {}

    def bucket(self, host: bytes, config: Config) -> str | None:
        """The bucket ``host`` names under ``config``'s domains, or None."""
        if config is not self._config:
            self._config, self._hosts = config, {}
        try:
            return self._hosts[host]
        except KeyError:
            pass
        bucket = bucket_of(host, config.server.domains)
        if len(self._hosts) >= _MAX_HOSTS:  # hosts are the client's choice: stay bounded
            self._hosts.clear()
        self._hosts[host] = bucket
        return bucket


def bucket_of(host: bytes, domains: tuple[str, ...]) -> str | None:
    """The bucket ``host`` names under one of ``domains`` (the first label), or None."""
    name, _, port = host.rpartition(b":")
    if name and port.isdigit():
        host = name
    try:
        text = host.decode("ascii").lower().rstrip(".")
    except UnicodeDecodeError:
        return None
    for domain in domains:
        bucket, dot, rest = text.partition(".")
        if dot and rest == domain:
            return bucket
    return None
