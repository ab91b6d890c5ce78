# ruff: noqa: F811 (the audit_lines fixture imported from tests.test_admin)
"""
The COS API on the bucket listener (issue 12), through a whole service as
``twistd cosedge`` builds it (on a MemoryReactorClock), with requests signed
by the official SDK's own signer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit
from xml.etree import ElementTree

import pytest
from twisted.internet.address import IPv4Address

from cosedge.admin.state import StateFile
from cosedge.config import ConfigError, load_config
from tests.helpers import RawResponse, _Transport, parse_response
from tests.test_admin import BUCKET, FILE_ORIGIN, Harness, audit_lines, toml_for  # noqa: F401 (a fixture)

qcloud_cos = pytest.importorskip("qcloud_cos", reason="cos-python-sdk-v5 is in the test extra")
requests = pytest.importorskip("requests")

SID, KEY = "AKIDapi", "api-secret-0123"
HOST = f"{BUCKET}.file.myqcloud.com"
API = f'\n[api]\ncredentials = [{{ secret_id = "{SID}", secret_key = "{KEY}" }}]\n'
ORIGIN_XML = (
    "<OriginConfiguration><OriginRule><RulePriority>1</RulePriority><OriginType>Redirect</OriginType>"
    "<OriginParameter><Protocol>HTTP</Protocol><HttpRedirectCode>301</HttpRedirectCode>"
    "<FollowRedirection>false</FollowRedirection></OriginParameter>"
    "<OriginInfo><HostInfo><HostName>www.example.com</HostName></HostInfo></OriginInfo></OriginRule>"
    "</OriginConfiguration>"
)


def api_harness(root: Path, bucket_extra: str = "") -> Harness:
    return Harness(root, bucket_extra + API)


def send(
    harness: Harness, method: str, path: str, *, key: str = KEY, body: bytes = b"", signed: bool = True, **headers: str
) -> RawResponse:
    """One request to the service's bucket listener, signed as the SDK signs it (``path`` may carry a query)."""
    parts = urlsplit(path)
    params = dict(parse_qsl(parts.query, keep_blank_values=True))
    prepared = requests.Request(method, f"http://127.0.0.1:8080{parts.path}", params=params, data=body or None,
                                headers={"Host": HOST, **headers}).prepare()  # fmt: skip
    if signed:
        config = qcloud_cos.CosConfig(
            Domain=HOST, IP="127.0.0.1", Port=8080, SecretId=SID, SecretKey=key, Region="ap-guangzhou"
        )
        prepared = qcloud_cos.cos_auth.CosS3Auth(config, parts.path.lstrip("/"), params)(prepared)
    target = urlsplit(prepared.url)
    lines = [f"{method} {target.path}{'?' + target.query if target.query else ''} HTTP/1.1"]
    lines += [f"{k}: {v}" for k, v in prepared.headers.items() if k.lower() not in ("connection", "content-length")]
    lines += [f"Content-Length: {len(body)}", "Connection: close"]
    raw = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8") + body
    protocol = harness.service.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = _Transport()
    transport.protocol = protocol
    protocol.makeConnection(transport)
    protocol.dataReceived(raw)
    return parse_response(transport.value())


def code(response: RawResponse) -> str | None:
    root = ElementTree.fromstring(response.body)
    assert root.findtext("Resource") and root.findtext("TraceId")  # what the SDK needs to read the error
    return root.findtext("Code")


def test_the_origin_api_puts_gets_and_deletes_rules_saved_and_audited(
    tmp_path: Path, audit_lines: list[dict[str, Any]]
) -> None:
    harness = api_harness(tmp_path)
    put = send(harness, "PUT", "/?origin", body=ORIGIN_XML.encode(), **{"Content-Type": "application/xml"})
    assert put.status == 200, put.body
    rules = harness.service.config.buckets[BUCKET].rules
    assert [(r.type, r.redirect_code) for r in rules] == [("redirect", 301)]
    assert StateFile(str(harness.state_file)).load().buckets[BUCKET]["rules"][0]["type"] == "redirect"
    assert [e["channel"] for e in audit_lines] == [f"api:{SID}"]
    got = send(harness, "GET", "/?origin")
    assert got.status == 200 and b"<OriginType>Redirect</OriginType>" in got.body
    assert b"<HttpRedirectCode>301</HttpRedirectCode>" in got.body
    assert send(harness, "GET", "/missing.jpg", signed=False).status == 301  # a miss follows the new rule
    assert send(harness, "DELETE", "/?origin").status == 204
    assert harness.service.config.buckets[BUCKET].rules == ()
    # Back to the file's origin, the seed's one rule, shown as a Proxy rule.
    assert b"<OriginType>Proxy</OriginType>" in send(harness, "GET", "/?origin").body
    assert FILE_ORIGIN.encode() in send(harness, "GET", "/?origin").body


def test_bad_origin_calls_change_nothing(tmp_path: Path) -> None:
    harness = api_harness(tmp_path)
    before = harness.service.config
    wrong = send(harness, "PUT", "/?origin", key="not-the-secret", body=ORIGIN_XML.encode())
    assert (wrong.status, code(wrong)) == (403, "SignatureDoesNotMatch")
    bad = send(harness, "PUT", "/?origin", body=ORIGIN_XML.replace("HTTP<", "GOPHER<").encode())
    assert bad.status == 400 and code(bad) in ("MalformedXML", "InvalidArgument") and b"Protocol" in bad.body
    digest = send(harness, "PUT", "/?origin", body=ORIGIN_XML.encode(), **{"Content-MD5": "AAAAAAAAAAAAAAAAAAAAAA=="})
    assert (digest.status, code(digest)) == (400, "BadDigest")
    unsigned = send(harness, "PUT", "/?origin", body=ORIGIN_XML.encode(), signed=False)
    assert (unsigned.status, code(unsigned)) == (403, "AccessDenied")
    assert harness.service.config is before and not harness.state_file.exists()


def test_listing_purge_head_and_what_is_not_implemented(tmp_path: Path) -> None:
    harness = api_harness(tmp_path)
    for key in ("a/1.txt", "a/2.txt", "a/b/3.txt", "c.txt"):
        path = harness.data_dir / BUCKET / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(key.encode())
    listing = ElementTree.fromstring(send(harness, "GET", "/?prefix=a/&delimiter=/").body)
    assert [k.text for k in listing.iter("Key")] == ["a/1.txt", "a/2.txt"]
    assert [p.findtext("Prefix") for p in listing.iter("CommonPrefixes")] == ["a/b/"]
    page = ElementTree.fromstring(send(harness, "GET", "/?max-keys=2").body)
    assert [k.text for k in page.iter("Key")] == ["a/1.txt", "a/2.txt"] and page.findtext("IsTruncated") == "true"
    rest = ElementTree.fromstring(send(harness, "GET", f"/?marker={page.findtext('NextMarker')}").body)
    assert [k.text for k in rest.iter("Key")] == ["a/b/3.txt", "c.txt"] and rest.findtext("IsTruncated") == "false"
    assert send(harness, "GET", "/", signed=False).status == 403  # unsigned listing: as before
    assert send(harness, "HEAD", "/", signed=False).status == 200  # the bucket exists
    assert send(harness, "DELETE", "/c.txt").status == 204
    assert not (harness.data_dir / BUCKET / "c.txt").exists()
    assert send(harness, "DELETE", "/a/1.txt", signed=False).status == 403
    for method, path in (("PUT", "/new.txt"), ("GET", "/?cors"), ("PUT", "/?lifecycle"), ("POST", "/k?uploads")):
        response = send(harness, method, path)
        assert (response.status, code(response)) == (501, "NotImplemented"), (method, path)


def test_a_private_bucket_needs_a_signature_or_a_pre_signed_url(tmp_path: Path) -> None:
    harness = api_harness(tmp_path, 'acl = "private"\n')  # into the bucket's table (toml_for's extra)
    (harness.data_dir / BUCKET).mkdir(parents=True, exist_ok=True)
    (harness.data_dir / BUCKET / "secret.txt").write_bytes(b"only for you")
    assert send(harness, "GET", "/secret.txt", signed=False).status == 403
    assert send(harness, "GET", "/secret.txt").body == b"only for you"
    client = qcloud_cos.CosS3Client(
        qcloud_cos.CosConfig(Domain=HOST, SecretId=SID, SecretKey=KEY, Region="ap-guangzhou")
    )
    url = urlsplit(client.get_presigned_url(Bucket=BUCKET, Key="secret.txt", Method="GET", Expired=60))
    assert send(harness, "GET", f"{url.path}?{url.query}", signed=False).body == b"only for you"
    assert send(harness, "HEAD", "/", signed=False).status == 403


def test_private_without_api_credentials_is_refused_at_load(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(toml_for(tmp_path / "data", 'acl = "private"\n'))
    with pytest.raises(ConfigError, match="acl = 'private' needs an \\[api\\] section"):
        load_config(config)
