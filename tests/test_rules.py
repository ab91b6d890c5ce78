"""
Origin rules (issue 11): the model's validation, and the planner for every
field.  The planner is a pure function, so these tests need no reactor.
"""

from __future__ import annotations

import re
import textwrap
import tomllib
from pathlib import Path

import pytest
from twisted.web.http_headers import Headers

from cosedge import origins
from cosedge.config import BucketConfig, ConfigError, parse_config, plain
from cosedge.origins import NOT_FOUND, Source
from cosedge.rules import Rule, RuleHost, parse_rule, parse_rules, rule_table

BUCKET = "example-1250000000"


def rule(**fields: object) -> Rule:
    return parse_rule({"priority": 1, "hosts": ["www.example.com"], **fields})


def bucket(*rules: dict[str, object], **fields: object) -> BucketConfig:
    return BucketConfig(
        rules=[{"priority": i + 1, "hosts": ["www.example.com"], **r} for i, r in enumerate(rules)], **fields
    )  # type: ignore[arg-type]


def first(_: str) -> bool:
    return True


# -- the model --


def test_a_file_with_rules_loads_and_pulls_without_origin_pull() -> None:
    """The issue's example table loads; a bucket with rules pulls by them without further settings."""
    config = parse_config(
        {
            "buckets": {
                BUCKET: {
                    "rules": [
                        {
                            "priority": 2,
                            "type": "mirror",
                            "prefix": "images/",
                            "suffix": ".jpg",
                            "hosts": ["www.example.com", {"host": "img2.example.com:8080", "weight": 3}],
                            "standby": ["backup.example.com"],
                            "protocol": "https",
                            "follow_query_string": True,
                            "follow_redirects": False,
                            "host_header": "www.example.com",
                            "headers_pass": ["Authorization"],
                            "headers_set": {"X-From": "cosedge"},
                            "key_prefix": "static/",
                        },
                        {
                            "priority": 1,
                            "type": "redirect",
                            "prefix": "old/",
                            "hosts": ["10.0.0.1"],
                            "redirect_code": 301,
                        },
                    ]
                }
            }
        }
    )
    b = config.buckets[BUCKET]
    assert b.origin_pull is True and [r.priority for r in b.rules] == [1, 2]  # sorted by priority
    mirror = b.rules[1]
    assert mirror.hosts == (RuleHost("www.example.com"), RuleHost("img2.example.com", 8080, 3))
    assert mirror.headers_pass == ("authorization",) and mirror.headers_set == (("x-from", "cosedge"),)


def test_origin_pull_false_turns_every_rule_off() -> None:
    assert origins.plan(bucket({}, origin_pull=False), ("a",), None, b"GET") is NOT_FOUND
    assert origins.plan(bucket({}), ("a",), None, b"GET").answer == "redirect"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"type": "cache"}, "type must be one of 'proxy', 'mirror', 'redirect'"),
        ({"hosts": []}, "hosts must name at least one origin host"),
        ({"hosts": ["http://www.example.com"]}, "hosts[0]: 'http://www.example.com' has a scheme"),
        ({"hosts": [{"host": "a.example.com", "weight": 0}]}, "hosts[0]: weight must be a whole number from 1 to 100"),
        ({"hosts": [{"host": "a.example.com", "cost": 1}]}, "hosts[0]: unknown key(s) cost"),
        ({"hosts": ["a.example.com", "A.example.com"]}, "host a.example.com is listed twice"),
        ({"standby": [{"host": "b.example.com", "weight": 2}]}, "standby[0]: unknown key(s) weight"),
        ({"protocol": "ftp"}, "protocol must be one of 'http', 'https', 'follow'"),
        ({"redirect_code": 303}, "redirect_code must be one of 301, 302, 307"),
        ({"follow_query_string": "yes"}, "follow_query_string must be true or false"),
        ({"host_header": "bad host"}, "host_header must be a domain name"),
        ({"headers_pass": ["Host"]}, "Host is set by cosedge itself"),
        ({"headers_set": {"X-A": "a\r\nb"}}, "contains a control character"),
        ({"headers_set": {"X A": "v"}}, "is not a header name"),
        ({"fixed_file": "index.html"}, "fixed_file must be a path like '/index.html'"),
        ({"fixed_file": "/i.html", "key_prefix": "x/"}, "cannot be combined with key_prefix/key_suffix"),
        ({"key_suffix": ".webp"}, "key_suffix replaces the rule's suffix; set suffix too"),
        ({"ca_file": "/nonexistent/ca.pem", "protocol": "https"}, "ca_file /nonexistent/ca.pem: cannot read"),
        ({"type": "redirect", "headers_set": {"X-A": "1"}}, "apply to proxy and mirror fetches only"),
        ({"priority": 0}, "priority must be a whole number from 1 to 10000"),
        ({"colour": "red"}, "unknown setting(s) colour"),
    ],
)
def test_every_bad_field_is_refused_by_name(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_rule({"priority": 1, "hosts": ["www.example.com"], **fields})
    assert message in str(e.value)
    assert str(e.value).startswith(f"rule priority {fields.get('priority', 1)!r}: ")


def test_errors_in_a_file_name_the_bucket_the_priority_and_the_field() -> None:
    with pytest.raises(ConfigError) as e:
        parse_config({"buckets": {BUCKET: {"rules": [{"priority": 7, "hosts": ["a.example.com"], "type": "x"}]}}})
    assert str(e.value).startswith(f"[buckets.{BUCKET}] rule priority 7: type must be one of")
    with pytest.raises(ConfigError, match="priority 1 is used twice"):
        parse_rules([{"priority": 1, "hosts": ["a.example.com"]}, {"priority": 1, "hosts": ["b.example.com"]}])
    with pytest.raises(ConfigError, match="priority is required"):
        parse_rules([{"hosts": ["a.example.com"]}])


def test_a_ca_file_must_hold_a_certificate(tmp_path: Path) -> None:
    empty = tmp_path / "ca.pem"
    empty.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match="no PEM certificate in it"):
        rule(protocol="https", ca_file=str(empty))
    with pytest.raises(ConfigError, match="ca_file applies to HTTPS origins"):
        empty.write_text("-----BEGIN CERTIFICATE-----\n")
        rule(ca_file=str(empty))


def test_a_rule_goes_back_to_its_table_with_only_what_differs() -> None:
    """rule_table is what the state file and the manhole show; parsing it gives the same rule."""
    r = rule(
        type="mirror", hosts=["a.example.com", {"host": "b.example.com:81", "weight": 3}], headers_set={"X-A": "1"}
    )
    table = rule_table(r)
    assert table == {
        "priority": 1,
        "type": "mirror",
        "hosts": ["a.example.com", {"host": "b.example.com:81", "weight": 3}],
        "headers_set": {"x-a": "1"},
    }
    assert parse_rule(table) == r
    assert plain(BucketConfig(rules=[table]).rules) == [table]  # type: ignore[arg-type]


# -- the planner --


def test_conditions_pick_the_first_matching_rule_by_priority() -> None:
    b = bucket(
        {"prefix": "img/", "suffix": ".png", "type": "redirect"},
        {"prefix": "img/"},
        {"suffix": ".txt", "type": "mirror"},
    )
    assert origins.plan(b, ("img", "a.png"), None, b"GET").fetch is None  # the redirect rule
    assert origins.plan(b, ("img", "a.jpg"), None, b"GET").fetch is not None  # the proxy rule
    assert origins.plan(b, ("doc", "a.txt"), None, b"GET").answer == "mirror"
    assert origins.plan(b, ("doc", "a.pdf"), None, b"GET") is NOT_FOUND  # no rule: a plain miss
    # A key as long as prefix + suffix overlapping is no match: "ab" is not "ab" + "b".
    assert not rule(prefix="ab", suffix="b").matches("ab")


def test_proxy_redirects_with_its_code_and_copies_on_get_and_head() -> None:
    b = bucket({"redirect_code": 307})
    for method in (b"GET", b"HEAD"):
        p = origins.plan(b, ("a b.jpg",), b"v=1", method)
        assert (p.answer, p.status, p.location) == ("redirect", 307, b"http://www.example.com/a%20b.jpg?v=1")
        assert p.fetch == Source(b"http://www.example.com/a%20b.jpg", rule="1:proxy")  # the copy: no query


def test_redirect_copies_nothing_and_mirror_answers_from_the_origin() -> None:
    redirect = origins.plan(bucket({"type": "redirect", "redirect_code": 301}), ("k",), None, b"GET")
    assert (redirect.answer, redirect.status, redirect.fetch) == ("redirect", 301, None)
    mirror = origins.plan(bucket({"type": "mirror"}), ("k",), b"a=1", b"HEAD")
    assert mirror.answer == "mirror" and mirror.location is None
    assert mirror.fetch == Source(b"http://www.example.com/k?a=1", rule="1:mirror")  # the query passes


def test_follow_query_string_false_drops_the_query() -> None:
    p = origins.plan(bucket({"follow_query_string": False}), ("k",), b"a=1", b"GET")
    assert p.location == b"http://www.example.com/k"


def test_protocol_https_and_follow_choose_the_scheme_and_its_default_port() -> None:
    https = bucket({"protocol": "https", "hosts": ["a.example.com", "b.example.com:443", "c.example.com:80"]})
    p = origins.plan(https, ("k",), None, b"GET", choose=lambda: 0.0)
    assert p.fetch is not None and p.fetch.urls == (
        b"https://a.example.com/k",
        b"https://b.example.com/k",
        b"https://c.example.com:80/k",
    )
    follow = bucket({"protocol": "follow"})
    assert origins.plan(follow, ("k",), None, b"GET", secure=True).location == b"https://www.example.com/k"
    assert origins.plan(follow, ("k",), None, b"GET", secure=False).location == b"http://www.example.com/k"


def test_rewrites_replace_the_prefix_the_suffix_or_the_whole_key() -> None:
    def location(**fields: object) -> bytes | None:
        return origins.plan(bucket(fields), ("images", "cat.jpg"), None, b"GET").location

    assert location(prefix="images/", key_prefix="static/img/") == b"http://www.example.com/static/img/cat.jpg"
    assert location(key_prefix="v2/") == b"http://www.example.com/v2/images/cat.jpg"
    assert location(suffix=".jpg", key_suffix=".webp") == b"http://www.example.com/images/cat.webp"
    assert location(fixed_file="/index.html") == b"http://www.example.com/index.html"


def test_headers_are_set_passed_and_the_host_named() -> None:
    b = bucket(
        {
            "type": "mirror",
            "protocol": "https",
            "host_header": "www.example.org",
            "headers_pass": ["authorization"],
            "headers_set": {"X-From": "cosedge"},
        }
    )
    client = Headers({b"authorization": [b"Bearer t"], b"cookie": [b"c=1"]})
    p = origins.plan(b, ("k",), None, b"GET", headers=client)
    assert p.fetch is not None
    assert sorted(p.fetch.headers) == [
        (b"authorization", b"Bearer t"),
        (b"host", b"www.example.org"),
        (b"x-from", b"cosedge"),
    ]
    assert p.fetch.server_name == b"www.example.org"  # the certificate is checked for the Host sent


def test_weights_share_the_first_choice_and_every_host_follows_as_a_fallback() -> None:
    b = bucket(
        {
            "hosts": [{"host": "a.example.com", "weight": 1}, {"host": "b.example.com", "weight": 3}],
            "standby": ["s.example.com"],
        }
    )
    firsts = []
    for i in range(100):
        p = origins.plan(b, ("k",), None, b"GET", choose=lambda i=i: i / 100)  # type: ignore[misc]
        assert p.fetch is not None and len(p.fetch.urls) == 3 and p.fetch.urls[2] == b"http://s.example.com/k"
        firsts.append(p.fetch.url)
    assert firsts.count(b"http://a.example.com/k") == 25 and firsts.count(b"http://b.example.com/k") == 75


def test_hosts_believed_down_are_passed_over_then_standby_then_all() -> None:
    b = bucket({"hosts": ["a.example.com", "b.example.com"], "standby": ["s.example.com", "t.example.com"]})
    down = {"http://a.example.com"}
    p = origins.plan(b, ("k",), None, b"GET", up=lambda base: base not in down, choose=lambda: 0.0)
    assert p.location == b"http://b.example.com/k"
    assert p.fetch is not None and p.fetch.urls == (
        b"http://b.example.com/k",
        b"http://s.example.com/k",
        b"http://t.example.com/k",
    )
    down |= {"http://b.example.com"}
    assert origins.plan(b, ("k",), None, b"GET", up=lambda base: base not in down).location == b"http://s.example.com/k"
    everything = origins.plan(b, ("k",), None, b"GET", up=lambda base: False)
    assert everything.fetch is not None and len(everything.fetch.urls) == 4  # nothing believed up: try all in order
    assert everything.location == b"http://a.example.com/k"


def test_prefetch_follows_the_rules_but_not_a_redirect_rule() -> None:
    b = bucket(
        {"prefix": "r/", "type": "redirect"}, {"type": "mirror", "standby": ["s.example.com"]}, origin_pull=False
    )
    assert origins.prefetch_source(b, ("r", "k")) is None
    source = origins.prefetch_source(b, ("k",))
    assert source is not None and source.urls == (b"http://www.example.com/k", b"http://s.example.com/k")
    assert RuleHost("a.example.com", 8443).netloc("https") == "a.example.com:8443"


def test_the_readmes_rule_examples_load(tmp_path: Path) -> None:
    """Every TOML example of the README's "Origin rules" section is a valid configuration."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    start = readme.index("## Origin rules: proxy, mirror and redirect\n")
    section = readme[start : readme.index("\n## ", start + 1)]
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    blocks = re.findall(r"```toml\n(.*?)```", section, re.S)
    assert len(blocks) >= 2
    for block in blocks:
        text = textwrap.dedent(block).replace("/etc/cosedge/origin-ca.pem", str(ca))
        config = parse_config(tomllib.loads(text))
        assert config.buckets[BUCKET].rules and config.buckets[BUCKET].origin_pull
