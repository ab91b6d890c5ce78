"""
HTTPS origins against the real daemon (issue 11): real TLS origins on
127.0.0.1 with certificates from a CA made at run time.  A rule's
``ca_file`` is honoured, a certificate from another CA or without the name
is refused (a clean miss, reason ``tls``: the fill's log line and
``cosedge_fills_failed_total``), and ``host_header`` is the name verified
and sent as SNI.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ..tlsca import CA, LoopbackOrigin
from .conftest import FAST_FILL, Daemon, _daemons_in_test, free_port, raw_request, wait_for

OK, WRONG_CA, WRONG_NAME, BY_NAME = (f"tls-{case}-1250000000" for case in ("ok", "wrongca", "wrongname", "byname"))


def body_for(path: str) -> bytes:
    """The bytes every origin here serves for ``path``: 300 KiB, several TLS records."""
    seed = hashlib.sha256(path.encode()).digest()
    return seed * (300 * 1024 // len(seed))


def _rule(bucket: str, origin: LoopbackOrigin, ca_file: Path, host_header: str | None = None) -> str:
    header = f'host_header = "{host_header}"\n' if host_header else ""
    return f"""
[[buckets."{bucket}".rules]]
priority = 1
type = "proxy"
hosts = ["{origin.netloc}"]
protocol = "https"
ca_file = "{ca_file}"
{header}"""


@attrs.frozen
class World:
    """
    The daemon (with its admin listener), an origin whose certificate names
    only 127.0.0.1 and one whose certificate names only origin.test (both
    from the CA the rules trust, but for WRONG_CA).
    """

    daemon: Daemon
    admin_port: int
    by_ip: LoopbackOrigin
    by_name: LoopbackOrigin

    def get(self, bucket: str, key: str) -> tuple[int, bytes]:
        reply = self.daemon.request(f"/{key}", host=f"{bucket}.file.myqcloud.com")
        return reply.status, reply.body

    def outcome(self, bucket: str, key: str) -> str:
        """The end of ``key``'s fill, from its log line: "stored" or the reason it failed."""
        match = self.daemon.wait_for_log(rf"fill {bucket}/{re.escape(key)} (stored|failed: (\S+))", 15)
        return match.group(2) or match.group(1)

    def tls_failures(self) -> float:
        """``cosedge_fills_failed_total{reason="tls"}`` (all other labels summed)."""
        request = b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        reply = raw_request(self.admin_port, request)
        assert reply.status == 200
        return sum(
            s.value
            for family in text_string_to_metric_families(reply.body.decode())
            for s in family.samples
            if s.name == "cosedge_fills_failed_total" and s.labels.get("reason") == "tls"
        )

    @property
    def asked(self) -> int:
        """The requests the origins have answered."""
        return len(self.by_ip.hosts) + len(self.by_name.hosts)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("cosedge-tls")
    ca, stranger = CA.make(), CA.make("a CA nobody trusts")
    trusted, untrusted = root / "ca.pem", root / "stranger.pem"
    trusted.write_bytes(ca.pem)
    untrusted.write_bytes(stranger.pem)
    with (
        LoopbackOrigin(body_for, ca.issue(["127.0.0.1"])) as by_ip,
        LoopbackOrigin(body_for, ca.issue(["origin.test"])) as by_name,
    ):
        admin = free_port()
        rules = (
            _rule(OK, by_ip, trusted)
            + _rule(WRONG_CA, by_ip, untrusted)
            + _rule(WRONG_NAME, by_name, trusted)
            + _rule(BY_NAME, by_name, trusted, host_header="origin.test")
        )
        extra = f'\n[admin]\nlisten = "tcp:{admin}:interface=127.0.0.1"\nmin_free_bytes = 0\n' + rules
        daemon = Daemon(root, by_ip.netloc, dict(FAST_FILL), extra_config=extra)
        daemon.start()
        try:
            yield World(daemon, admin, by_ip, by_name)
        finally:
            daemon.stop()
    assert daemon.problems() == [], "the daemon logged an unexpected error"


@pytest.fixture(autouse=True)
def _shown_if_failed(world: World) -> None:
    """A failing test shows the shared daemon's log."""
    _daemons_in_test.append(world.daemon)


def test_a_ca_file_is_honoured_and_the_object_stored_and_served(world: World) -> None:
    key = "ok/trusted.bin"
    assert world.get(OK, key)[0] == 302
    wait_for(lambda: world.get(OK, key) == (200, body_for("/" + key)), 15, "the object stored and served")
    assert world.outcome(OK, key) == "stored"
    # An IP address is verified against the certificate's, and never sent as SNI (RFC 6066).
    assert world.by_ip.sni and set(world.by_ip.sni) == {None}


@pytest.mark.parametrize(
    ("bucket", "key", "why"),
    [
        (WRONG_CA, "a/untrusted.bin", "TLS failed: certificate verify failed"),
        (WRONG_NAME, "a/misnamed.bin", "the certificate does not name 127.0.0.1"),
    ],
)
def test_a_certificate_from_another_ca_or_without_the_name_is_refused(
    world: World, bucket: str, key: str, why: str
) -> None:
    """A clean miss: nothing stored, the fill failed ``tls`` (and says why), counted, and the origin never asked."""
    before, asked = world.tls_failures(), world.asked
    assert world.get(bucket, key)[0] == 302
    assert world.outcome(bucket, key) == "tls"
    world.daemon.wait_for_log(rf"fill {bucket}/{re.escape(key)} failed: tls \(https://127\.0\.0\.1:\d+: {why}\)")
    assert world.tls_failures() == before + 1
    assert world.get(bucket, key)[0] == 302
    assert not (world.daemon.data_dir / bucket / key).exists()
    assert world.asked == asked


def test_host_header_is_the_name_verified_and_sent_as_sni(world: World) -> None:
    """An origin at 127.0.0.1 whose certificate names only origin.test, reached with host_header = "origin.test"."""
    key = "named/by-host-header.bin"
    assert world.get(BY_NAME, key)[0] == 302
    assert world.outcome(BY_NAME, key) == "stored"
    assert world.get(BY_NAME, key) == (200, body_for("/" + key))
    assert "origin.test" in world.by_name.sni
    assert world.by_name.hosts[-1] == "origin.test"
