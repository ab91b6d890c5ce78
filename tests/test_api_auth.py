"""
COS request signatures (issue 12), checked against what the official SDK
signs: its Authorization header and its pre-signed URLs.
"""

from __future__ import annotations

import time
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlsplit

import pytest

from cosedge.addresses import ConfigError
from cosedge.api.auth import ApiSettings, SignatureProblem, find_signature, parse_api_section, verify

qcloud_cos = pytest.importorskip("qcloud_cos", reason="cos-python-sdk-v5 is in the test extra")
requests = pytest.importorskip("requests")

SID, KEY = "AKIDexample", "secret-key-0123"
DOMAIN = "example-1250000000.file.myqcloud.com"
SETTINGS = ApiSettings({SID: KEY, "AKIDother": "other-secret-9"}, None, 900.0)


def sdk_config(secret_key: str = KEY) -> object:
    return qcloud_cos.CosConfig(
        Domain=DOMAIN,
        IP="127.0.0.1",
        Port=8080,
        Scheme="http",
        SecretId=SID,
        SecretKey=secret_key,
        Region="ap-guangzhou",
    )


def signed_by_sdk(method: str, key: str, params: dict[str, str], headers: dict[str, str]) -> requests.PreparedRequest:
    """A request as the SDK sends it, signed by its own CosS3Auth."""
    request = requests.Request(method, f"http://127.0.0.1:8080/{key}", params=params, headers=headers).prepare()
    return qcloud_cos.cos_auth.CosS3Auth(sdk_config(), key, params)(request)


def check(request: requests.PreparedRequest, now: float | None = None, settings: ApiSettings = SETTINGS) -> str:
    parts = urlsplit(request.url)
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    headers = {k.lower(): v for k, v in request.headers.items()}
    auth = request.headers.get("Authorization", "").encode()
    signed = find_signature(auth, query)
    assert signed is not None
    return verify(settings, signed, request.method.encode(), unquote(parts.path), query, headers, now or time.time())


def test_the_sdks_signature_is_accepted_for_every_method_and_subresource() -> None:
    assert check(signed_by_sdk("GET", "a b/c.jpg", {}, {"Host": DOMAIN})) == SID
    assert check(signed_by_sdk("PUT", "", {"origin": ""}, {"Host": DOMAIN, "Content-MD5": "abc=="})) == SID
    assert check(signed_by_sdk("GET", "", {"prefix": "img/", "max-keys": "10"}, {"Host": DOMAIN})) == SID
    assert check(signed_by_sdk("DELETE", "k/é.txt", {}, {"Host": DOMAIN})) == SID


def test_a_pre_signed_url_is_accepted() -> None:
    client = qcloud_cos.CosS3Client(sdk_config())
    url = client.get_presigned_url(Bucket="example-1250000000", Key="a b/c.jpg", Method="GET")
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    signed = find_signature(None, query)
    assert signed is not None and signed.in_query
    # The SDK signs the URL's host name without its port; the Host header carries the port.
    host = f"{parts.hostname}:{parts.port}"
    assert verify(SETTINGS, signed, b"GET", unquote(parts.path), query, {"host": host}, time.time()) == SID


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ("wrong-key", "SignatureDoesNotMatch"),
        ("unknown-id", "InvalidAccessKeyId"),
        ("other-path", "SignatureDoesNotMatch"),
        ("other-header", "SignatureDoesNotMatch"),
        ("future", "RequestTimeTooSkewed"),
        ("expired", "AccessDenied"),
        ("algorithm", "AccessDenied"),
    ],
)
def test_every_wrong_signature_is_refused_with_cos_s_code(change: str, code: str) -> None:
    request = signed_by_sdk("GET", "k.jpg", {}, {"Host": DOMAIN})
    now = time.time()
    if change == "wrong-key":
        request = qcloud_cos.cos_auth.CosS3Auth(sdk_config("not-the-key"), "k.jpg", {})(request)
    elif change == "unknown-id":
        request.headers["Authorization"] = request.headers["Authorization"].replace(SID, "AKIDnobody")
    elif change == "other-path":
        request.url = request.url.replace("k.jpg", "x.jpg")
    elif change == "other-header":
        request.headers["Host"] = "other-1250000000.file.myqcloud.com"
    elif change == "future":
        now -= 20_000  # the signature starts far after the server's clock
    elif change == "expired":
        now += 20_000
    elif change == "algorithm":
        request.headers["Authorization"] = request.headers["Authorization"].replace("=sha1", "=md5")
    with pytest.raises(SignatureProblem) as e:
        check(request, now)
    assert e.value.code == code
    assert KEY not in e.value.message


def test_the_api_section_is_validated_and_reads_a_credentials_file(tmp_path: Path) -> None:
    keys = tmp_path / "api.keys"
    keys.write_text("# id key\nAKIDfile secret-in-file\n\n")
    settings = parse_api_section(
        {"credentials": [{"secret_id": SID, "secret_key": KEY}], "credentials_file": str(keys), "max_skew": 60}
    )
    assert settings.credentials == {SID: KEY, "AKIDfile": "secret-in-file"} and settings.max_skew == 60
    for table, message in (
        ({}, "needs credentials"),
        ({"credentials": [{"secret_id": SID}]}, "exactly secret_id and secret_key"),
        ({"credentials": [{"secret_id": SID, "secret_key": "short"}]}, "8 characters or more"),
        ({"credentials": [{"secret_id": SID, "secret_key": KEY}], "max_skew": 0}, "max_skew"),
        ({"credentials_file": str(tmp_path / "missing")}, "cannot read"),
        ({"credentials": [], "colour": 1}, "unknown setting(s) colour"),
    ):
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            parse_api_section(table)
    keys.write_text("one-field-only\n")
    with pytest.raises(ConfigError, match="line 1: expected 'secret_id secret_key'"):
        parse_api_section({"credentials_file": str(keys)})
