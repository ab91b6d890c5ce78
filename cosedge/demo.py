"""
A demo origin server for trying cosedge by hand: ``python -m cosedge.demo``.

It serves a few generated files (``1.jpg``, ``index.html``, ``docs/readme.txt``)
on ``127.0.0.1:8081``, the origin of the example bucket in the default
configuration, and logs every request so you can watch the background fill.
"""

from __future__ import annotations

import argparse
import sys

from twisted.web.resource import Resource

from .testing import FakeOrigin

__all__ = ["DEMO_ORIGIN_ENDPOINT", "demo_objects", "demo_resource", "main"]

#: Where ``twistd cosedge --demo-origin`` runs the demo origin: the origin of
#: the example bucket in the embedded default configuration.
DEMO_ORIGIN_ENDPOINT = "tcp:8081:interface=127.0.0.1"


def demo_objects() -> dict[str, tuple[bytes, str]]:
    """The demo origin's files: key -> (body, content type)."""
    jpeg = bytes.fromhex("ffd8ffe000104a46494600010100000100010000ffd9") + bytes(range(256)) * 16
    return {
        "1.jpg": (jpeg, "image/jpeg"),
        "index.html": (b"<!doctype html><title>origin</title><p>Hello from the origin.</p>\n", "text/html"),
        "docs/readme.txt": (b"This file was pulled from the origin into the bucket.\n", "text/plain"),
    }


def demo_resource() -> Resource:
    """A fake origin serving :func:`demo_objects`."""
    origin = FakeOrigin()
    for key, (body, content_type) in demo_objects().items():
        origin.add(key, body, content_type=content_type)
    return origin


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cosedge.demo", description=__doc__)
    parser.add_argument("--port", type=int, default=8081, help="port on 127.0.0.1 (default 8081)")
    args = parser.parse_args(argv)

    from twisted.internet import endpoints, reactor
    from twisted.logger import globalLogBeginner, textFileLogObserver
    from twisted.web.server import Site

    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)])
    endpoint = endpoints.TCP4ServerEndpoint(reactor, args.port, interface="127.0.0.1")
    endpoint.listen(Site(demo_resource()))
    print(f"demo origin on http://127.0.0.1:{args.port}/ serving: {', '.join(demo_objects())}", flush=True)
    reactor.run()  # type: ignore[attr-defined]
    return 0


if __name__ == "__main__":
    sys.exit(main())
