"""
``python -m bench.hitloop``: the hit path in one process, without sockets.

Builds the bucket listener over a disk store holding one 1 KiB object and
feeds it N keep-alive GETs through an in-memory transport; prints the mean
and the best of five rounds in CPU microseconds per request (CPU time, so
that other work on the machine moves the figures less).  It measures only
cosedge's own work per hit (parsing, routing, the store's open, the answer),
which is what a change of the hit path moves; `bash bench/run` measures the
daemon over real sockets against its peers.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable, Iterable

from twisted.internet import _producer_helpers
from twisted.internet.task import Clock, Cooperator
from twisted.internet.testing import StringTransport

from cosedge.config import BucketConfig, Config, ServerConfig, parse_origin
from cosedge.stats import Stats

try:
    from cosedge.fill.scheduler import Filler
    from cosedge.storage.disk import DiskStore
    from cosedge.web.channel import EdgeSite
    from cosedge.web.resource import EdgeResource
except ImportError:  # the layout before the data-plane change, to compare with it
    from cosedge.store import DiskStore  # type: ignore[no-redef]

    from cosedge.fill import Filler  # type: ignore[no-redef]
    from cosedge.web import EdgeResource, EdgeSite  # type: ignore[no-redef]

BUCKET = "example-1250000000"
HOST = f"{BUCKET}.file.myqcloud.com"


def build(data_dir: str) -> EdgeSite:
    config = Config(
        server=ServerConfig(data_dir=data_dir, access_log=""),
        buckets={BUCKET: BucketConfig(origin=parse_origin("127.0.0.1:9"), origin_pull=True)},
    )
    store = DiskStore(data_dir)
    clock = Clock()
    stats = Stats()
    filler = Filler(store, None, clock, lambda: config.fill, stats)  # type: ignore[arg-type]
    resource = EdgeResource(lambda: config, store, filler, stats)
    return EdgeSite(resource, stats, "", clock, 60)


class _Steps:
    """Runs the pull producers of large bodies (Twisted's pull-to-push adapter) at once, with no reactor."""

    def __init__(self) -> None:
        self.calls: list[Callable[[], None]] = []
        self.cooperator = Cooperator(terminationPredicateFactory=lambda: lambda: False, scheduler=self.calls.append)

    def run(self) -> None:
        while self.calls:
            self.calls.pop(0)()


class _Sink(StringTransport):
    """
    A transport that counts what is written and keeps none of it.
    ``StringTransport`` gathers it in a ``BytesIO``, whose growth copies the
    body again whenever ``realloc`` cannot grow it in place: up to some
    70,000 instructions a 100 KiB hit, and whether it does depends on the
    heap's layout, so it moved with changes anywhere in the process.
    """

    written = 0

    def write(self, data: bytes) -> None:
        self.written += len(data)

    def writeSequence(self, data: Iterable[bytes]) -> None:
        for piece in data:
            self.written += len(piece)


def rounds(n: int, count: int, size: int = 1024) -> list[float]:
    steps = _Steps()
    _producer_helpers.cooperate = steps.cooperator.cooperate  # type: ignore[assignment]
    with tempfile.TemporaryDirectory() as tmp:
        os.makedirs(os.path.join(tmp, BUCKET))
        with open(os.path.join(tmp, BUCKET, "object.bin"), "wb") as f:
            f.write(os.urandom(size))
        site = build(tmp)
        request = f"GET /object.bin HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode()
        results = []
        for _ in range(count):
            channel = site.buildProtocol(None)  # type: ignore[arg-type]
            transport = _Sink()
            channel.makeConnection(transport)
            start = time.process_time()
            for _ in range(n):
                channel.dataReceived(request)
                steps.run()
            results.append((time.process_time() - start) / n * 1e6)
            if transport.written < n * size:
                raise RuntimeError(f"{transport.written} bytes answered to {n} requests for {size}")
            channel.connectionLost(None)  # type: ignore[arg-type]
        return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=20000, help="requests per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--size", type=int, default=1024, help="object size in bytes")
    args = parser.parse_args()
    times = rounds(args.n, args.rounds, args.size)
    print(
        f"{args.size}-byte hit, in process: best {min(times):.1f} us, mean {sum(times) / len(times):.1f} us per request"
    )


if __name__ == "__main__":
    main()
