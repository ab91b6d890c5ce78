"""
COS-style error answers: the status of each error code, and the XML body
every error of the bucket listener carries.
"""

from __future__ import annotations

from urllib.parse import urlsplit
from xml.sax.saxutils import escape

from twisted.web.server import Request

__all__ = ["STATUS", "answer_error", "error_body", "resource_of"]

STATUS = {
    "AccessDenied": 403,
    "InternalError": 500,
    "InvalidArgument": 400,
    "InvalidRange": 416,
    "InvalidURI": 400,
    "KeyTooLong": 400,
    "MethodNotAllowed": 405,
    "MirrorFailed": 424,
    "InvalidAccessKeyId": 403,
    "SignatureDoesNotMatch": 403,
    "RequestTimeTooSkewed": 403,
    "MalformedXML": 400,
    "InvalidDigest": 400,
    "BadDigest": 400,
    "NoSuchOriginConfiguration": 404,
    "NotImplemented": 501,
    "NoSuchBucket": 404,
    "NoSuchKey": 404,
    "PreconditionFailed": 412,
    "ServiceUnavailable": 503,
    "EntityTooLarge": 413,
}


def error_body(code: str, message: str, request_id: str, resource: str = "/") -> bytes:
    """
    A COS XML error document: Code, Message, Resource (the bucket's host and
    the path asked for), RequestId and TraceId, every one of which the COS
    SDKs read (without Resource they report ``code=Unknown``).
    """
    return (
        "<?xml version='1.0' encoding='utf-8' ?>\n"
        f"<Error><Code>{code}</Code><Message>{escape(message)}</Message>"
        f"<Resource>{escape(resource or '/')}</Resource>"
        f"<RequestId>{request_id}</RequestId><TraceId>{request_id}</TraceId></Error>\n"
    ).encode()


def resource_of(request: Request) -> str:
    """What an error's Resource names: the Host and the path, as COS does (``bucket-appid.cos.…/key``)."""
    host = request.getHeader(b"host") or b""
    path = (request.path or b"/").split(b"?", 1)[0]
    if not path.startswith(b"/"):  # an absolute-form target (a client using cosedge as its proxy)
        path = urlsplit(path).path or b"/"
    return (host + path).decode("utf-8", "replace")


#: Headers set from an object, removed again when the answer is an error.
_OBJECT_HEADERS = (
    b"etag",
    b"last-modified",
    b"accept-ranges",
    b"content-encoding",
    b"content-disposition",
    b"cache-control",
    b"expires",
    b"vary",
)


def answer_error(request: Request, request_id: str, code: str, message: str) -> bytes:
    """Set the status and headers of a COS error on ``request`` and return its body (empty for HEAD)."""
    request.setResponseCode(STATUS[code])
    headers = request.responseHeaders
    for name, _ in list(headers.getAllRawHeaders()):  # an object's headers do not describe an error
        if name.lower() in _OBJECT_HEADERS or name.lower().startswith(b"x-cos-meta-"):
            headers.removeHeader(name)
    request.setHeader(b"content-type", b"application/xml")
    body = error_body(code, message, request_id, resource_of(request))
    if request.method == b"HEAD":  # the headers of the GET answer, no body
        # The SDKs read a bodiless error's code from these (else they report code "Unknown").
        request.setHeader(b"x-cos-error-code", code.encode("ascii"))
        request.setHeader(b"x-cos-trace-id", request_id.encode("ascii"))
        request.setHeader(b"content-length", b"%d" % len(body))
        return b""
    return body
