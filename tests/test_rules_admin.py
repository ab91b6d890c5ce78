"""
Origin rules administered live (issue 11, "Administration"): ``edge.rules``,
``set_rules``, ``add_rule``, ``remove_rule``, ``rules_xml`` and
``set_rules_xml`` on the whole service built as ``twistd cosedge`` builds it
(the harness of tests/test_admin.py), the state file's ``rules`` field, and
the COS ``<OriginConfiguration>`` mapping of :mod:`cosedge.cosxml`.
"""

# ruff: noqa: F811 (the fixtures imported from tests.test_admin are parameters of the tests)

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from cosedge import origins
from cosedge.admin.errors import AdminError
from cosedge.admin.state import StateFile
from cosedge.config import ConfigError
from cosedge.cosxml import MAX_XML_BYTES, CosXmlError, rules_from_xml, rules_to_xml
from cosedge.rules import Rule, parse_rules
from tests.test_admin import BUCKET, FILE_ORIGIN, NEW, Harness, audit_lines, harness, run  # noqa: F401 (fixtures)

#: In the order of cosedge.rules.rule_table, so that json.dumps gives the text of change lines.
REDIRECT = {"priority": 2, "type": "redirect", "hosts": ["10.0.0.9:8080"], "prefix": "r/", "redirect_code": 301}
MIRROR = {
    "priority": 1,
    "type": "mirror",
    "prefix": "img/",
    "suffix": ".jpg",
    "hosts": ["a.example.com", {"host": "b.example.com:8080", "weight": 3}],
    "standby": ["c.example.com"],
    "protocol": "https",
    "headers_set": {"X-From": "cosedge"},
}


def plan(harness: Harness, bucket: str, key: str) -> origins.Plan:
    """What the running configuration does about a miss of ``key`` (a GET)."""
    return origins.plan(harness.service.config.buckets[bucket], tuple(key.split("/")), None, b"GET")


def saved(harness: Harness) -> dict[str, Any]:
    """The state file's buckets, as JSON."""
    buckets: dict[str, Any] = json.loads(harness.state_file.read_text())["buckets"]
    return buckets


# -- the commands --


def test_set_rules_applies_at_once_is_saved_and_audited(harness: Harness, audit_lines: list[dict[str, Any]]) -> None:
    """
    The rules are in the running configuration at once (the next miss follows
    them: a redirect rule's 301 to its host, no rule a 404), saved in the
    state file as plain tables, and audited with the channel.
    """
    message = harness.edge("ssh:ops@127.0.0.1").set_rules(BUCKET, [MIRROR, REDIRECT])
    assert str(message).startswith(f'rules of {BUCKET}: rule 1 added {{"priority": 1, "type": "mirror", ')
    assert '; rule 2 added {"priority": 2, "type": "redirect", "hosts": ["10.0.0.9:8080"], ' in message
    assert "origin 127.0.0.1:8081 is used by none of them" in message
    assert plan(harness, BUCKET, "r/a.jpg").location == b"http://10.0.0.9:8080/r/a.jpg"
    assert plan(harness, BUCKET, "r/a.jpg").status == 301
    assert plan(harness, BUCKET, "other.txt") == origins.NOT_FOUND
    assert plan(harness, BUCKET, "img/x.jpg").answer == "mirror"
    assert saved(harness)[BUCKET]["rules"] == [
        {**MIRROR, "headers_set": {"x-from": "cosedge"}},
        REDIRECT,
    ]
    assert [(e["what"], e["subject"], e["old"], e["channel"]) for e in audit_lines] == [
        ("rules", BUCKET, "(none)", "ssh:ops@127.0.0.1")
    ]
    assert json.loads(audit_lines[0]["new"])[1] == REDIRECT


def test_rules_shows_a_readable_table(harness: Harness) -> None:
    """edge.rules() lists priority, type, conditions, hosts with weights, standby, protocol and the rest."""
    edge = harness.edge()
    assert repr(edge.rules(BUCKET)) == "(none)"
    edge.set_rules(BUCKET, [REDIRECT, MIRROR])
    rows = edge.rules(BUCKET)
    assert rows[0] == {
        "priority": 1,
        "type": "mirror",
        "prefix": "img/",
        "suffix": ".jpg",
        "hosts": "a.example.com, b.example.com:8080 (weight 3)",
        "standby": "c.example.com",
        "protocol": "https",
        "other": "headers_set=x-from: cosedge",
    }
    assert rows[1]["other"] == "redirect_code=301" and rows[1]["standby"] is None
    lines = repr(rows).splitlines()
    assert lines[0].split() == ["priority", "type", "prefix", "suffix", "hosts", "standby", "protocol", "other"]
    assert lines[2].split()[:4] == ["2", "redirect", "r/", "-"]


def test_buckets_and_changes_count_the_rules(harness: Harness) -> None:
    """edge.buckets() and edge.changes() show rules compactly, by their number."""
    edge = harness.edge()
    edge.set_rules(BUCKET, [REDIRECT, MIRROR])
    assert edge.buckets()[0]["rules"] == 2
    assert repr(edge.buckets()).splitlines()[1].split() == [BUCKET, FILE_ORIGIN, "on", "changed", "2"]
    assert edge.changes() == [
        {"bucket": BUCKET, "change": "changed", "origin": "(file)", "origin_pull": "(file)", "rules": "2 rules"}
    ]
    assert repr(edge.changes()).splitlines()[0].split() == ["bucket", "change", "origin", "origin_pull", "rules"]


def test_add_rule_and_remove_rule(harness: Harness) -> None:
    """add_rule adds one rule in priority order; remove_rule takes one out by its priority."""
    edge = harness.edge()
    edge.add_rule(BUCKET, REDIRECT)
    edge.add_rule(BUCKET, MIRROR)
    assert [r.priority for r in harness.service.config.buckets[BUCKET].rules] == [1, 2]
    message = edge.remove_rule(BUCKET, 1)
    assert str(message).startswith(f'rules of {BUCKET}: rule 1 removed (was {{"priority": 1, "type": "mirror"')
    changed = str(edge.set_rules(BUCKET, [{**REDIRECT, "redirect_code": 307}]))
    assert (
        changed
        == f"rules of {BUCKET}: rule 2 {json.dumps(REDIRECT)} -> {json.dumps({**REDIRECT, 'redirect_code': 307})}"
    )
    edge.set_rules(BUCKET, [REDIRECT])
    assert [r.priority for r in harness.service.config.buckets[BUCKET].rules] == [2]
    assert [t["priority"] for t in saved(harness)[BUCKET]["rules"]] == [2]


def test_rules_given_to_a_bucket_that_could_not_pull_turn_origin_pull_on(harness: Harness) -> None:
    """
    A bucket with neither origin nor rules gets origin-pull with its first
    rules; removing its last rule turns it off again, and a new rule on again.
    """
    edge = harness.edge()
    edge.add_bucket(NEW)
    assert str(edge.add_rule(NEW, REDIRECT)).splitlines()[1] == f"origin_pull of {NEW}: off -> on"
    assert plan(harness, NEW, "r/x").status == 301
    assert str(edge.remove_rule(NEW, 2)).splitlines()[1] == f"origin_pull of {NEW}: on -> off"
    assert harness.service.config.buckets[NEW].origin_pull is False
    assert "origin_pull" not in saved(harness)[NEW]
    assert str(edge.set_rules(NEW, [REDIRECT])).splitlines()[1] == f"origin_pull of {NEW}: off -> on"


def test_origin_pull_switched_off_stays_off_and_the_message_says_how_to_turn_it_on(harness: Harness) -> None:
    """
    origin_pull is COS's status switch: rules given to a bucket whose
    operator turned it off leave it off, and the message says so.
    """
    edge = harness.edge()
    edge.add_bucket(NEW)
    edge.disable_origin_pull(NEW)
    message = str(edge.set_rules(NEW, [REDIRECT]))
    assert f"origin-pull of {NEW} is off" in message and f"edge.enable_origin_pull({NEW!r})" in message
    assert plan(harness, NEW, "r/x") == origins.NOT_FOUND
    edge.disable_origin_pull(BUCKET)
    assert "is off, so its rules do not apply yet" in str(edge.add_rule(BUCKET, REDIRECT))
    assert harness.service.config.buckets[BUCKET].origin_pull is False


def test_enable_origin_pull_accepts_a_bucket_with_rules_and_no_origin(harness: Harness) -> None:
    """A bucket with rules but no origin can be switched on; one with neither cannot."""
    edge = harness.edge()
    edge.add_bucket(NEW)
    with pytest.raises(AdminError, match="no origin address and no rules"):
        edge.enable_origin_pull(NEW)
    edge.disable_origin_pull(NEW)
    edge.set_rules(NEW, [REDIRECT])
    assert repr(edge.enable_origin_pull(NEW)) == f"origin_pull of {NEW}: off -> on"
    assert plan(harness, NEW, "r/x").location == b"http://10.0.0.9:8080/r/x"


def test_removing_every_rule_of_an_origin_bucket_keeps_its_origin_pull(harness: Harness) -> None:
    """With an origin left, removing the rules brings the origin's one rule back, origin-pull unchanged."""
    edge = harness.edge()
    edge.set_rules(BUCKET, [REDIRECT])
    edge.set_rules(BUCKET, [])
    assert harness.service.config.buckets[BUCKET].origin_pull is True
    assert plan(harness, BUCKET, "x.jpg").location == f"http://{FILE_ORIGIN}/x.jpg".encode()


def test_rules_persist_across_a_restart(harness: Harness) -> None:
    """A new daemon built from the same file and data directory has the live rules and switch."""
    edge = harness.edge()
    edge.add_bucket(NEW)
    edge.set_rules(NEW, [MIRROR, REDIRECT])
    edge.set_rules(BUCKET, [REDIRECT])
    restarted = harness.build()
    assert restarted.config.buckets == harness.service.config.buckets
    assert restarted.config.buckets[NEW].rules == parse_rules([MIRROR, REDIRECT])
    assert restarted.config.buckets[NEW].origin_pull is True


def test_prefetch_copies_by_the_rule_and_says_from_where(harness: Harness) -> None:
    """prefetch copies through the proxy or mirror rule of the key (rewrite included) and shows the URL."""
    edge = harness.edge()
    edge.add_bucket(NEW)
    rule = {"priority": 1, "type": "proxy", "prefix": "a/", "key_prefix": "static/", "hosts": [FILE_ORIGIN]}
    edge.set_rules(NEW, [rule, REDIRECT])
    harness.origin.add("static/1.jpg", b"by the rule")
    results: list[Any] = []
    edge.prefetch(NEW, "a/1.jpg").addBoth(results.append)
    for _ in range(20):
        if results:
            break
        harness.agent.flush()
    assert results and results[0].stored, results
    assert results[0].source == f"http://{FILE_ORIGIN}/static/1.jpg"
    assert "source='http://127.0.0.1:8081/static/1.jpg'" in repr(results[0])
    assert (harness.data_dir / NEW / "a" / "1.jpg").read_bytes() == b"by the rule"
    with pytest.raises(AdminError, match="redirect rule, which copies nothing"):
        edge.prefetch(NEW, "r/1.jpg")
    with pytest.raises(AdminError, match="no origin address and no rule for this key"):
        edge.prefetch(NEW, "b/1.jpg")


def test_help_names_the_rule_commands(harness: Harness) -> None:
    """help(edge) documents the rule commands."""
    import pydoc

    text = pydoc.render_doc(harness.edge(), renderer=pydoc.plaintext)  # type: ignore[attr-defined]
    for name in ["rules", "set_rules", "add_rule", "remove_rule", "rules_xml", "set_rules_xml"]:
        assert f"edge.{name}(" in text


# -- refusals: each names what is wrong, and nothing changes --


@pytest.fixture
def unchanged(harness: Harness, audit_lines: list[dict[str, Any]]) -> Any:
    """Rules set once; the test's refusal must leave config, state file and audit log as they are."""
    harness.edge().set_rules(BUCKET, [REDIRECT])
    before, text = harness.service.config, harness.state_file.read_bytes()
    audit_lines.clear()
    yield
    assert harness.service.config is before
    assert harness.state_file.read_bytes() == text
    assert audit_lines == []


@pytest.mark.parametrize(
    ("call", "args", "words"),
    [
        ("set_rules", ([{"priority": 1, "hosts": ["http://x.example.com"]}],), "rule priority 1: hosts[0]"),
        ("set_rules", ([{"priority": 3, "type": "copy", "hosts": ["x.example.com"]}],), "rule priority 3: type"),
        ("set_rules", ([{"priority": 1, "colour": "red", "hosts": ["x.example.com"]}],), "unknown setting(s) colour"),
        ("set_rules", ([{"priority": 1, "hosts": ["a.example.com"]}] * 2,), "priority 1 is used twice"),
        ("set_rules", ([{"hosts": ["a.example.com"]}],), "priority is required"),
        ("set_rules", ({"priority": 1, "hosts": ["a.example.com"]},), "rules must be a list"),
        ("add_rule", ({"priority": 2, "hosts": ["a.example.com"]},), "rule priority 2: the priority is taken"),
        ("add_rule", ({"priority": 5, "hosts": ["a.example.com"], "redirect_code": 303},), "redirect_code"),
        ("remove_rule", (7,), "has no rule with priority 7 (its rules' priorities: 2)"),
        ("remove_rule", ("2",), "has no rule with priority '2'"),
        ("set_rules_xml", (b"<OriginConfiguration><OriginRule>",), "not well-formed XML"),
        ("set_rules_xml", ("<Other/>",), "must be an <OriginConfiguration>"),
    ],
)
def test_a_refused_rule_change_names_the_bucket_and_field_and_changes_nothing(
    harness: Harness, unchanged: None, call: str, args: tuple[Any, ...], words: str
) -> None:
    with pytest.raises(AdminError) as e:
        getattr(harness.edge(), call)(BUCKET, *args)
    assert BUCKET in str(e.value) and words in str(e.value)
    assert str(e.value).endswith("; nothing changed")


@pytest.mark.parametrize("call", ["rules", "set_rules", "add_rule", "remove_rule", "rules_xml", "set_rules_xml"])
def test_every_rule_command_refuses_an_unknown_bucket(harness: Harness, unchanged: None, call: str) -> None:
    argument: Any = {"rules": None, "rules_xml": None, "remove_rule": 2, "set_rules": [REDIRECT]}.get(call, REDIRECT)
    if call == "set_rules_xml":
        argument = rules_to_xml(parse_rules([REDIRECT]))
    args = () if argument is None else (argument,)
    with pytest.raises(AdminError, match=f"no bucket named 'exmple-1250000000'.*{BUCKET}.*nothing changed"):
        getattr(harness.edge(), call)("exmple-1250000000", *args)


def test_a_script_sees_a_refused_rule_change_as_exit_status_1(harness: Harness) -> None:
    """`ssh … "edge.add_rule(…)"` with a bad rule prints one error line and exits 1."""
    out, codes = run(
        f"edge.add_rule({BUCKET!r}, {{'priority': 0, 'hosts': ['a.example.com']}})", {"edge": harness.edge()}
    )
    assert out.startswith(f"error: add_rule refused for bucket {BUCKET}: rule priority 0: priority must be")
    assert codes == [1] and not harness.state_file.exists()


def test_the_state_file_refuses_bad_rules_naming_the_bucket(harness: Harness) -> None:
    """A state file edited into invalid rules stops the start with a message naming the bucket and the rule."""
    harness.state_file.parent.mkdir(parents=True)
    for rules, words in [
        ([{"priority": 1, "hosts": ["a.example.com"], "type": "copy"}], "rules: rule priority 1: type"),
        ("all", "rules must be a list of rule tables"),
        ([{"priority": 1, "hosts": ["a.example.com"]}] * 2, "rules: priority 1 is used twice"),
    ]:
        harness.state_file.write_text(json.dumps({"version": 1, "buckets": {BUCKET: {"rules": rules}}}))
        with pytest.raises(ConfigError) as e:
            StateFile(str(harness.state_file)).load()
        assert f"bucket {BUCKET}: {words}" in str(e.value), str(e.value)
        with pytest.raises(ConfigError, match=f"bucket {BUCKET}: rules"):
            harness.build()


# -- XML through the manhole --


def test_rules_xml_and_set_rules_xml_round_trip_through_the_manhole(harness: Harness) -> None:
    """What rules_xml prints, set_rules_xml loads back into the same rules (on another bucket too)."""
    edge = harness.edge()
    edge.set_rules(BUCKET, [MIRROR, REDIRECT])
    text = str(edge.rules_xml(BUCKET))
    assert text.startswith('<?xml version="1.0" encoding="UTF-8"?>\n<OriginConfiguration>')
    edge.add_bucket(NEW)
    assert repr(edge.set_rules_xml(NEW, text)).splitlines()[1] == f"origin_pull of {NEW}: off -> on"
    assert harness.service.config.buckets[NEW].rules == harness.service.config.buckets[BUCKET].rules
    assert repr(edge.set_rules_xml(NEW, text.encode())) == f"rules of {NEW}: unchanged"
    edge.set_rules(BUCKET, [])
    assert str(edge.rules_xml(BUCKET)).endswith("<OriginConfiguration></OriginConfiguration>")


XXE = b"""<?xml version="1.0"?>
<!DOCTYPE OriginConfiguration [<!ENTITY secret SYSTEM "file:///etc/passwd">]>
<OriginConfiguration><OriginRule><RulePriority>&secret;</RulePriority></OriginRule></OriginConfiguration>"""
LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">]>
<OriginConfiguration>&lol2;</OriginConfiguration>"""


def _rule(rule: str = "", condition: str = "", parameter: str = "", info: str = "") -> str:
    """A COS mirror rule, with more elements in its parts."""
    return f"""<OriginRule><RulePriority>1</RulePriority><OriginType>Mirror</OriginType>{rule}
<OriginCondition><HTTPStatusCode>404</HTTPStatusCode><Prefix>img/</Prefix>{condition}</OriginCondition>
<OriginParameter><Protocol>HTTP</Protocol>{parameter}</OriginParameter>
<OriginInfo><HostInfo><HostName>a.example.com</HostName></HostInfo>{info}</OriginInfo></OriginRule>"""


def _doc(*rules: str) -> bytes:
    return ("<OriginConfiguration>" + "".join(rules or (_rule(),)) + "</OriginConfiguration>").encode()


R = "OriginRule[RulePriority=1]"
STANDBY_ON_SECOND = "<HostInfo><HostName>b.example.com</HostName><StandbyHostName_1>c</StandbyHostName_1></HostInfo>"
PREFIX_REWRITE = (
    "<PrefixConfiguration><Prefix>x/</Prefix><ReplacedWithPrefix>y/</ReplacedWithPrefix></PrefixConfiguration>"
)


@pytest.mark.parametrize(
    ("document", "element", "words"),
    [
        (XXE, "OriginConfiguration", "DOCTYPE"),
        (LAUGHS, "OriginConfiguration", "DOCTYPE"),
        (b"<OriginConfiguration>&lol;</OriginConfiguration>", "OriginConfiguration", "undefined entity"),
        (b"\xff\xfe<\x00", "OriginConfiguration", "not UTF-8"),
        (b"<OriginConfiguration>" + b" " * MAX_XML_BYTES + b"</OriginConfiguration>", "OriginConfiguration", "at most"),
        (_doc(_rule(condition="<HTTPStatusCode>4</HTTPStatusCode>")), f"{R}/OriginCondition/HTTPStatusCode", "twice"),
        (_doc().replace(b">404<", b">403<"), f"{R}/OriginCondition/HTTPStatusCode", "<HTTPStatusCode> '403' is not"),
        (
            _doc(_rule(parameter="<CopyOriginData>false</CopyOriginData>")),
            f"{R}/OriginParameter/CopyOriginData",
            "<CopyOriginData> false is not supported",
        ),
        (
            _doc(_rule(rule="<HTTPStandbyCode><StatusCode>404</StatusCode></HTTPStandbyCode>")),
            "OriginRule/HTTPStandbyCode",
            "<HTTPStandbyCode> is not supported",
        ),
        (
            _doc(_rule(parameter="<TransparentErrorCode>true</TransparentErrorCode>")),
            f"{R}/OriginParameter/TransparentErrorCode",
            "not supported",
        ),
        (
            _doc(_rule(parameter="<HttpHeader><FollowAllHeaders>true</FollowAllHeaders></HttpHeader>")),
            f"{R}/OriginParameter/HttpHeader/FollowAllHeaders",
            "not supported",
        ),
        (
            _doc(_rule(parameter="<HttpHeader><ForbidFollowHeaders/></HttpHeader>")),
            f"{R}/OriginParameter/HttpHeader/ForbidFollowHeaders",
            "not supported",
        ),
        (_doc(_rule(info="<FileInfo><Prefix>x/</Prefix></FileInfo>")), f"{R}/OriginInfo/FileInfo/Prefix", "old"),
        (_doc(_rule(info=STANDBY_ON_SECOND)), f"{R}/OriginInfo/HostInfo/StandbyHostName_1", "first <HostInfo>"),
        (
            _doc(_rule(info=f"<FileInfo>{PREFIX_REWRITE}</FileInfo>")),
            f"{R}/OriginInfo/FileInfo/PrefixConfiguration/Prefix",
            "the rule's own prefix",
        ),
        (_doc(_rule(condition="<Colour>red</Colour>")), f"{R}/OriginCondition/Colour", "unknown element"),
        (_doc(_rule(rule='<Extra a="1"/>')), "OriginRule/Extra", "not part of COS's schema"),
        (_doc().replace(b"<Protocol>HTTP</Protocol>", b""), f"{R}/OriginParameter/Protocol", "is required"),
        (_doc().replace(b"Mirror", b"Copy"), "OriginRule/OriginType", "must be one of Proxy, Mirror, Redirect"),
        (_doc().replace(b"a.example", b"http://a.example"), f"{R}/OriginInfo/HostInfo", "has a scheme"),
        (
            _doc(_rule(parameter="<HttpRedirectCode>303</HttpRedirectCode>")),
            f"{R}/OriginParameter/HttpRedirectCode",
            "redirect_code must be one of",
        ),
        (_doc(_rule(), _rule()), "OriginRule/RulePriority", "priority 1 is used twice"),
    ],
)
def test_set_rules_xml_refuses_by_element_and_changes_nothing(
    harness: Harness, unchanged: None, document: bytes, element: str, words: str
) -> None:
    with pytest.raises(CosXmlError) as raised:
        rules_from_xml(document)
    assert raised.value.element == element and words in raised.value.problem, str(raised.value)
    with pytest.raises(AdminError, match=f"set_rules_xml refused for bucket {BUCKET}: <"):
        harness.edge().set_rules_xml(BUCKET, document)


# -- the XML mapping --


def test_a_cos_document_as_cos_documents_it_is_read_with_cos_defaults() -> None:
    """
    COS's own example body (the API reference's "Mirror" case) reads as the
    rule it means; absent elements take COS's defaults (FollowRedirection
    and FollowQueryString true).
    """
    document = b"""<?xml version="1.0" encoding="UTF-8"?>
<OriginConfiguration>
  <OriginRule>
    <RulePriority>1</RulePriority>
    <OriginType>Mirror</OriginType>
    <OriginCondition><HTTPStatusCode>404</HTTPStatusCode><Prefix></Prefix></OriginCondition>
    <OriginParameter>
      <Protocol>HTTP</Protocol>
      <HttpHeader>
        <FollowAllHeaders>false</FollowAllHeaders>
        <NewHttpHeaders><Header><Key>x-cos</Key><Value>exampleHeader</Value></Header></NewHttpHeaders>
        <FollowHttpHeaders><Header><Key>exampleHeaderKey</Key></Header></FollowHttpHeaders>
      </HttpHeader>
      <HttpRedirectCode>302</HttpRedirectCode>
    </OriginParameter>
    <OriginInfo>
      <HostInfo><HostName>examplebucket-1250000000.cos.ap-shanghai.myqcloud.com</HostName></HostInfo>
    </OriginInfo>
  </OriginRule>
</OriginConfiguration>"""
    (rule,) = rules_from_xml(document)
    assert rule == Rule(
        priority=1,
        type="mirror",
        hosts=["examplebucket-1250000000.cos.ap-shanghai.myqcloud.com"],
        headers_set={"x-cos": "exampleHeader"},
        headers_pass=["exampleHeaderKey"],
        follow_redirects=True,
    )
    assert rules_from_xml(b"<OriginConfiguration/>") == ()


def _pem(tmp_path: Path) -> str:
    path = tmp_path / "ca.pem"
    path.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    return str(path)


def _random_rule(rng: random.Random, priority: int, ca_file: str) -> Rule | None:
    """A rule with a random choice of every field (None when the combination is invalid)."""
    pick: dict[str, list[Any]] = {
        "type": ["proxy", "mirror", "redirect"],
        "prefix": ["", "img/", "a b/ü", "&<>'\""],
        "suffix": ["", ".jpg", " x"],
        "hosts": [["a.example.com"], ["10.0.0.1:8080", {"host": "b.example.com", "weight": 7}]],
        "standby": [[], ["s1.example.com"], ["s1.example.com", "10.0.0.2:81", "s3.example.com"]],
        "protocol": ["http", "https", "follow"],
        "follow_query_string": [True, False],
        "redirect_code": [301, 302, 307],
        "follow_redirects": [True, False],
        "host_header": [None, "www.example.com"],
        "headers_pass": [[], ["Authorization", "X-Trace"]],
        "headers_set": [{}, {"X-From": "cosedge", "X-Empty": ""}],
        "key_prefix": [None, "", "static/"],
        "key_suffix": [None, ".webp"],
        "fixed_file": [None, "/index.html"],
        "ca_file": [None, ca_file],
    }
    table = {name: rng.choice(values) for name, values in pick.items()}
    try:
        return Rule(priority=priority, **table)
    except ConfigError:
        return None


def test_the_xml_round_trip_keeps_every_field_combination(tmp_path: Path) -> None:
    """rules_from_xml(rules_to_xml(r)) == r for random combinations of every field's values (a fixed seed)."""
    rng = random.Random(11)
    ca_file = _pem(tmp_path)
    rules = [r for r in (_random_rule(rng, i, ca_file) for i in range(1, 3001)) if r is not None]
    assert len(rules) > 500
    for start in range(0, len(rules), 90):
        batch = tuple(rules[start : start + 90])
        assert rules_from_xml(rules_to_xml(batch)) == batch
    seen = {(name, repr(getattr(r, name))) for r in rules for name in ("type", "key_prefix", "ca_file", "standby")}
    assert len(seen) >= 3 + 3 + 2 + 3


def test_rules_from_xml_accepts_only_bytes() -> None:
    with pytest.raises(CosXmlError, match="as bytes"):
        rules_from_xml("<OriginConfiguration/>")  # type: ignore[arg-type]


def test_fills_name_the_rule_and_the_url_of_each_fill(harness: Harness) -> None:
    """edge.fills() shows which rule started a running fill and the URL it copies from."""
    harness.edge().set_rules(BUCKET, [{"priority": 3, "type": "mirror", "hosts": ["10.9.8.7:81"]}])
    source = origins.prefetch_source(harness.service.config.buckets[BUCKET], ("a.jpg",))
    assert source is not None
    harness.origin.add("a.jpg", b"x" * 100, mode="stall", cut=10)  # the fill stays in flight
    assert harness.service.filler.start(BUCKET, ("a.jpg",), source)
    rows = list(harness.edge().fills())
    assert [(r["key"], r["rule"], r["url"]) for r in rows] == [("a.jpg", "3:mirror", "http://10.9.8.7:81/a.jpg")]
