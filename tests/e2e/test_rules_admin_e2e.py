"""
End-to-end: origin rules set live through the real manhole of the real
``twistd -n --pidfile= cosedge`` daemon (SSH with a generated key, one
command per connection, as a script would), followed by the next miss, kept
in the state file and alive after a restart.

Run with ``.venv/bin/python -m pytest tests/e2e/test_rules_admin_e2e.py -q``.
"""

# ruff: noqa: F811 (the fixtures imported from test_admin_e2e are parameters of the test)

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from .conftest import BUCKET
from .origin import MisbehavingOrigin, body_for
from .test_admin_e2e import (  # noqa: F401 (fixtures)
    AdminDaemon,
    Credentials,
    credentials,
    ensure_deferred,
    make_admin_daemon,
    manhole_port,
    ssh_command,
    start,
)

pytestmark = pytest.mark.e2e

XXE = (
    '<?xml version="1.0"?><!DOCTYPE OriginConfiguration [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
    "<OriginConfiguration>&x;</OriginConfiguration>"
)


@ensure_deferred
async def test_rules_set_in_the_manhole_decide_the_next_miss_and_survive_a_restart(
    make_admin_daemon: Callable[..., AdminDaemon], credentials: Credentials, origin: MisbehavingOrigin
) -> None:
    """
    set_rules and add_rule over SSH: a key under the redirect rule's prefix
    answers 301 to the rule's host, one under the mirror rule's is answered
    with the object (copied once), a key no rule matches is 404 NoSuchKey;
    a refused XML document changes nothing; after a restart the rules still
    decide, and the XML the manhole printed loads them back.
    """
    daemon = make_admin_daemon()
    port = manhole_port(daemon, "ssh")

    async def edge(command: str, expected_status: int = 0) -> str:
        out, status = await ssh_command(port, credentials.key, f"edge.{command}")
        assert status == expected_status, out
        return out

    # In the order of cosedge.rules.rule_table, so that json.dumps gives the text of change lines.
    redirect = {"priority": 2, "type": "redirect", "hosts": [origin.netloc], "prefix": "r/", "redirect_code": 301}
    mirror = {"priority": 1, "type": "mirror", "hosts": [origin.netloc], "prefix": "ok/rules/"}
    out = await edge(f"set_rules({BUCKET!r}, [{redirect!r}])")
    assert out.startswith(f"rules of {BUCKET}: rule 2 added {json.dumps(redirect)}"), out
    out = await edge(f"add_rule({BUCKET!r}, {mirror!r})")
    assert out.startswith(f"rules of {BUCKET}: rule 1 added {json.dumps(mirror)}"), out

    def follows_the_rules(n: int) -> None:
        reply = daemon.request(f"/r/{n}.jpg")
        assert (reply.status, reply.header("Location")) == (301, f"http://{origin.netloc}/r/{n}.jpg")
        reply = daemon.request("/ok/rules/m.bin")
        assert (reply.status, reply.body) == (200, body_for("/ok/rules/m.bin"))
        reply = daemon.request(f"/no-rule-{n}.jpg")
        assert (reply.status, reply.error_code) == (404, "NoSuchKey")

    follows_the_rules(1)
    assert origin.gets("/ok/rules/m.bin") == 1
    daemon.wait_for_log(rf"audit: rules of {BUCKET}: rule 1 added .* via ssh:admin@127\.0\.0\.1")
    saved = json.loads(daemon.state_file.read_text())["buckets"][BUCKET]
    assert saved == {"rules": [mirror, redirect]}
    xml = await edge(f"rules_xml({BUCKET!r})")
    assert "<OriginType>Mirror</OriginType>" in xml and "<HttpRedirectCode>301</HttpRedirectCode>" in xml

    out = await edge(f"set_rules_xml({BUCKET!r}, {XXE!r})", expected_status=1)
    assert out.startswith(f"error: set_rules_xml refused for bucket {BUCKET}: <OriginConfiguration>: a DOCTYPE")
    assert "nothing changed" in out and "root:" not in out
    assert json.loads(daemon.state_file.read_text())["buckets"][BUCKET] == saved

    daemon.stop()
    start(daemon)
    follows_the_rules(2)
    out = await edge(f"rules({BUCKET!r})")
    assert [line.split()[:3] for line in out.splitlines()[1:]] == [
        ["1", "mirror", "ok/rules/"],
        ["2", "redirect", "r/"],
    ]
    await edge(f"set_rules({BUCKET!r}, [])")
    assert daemon.request("/r/3.jpg").header("Location") == f"http://{daemon.origin}/r/3.jpg"  # the origin's rule
    await edge(f"set_rules_xml({BUCKET!r}, {xml!r})")
    follows_the_rules(4)
    assert origin.gets("/ok/rules/m.bin") == 1  # stored: every later request was a hit
