"""
How the S3 store stores an object: one PUT with its length and MD5, or,
for a temporary file above ``multipart_threshold``, a multipart upload
(:mod:`cosedge.storage.s3_multipart`); and how it creates a missing store
bucket on the way.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from itertools import count
from typing import Any

from twisted.internet import task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.client import FileBodyProducer

from ..interfaces import StoreError
from .produce import CHUNK, RunBlocking
from .s3_http import S3Client
from .s3_multipart import FilePart, put_in_parts

__all__ = ["S3Puts"]

_log = Logger()

#: Seconds a PUT may take per byte beyond ``timeout`` (a floor of 1 MB/s to the store).
PUT_SECONDS_PER_BYTE = 1e-6
#: PUTs retried after S3's 409 ConditionalRequestConflict (another conditional write of the key was under way).
_CONFLICT_RETRIES = 3


class S3Puts:
    """
    Objects stored in one store (``multipart``: the threshold above which a
    temporary file is uploaded in parts, and the parts' size).
    """

    def __init__(
        self,
        client: S3Client,
        clock: IReactorTime,
        run_blocking: RunBlocking,
        cooperator: Any,
        multipart: tuple[int, int],
        describe: Callable[[], str],
    ) -> None:
        self._client = client
        self._clock = clock
        self._run_blocking = run_blocking
        self._cooperator = cooperator
        self.multipart_threshold, self.part_size = multipart
        self._describe = describe

    def open_body(self, source: bytes | str | FilePart) -> FileBodyProducer:
        """A request body of bytes, of a file (by its path), or of a part of a file."""
        if isinstance(source, bytes):
            data: Any = io.BytesIO(source)
        else:
            data = open(source, "rb") if isinstance(source, str) else source  # noqa: SIM115
        return FileBodyProducer(data, cooperator=self._cooperator, readSize=CHUNK)

    async def put(
        self, store_bucket: str, key: str, source: bytes | str, size: int, headers: dict[str, str], md5: str
    ) -> bool:
        """
        Store ``source`` (bytes, or the path of a file of ``size`` bytes whose
        MD5 is ``md5``) under ``key``.  True: stored; False: ``headers`` say
        ``If-None-Match: *`` and the store holds the key already.

        :raises StoreError: the store did not store it (and holds nothing of it).
        """
        if isinstance(source, str) and size > self.multipart_threshold:
            return await put_in_parts(
                self._client,
                store_bucket,
                key,
                source,
                size,
                headers,
                part_size=self.part_size,
                open_body=self.open_body,
                run_blocking=self._run_blocking,
                create_bucket=self.create_bucket,
                seconds_per_byte=PUT_SECONDS_PER_BYTE,
                md5=md5,
            )
        client = self._client
        timeout = client.timeout + size * PUT_SECONDS_PER_BYTE
        exclusive = "if-none-match" in headers
        for attempt in count(1):
            reply = await client.call(
                "PUT", store_bucket, key, headers=headers, body=self.open_body(source), timeout=timeout
            )
            if reply.status == 404 and reply.failure("").code == "NoSuchBucket":
                # Not created yet: a bucket of its own, or the configured one that the probe at start
                # is still creating (Ceph RGW takes seconds over its first bucket, while fills start).
                await self.create_bucket(store_bucket)
                reply = await client.call(
                    "PUT", store_bucket, key, headers=headers, body=self.open_body(source), timeout=timeout
                )
            conflict = exclusive and reply.status == 409 and reply.failure("").code == "ConditionalRequestConflict"
            if not conflict or attempt > _CONFLICT_RETRIES:
                break
            # (AWS S3) another conditional write of the key is under way: it ends in a 200, then this one's 412.
            await task.deferLater(self._clock, 0.2 * attempt)
        if reply.status == 412 and exclusive:
            return False
        if reply.status != 200:
            raise reply.failure(f"PUT {key}")
        etag = (reply.header(b"etag") or "").strip('"')
        if re.fullmatch(r"[0-9a-f]{32}", etag) and etag != md5:
            await client.call("DELETE", store_bucket, key)
            raise StoreError(f"{self._describe()}: PUT {key}: the stored ETag {etag} is not the body's MD5 {md5}")
        return True

    async def create_bucket(self, store_bucket: str) -> None:
        """Create the store bucket (one that exists already is as good)."""
        region = self._client.region
        body = None
        if region != "us-east-1":
            xml = f'<CreateBucketConfiguration xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><LocationConstraint>{region}</LocationConstraint></CreateBucketConfiguration>'  # noqa: E501
            body = self.open_body(xml.encode("ascii"))
        reply = await self._client.call("PUT", store_bucket, body=body)
        if reply.status != 200 and reply.failure("").code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
            raise reply.failure(f"creating the store bucket {store_bucket}")
        _log.info("created the store bucket {bucket} on {store}", bucket=store_bucket, store=self._describe())
