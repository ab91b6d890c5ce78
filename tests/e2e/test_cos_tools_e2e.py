"""
COS tools against the real daemon (issue 12): the official
``cos-python-sdk-v5`` and ``coscmd``, as published, talking to ``twistd
cosedge`` on 127.0.0.1 — the origin API, signatures, listing, purge, hits,
private buckets and pre-signed URLs, and the COS error codes the tools see.

How the tools reach the daemon (the README's "Using COS tools with cosedge"):

- the SDK: ``CosConfig(Endpoint="file.myqcloud.com", IP="127.0.0.1",
  Port=<port>, Scheme="http", ...)``: the connection goes to IP:Port, the
  Host header and the signature name ``<bucket>.file.myqcloud.com``;
- ``coscmd``, which has no IP or port setting: ``endpoint =
  file.myqcloud.com`` and the daemon as its HTTP proxy (``http_proxy``):
  cosedge serves absolute-form request targets by their authority;
- a pre-signed URL names the bucket's domain (it is signed with that host):
  fetched here through the daemon as a proxy too.

The last tests cover cosedge bugs these tools found (each failed before its fix).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import requests

from .conftest import FAST_FILL, Daemon, _daemons_in_test, wait_for
from .origin import MisbehavingOrigin, body_for

qcloud_cos = pytest.importorskip("qcloud_cos", reason="cos-python-sdk-v5 is in the test extra")
pytest.importorskip("coscmd", reason="coscmd is in the test extra")
from qcloud_cos import CosConfig, CosS3Client, CosServiceError  # noqa: E402

pytestmark = pytest.mark.e2e

SID, KEY = "AKIDcosToolsE2E", "cos-tools-e2e-secret-0123456789"
WRONG_KEY = "not-the-secret-key-0000"
ENDPOINT = "file.myqcloud.com"
#: The origin API's bucket: no origin in the file, rules only through PUT ?origin.
RULES = "rules-1250000000"
#: Rules from the file, that refused calls must leave alone.
GUARDED = "guarded-1250000000"
#: No origin, no rules: what is stored is all there is.
PLAIN = "plain-1250000000"
#: acl = "private": object reads need a signature.
PRIVATE = "private-1250000000"

CONFIG = f"""
[api]
credentials = [{{ secret_id = "{SID}", secret_key = "{KEY}" }}]
max_skew = 900

[buckets."{RULES}"]

[buckets."{PLAIN}"]

[buckets."{PRIVATE}"]
acl = "private"

[[buckets."{GUARDED}".rules]]
priority = 1
type = "proxy"
prefix = "ok/"
hosts = ["{{origin}}"]
"""


def host(bucket: str) -> str:
    return f"{bucket}.{ENDPOINT}"


@pytest.fixture(scope="module")
def _tools_daemon(tmp_path_factory: pytest.TempPathFactory, origin: MisbehavingOrigin) -> Iterator[Daemon]:
    root = tmp_path_factory.mktemp("cosedge")
    daemon = Daemon(root, origin.netloc, dict(FAST_FILL), extra_config=CONFIG.replace("{origin}", origin.netloc))
    try:
        daemon.start()
        yield daemon
    finally:
        daemon.stop()


@pytest.fixture
def cos(_tools_daemon: Daemon) -> Iterator[Daemon]:
    """The module's daemon with [api] credentials (restarted if a test left it down); no errors logged."""
    if _tools_daemon.proc is None or _tools_daemon.proc.poll() is not None:
        _tools_daemon.proc = None
        _tools_daemon.start()
    _daemons_in_test.append(_tools_daemon)
    since = len(_tools_daemon.log())
    yield _tools_daemon
    assert _tools_daemon.problems(since) == [], "the daemon logged an unexpected error"
    assert KEY not in _tools_daemon.log() and KEY not in _tools_daemon.access_log.read_text(), "a secret was logged"


def sdk(daemon: Daemon, *, secret_id: str = SID, secret_key: str = KEY, anonymous: bool = False) -> CosS3Client:
    """The SDK addressing the daemon: IP/Port for the connection, Endpoint for the bucket's Host."""
    if anonymous:
        config = CosConfig(
            Endpoint=ENDPOINT, IP="127.0.0.1", Port=daemon.port, Scheme="http", Anonymous=True, Timeout=10
        )
    else:
        config = CosConfig(
            Endpoint=ENDPOINT,
            IP="127.0.0.1",
            Port=daemon.port,
            Scheme="http",
            SecretId=secret_id,
            SecretKey=secret_key,
            Timeout=10,
        )
    return CosS3Client(config, retry=0)  # no retries: a 5xx answer is the answer under test


def refused(call: Callable[[], object], status: int, code: str, *, has_body: bool = True) -> CosServiceError:
    """
    ``call`` raises the SDK's CosServiceError with ``status`` and ``code``;
    with a body (not a HEAD), the SDK read every element of it.
    """
    with pytest.raises(CosServiceError) as info:
        call()
    error = info.value
    assert (error.get_status_code(), error.get_error_code()) == (status, code), error.get_digest_msg()
    if has_body:
        assert error.get_request_id() not in ("", "Unknown") and error.get_trace_id() not in ("", "Unknown")
        assert error.get_resource_location() not in ("", "Unknown")
    return error


def store(daemon: Daemon, bucket: str, key: str, data: bytes) -> Path:
    """An object put straight into the daemon's data directory (a copied-in file is served)."""
    path = daemon.data_dir / bucket / key
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def read(response: dict[str, Any]) -> bytes:
    return bytes(response["Body"].get_raw_stream().read())


def origin_configuration(origin: str) -> dict[str, Any]:
    """
    Three rules in the SDK's dict form, written as GET ?origin gives them
    back (every value a string, every default spelled out).
    """
    return {
        "OriginRule": [
            {
                "RulePriority": "1",
                "OriginType": "Mirror",
                "OriginCondition": {"HTTPStatusCode": "404", "Prefix": "tools/"},
                "OriginParameter": {
                    "Protocol": "HTTP",
                    "FollowQueryString": "true",
                    "FollowRedirection": "true",
                    "HttpRedirectCode": "302",
                    "CopyOriginData": "true",
                },
                "OriginInfo": {
                    "HostInfo": {"HostName": origin, "Weight": "1"},
                    "FileInfo": {"PrefixConfiguration": {"Prefix": "tools/", "ReplacedWithPrefix": "ok/cos-tools/"}},
                },
            },
            {
                "RulePriority": "2",
                "OriginType": "Proxy",
                "OriginCondition": {"HTTPStatusCode": "404", "Prefix": "proxied/"},
                "OriginParameter": {
                    "Protocol": "HTTP",
                    "FollowQueryString": "false",
                    "HttpHeader": {
                        "FollowAllHeaders": "false",
                        "NewHttpHeaders": {"Header": {"Key": "x-from", "Value": "cosedge"}},
                    },
                    "FollowRedirection": "true",
                    "HttpRedirectCode": "302",
                    "CopyOriginData": "true",
                },
                "OriginInfo": {
                    "HostInfo": {"HostName": origin, "Weight": "1"},
                    "FileInfo": {
                        "PrefixConfiguration": {"Prefix": "proxied/", "ReplacedWithPrefix": "ok/cos-proxied/"}
                    },
                },
            },
            {
                "RulePriority": "3",
                "OriginType": "Redirect",
                "OriginCondition": {"HTTPStatusCode": "404", "Prefix": "moved/"},
                "OriginParameter": {
                    "Protocol": "HTTPS",
                    "FollowQueryString": "true",
                    "FollowRedirection": "false",
                    "HttpRedirectCode": "301",
                },
                "OriginInfo": {"HostInfo": {"HostName": "www.example.com", "Weight": "1"}},
            },
        ]
    }


# -- the origin API --


def test_put_get_follow_and_delete_the_origin_rules(cos: Daemon, origin: MisbehavingOrigin) -> None:
    client = sdk(cos)
    refused(lambda: client.get_bucket_origin(Bucket=RULES), 404, "NoSuchOriginConfiguration")
    rules = origin_configuration(origin.netloc)
    assert client.put_bucket_origin(Bucket=RULES, OriginConfiguration=rules) is None
    assert client.get_bucket_origin(Bucket=RULES) == rules
    assert f"rules of {RULES}: rule 1 added" in cos.log() and f"via api:{SID}" in cos.log()  # audited

    # A miss follows them: the mirror rule answers with the origin's bytes (its key rewritten) ...
    got = client.get_object(Bucket=RULES, Key="tools/sdk-mirror.bin")
    assert read(got) == body_for("/ok/cos-tools/sdk-mirror.bin")
    assert origin.gets("/ok/cos-tools/sdk-mirror.bin") == 1
    # ... the proxy rule with a 302 to the origin and a copy, then a local hit ...
    proxied = cos.request("/proxied/sdk-proxy.bin", host=host(RULES))
    assert proxied.status == 302
    assert proxied.header("location") == f"http://{origin.netloc}/ok/cos-proxied/sdk-proxy.bin"
    wait_for(lambda: cos.request("/proxied/sdk-proxy.bin", host=host(RULES)).status == 200, 10, "the proxy's copy")
    assert read(client.get_object(Bucket=RULES, Key="proxied/sdk-proxy.bin")) == body_for(
        "/ok/cos-proxied/sdk-proxy.bin"
    )
    # ... the redirect rule with its own code, scheme and host, and no copy.
    moved = cos.request("/moved/sdk-moved.bin", host=host(RULES))
    assert (moved.status, moved.header("location")) == (301, "https://www.example.com/moved/sdk-moved.bin")
    # No rule matches: no origin.
    refused(lambda: client.get_object(Bucket=RULES, Key="elsewhere/sdk.bin"), 404, "NoSuchKey")

    # Saved: a restarted daemon has them.
    cos.restart()
    client = sdk(cos)
    assert client.get_bucket_origin(Bucket=RULES) == rules

    assert client.delete_bucket_origin(Bucket=RULES) is None
    refused(lambda: client.get_bucket_origin(Bucket=RULES), 404, "NoSuchOriginConfiguration")
    refused(lambda: client.get_object(Bucket=RULES, Key="tools/sdk-after-delete.bin"), 404, "NoSuchKey")
    assert origin.gets("/ok/cos-tools/sdk-after-delete.bin") == 0


def test_an_invalid_origin_configuration_is_refused_naming_the_field_and_changes_nothing(
    cos: Daemon, origin: MisbehavingOrigin
) -> None:
    client = sdk(cos)
    before = client.get_bucket_origin(Bucket=GUARDED)
    bad = origin_configuration(origin.netloc)
    bad["OriginRule"][0]["OriginType"] = "Teleport"
    error = refused(lambda: client.put_bucket_origin(Bucket=GUARDED, OriginConfiguration=bad), 400, "InvalidArgument")
    assert "<OriginRule/OriginType>" in error.get_error_msg() and "nothing changed" in error.get_error_msg()
    unknown = origin_configuration(origin.netloc)
    unknown["OriginRule"][1]["OriginParameter"]["HTTPStandbyCode"] = {"StatusCode": "500"}
    error = refused(
        lambda: client.put_bucket_origin(Bucket=GUARDED, OriginConfiguration=unknown), 400, "InvalidArgument"
    )
    assert "HTTPStandbyCode> is not supported by cosedge" in error.get_error_msg()
    assert client.get_bucket_origin(Bucket=GUARDED) == before


# -- signatures --


def test_a_wrong_secret_is_refused_and_changes_nothing(cos: Daemon, origin: MisbehavingOrigin) -> None:
    good = sdk(cos)
    since = len(cos.log())
    before = good.get_bucket_origin(Bucket=GUARDED)
    assert [r["OriginInfo"]["HostInfo"]["HostName"] for r in before["OriginRule"]] == [origin.netloc]
    stored = store(cos, GUARDED, "kept/sdk-wrong-secret.txt", b"still here\n")
    wrong = sdk(cos, secret_key=WRONG_KEY)
    stranger = sdk(cos, secret_id="AKIDnobodyKnows")
    anonymous = sdk(cos, anonymous=True)
    new_rules = origin_configuration("127.0.0.1:9")
    for client, code in (
        (wrong, "SignatureDoesNotMatch"),
        (stranger, "InvalidAccessKeyId"),
        (anonymous, "AccessDenied"),
    ):
        refused(lambda c=client: c.put_bucket_origin(Bucket=GUARDED, OriginConfiguration=new_rules), 403, code)
        refused(lambda c=client: c.delete_bucket_origin(Bucket=GUARDED), 403, code)
        refused(lambda c=client: c.get_bucket_origin(Bucket=GUARDED), 403, code)
        refused(lambda c=client: c.delete_object(Bucket=GUARDED, Key="kept/sdk-wrong-secret.txt"), 403, code)
        refused(lambda c=client: c.list_objects(Bucket=GUARDED, Prefix="kept/"), 403, code)
    assert good.get_bucket_origin(Bucket=GUARDED) == before
    assert stored.read_bytes() == b"still here\n"
    assert f"of {GUARDED}" not in cos.log()[since:]  # no change audited


def test_signatures_outside_the_allowed_clock_skew_are_refused(cos: Daemon) -> None:
    """
    The SDK's own signer with its clock off: a signature that ended long ago
    (the SDK signs for 10,000 s) is AccessDenied "expired", one that starts
    an hour ahead is RequestTimeTooSkewed (max_skew is 900 s).
    """
    client = sdk(cos)
    now = time.time()
    with mock.patch("qcloud_cos.cos_auth.time.time", return_value=now - 20_000):
        error = refused(lambda: client.list_objects(Bucket=PLAIN), 403, "AccessDenied")
    assert "expired" in error.get_error_msg()
    with mock.patch("qcloud_cos.cos_auth.time.time", return_value=now + 3600):
        refused(lambda: client.list_objects(Bucket=PLAIN), 403, "RequestTimeTooSkewed")
    assert client.list_objects(Bucket=PLAIN, Prefix="no-such-prefix/")["IsTruncated"] == "false"


# -- reading and tidying a bucket --


def test_list_objects_pages_through_2500_keys_with_a_prefix(cos: Daemon) -> None:
    keys = [f"listing/k-{i:04d}.txt" for i in range(2500)]
    for key in keys:
        store(cos, PLAIN, key, key.encode())
    for decoy in ("listing-other/x.txt", "listinf.txt", "zz/listing/y.txt"):
        store(cos, PLAIN, decoy, b"decoy")
    client = sdk(cos)
    listed: list[str] = []
    pages: list[tuple[int, str]] = []
    marker = ""
    for _ in range(10):  # bounded: 3 pages expected
        page = client.list_objects(Bucket=PLAIN, Prefix="listing/", Marker=marker, MaxKeys=1000)
        contents = page.get("Contents", [])
        listed += [c["Key"] for c in contents]
        assert all(int(c["Size"]) == len(c["Key"]) for c in contents)
        pages.append((len(contents), page["IsTruncated"]))
        if page["IsTruncated"] != "true":
            break
        marker = page["NextMarker"]
    assert pages == [(1000, "true"), (1000, "true"), (500, "false")]
    assert listed == keys
    # Smaller pages, as the SDK's callers page: the same keys, in order, once each.
    listed, marker = [], ""
    for _ in range(20):
        page = client.list_objects(Bucket=PLAIN, Prefix="listing/k-24", Marker=marker, MaxKeys=7)
        listed += [c["Key"] for c in page.get("Contents", [])]
        if page["IsTruncated"] != "true":
            break
        marker = page["NextMarker"]
    assert listed == [k for k in keys if k.startswith("listing/k-24")]
    # A delimiter sums a folder up.
    top = client.list_objects(Bucket=PLAIN, Prefix="listing", Delimiter="/")
    assert [p["Prefix"] for p in top["CommonPrefixes"]] == ["listing-other/", "listing/"]
    assert "Contents" not in top


def test_listing_decodes_keys_the_sdk_asked_url_encoded(cos: Daemon) -> None:
    odd = ["odd/a b+c&d=e.txt", "odd/été/ü.txt", "odd/100%.txt"]
    for key in odd:
        store(cos, PLAIN, key, key.encode())
    client = sdk(cos)
    listed = client.list_objects(Bucket=PLAIN, Prefix="odd/")
    assert [c["Key"] for c in listed["Contents"]] == sorted(odd)
    for key in odd:
        assert read(client.get_object(Bucket=PLAIN, Key=key)) == key.encode()


def test_head_and_get_of_a_hit(cos: Daemon) -> None:
    data = os.urandom(50_000)
    store(cos, PLAIN, "hits/sdk-hit.bin", data)
    client = sdk(cos)
    head = client.head_object(Bucket=PLAIN, Key="hits/sdk-hit.bin")
    assert int(head["Content-Length"]) == len(data)
    assert head["ETag"] == client.list_objects(Bucket=PLAIN, Prefix="hits/")["Contents"][0]["ETag"]
    assert read(client.get_object(Bucket=PLAIN, Key="hits/sdk-hit.bin")) == data
    ranged = client.get_object(Bucket=PLAIN, Key="hits/sdk-hit.bin", Range="bytes=100-199")
    assert read(ranged) == data[100:200]
    # Reads of a public bucket need no signature.
    assert read(sdk(cos, anonymous=True).get_object(Bucket=PLAIN, Key="hits/sdk-hit.bin")) == data


def test_object_exists_of_a_missing_key_with_no_rule_is_false(cos: Daemon) -> None:
    client = sdk(cos)
    assert client.object_exists(Bucket=PLAIN, Key="missing/sdk-nothing.bin") is False
    store(cos, PLAIN, "missing/sdk-something.bin", b"x")
    assert client.object_exists(Bucket=PLAIN, Key="missing/sdk-something.bin") is True
    refused(lambda: client.get_object(Bucket=PLAIN, Key="missing/sdk-nothing.bin"), 404, "NoSuchKey")
    # A HEAD's 404 has no body: the SDK names it itself.
    refused(
        lambda: client.head_object(Bucket=PLAIN, Key="missing/sdk-nothing.bin"), 404, "NoSuchResource", has_body=False
    )
    assert client.head_bucket(Bucket=PLAIN) is not None
    refused(lambda: client.get_object(Bucket="nobody-1250000000", Key="a.txt"), 404, "NoSuchBucket")


def test_delete_object_purges(cos: Daemon, origin: MisbehavingOrigin) -> None:
    client = sdk(cos)
    path = store(cos, PLAIN, "purge/sdk-purged.txt", b"gone soon")
    assert read(client.get_object(Bucket=PLAIN, Key="purge/sdk-purged.txt")) == b"gone soon"
    client.delete_object(Bucket=PLAIN, Key="purge/sdk-purged.txt")
    assert not path.exists()
    assert client.object_exists(Bucket=PLAIN, Key="purge/sdk-purged.txt") is False
    client.delete_object(Bucket=PLAIN, Key="purge/sdk-purged.txt")  # again: nothing to do, no error
    # On a bucket with an origin, a purged key is fetched anew: a stale copy replaced.
    stale = store(cos, GUARDED, "ok/sdk-purge-stale.bin", b"stale")
    assert read(client.get_object(Bucket=GUARDED, Key="ok/sdk-purge-stale.bin")) == b"stale"
    client.delete_object(Bucket=GUARDED, Key="ok/sdk-purge-stale.bin")
    assert cos.request("/ok/sdk-purge-stale.bin", host=host(GUARDED)).status == 302
    wait_for(lambda: stale.exists() and stale.read_bytes() == body_for("/ok/sdk-purge-stale.bin"), 10, "the new copy")
    assert read(client.get_object(Bucket=GUARDED, Key="ok/sdk-purge-stale.bin")) == body_for("/ok/sdk-purge-stale.bin")


def test_what_cosedge_does_not_implement_answers_501_by_name(cos: Daemon) -> None:
    client = sdk(cos)
    store(cos, PLAIN, "nope/sdk-501.txt", b"x")
    calls: list[tuple[Callable[[], object], str]] = [
        (lambda: client.put_object(Bucket=PLAIN, Key="nope/sdk-put.txt", Body=b"data"), "PUT of an object"),
        (lambda: client.get_bucket_acl(Bucket=PLAIN), "?acl"),
        (lambda: client.get_object_acl(Bucket=PLAIN, Key="nope/sdk-501.txt"), "?acl"),
        (lambda: client.get_bucket_cors(Bucket=PLAIN), "?cors"),
        (lambda: client.list_objects_versions(Bucket=PLAIN), "?versions"),
        (lambda: client.create_multipart_upload(Bucket=PLAIN, Key="nope/sdk-mpu.bin"), "?uploads"),
        (lambda: client.delete_objects(Bucket=PLAIN, Delete={"Object": [{"Key": "nope/sdk-501.txt"}]}), "?delete"),
    ]
    for call, what in calls:
        error = refused(call, 501, "NotImplemented")
        assert what in error.get_error_msg()
    assert (cos.data_dir / PLAIN / "nope" / "sdk-501.txt").exists()
    assert not (cos.data_dir / PLAIN / "nope" / "sdk-put.txt").exists()


def test_three_ways_to_address_the_daemon(cos: Daemon) -> None:
    """Endpoint= (any bucket) or Domain= (one bucket) with IP=/Port=, or Endpoint= and the daemon as a proxy."""
    store(cos, PLAIN, "ways/sdk.txt", b"reached")
    clients = [
        sdk(cos),
        CosS3Client(
            CosConfig(Domain=host(PLAIN), IP="127.0.0.1", Port=cos.port, Scheme="http", SecretId=SID, SecretKey=KEY),
            retry=0,
        ),
        CosS3Client(
            CosConfig(
                Endpoint=ENDPOINT,
                Scheme="http",
                SecretId=SID,
                SecretKey=KEY,
                Proxies={"http": f"http://127.0.0.1:{cos.port}"},
            ),
            retry=0,
        ),
    ]
    for client in clients:
        assert read(client.get_object(Bucket=PLAIN, Key="ways/sdk.txt")) == b"reached"
        assert [c["Key"] for c in client.list_objects(Bucket=PLAIN, Prefix="ways/")["Contents"]] == ["ways/sdk.txt"]


# -- private buckets --


def test_a_private_bucket_refuses_an_unsigned_get_and_serves_a_presigned_url(cos: Daemon) -> None:
    store(cos, PRIVATE, "secret/sdk.txt", b"for signed eyes")
    refused(lambda: sdk(cos, anonymous=True).get_object(Bucket=PRIVATE, Key="secret/sdk.txt"), 403, "AccessDenied")
    assert cos.request("/secret/sdk.txt", host=host(PRIVATE)).status == 403
    client = sdk(cos)
    assert read(client.get_object(Bucket=PRIVATE, Key="secret/sdk.txt")) == b"for signed eyes"
    assert int(client.head_object(Bucket=PRIVATE, Key="secret/sdk.txt")["Content-Length"]) == 15
    refused(lambda: client.get_object(Bucket=PRIVATE, Key="secret/sdk-none.txt"), 404, "NoSuchKey")
    assert client.object_exists(Bucket=PRIVATE, Key="secret/sdk-none.txt") is False

    # A pre-signed URL names the bucket's domain (signed with it): fetched with the daemon as the proxy.
    signer = CosS3Client(CosConfig(Endpoint=ENDPOINT, Scheme="http", SecretId=SID, SecretKey=KEY))
    url = signer.get_presigned_url(Bucket=PRIVATE, Key="secret/sdk.txt", Method="GET", Expired=300)
    assert url.startswith(f"http://{host(PRIVATE)}/secret/sdk.txt?q-sign-algorithm=sha1&")
    proxies = {"http": f"http://127.0.0.1:{cos.port}"}
    got = requests.get(url, proxies=proxies, timeout=10)
    assert (got.status_code, got.content) == (200, b"for signed eyes")
    assert requests.head(url, proxies=proxies, timeout=10).status_code == 403  # signed for GET
    for forged in (
        url.split("?", 1)[0],  # no signature
        url.replace("secret/sdk.txt", "secret/other.txt"),  # another key
        url.replace("q-signature=", "q-signature=0"),  # tampered
    ):
        assert requests.get(forged, proxies=proxies, timeout=10).status_code == 403
    # An expired one.
    with mock.patch("qcloud_cos.cos_auth.time.time", return_value=time.time() - 3600):
        old = signer.get_presigned_url(Bucket=PRIVATE, Key="secret/sdk.txt", Method="GET", Expired=60)
    assert requests.get(old, proxies=proxies, timeout=10).status_code == 403
    # From a client with IP=, the URL names 127.0.0.1: sign the bucket's Host explicitly and send it.
    direct = client.get_presigned_url(
        Bucket=PRIVATE, Key="secret/sdk.txt", Method="GET", Headers={"Host": host(PRIVATE)}
    )
    got = requests.get(direct, headers={"Host": host(PRIVATE)}, timeout=10)
    assert (got.status_code, got.content) == (200, b"for signed eyes")


# -- coscmd --


def coscmd(tmp_path: Path, daemon: Daemon, *args: str, bucket: str = PLAIN, secret_key: str = KEY) -> str:
    """Run ``coscmd -c <config> <args>`` with the daemon as its HTTP proxy; its output (it must succeed)."""
    proc = run_coscmd(tmp_path, daemon, *args, bucket=bucket, secret_key=secret_key)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


def run_coscmd(
    tmp_path: Path, daemon: Daemon, *args: str, bucket: str = PLAIN, secret_key: str = KEY
) -> subprocess.CompletedProcess[str]:
    config = tmp_path / f"cos-{bucket}-{secret_key[:4]}.conf"
    config.write_text(
        "[common]\n"
        f"secret_id = {SID}\n"
        f"secret_key = {secret_key}\n"
        f"bucket = {bucket}\n"
        f"endpoint = {ENDPOINT}\n"
        "schema = http\n"
    )
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env["http_proxy"] = f"http://127.0.0.1:{daemon.port}"
    env["HOME"] = str(tmp_path)  # coscmd writes ~/.cos.log
    sibling = Path(sys.executable).with_name("coscmd")
    command = (
        [str(sibling)] if sibling.exists() else [sys.executable, "-c", "from coscmd.cos_cmd import _main; _main()"]
    )
    return subprocess.run(
        [*command, "-c", str(config), "-l", str(tmp_path / "cos.log"), *args],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_coscmd_lists_and_downloads(cos: Daemon, tmp_path: Path) -> None:
    files = {"cmd/a.txt": b"alpha\n", "cmd/b.bin": os.urandom(30_000), "cmd/sub/c.txt": b"gamma\n"}
    for key, data in files.items():
        store(cos, PLAIN, key, data)
    listed = coscmd(tmp_path, cos, "list", "cmd/")
    lines = [line.split() for line in listed.splitlines() if line.strip()]
    assert ["cmd/a.txt", "6"] in [line[:2] for line in lines]
    assert ["cmd/b.bin", "30000"] in [line[:2] for line in lines]
    assert ["cmd/sub/", "DIR"] in [line[:2] for line in lines]
    assert not any(line[0] == "cmd/sub/c.txt" for line in lines)  # summed up by the delimiter
    recursive = coscmd(tmp_path, cos, "list", "-r", "cmd/")
    assert "Files num: 3" in recursive and "cmd/sub/c.txt" in recursive

    coscmd(tmp_path, cos, "download", "cmd/b.bin", "one/b.bin")
    assert (tmp_path / "one" / "b.bin").read_bytes() == files["cmd/b.bin"]
    coscmd(tmp_path, cos, "download", "-r", "cmd/", "all/")
    for key, data in files.items():
        assert (tmp_path / "all" / key.removeprefix("cmd/")).read_bytes() == data

    # A private bucket: coscmd signs, so it reads as well.
    store(cos, PRIVATE, "cmd/private.txt", b"signed by coscmd\n")
    assert "cmd/private.txt" in coscmd(tmp_path, cos, "list", "cmd/", bucket=PRIVATE)
    coscmd(tmp_path, cos, "download", "cmd/private.txt", "private.txt", bucket=PRIVATE)
    assert (tmp_path / "private.txt").read_bytes() == b"signed by coscmd\n"


def test_coscmd_reports_the_error_code_of_a_refused_call(cos: Daemon, tmp_path: Path) -> None:
    wrong = run_coscmd(tmp_path, cos, "list", "cmd/", secret_key=WRONG_KEY)
    assert wrong.returncode != 0
    assert "'code': 'SignatureDoesNotMatch'" in wrong.stdout + wrong.stderr
    upload = tmp_path / "up.txt"
    upload.write_text("no uploads here\n")
    put = run_coscmd(tmp_path, cos, "upload", str(upload), "cmd/up.txt")
    assert put.returncode != 0 and "'code': 'NotImplemented'" in put.stdout + put.stderr
    assert not (cos.data_dir / PLAIN / "cmd" / "up.txt").exists()


# -- cosedge bugs these tools found, fixed: each test failed before its fix --


def test_head_errors_reach_the_sdk_with_their_code(cos: Daemon) -> None:
    """
    HEAD errors carry x-cos-error-code (a HEAD answer has no body): the SDK
    used to report code 'Unknown' for every HEAD error but 404.
    """
    store(cos, PRIVATE, "head/sdk.txt", b"x")
    anonymous = sdk(cos, anonymous=True)
    refused(lambda: anonymous.head_object(Bucket=PRIVATE, Key="head/sdk.txt"), 403, "AccessDenied", has_body=False)
    refused(lambda: anonymous.head_bucket(Bucket=PRIVATE), 403, "AccessDenied", has_body=False)
    wrong = sdk(cos, secret_key=WRONG_KEY)
    refused(lambda: wrong.head_bucket(Bucket=PRIVATE), 403, "SignatureDoesNotMatch", has_body=False)


def test_a_private_read_with_a_wrong_secret_says_which(cos: Daemon) -> None:
    """
    A read of a private bucket with a bad signature says what is wrong
    (SignatureDoesNotMatch, InvalidAccessKeyId), not always AccessDenied.
    """
    store(cos, PRIVATE, "wrong/sdk.txt", b"x")
    wrong, stranger = sdk(cos, secret_key=WRONG_KEY), sdk(cos, secret_id="AKIDnobodyKnows")
    refused(lambda: wrong.get_object(Bucket=PRIVATE, Key="wrong/sdk.txt"), 403, "SignatureDoesNotMatch")
    refused(lambda: stranger.get_object(Bucket=PRIVATE, Key="wrong/sdk.txt"), 403, "InvalidAccessKeyId")


def test_paging_with_a_delimiter_reports_each_common_prefix_once(cos: Daemon) -> None:
    """
    With a delimiter, a page that ends with a common prefix does not report
    it again on the next page (with max-keys=1 paging used never to end).
    """
    for key in ("dl/a.txt", "dl/b.txt", "dl/sub/x.txt", "dl/sub/y.txt", "dl/z.txt"):
        store(cos, PLAIN, key, b"x")
    client = sdk(cos)
    for max_keys in (1, 2, 3):
        seen: list[str] = []
        marker = ""
        for _ in range(10):  # bounded: the bug never ends with max-keys=1
            page = client.list_objects(Bucket=PLAIN, Prefix="dl/", Delimiter="/", Marker=marker, MaxKeys=max_keys)
            seen += [c["Key"] for c in page.get("Contents", [])]
            seen += [p["Prefix"] for p in page.get("CommonPrefixes", [])]
            if page["IsTruncated"] != "true":
                break
            marker = page["NextMarker"]
        assert sorted(seen) == ["dl/a.txt", "dl/b.txt", "dl/sub/", "dl/z.txt"], (max_keys, seen)


def test_the_resource_of_an_error_to_a_proxy_client_is_host_and_path(cos: Daemon) -> None:
    """
    The Resource of an error to a client using cosedge as its proxy is the
    host and the path, not the host followed by the whole URL.
    """
    proxied = CosS3Client(
        CosConfig(
            Endpoint=ENDPOINT,
            Scheme="http",
            SecretId=SID,
            SecretKey=KEY,
            Proxies={"http": f"http://127.0.0.1:{cos.port}"},
        ),
        retry=0,
    )
    error = refused(lambda: proxied.get_object(Bucket=PLAIN, Key="resource/none.txt"), 404, "NoSuchKey")
    assert error.get_resource_location() == f"{host(PLAIN)}/resource/none.txt"
