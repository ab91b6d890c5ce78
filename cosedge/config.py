"""
Configuration: frozen, validated values loaded from TOML.

A configuration is never mutated; a live change builds a new value (with
:func:`attrs.evolve`, which re-runs every validator) and swaps it in whole, so
a change is either applied completely or not at all.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import attrs
from attrs import evolve, field, frozen

from .addresses import ConfigError, Origin, parse_origin, valid_hostname
from .api.auth import ApiSettings, parse_api_section
from .rules import Rule, parse_rules, rule_table

_BUCKET = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,48}[a-z0-9])?-[0-9]{1,20}\Z")

__all__ = [
    "BucketConfig",
    "Config",
    "ConfigError",
    "FillConfig",
    "JobsConfig",
    "Origin",
    "ServerConfig",
    "default_config_text",
    "load_config",
    "build_section",
    "parse_config",
    "parse_origin",
    "validate_bucket_name",
]


def _optional_origin(value: object) -> Origin | None:
    if value is None or value == "":
        return None
    try:
        return parse_origin(value)
    except ConfigError as e:
        raise ConfigError(f"origin {e}") from None


def validate_bucket_name(name: object) -> str:
    """
    Check a COS bucket name: ``<name>-<appid>``, lowercase letters, digits and
    hyphens, e.g. ``example-1250000000``.
    """
    if not isinstance(name, str) or not _BUCKET.match(name):
        raise ConfigError(
            f"bucket name {name!r} is invalid: expected '<name>-<appid>' in lowercase"
            " letters, digits and '-', like 'example-1250000000'"
        )
    return name


def _check_origin_pull(instance: BucketConfig, attribute: object, value: bool) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"origin_pull must be true or false, not {value!r}")
    if value and instance.origin is None and not instance.rules:
        raise ConfigError("origin_pull cannot be enabled without an origin address or rules; set 'origin' first")


def _check_revalidate_after(instance: object, attribute: object, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ConfigError(f"revalidate_after must be zero (never) or a number of seconds, not {value!r}")


def _check_acl(instance: object, attribute: object, value: object) -> None:
    if value not in ("public-read", "private"):
        raise ConfigError(f"acl must be 'public-read' or 'private', not {value!r}")


def _rules(value: object) -> tuple[Rule, ...]:
    try:
        return parse_rules(value)
    except ConfigError as e:
        raise ConfigError(str(e) if str(e).startswith("rule") else f"rules: {e}") from None


@frozen
class BucketConfig:
    """
    One bucket: where its misses are pulled from, and whether they are.

    ``origin`` with ``origin_pull`` is the seed's one rule (a 302 to the
    origin and a background copy, for every key); ``rules`` are COS's origin
    rules (:mod:`cosedge.rules`).  A bucket with rules pulls by them unless
    ``origin_pull`` is set to false, the console's switch that turns every
    rule off.
    """

    origin: Origin | None = field(default=None, converter=_optional_origin)
    rules: tuple[Rule, ...] = field(default=(), converter=_rules)
    origin_pull: bool = field(
        default=attrs.Factory(lambda self: bool(self.rules), takes_self=True), validator=_check_origin_pull
    )
    #: ``"public-read"``: anyone may GET/HEAD objects; ``"private"``: only signed requests (``[api]``).
    acl: str = field(default="public-read", validator=_check_acl)
    #: Seconds after which a hit also revalidates its copy with the origin in the background (0: never).
    revalidate_after: float = field(default=0, validator=_check_revalidate_after)


#: A bucket's settings, by the names the file, the state file, the manhole
#: and the audit lines share: the one list code walks instead of naming them.
BUCKET_FIELDS: tuple[str, ...] = tuple(f.name for f in attrs.fields(BucketConfig))


def plain(value: object) -> object:
    """A setting's value as the state file and change lines keep it (an origin as its text, rules as tables)."""
    if isinstance(value, tuple) and value and isinstance(value[0], Rule):
        return [rule_table(r) for r in value]
    return value if value is None or isinstance(value, bool | int | float | str | tuple) else str(value)


def _positive(instance: object, attribute: Any, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ConfigError(f"{attribute.name} must be a positive number, not {value!r}")


def _non_negative(instance: object, attribute: Any, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ConfigError(f"{attribute.name} must be zero or a positive number, not {value!r}")


@frozen
class FillConfig:
    """Limits and deadlines for background fills from origins (seconds, bytes)."""

    max_concurrent: int = field(default=16, validator=_positive)
    max_queue: int = field(default=10_000, validator=_non_negative)
    connect_timeout: float = field(default=5.0, validator=_positive)
    header_timeout: float = field(default=30.0, validator=_positive)
    idle_timeout: float = field(default=30.0, validator=_positive)
    total_timeout: float = field(default=3600.0, validator=_positive)
    max_object_size: int = field(default=5 * 1024**3, validator=_non_negative)
    not_found_ttl: float = field(default=10.0, validator=_non_negative)
    retry_backoff: float = field(default=5.0, validator=_non_negative)
    #: Bytes per second an origin must average over ``min_rate_window`` seconds mid-body (0: no minimum).
    min_rate: int = field(default=1024, validator=_non_negative)
    min_rate_window: float = field(default=30.0, validator=_positive)
    #: Bounds on an origin's response headers: one line, all of them, how many.
    max_header_line: int = field(default=16 * 1024, validator=_positive)
    max_header_bytes: int = field(default=64 * 1024, validator=_positive)
    max_header_count: int = field(default=100, validator=_positive)
    #: Seconds an origin host that refused, timed out or answered 5xx is passed over (then probed with a HEAD).
    host_down_time: float = field(default=30.0, validator=_positive)


@frozen
class JobsConfig:
    """
    Backfill and verify jobs (:mod:`cosedge.jobs`): keys worked on at once
    by all jobs together (keep it below ``[fill] max_concurrent``, so that
    live misses keep their slots), jobs running at once, and each job's
    default rate (objects and bytes per second; 0: unlimited).
    """

    max_concurrent: int = field(default=4, validator=_positive)
    max_running: int = field(default=1, validator=_positive)
    rate_objects: float = field(default=0.0, validator=_non_negative)
    rate_bytes: int = field(default=0, validator=_non_negative)

    @max_concurrent.validator
    @max_running.validator
    @rate_bytes.validator
    def _whole(self, attribute: Any, value: object) -> None:
        if not isinstance(value, int):
            raise ConfigError(f"{attribute.name} must be a whole number, not {value!r}")


def _domains(value: object) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, list | tuple):
        raise ConfigError(f"domains must be a list of domain names, not {value!r}")
    out = []
    for d in value:
        if not isinstance(d, str) or not valid_hostname(d.lower()):
            raise ConfigError(f"domains: {d!r} is not a valid domain name")
        out.append(d.lower())
    if not out:
        raise ConfigError("domains must name at least one domain")
    return tuple(out)


def _listen(value: object) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, list | tuple):
        raise ConfigError(f"listen must be a list of endpoint strings, not {value!r}")
    if not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"listen entries must be non-empty endpoint strings: {value!r}")
    return tuple(value)


#: Listener kinds several processes can serve (:mod:`cosedge.workers`, :mod:`cosedge.adopted`).
_SHARED_KINDS = frozenset({"tcp", "tcp6", "ssl", "unix", "systemd"})
#: The most processes ``workers`` may ask for.
MAX_WORKERS = 64


def _usable_cpus() -> int:
    """The CPUs this process may run on (a container's cpuset, taskset), not all the host has."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def _workers(value: object) -> int:
    if value == "auto":
        return max(1, min(MAX_WORKERS, _usable_cpus()))
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_WORKERS:
        raise ConfigError(f'workers must be "auto" or a whole number from 1 to {MAX_WORKERS}, not {value!r}')
    return value


@frozen
class ServerConfig:
    """The bucket listener and where buckets live."""

    listen: tuple[str, ...] = field(default=("tcp:8080:interface=127.0.0.1",), converter=_listen)
    domains: tuple[str, ...] = field(default=("file.myqcloud.com",), converter=_domains)
    data_dir: str = field(default="var")
    #: ``"-"`` for standard output, a path for a file, ``""`` for no access log.
    access_log: str = field(default="-")
    #: Seconds a connection may sit idle (including while sending headers).
    request_timeout: float = field(default=60.0, validator=_positive)
    #: Processes serving the listeners (``"auto"``: one per CPU); needs a restart to change.
    workers: int = field(default=1, converter=_workers)
    #: Seconds a response may make no progress (the client reads nothing) before the connection is closed.
    send_timeout: float = field(default=60.0, validator=_positive)
    #: Client connections one process keeps at once; more are closed as they come (0: no limit).
    max_connections: int = field(default=4096, validator=_non_negative)

    @workers.validator
    def _check_shared_listeners(self, attribute: object, value: int) -> None:
        if value == 1:
            return
        for entry in self.listen:
            kind = entry.partition(":")[0]
            if kind not in _SHARED_KINDS:
                raise ConfigError(
                    f"listen entry {entry!r}: with workers = {value} every listener is shared between the processes,"
                    f" and a {kind}: listener cannot be; use tcp:, tcp6:, ssl:, unix: or systemd:, or workers = 1"
                )

    @data_dir.validator
    def _check_data_dir(self, attribute: object, value: object) -> None:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"data_dir must be a non-empty path, not {value!r}")

    @access_log.validator
    def _check_access_log(self, attribute: object, value: object) -> None:
        if not isinstance(value, str):
            raise ConfigError(f"access_log must be '-', '' or a path, not {value!r}")


def _buckets(value: object) -> Mapping[str, BucketConfig]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"buckets must be a table, not {value!r}")
    for name, bucket in value.items():
        validate_bucket_name(name)
        if not isinstance(bucket, BucketConfig):
            raise ConfigError(f"buckets.{name} must be a BucketConfig, not {bucket!r}")
    # A read-only snapshot: sorted for stable output, immutable so that a
    # config value cannot be changed behind the service's back.
    return _FrozenDict(sorted(value.items()))


class _FrozenDict(dict[str, BucketConfig]):
    """A dict that refuses mutation (hashable by identity)."""

    def _refuse(self, *args: object, **kwargs: object) -> None:
        raise TypeError("configuration is immutable; build a new Config with attrs.evolve")

    __setitem__ = __delitem__ = __ior__ = clear = pop = popitem = setdefault = update = _refuse  # type: ignore[assignment]
    __hash__ = object.__hash__  # type: ignore[assignment]

    def __reduce__(self) -> tuple[type, tuple[list[tuple[str, BucketConfig]]]]:
        # copy.deepcopy and pickle would otherwise rebuild it with __setitem__.
        return (type(self), (list(self.items()),))


@frozen
class Config:
    """The whole daemon configuration."""

    server: ServerConfig = ServerConfig()
    fill: FillConfig = FillConfig()
    buckets: Mapping[str, BucketConfig] = field(factory=dict, converter=_buckets)
    #: Sections owned by optional features (``manhole``, ``admin``), kept as
    #: plain tables and validated by the feature that reads them.
    extra: Mapping[str, Any] = field(factory=dict)
    #: The COS API's credentials (``[api]``); None: the API is off.
    api: ApiSettings | None = None
    jobs: JobsConfig = JobsConfig()

    def with_bucket(self, name: str, bucket: BucketConfig) -> Config:
        """A new config with bucket ``name`` added or replaced."""
        validate_bucket_name(name)
        return evolve(self, buckets={**self.buckets, name: bucket})

    def without_bucket(self, name: str) -> Config:
        """A new config without bucket ``name``."""
        return evolve(self, buckets={k: v for k, v in self.buckets.items() if k != name})


_SECTIONS = {"server": ServerConfig, "fill": FillConfig, "jobs": JobsConfig}
_EXTRA_SECTIONS = ("manhole", "admin", "log", "storage", "cluster")


def build_section(cls: type, table: object, where: str) -> Any:
    """
    Build the attrs class ``cls`` from the TOML table of section ``where``,
    refusing unknown settings; every error names the section.
    """
    if not isinstance(table, Mapping):
        raise ConfigError(f"[{where}] must be a table")
    known = {a.name for a in cls.__attrs_attrs__}  # type: ignore[attr-defined]
    unknown = sorted(set(table) - known)
    if unknown:
        raise ConfigError(f"[{where}] has unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    try:
        return cls(**table)
    except ConfigError as e:
        if str(e).startswith(f"[{where}]"):
            raise
        raise ConfigError(f"[{where}] {e}") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"[{where}] {e}") from None


def parse_config(data: Mapping[str, Any]) -> Config:
    """Build a :class:`Config` from a parsed TOML document."""
    unknown = sorted(set(data) - set(_SECTIONS) - {"buckets", "api", *_EXTRA_SECTIONS})
    if unknown:
        raise ConfigError(f"unknown section(s) {', '.join(unknown)}")
    sections = {name: build_section(cls, data.get(name, {}), name) for name, cls in _SECTIONS.items()}
    raw_buckets = data.get("buckets", {})
    if not isinstance(raw_buckets, Mapping):
        raise ConfigError('[buckets] must be a table of [buckets."<name>-<appid>"] sections')
    buckets = {}
    for name, table in raw_buckets.items():
        try:
            validate_bucket_name(name)
        except ConfigError as e:
            raise ConfigError(f"[buckets.{name}] {e}") from None
        buckets[name] = build_section(BucketConfig, table, f"buckets.{name}")
    api = parse_api_section(data["api"]) if "api" in data else None
    private = [name for name, bucket in buckets.items() if bucket.acl == "private"]
    if private and api is None:
        raise ConfigError(f"[buckets.{private[0]}] acl = 'private' needs an [api] section with credentials")
    extra = {}
    for name in _EXTRA_SECTIONS:
        if name in data:
            if not isinstance(data[name], Mapping):
                raise ConfigError(f"[{name}] must be a table")
            extra[name] = dict(data[name])
    return Config(buckets=buckets, extra=extra, api=api, **sections)


def default_config_text() -> str:
    """The embedded default configuration (the same as ``etc/cosedge.toml``)."""
    return resources.files("cosedge").joinpath("default.toml").read_text("utf-8")


def load_config(path: str | Path | None) -> Config:
    """
    Load the configuration from a TOML file, or the embedded default when
    ``path`` is ``None``.

    :raises ConfigError: naming the file and the field that is wrong.
    """
    if path is None:
        text, where = default_config_text(), "embedded default config"
    else:
        where = str(path)
        try:
            text = Path(path).read_text("utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{where}: cannot read: {e}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{where}: not valid TOML: {e}") from None
    try:
        return parse_config(data)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
