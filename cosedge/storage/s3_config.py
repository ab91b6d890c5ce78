"""
The ``[storage]`` section: which store holds bucket objects, and for the S3
store, where it is and the keys it signs with.  Every error names the field.
"""

from __future__ import annotations

import configparser
import os
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from attrs import field, frozen

from ..config import Config, ConfigError, build_section

__all__ = ["StorageConfig", "access_keys", "check_config", "parse_storage"]

S3_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]\Z")
_REGION = re.compile(r"[a-z0-9-]+\Z")
#: S3's smallest part of a multipart upload (but the last), and its largest single PUT.
_MIN_PART = 5 * 1024 * 1024
_MAX_PUT = 5 * 1024 * 1024 * 1024


def _choice(*allowed: str) -> Any:
    def check(instance: object, attribute: Any, value: object) -> None:
        if value not in allowed:
            raise ConfigError(f"{attribute.name} must be {' or '.join(map(repr, allowed))}, not {value!r}")

    return check


def _string(instance: object, attribute: Any, value: object) -> None:
    if not isinstance(value, str):
        raise ConfigError(f"{attribute.name} must be a string, not {value!r}")


def _seconds(instance: object, attribute: Any, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ConfigError(f"{attribute.name} must be a positive number of seconds, not {value!r}")


def _not_negative(instance: object, attribute: Any, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ConfigError(f"{attribute.name} must be a number of seconds, 0 or more, not {value!r}")


def _bytes(instance: object, attribute: Any, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{attribute.name} must be a number of bytes, 0 or more, not {value!r}")


@frozen
class StorageConfig:
    """``[storage]``: where bucket objects live (``backend = "disk"``, the default, or ``"s3"``)."""

    backend: str = field(default="disk", validator=_choice("disk", "s3"))
    endpoint: str = field(default="", validator=_string)
    region: str = field(default="us-east-1", validator=_string)
    access_key_id: str = field(default="", validator=_string)
    secret_access_key: str = field(default="", validator=_string, repr=False)
    credentials_file: str = field(default="", validator=_string)
    addressing: str = field(default="path", validator=_choice("path", "virtual"))
    bucket: str = field(default="", validator=_string)
    #: Seconds a request to the store may take to be answered (a PUT: more, by its size).
    timeout: float = field(default=30.0, validator=_seconds)
    #: Seconds a small object, once opened, is answered again without asking the store (0: never).
    cache_validity: float = field(default=1.0, validator=_not_negative)
    #: Bytes of such objects kept at most, per process.
    cache_bytes: int = field(default=64 * 1024 * 1024, validator=_bytes)
    #: An object larger than this is stored with a multipart upload, in parts of ``multipart_part_size``.
    multipart_threshold: int = field(default=64 * 1024 * 1024, validator=_bytes)
    multipart_part_size: int = field(default=16 * 1024 * 1024, validator=_bytes)

    def __attrs_post_init__(self) -> None:
        if self.backend != "s3":
            return
        parts = urlsplit(self.endpoint)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
            raise ConfigError(
                f"endpoint must be the S3 gateway's http:// or https:// URL, like 'http://127.0.0.1:8333',"
                f" not {self.endpoint!r}"
            )
        if parts.query or parts.fragment or parts.username or parts.password:
            raise ConfigError("endpoint must be a plain URL (credentials go in access_key_id and secret_access_key)")
        try:
            parts.port  # noqa: B018  (raises on a bad port)
        except ValueError:
            raise ConfigError(f"endpoint has an invalid port: {self.endpoint!r}") from None
        for name in ("multipart_threshold", "multipart_part_size"):
            if not _MIN_PART <= getattr(self, name) <= _MAX_PUT:
                raise ConfigError(
                    f"{name} must be between 5 MiB (5242880) and 5 GiB (5368709120) bytes, not {getattr(self, name)!r}"
                )
        if not _REGION.match(self.region):
            raise ConfigError(f"region must be a region name like 'us-east-1', not {self.region!r}")
        if self.bucket and not S3_BUCKET.match(self.bucket):
            raise ConfigError(f"bucket {self.bucket!r} is not a valid S3 bucket name")
        if bool(self.access_key_id) != bool(self.secret_access_key):
            raise ConfigError("access_key_id and secret_access_key go together: set both, or neither")
        if self.access_key_id and self.credentials_file:
            raise ConfigError("set access_key_id and secret_access_key, or credentials_file, not both")


def parse_storage(extra: Mapping[str, Any]) -> StorageConfig:
    """The ``[storage]`` section of ``Config.extra``, validated (the default when absent)."""
    if "storage" not in extra:
        return StorageConfig()
    settings: StorageConfig = build_section(StorageConfig, extra["storage"], "storage")
    return settings


def access_keys(settings: StorageConfig, environ: Mapping[str, str]) -> tuple[str, str]:
    """The access key pair: from the section, its ``credentials_file``, or the environment."""
    if settings.access_key_id:
        return settings.access_key_id, settings.secret_access_key
    if settings.credentials_file:
        path = settings.credentials_file
        parser = configparser.ConfigParser(interpolation=None)
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
            parser.read_string(text if text.lstrip().startswith("[") else "[default]\n" + text, path)
        except (OSError, UnicodeDecodeError, configparser.Error) as e:
            raise ConfigError(f"[storage] credentials_file {path!r} cannot be read: {e}") from None
        for section in [parser["default"]] if parser.has_section("default") else parser.values():
            pair = [section.get(n) or section.get(f"aws_{n}") for n in ("access_key_id", "secret_access_key")]
            if pair[0] and pair[1]:
                return pair[0], pair[1]
        raise ConfigError(f"[storage] credentials_file {path!r} has no access_key_id and secret_access_key")
    key, secret = environ.get("AWS_ACCESS_KEY_ID"), environ.get("AWS_SECRET_ACCESS_KEY")
    if key and secret:
        return key, secret
    raise ConfigError(
        "[storage] backend = 's3' needs credentials: access_key_id and secret_access_key, credentials_file,"
        " or the AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY environment variables"
    )


def check_config(config: Config, environ: Mapping[str, str] | None = None) -> StorageConfig:
    """
    Validate ``[storage]`` (and, for the S3 store, its credentials and the
    bucket names it will use), so that a bad file is refused at start.

    :raises ConfigError: naming the section and the field.
    """
    settings = parse_storage(config.extra)
    if settings.backend == "s3":
        access_keys(settings, os.environ if environ is None else environ)
        for name in config.buckets if not settings.bucket else ():
            if not S3_BUCKET.match(name):
                raise ConfigError(
                    f"[buckets.{name}] is not a valid S3 bucket name (at most 63 characters):"
                    " set [storage] bucket to keep every bucket as a prefix of one store bucket"
                )
    return settings
