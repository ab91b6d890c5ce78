"""
COS request signatures (the ``q-sign-algorithm=sha1`` scheme of COS's API
and its SDKs), checked against the ``[api]`` credentials.

The client signs, with HMAC-SHA1 keyed by ``HMAC-SHA1(secret_key,
q-key-time)``, the string ``sha1\\n<q-sign-time>\\n<sha1 of HttpString>\\n``
where HttpString is the method (lower case), the decoded path, the signed
query parameters and the signed headers, each ``name=value`` percent-encoded,
lower-cased names, sorted, joined by ``&`` (``q-url-param-list`` and
``q-header-list`` name them).  The signature comes in the Authorization
header or, for a pre-signed URL, in the query string.

:func:`verify` recomputes it from the request as received: the signed
headers' values as sent, the signed query parameters as sent, so a request
changed on the way does not match.  Signatures are compared in constant time;
secrets are never logged or put into a message.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Mapping
from urllib.parse import parse_qsl, quote

from attrs import field, frozen

from ..addresses import ConfigError

__all__ = [
    "ApiSettings",
    "SignatureProblem",
    "Signed",
    "find_signature",
    "load_credentials_file",
    "parse_api_section",
    "verify",
]

_FIELDS = ("q-sign-algorithm", "q-ak", "q-sign-time", "q-key-time", "q-header-list", "q-url-param-list", "q-signature")
_MAX_CREDENTIALS = 10_000


class SignatureProblem(Exception):
    """A request whose signature does not hold: a COS error code and message."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message


@frozen
class ApiSettings:
    """The ``[api]`` section: credentials by secret id, and the clock skew allowed (seconds)."""

    credentials: Mapping[str, str] = field(factory=dict)
    credentials_file: str | None = None
    max_skew: float = 900.0


def _credential_pairs(value: object, where: str) -> dict[str, str]:
    if isinstance(value, str) or not isinstance(value, list | tuple):
        raise ConfigError(f"{where} must be a list of {{ secret_id = …, secret_key = … }} tables")
    out: dict[str, str] = {}
    for i, entry in enumerate(value):
        if not isinstance(entry, Mapping) or set(entry) != {"secret_id", "secret_key"}:
            raise ConfigError(f"{where}[{i}] must have exactly secret_id and secret_key")
        sid, key = entry["secret_id"], entry["secret_key"]
        if not isinstance(sid, str) or not sid or not sid.isprintable() or " " in sid:
            raise ConfigError(f"{where}[{i}].secret_id must be a non-empty string without blanks")
        if not isinstance(key, str) or len(key) < 8:
            raise ConfigError(f"{where}[{i}].secret_key (of {sid}) must be a string of 8 characters or more")
        if sid in out:
            raise ConfigError(f"{where}: secret_id {sid} is listed twice")
        out[sid] = key
    return out


def load_credentials_file(path: str) -> dict[str, str]:
    """``secret_id secret_key`` lines (``#`` comments and blank lines skipped)."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"[api] credentials_file {path}: cannot read: {e}") from None
    table = []
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        parts = text.split()
        if len(parts) != 2:
            raise ConfigError(f"[api] credentials_file {path} line {number}: expected 'secret_id secret_key'")
        table.append({"secret_id": parts[0], "secret_key": parts[1]})
    if len(table) > _MAX_CREDENTIALS:
        raise ConfigError(f"[api] credentials_file {path}: more than {_MAX_CREDENTIALS} credentials")
    return _credential_pairs(table, f"[api] credentials_file {path}")


def parse_api_section(table: object) -> ApiSettings:
    """The ``[api]`` table (credentials, credentials_file, max_skew), validated; the file read now."""
    if not isinstance(table, Mapping):
        raise ConfigError("[api] must be a table")
    unknown = sorted(set(table) - {"credentials", "credentials_file", "max_skew"})
    if unknown:
        raise ConfigError(
            f"[api] has unknown setting(s) {', '.join(unknown)}; known: credentials, credentials_file, max_skew"
        )
    credentials = _credential_pairs(table.get("credentials", []), "[api] credentials")
    path = table.get("credentials_file")
    if path is not None:
        if not isinstance(path, str) or not path:
            raise ConfigError("[api] credentials_file must be a path")
        for sid, key in load_credentials_file(os.path.abspath(path)).items():
            if sid in credentials:
                raise ConfigError(f"[api] secret_id {sid} is both in credentials and in credentials_file")
            credentials[sid] = key
    if not credentials:
        raise ConfigError("[api] needs credentials or a credentials_file with at least one secret_id")
    skew = table.get("max_skew", 900)
    if isinstance(skew, bool) or not isinstance(skew, int | float) or not 0 < skew <= 7 * 86400:
        raise ConfigError(f"[api] max_skew must be seconds from 1 to 604800, not {skew!r}")
    return ApiSettings(credentials, path, float(skew))


@frozen
class Signed:
    """The signature fields of a request, and where they came from."""

    fields: Mapping[str, str]
    #: In the query string (a pre-signed URL): the signature's own parameters are not signed.
    in_query: bool


def find_signature(authorization: bytes | None, query: Mapping[str, str]) -> Signed | None:
    """The signature of a request (Authorization header first, then the query string), or None."""
    if authorization:
        try:
            text = authorization.decode("ascii")
        except UnicodeDecodeError:
            raise SignatureProblem("AccessDenied", "The Authorization header is not ASCII.") from None
        if "q-sign-algorithm" in text:
            return Signed(dict(parse_qsl(text, keep_blank_values=True)), False)
    if "q-sign-algorithm" in query or "q-signature" in query:
        return Signed({k: v for k, v in query.items() if k in _FIELDS}, True)
    return None


def _encoded(pairs: Mapping[str, str]) -> str:
    return "&".join(f"{k}={v}" for k, v in sorted(pairs.items()))


def _quote(text: str) -> str:
    return quote(text.encode("utf-8"), safe="-_.~")


def _window(text: str, what: str) -> tuple[int, int]:
    start, sep, end = text.partition(";")
    if not sep or not start.isdigit() or not end.isdigit() or int(start) > int(end):
        raise SignatureProblem("AccessDenied", f"{what} must be '<start>;<end>' in seconds.")
    return int(start), int(end)


def verify(
    settings: ApiSettings,
    signed: Signed,
    method: bytes,
    path: str,
    query: Mapping[str, str],
    headers: Mapping[str, str],
    now: float,
) -> str:
    """
    Check ``signed`` for a request (``path``: decoded, with its leading
    slash; ``query``: decoded parameters; ``headers``: lower-cased names,
    values as received).  Returns the secret id.

    :raises SignatureProblem: ``AccessDenied`` (malformed, expired),
        ``InvalidAccessKeyId``, ``RequestTimeTooSkewed`` or
        ``SignatureDoesNotMatch``.
    """
    fields = signed.fields
    missing = [f for f in _FIELDS if f not in fields]
    if missing:
        raise SignatureProblem("AccessDenied", f"The signature lacks {', '.join(missing)}.")
    if fields["q-sign-algorithm"] != "sha1":
        raise SignatureProblem("AccessDenied", "Only q-sign-algorithm=sha1 is supported.")
    secret_id = fields["q-ak"]
    secret_key = settings.credentials.get(secret_id)
    if secret_key is None:
        raise SignatureProblem("InvalidAccessKeyId", "The access key Id you provided does not exist in our records.")
    start, end = _window(fields["q-sign-time"], "q-sign-time")
    _window(fields["q-key-time"], "q-key-time")
    if now + settings.max_skew < start:
        raise SignatureProblem(
            "RequestTimeTooSkewed", "The difference between the request time and the server's time is too large."
        )
    if now - settings.max_skew > end:
        raise SignatureProblem("AccessDenied", "Request has expired.")
    header_names = [n for n in fields["q-header-list"].split(";") if n]
    param_names = [n for n in fields["q-url-param-list"].split(";") if n]
    signed_headers: dict[str, str] = {}
    for name in header_names:
        value = headers.get(name)
        if value is None:
            raise SignatureProblem("AccessDenied", f"The signed header {name} is not in the request.")
        signed_headers[name] = value
    plain_query = {_quote(k).lower(): v for k, v in query.items()}
    signed_params: dict[str, str] = {}
    for name in param_names:
        if name not in plain_query:
            raise SignatureProblem("AccessDenied", f"The signed parameter {name} is not in the request.")
        signed_params[name] = _quote(plain_query[name])
    sign_key = hmac.new(secret_key.encode("utf-8"), fields["q-key-time"].encode("ascii"), hashlib.sha1).hexdigest()
    given = fields["q-signature"].encode("ascii", "replace")
    # The SDKs sign the host name without its port (``urlparse(url).hostname``)
    # while the Host header carries it when cosedge listens on another port.
    variants = [signed_headers]
    host = signed_headers.get("host", "")
    if ":" in host:
        variants.append({**signed_headers, "host": host.rsplit(":", 1)[0]})
    matched = False
    for variant in variants:
        encoded = {k: _quote(v) for k, v in variant.items()}
        http_string = f"{method.decode('ascii').lower()}\n{path}\n{_encoded(signed_params)}\n{_encoded(encoded)}\n"
        digest = hashlib.sha1(http_string.encode("utf-8")).hexdigest()
        to_sign = f"sha1\n{fields['q-sign-time']}\n{digest}\n"
        expected = hmac.new(sign_key.encode("ascii"), to_sign.encode("utf-8"), hashlib.sha1).hexdigest()
        matched |= hmac.compare_digest(expected.encode("ascii"), given)
    if not matched:
        raise SignatureProblem(
            "SignatureDoesNotMatch",
            "The request signature we calculated does not match the signature you provided.",
        )
    return secret_id
