"""
Large objects on the S3 store: a fill's temporary file above
``[storage] multipart_threshold`` is stored with S3's multipart upload
(a single PUT is limited to 5 GiB on AWS S3 and Ceph RGW, and a failed part
is cheaper to send again than a whole object).

The object appears only when the upload is completed, whole or not at all,
as with a single PUT.  Each part carries its Content-MD5 and its ETag must be
that MD5; the completed object's ETag must be the MD5 of the parts' MD5s
(S3's ``<hex>-<parts>``), or the object is deleted and the fill is a clean
miss.  An upload that fails or is cancelled is aborted; the upload's id is
kept in a journal file beside the temporary file until it is completed or
aborted, so an upload left by a crash is aborted by the next sweep.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any
from xml.etree import ElementTree

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web.iweb import IBodyProducer

from ..interfaces import StoreError
from .produce import RunBlocking
from .s3_http import Reply, S3Client, child_text, xml_tag

__all__ = ["JOURNAL_SUFFIX", "FilePart", "abort_journalled", "composite_etag", "parts", "put_in_parts"]

_log = Logger()

#: S3's most parts in one upload.
MAX_PARTS = 10_000
#: The journal of an upload under way: beside its temporary file, ``<pid>.<bucket>.<random>.upload``.
JOURNAL_SUFFIX = ".upload"


class FilePart:
    """
    Bytes ``offset`` to ``offset + length`` of a file, as
    :class:`~twisted.web.client.FileBodyProducer` reads one: opened at the
    first read (a request that fails before its body is sent holds no
    descriptor), closed by the producer once it is done or stopped.
    """

    def __init__(self, path: str, offset: int, length: int) -> None:
        self._path = path
        self._fd = -1
        self._offset = offset
        self._length = length
        self._position = 0

    def seek(self, position: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._position, os.SEEK_END: self._length}[whence]
        self._position = max(0, min(self._length, base + position))
        return self._position

    def tell(self) -> int:
        return self._position

    def read(self, size: int = -1) -> bytes:
        if self._fd < 0:
            self._fd = os.open(self._path, os.O_RDONLY)
        left = self._length - self._position
        data = os.pread(self._fd, left if size < 0 else min(size, left), self._offset + self._position)
        self._position += len(data)
        return data

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def parts(size: int, part_size: int) -> list[tuple[int, int]]:
    """The ``(offset, length)`` of each part: ``part_size`` each (raised to keep within S3's 10,000 parts)."""
    part_size = max(part_size, -(-size // MAX_PARTS))
    return [(offset, min(part_size, size - offset)) for offset in range(0, size, part_size)] or [(0, 0)]


def composite_etag(digests: list[bytes]) -> str:
    """The ETag S3 gives an object uploaded in these parts (by their MD5 digests)."""
    return f"{hashlib.md5(b''.join(digests), usedforsecurity=False).hexdigest()}-{len(digests)}"


def _md5(path: str, offset: int, length: int, whole: Any) -> bytes:
    """
    The MD5 of bytes ``offset`` to ``offset + length`` of the file (blocking);
    ``whole``, the whole file's running MD5, is updated with them too.
    """
    digest = hashlib.md5(usedforsecurity=False)
    part = FilePart(path, offset, length)
    try:
        while chunk := part.read(1024 * 1024):
            digest.update(chunk)
            whole.update(chunk)
    finally:
        part.close()
    return digest.digest()


def _element(body: bytes, name: str) -> tuple[str, str]:
    """
    The root element's name and the text of its child ``name`` ("" when the
    body is no XML).  S3 may send whitespace before a slow answer's XML (to
    keep the connection open): it is skipped.
    """
    try:
        root = ElementTree.fromstring(body.strip())
    except ElementTree.ParseError:
        return "", ""
    return xml_tag(root), child_text(root, name)


class _Journal:
    """
    The journal file of one upload: written (durably: a temporary file,
    ``fsync``, ``rename``) once the store has given its id and before the
    first part, removed once the upload is over.
    """

    def __init__(self, path: str) -> None:
        self.path = path

    def write(self, store_bucket: str, key: str, upload_id: str) -> None:
        """Blocking: on the thread pool."""
        record = {"bucket": store_bucket, "key": key, "upload_id": upload_id}
        writing = self.path + ".part"  # a crash leaves it to the sweep of temporary files
        with open(writing, "w", encoding="utf-8") as f:
            json.dump(record, f)
            f.flush()
            os.fsync(f.fileno())
        os.rename(writing, self.path)

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


async def _abort(client: S3Client, store_bucket: str, key: str, upload_id: str) -> bool:
    """Abort an upload: whether it is gone (aborted now, or before)."""
    reply = await client.call("DELETE", store_bucket, key, query=[("uploadId", upload_id)])
    return reply.status in (200, 204, 404)


def _abort_failed(key: str, why: object) -> None:
    _log.info("aborting the upload of {key} failed ({why}): the next sweep does it", key=key, why=why)


def _abort_later(client: S3Client, store_bucket: str, key: str, upload_id: str, journal: _Journal) -> None:
    """Abort an upload that failed, in the background: its journal stays for the next sweep unless it is gone."""

    def done(gone: bool) -> None:
        if gone:
            journal.remove()

    def failed(failure: Any) -> None:
        _abort_failed(key, failure.value)

    Deferred.fromCoroutine(_abort(client, store_bucket, key, upload_id)).addCallbacks(done, failed)


async def abort_journalled(client: S3Client, path: str) -> bool:
    """
    Abort the upload a journal file names (left by a process that stopped
    mid-upload) and remove the file; whether it did (the store unreachable:
    the file stays, for the next sweep).
    """
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
        where = (str(record["bucket"]), str(record["key"]), str(record["upload_id"]))
    except FileNotFoundError:
        return False
    except (OSError, ValueError, KeyError, TypeError):
        _Journal(path).remove()  # not this file's (a journal is renamed into place whole): nothing to abort
        return True
    try:
        gone = await _abort(client, *where)
    except Exception as e:
        _abort_failed(where[1], e)
        return False
    if gone:
        _Journal(path).remove()
    return gone


async def put_in_parts(
    client: S3Client,
    store_bucket: str,
    key: str,
    path: str,
    size: int,
    headers: dict[str, str],
    *,
    part_size: int,
    open_body: Callable[[bytes | FilePart], IBodyProducer],
    run_blocking: RunBlocking,
    create_bucket: Callable[[str], Awaitable[None]],
    seconds_per_byte: float,
    md5: str,
) -> bool:
    """
    Store the file ``path`` (``size`` bytes, whose MD5 as it was written is
    ``md5``) under ``key`` in parts.
    ``headers``: the object's (metadata, Content-Type; ``If-None-Match: *``
    makes the upload give way to an object stored meanwhile).  True: stored;
    False: the key was stored already and this upload gave way.

    :raises StoreError: the upload failed (and is aborted).
    """
    exclusive = "if-none-match" in headers
    initiate = {k: v for k, v in headers.items() if k not in ("content-md5", "if-none-match")}
    reply = await client.call("POST", store_bucket, key, query=[("uploads", "")], headers=initiate)
    if reply.status == 404 and reply.failure("").code == "NoSuchBucket":
        await create_bucket(store_bucket)
        reply = await client.call("POST", store_bucket, key, query=[("uploads", "")], headers=initiate)
    upload_id = _element(reply.body, "UploadId")[1] if reply.status == 200 else ""
    if not upload_id:
        raise reply.failure(f"starting the multipart upload of {key}")
    journal = _Journal(path[: -len(".part")] + JOURNAL_SUFFIX if path.endswith(".part") else path + JOURNAL_SUFFIX)
    try:
        await run_blocking(partial(journal.write, store_bucket, key, upload_id))
        digests: list[bytes] = []
        whole = hashlib.md5(usedforsecurity=False)
        for number, (offset, length) in enumerate(parts(size, part_size), 1):
            digest: bytes = await run_blocking(partial(_md5, path, offset, length, whole))
            sent = {"content-md5": base64.b64encode(digest).decode("ascii")}
            query = [("partNumber", str(number)), ("uploadId", upload_id)]
            body = open_body(FilePart(path, offset, length))
            timeout = client.timeout + length * seconds_per_byte
            reply = await client.call("PUT", store_bucket, key, query=query, headers=sent, body=body, timeout=timeout)
            if reply.status != 200:
                raise reply.failure(f"PUT part {number} of {key}")
            etag = (reply.header(b"etag") or "").strip('"')
            if len(etag) == 32 and etag != digest.hex():
                raise StoreError(f"PUT part {number} of {key}: the stored ETag {etag} is not the part's MD5")
            digests.append(digest)
        if whole.hexdigest() != md5:
            raise StoreError(f"{key}: the temporary file's MD5 {whole.hexdigest()} is not the body's {md5}")
        if exclusive and (await client.call("HEAD", store_bucket, key)).status == 200:
            _abort_later(client, store_bucket, key, upload_id, journal)
            return False
        stored = await _complete(client, store_bucket, key, upload_id, digests, exclusive, open_body)
    except BaseException:
        _abort_later(client, store_bucket, key, upload_id, journal)
        raise
    if not stored:
        _abort_later(client, store_bucket, key, upload_id, journal)
        return False
    journal.remove()
    return True


async def _complete(
    client: S3Client,
    store_bucket: str,
    key: str,
    upload_id: str,
    digests: list[bytes],
    exclusive: bool,
    open_body: Callable[[bytes | FilePart], IBodyProducer],
) -> bool:
    """Complete the upload (False: ``If-None-Match: *`` and the key is stored already)."""
    listed = "".join(
        f"<Part><PartNumber>{n}</PartNumber><ETag>&quot;{d.hex()}&quot;</ETag></Part>" for n, d in enumerate(digests, 1)
    )
    xml = f"<CompleteMultipartUpload>{listed}</CompleteMultipartUpload>".encode("ascii")
    headers = {"content-type": "application/xml", **({"if-none-match": "*"} if exclusive else {})}
    # S3 answers a completion that takes long with a 200 whose body may still turn into an <Error>.
    query = [("uploadId", upload_id)]
    reply = await client.call("POST", store_bucket, key, query=query, headers=headers, body=open_body(xml))
    root, etag = _element(reply.body, "ETag")
    if reply.status == 412 and exclusive:
        return False
    if reply.status != 200 or root != "CompleteMultipartUploadResult":  # a 200 may still end in an <Error>
        raise Reply(reply.status if reply.status != 200 else 500, reply.headers, reply.body).failure(
            f"completing the multipart upload of {key}"
        )
    etag = etag.strip('"') or (reply.header(b"etag") or "").strip('"')
    expected = composite_etag(digests)
    if "-" in etag and etag != expected:
        await client.call("DELETE", store_bucket, key)
        raise StoreError(f"completing the upload of {key}: the stored ETag {etag} is not the parts' {expected}")
    return True
