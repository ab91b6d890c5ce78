"""
Large objects on the S3 store (issue 13): a fill's temporary file above
``multipart_threshold`` is stored with a multipart upload, against the fake
S3 of :mod:`tests.test_s3_store` taught S3's upload calls.  What is
checked: the object appears whole or not at all, every part and the whole
are checked against their MD5s, a failed, cancelled or given-way upload is
aborted, and an upload a crash left is aborted by the next sweep.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import pytest
from twisted.python.failure import Failure
from twisted.web.server import Request

from cosedge.interfaces import StoreError
from cosedge.storage.s3_multipart import MAX_PARTS, FilePart, parts
from cosedge.storage.s3_objects import META_HEADER

from .helpers import capture_logs, result_of
from .test_s3_store import BUCKET, NS, FakeS3, Harness

#: Small sizes for the fake (the configuration keeps S3's 5 MiB floor; the store itself has none).
THRESHOLD, PART = 300_000, 100_000


class MultipartS3(FakeS3):
    """The fake S3 with multipart uploads: initiate, upload part, complete, abort."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        #: upload id -> (key, the object's headers, parts by number)
        self.uploads: dict[str, tuple[str, dict[str, str], dict[int, bytes]]] = {}
        self.started = 0
        #: Stored under the key by "another edge" just before the next completion.
        self.stored_before_complete: bytes | None = None
        self.bad_complete_etag = False
        #: Answer the next completion 200, then (after whitespace, as S3 does for a slow one) an <Error>.
        self.error_after_200 = False

    def _upload(
        self,
        request: Request,
        method: str,
        objects: dict[str, Any],
        key: str,
        headers: dict[str, str],
        query: dict[str, str],
    ) -> bytes:
        if method == "POST" and "uploads" in query:
            assert "content-md5" not in headers and "if-none-match" not in headers
            self.started += 1
            upload_id = f"upload-{self.started}"
            kept = {k: v for k, v in headers.items() if k.startswith("x-amz-meta-") or k == "content-type"}
            self.uploads[upload_id] = (key, kept, {})
            return (
                f'<InitiateMultipartUploadResult xmlns="{NS}"><Key>{escape(key)}</Key>'
                f"<UploadId>{upload_id}</UploadId></InitiateMultipartUploadResult>"
            ).encode()
        upload_id = query.get("uploadId", "")
        if upload_id not in self.uploads or self.uploads[upload_id][0] != key:
            return self._error(request, 404, "NoSuchUpload")
        _, kept, received = self.uploads[upload_id]
        assert request.content is not None
        body = request.content.read()
        if method == "DELETE":
            del self.uploads[upload_id]
            request.setResponseCode(204)
            return b""
        if method == "PUT":
            assert headers["content-length"] == str(len(body))
            if headers["content-md5"] != base64.b64encode(hashlib.md5(body).digest()).decode():
                return self._error(request, 400, "BadDigest")
            received[int(query["partNumber"])] = body
            request.setHeader(b"etag", f'"{hashlib.md5(body).hexdigest()}"'.encode())
            return b""
        listed = re.findall(rb"<PartNumber>(\d+)</PartNumber><ETag>&quot;([0-9a-f]{32})&quot;</ETag>", body)
        numbers = [int(n) for n, _ in listed]
        assert numbers == sorted(received) == list(range(1, len(received) + 1))
        if any(hashlib.md5(received[int(n)]).hexdigest() != etag.decode() for n, etag in listed):
            return self._error(request, 400, "InvalidPart")
        if self.error_after_200:
            self.error_after_200 = False
            return b"\n  \n" + b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>InternalError</Code></Error>'
        if self.stored_before_complete is not None:
            objects[key] = (self.stored_before_complete, {}, '"another-edge"')
            self.stored_before_complete = None
        if headers.get("if-none-match") == "*" and key in objects:
            return self._error(request, 412, "PreconditionFailed")
        data = b"".join(received[n] for n in numbers)
        whole = hashlib.md5(b"".join(hashlib.md5(received[n]).digest() for n in numbers)).hexdigest()
        etag = f'"{"0" * 32 if self.bad_complete_etag else whole}-{len(numbers)}"'
        objects[key] = (data, kept, etag)
        del self.uploads[upload_id]
        return (
            f'<CompleteMultipartUploadResult xmlns="{NS}"><Key>{escape(key)}</Key>'
            f"<ETag>{escape(etag, {chr(34): '&quot;'})}</ETag></CompleteMultipartUploadResult>"
        ).encode()


@pytest.fixture
def s3(tmp_path: Path) -> Harness:
    return Harness(tmp_path, fake_s3=MultipartS3, multipart=(THRESHOLD, PART))


def _fake(s3: Harness) -> MultipartS3:
    assert isinstance(s3.fake, MultipartS3)
    return s3.fake


def _body(size: int) -> bytes:
    return bytes(range(256)) * (size // 256) + b"z" * (size % 256)


def _writer(s3: Harness, key: str, data: bytes, *, exclusive: bool | None = None) -> Any:
    """A fill's writer (no declared length: a temporary file) with ``data`` written."""
    writer = s3.run(s3.store.writer(BUCKET, (key,), None, exclusive=exclusive))
    writer.write(data)
    return writer


def _leftovers(tmp_path: Path) -> list[str]:
    return sorted(os.listdir(tmp_path / "tmp")) if (tmp_path / "tmp").exists() else []


def test_a_large_object_is_uploaded_in_parts_and_read_back(s3: Harness, tmp_path: Path) -> None:
    data = _body(THRESHOLD + 50_001)
    writer = _writer(s3, "big", data)
    s3.run(writer.commit({"content-type": "video/mp4", "x-cos-meta-origin": "www"}, 1e9))
    fake = _fake(s3)
    stored, kept, etag = s3.objects["big"]
    assert stored == data and fake.uploads == {}
    assert kept["content-type"] == "video/mp4" and kept["x-amz-meta-origin"] == "www"
    assert etag.endswith('-4"')  # 100,000 x 3 + 50,001
    part_puts = [h for m, w, h in fake.requests if m == "PUT" and w == f"{BUCKET}/big" and META_HEADER not in h]
    assert len(part_puts) == 4 and all("content-md5" in h for h in part_puts)
    assert not any(m == "PUT" and "if-none-match" in h for m, _, h in fake.requests)
    assert _leftovers(tmp_path) == []
    found = s3.open("big")
    assert found.size == len(data) and found.meta["content-type"] == "video/mp4"


def test_at_the_threshold_one_put_is_enough(s3: Harness) -> None:
    s3.run(_writer(s3, "edge", _body(THRESHOLD)).commit({}, 1e9))
    assert s3.objects["edge"][0] == _body(THRESHOLD) and _fake(s3).started == 0


def test_a_failed_part_aborts_the_upload_and_leaves_nothing(s3: Harness, tmp_path: Path) -> None:
    writer = _writer(s3, "cut", _body(THRESHOLD + 1))
    s3.fake.fail_next["PUT"] = 500
    with pytest.raises(StoreError, match="PUT part 1 of cut: HTTP 500"):
        s3.run(writer.commit({}, 1e9))
    s3.pump()
    assert "cut" not in s3.objects and _fake(s3).uploads == {} and _leftovers(tmp_path) == []


def test_a_completed_object_whose_etag_is_not_the_parts_is_deleted(s3: Harness) -> None:
    _fake(s3).bad_complete_etag = True
    with pytest.raises(StoreError, match="is not the parts'"):
        s3.run(_writer(s3, "garbled", _body(THRESHOLD + 1)).commit({}, 1e9))
    assert "garbled" not in s3.objects


def test_an_upload_cancelled_midway_is_aborted(s3: Harness, tmp_path: Path) -> None:
    """A fill cancelled while its parts are on their way (shutdown, a client gone in mirror mode)."""
    fake = _fake(s3)
    writer = _writer(s3, "stopped", _body(THRESHOLD * 3))
    committing = writer.commit({}, 1e9)
    for _ in range(100):  # bounded: until the upload has begun
        if fake.uploads and next(iter(fake.uploads.values()))[2]:
            break
        s3.pump()
    assert fake.uploads and not committing.called
    writer.abort()
    for _ in range(100):
        if not fake.uploads:
            break
        s3.pump()
    assert fake.uploads == {} and "stopped" not in s3.objects and _leftovers(tmp_path) == []
    assert isinstance(result_of(committing), Failure)  # cancelled: the commit failed


def test_after_a_miss_an_upload_gives_way_to_another_edges_copy(s3: Harness, tmp_path: Path) -> None:
    """
    Exclusive (the key was just found missing): a copy stored meanwhile
    wins, seen before completing (a HEAD) or by the completion's 412; the
    commit succeeds, the upload is aborted, the other copy stays.
    """
    fake = _fake(s3)
    assert s3.open("raced") is None
    writer = _writer(s3, "raced", _body(THRESHOLD + 1))
    s3.objects["raced"] = (b"theirs", {}, '"theirs"')
    with capture_logs() as events:
        s3.run(writer.commit({}, 1e9))
        s3.pump()
    assert s3.objects["raced"][0] == b"theirs" and fake.uploads == {}
    assert [e["key"] for e in events if "stored already" in e.get("log_format", "")] == ["raced"]

    assert s3.open("late") is None
    writer = _writer(s3, "late", _body(THRESHOLD + 1))
    fake.stored_before_complete = b"just in time"
    s3.run(writer.commit({}, 1e9))
    s3.pump()
    assert s3.objects["late"][0] == b"just in time" and fake.uploads == {} and _leftovers(tmp_path) == []
    completions = [h for m, w, h in fake.requests if m == "POST" and h.get("content-type") == "application/xml"]
    assert all(h.get("if-none-match") == "*" for h in completions) and completions


def test_a_replacement_completes_plainly(s3: Harness) -> None:
    s3.objects["old"] = (b"old copy", {}, '"old"')
    s3.run(_writer(s3, "old", _body(THRESHOLD + 1), exclusive=False).commit({}, 1e9))
    assert s3.objects["old"][0] == _body(THRESHOLD + 1)


def test_the_sweep_aborts_an_upload_a_crash_left(s3: Harness, tmp_path: Path) -> None:
    """
    A process killed mid-upload leaves its temporary file and the upload's
    journal: the next sweep removes the file and aborts the upload (kept
    for a later sweep while the store does not answer).
    """
    fake = _fake(s3)
    fake.uploads["upload-crashed"] = ("gone", {}, {1: b"part"})
    (tmp_path / "tmp").mkdir(exist_ok=True)
    pid = os.getpid() + 1
    journal = tmp_path / "tmp" / f"{pid}.{BUCKET}.abc.upload"
    journal.write_text(json.dumps({"bucket": BUCKET, "key": "gone", "upload_id": "upload-crashed"}))
    (tmp_path / "tmp" / f"{pid}.{BUCKET}.abc.part").write_bytes(b"part")
    fake.fail_next["DELETE"] = 503
    with capture_logs():
        assert s3.run(s3.store.sweep(owner=pid)) == 1  # the file; the upload waits
    assert journal.exists() and "upload-crashed" in fake.uploads
    assert s3.run(s3.store.sweep(owner=pid + 1)) == 0 and journal.exists()
    assert s3.run(s3.store.sweep()) == 1
    assert not journal.exists() and fake.uploads == {} and _leftovers(tmp_path) == []
    torn = tmp_path / "tmp" / f"{pid}.{BUCKET}.torn.upload"
    torn.write_text('{"bucket": "cose')
    assert s3.run(s3.store.sweep()) == 1 and not torn.exists()


def test_parts_stay_within_s3s_count() -> None:
    assert parts(250, 100) == [(0, 100), (100, 100), (200, 50)]
    assert parts(0, 100) == [(0, 0)]
    huge = parts(MAX_PARTS * 100 + 1, 100)
    assert len(huge) <= MAX_PARTS and sum(length for _, length in huge) == MAX_PARTS * 100 + 1


def test_a_file_part_reads_its_bytes_and_opens_only_when_read(tmp_path: Path) -> None:
    path = tmp_path / "body"
    path.write_bytes(_body(1000))
    part = FilePart(str(path), 300, 500)
    fds = len(os.listdir("/proc/self/fd"))
    assert part.seek(0, os.SEEK_END) == 500 and part.tell() == 500 and part.seek(0) == 0
    assert len(os.listdir("/proc/self/fd")) == fds  # FileBodyProducer measures it: no descriptor yet
    assert part.read(200) + part.read() == _body(1000)[300:800] and part.read() == b""
    part.close()
    part.close()
    assert len(os.listdir("/proc/self/fd")) == fds


def test_a_completion_that_fails_after_its_200_fails_the_commit(s3: Harness, tmp_path: Path) -> None:
    """S3 may answer a slow completion 200, then whitespace, then an <Error>: no object, the upload aborted."""
    _fake(s3).error_after_200 = True
    with pytest.raises(StoreError, match="completing the multipart upload of late-error"):
        s3.run(_writer(s3, "late-error", _body(THRESHOLD + 1)).commit({}, 1e9))
    s3.pump()
    assert "late-error" not in s3.objects and _fake(s3).uploads == {} and _leftovers(tmp_path) == []


def test_a_temporary_file_changed_on_disk_is_not_stored(s3: Harness, tmp_path: Path) -> None:
    """The parts are read back from the temporary file: they must make the body's MD5, as written."""
    writer = _writer(s3, "corrupt", _body(THRESHOLD + 1))
    (part,) = (tmp_path / "tmp").iterdir()
    with open(part, "r+b") as f:
        f.write(b"\xff")
    with pytest.raises(StoreError, match="the temporary file's MD5"):
        s3.run(writer.commit({}, 1e9))
    s3.pump()
    assert "corrupt" not in s3.objects and _fake(s3).uploads == {} and _leftovers(tmp_path) == []
