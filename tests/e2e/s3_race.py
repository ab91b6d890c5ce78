"""
Several edges filling one key at once, in one process: ``count`` S3 stores
(each with its own connection pool, as separate edges have) each open the
key, find it missing, and commit a body of their own, all at the same
moment.  Run by tests/e2e/test_engines_e2e.py as

    python s3_race.py ENDPOINT STORE_BUCKET KEY COUNT SIZE TMP_DIR

with the access keys in ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``.
Prints one JSON object: each writer's commit outcome ("stored" or the
error), the status of each object PUT the stores sent, and each body's MD5.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from typing import Any

from twisted.internet import task
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.web.client import Agent, HTTPConnectionPool

from cosedge.storage.s3 import S3Store
from cosedge.storage.s3_http import S3Client

#: Seconds the whole race may take.
TIME_LIMIT = 60


async def race(reactor: Any, endpoint: str, bucket: str, key: str, count: int, size: int, tmp_dir: str) -> None:
    keys = (os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"])
    statuses: list[int] = []
    stores, pools = [], []
    for _ in range(count):
        pool = HTTPConnectionPool(reactor, persistent=True)
        client = S3Client(Agent(reactor, pool=pool), reactor, endpoint, "us-east-1", keys, timeout=20)
        call = client.call

        def counted(method: str, *args: Any, _call: Any = call, **options: Any) -> Any:
            answer = _call(method, *args, **options)
            if method == "PUT" and len(args) > 1 and args[1] and "x-amz-copy-source" not in options.get("headers", {}):
                answer.addCallback(lambda reply: statuses.append(reply.status) or reply)
            return answer

        client.call = counted  # type: ignore[method-assign]
        stores.append(S3Store(client, reactor, tmp_dir, bucket=bucket, run_blocking=maybeDeferred))
        pools.append(pool)
    segments = tuple(key.split("/"))
    found = [await store.open("race", segments) for store in stores]
    writers = [await store.writer("race", segments, None) for store in stores]  # temporary files: a long PUT
    bodies = [hashlib.sha256(b"%d" % i).digest() * (size // 32) for i in range(count)]
    for writer, body in zip(writers, bodies, strict=True):
        writer.write(body)
    commits = [writer.commit({"content-type": "application/octet-stream"}, None) for writer in writers]
    results = await DeferredList(commits, consumeErrors=True)
    outcomes = ["stored" if ok else f"{value.type.__name__}: {value.getErrorMessage()}" for ok, value in results]
    for pool in pools:
        await pool.closeCachedConnections()
    report = {
        "found": [obj is not None for obj in found],
        "outcomes": outcomes,
        "statuses": statuses,
        "md5": [hashlib.md5(body).hexdigest() for body in bodies],
        "left": os.listdir(tmp_dir),
    }
    print(json.dumps(report))


def main(reactor: Any, *argv: str) -> Any:
    endpoint, bucket, key, count, size, tmp_dir = argv
    work = race(reactor, endpoint, bucket, key, int(count), int(size), tmp_dir)
    return Deferred.fromCoroutine(work).addTimeout(TIME_LIMIT, reactor)


if __name__ == "__main__":
    task.react(main, sys.argv[1:])
