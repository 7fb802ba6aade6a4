"""The devcloud's S3-compatible object store: moto in server mode, as a process of its own, with IAM auth on.

``python -m agent.devcloud.s3server --port 0`` starts moto's server app, creates an administrator (an IAM user
with an access key allowed everything), switches moto's IAM authentication on (every later request must be
signed by a live access key and allowed by its user's policies; a deleted key is refused with
``InvalidAccessKeyId``), and then prints one JSON line on stdout, its readiness signal::

    {"endpoint": "http://127.0.0.1:PORT", "region": "us-east-1", "access_key_id": ..., "secret_access_key": ...,
     "quota_token": ...}

Two things are added around moto, each a WSGI middleware:

- moto accepts any ``x-amz-checksum-sha256``, ``Content-MD5`` or ``x-amz-content-sha256`` without comparing it
  with the body (a TODO in moto 5), where S3 refuses a mismatch: :class:`ChecksumVerifier` compares, and answers
  as S3 does (400 ``BadDigest`` / ``InvalidDigest`` / ``XAmzContentSHA256Mismatch``), so that an upload's checksum
  is verified by the server as it would be by a real store;
- moto has no quotas: :class:`QuotaEnforcer` holds each storage resource to its size, at the store, on every
  write, as S3-compatible stores with quotas do (Ceph's RGW answers 403 ``QuotaExceeded``). The devcloud sets a
  resource's quota on its prefix through ``/_devcloud/quotas``, with the ``quota_token`` of the readiness line.
  The store is where a quota can hold: checked only when credentials are issued, a key already handed out
  would write past it until it expires.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import hmac
import io
import json
import logging
import os
import secrets
import signal
import sys
import threading
import urllib.parse
from collections.abc import Callable, Iterable
from types import FrameType
from typing import Any
from xml.sax.saxutils import escape

REGION = "us-east-1"
ADMIN_USER = "devcloud-admin"
_UNHASHED_PAYLOADS = ("UNSIGNED-PAYLOAD", "STREAMING-")

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class ChecksumVerifier:
    """WSGI middleware: refuse a request whose body does not match the checksums its headers state."""

    def __init__(self, app: WsgiApp) -> None:
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        length = environ.get("CONTENT_LENGTH")
        checks = {name: environ.get(name) for name in ("HTTP_X_AMZ_CHECKSUM_SHA256", "HTTP_CONTENT_MD5",
                                                       "HTTP_X_AMZ_CONTENT_SHA256")}
        if not length or not any(checks.values()):
            return self.app(environ, start_response)
        body = environ["wsgi.input"].read(int(length))
        environ["wsgi.input"] = io.BytesIO(body)
        refusal = _refusal(body, checks)
        if refusal is None:
            return self.app(environ, start_response)
        code, message = refusal
        return _s3_error(start_response, "400 Bad Request", code, message)


def _s3_error(start_response: Callable[..., Any], status: str, code: str, message: str) -> list[bytes]:
    xml = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{escape(message)}'
           f"</Message></Error>").encode()
    start_response(status, [("Content-Type", "application/xml"), ("Content-Length", str(len(xml)))])
    return [xml]


def _refusal(body: bytes, checks: dict[str, str | None]) -> tuple[str, str] | None:
    stated = checks["HTTP_X_AMZ_CHECKSUM_SHA256"]
    if stated is not None and _b64(hashlib.sha256(body).digest()) != stated.strip():
        return "BadDigest", "The SHA256 you specified did not match the calculated checksum."
    md5 = checks["HTTP_CONTENT_MD5"]
    if md5 is not None:
        try:
            given = base64.b64decode(md5.strip(), validate=True)
        except binascii.Error:
            return "InvalidDigest", "The Content-MD5 you specified was invalid."
        if given != hashlib.md5(body).digest():  # noqa: S324 - Content-MD5 is MD5 by definition
            return "BadDigest", "The Content-MD5 you specified did not match what we received."
    content = checks["HTTP_X_AMZ_CONTENT_SHA256"]
    if (content is not None and not content.startswith(_UNHASHED_PAYLOADS)
            and hashlib.sha256(body).hexdigest() != content.strip().lower()):
        return ("XAmzContentSHA256Mismatch",
                "The provided 'x-amz-content-sha256' header does not match what was computed.")
    return None


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode("ascii")


QUOTA_PATH = "/_devcloud/quotas"  # never a bucket's path: a bucket's name has no "_"
# A PUT on an object key with only these query parameters stores bytes (PutObject, UploadPart, their copies);
# the others (?tagging, ?acl, ?retention ...) change what is known about an object, not its size.
_WRITE_PARAMS = frozenset({"uploadId", "partNumber", "x-id"})


class QuotaEnforcer:
    """WSGI middleware: each prefix with a quota holds at most that many bytes, its objects and the parts of its
    incomplete multipart uploads together. A write that would take it beyond is refused with 403
    ``QuotaExceeded`` before moto sees it. A write that adds nothing passes even when the prefix is full (a copy
    of an object onto itself, a completion, whose parts were counted as they came), so a full resource can
    still be tidied; deletes always pass. Writes under a quota are taken one at a time, so two cannot both fit
    in the room left for one. It runs before moto's authentication: an unsigned write to a full prefix hears
    ``QuotaExceeded`` rather than ``AccessDenied`` (and stores nothing either way)."""

    def __init__(self, app: WsgiApp, token: str) -> None:
        self.app = app
        self._token = token
        self._quotas: dict[tuple[str, str], int] = {}  # (bucket, prefix) → bytes
        self._lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == QUOTA_PATH:
            return self._admin(environ, start_response)
        bucket, _, key = path.lstrip("/").partition("/")
        quota = self._quota_of(bucket, key) if key else None
        method = environ.get("REQUEST_METHOD", "")
        if method == "POST" and not key and self._any_quota(bucket) and "multipart/form-data" in environ.get(
                "CONTENT_TYPE", ""):
            _drain(environ)  # a browser form's upload names its key inside the body: not offered here
            return _s3_error(start_response, "501 Not Implemented", "NotImplemented",
                             "POST uploads are not offered on a bucket with quotas; use PutObject")
        params = urllib.parse.parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True)
        if quota is None or method != "PUT" or not set(params) <= _WRITE_PARAMS:
            return self.app(environ, start_response)
        prefix, limit = quota
        with self._lock:
            moto_bucket = _moto_bucket(bucket)
            if moto_bucket is not None:
                used = _used(moto_bucket, prefix)
                upload, part = params.get("uploadId", [""])[0], params.get("partNumber", [""])[0]
                adds = _incoming(environ) - _replaced(moto_bucket, key, upload, part)
                if adds > 0 and used + adds > limit:
                    _drain(environ)
                    return _s3_error(start_response, "403 Forbidden", "QuotaExceeded",
                                     f"The storage quota of {limit} bytes under {prefix} is full: {used} bytes "
                                     f"are used and this write needs {adds} more.")
            return list(self.app(environ, start_response))  # the write done while no other is checked

    def _quota_of(self, bucket: str, key: str) -> tuple[str, int] | None:
        for (quota_bucket, prefix), limit in self._quotas.items():
            if quota_bucket == bucket and key.startswith(prefix):
                return prefix, limit
        return None

    def _any_quota(self, bucket: str) -> bool:
        return any(quota_bucket == bucket for quota_bucket, _ in self._quotas)

    def _admin(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        """``PUT`` ``{"bucket", "prefix", "bytes"}`` sets a quota (``bytes`` null removes it); ``GET
        ?bucket=&prefix=`` answers ``{"bytes", "used_bytes"}``. Only with ``Authorization: Bearer <quota_token>``."""
        given = environ.get("HTTP_AUTHORIZATION", "").removeprefix("Bearer ").encode()
        if not hmac.compare_digest(given, self._token.encode()):
            _drain(environ)
            return _json(start_response, "401 Unauthorized", {"error": "the quota token is missing or wrong"})
        if environ.get("REQUEST_METHOD") == "PUT":
            try:
                body = json.loads(_drain(environ))
                where = (str(body["bucket"]), str(body["prefix"]))
                limit = body["bytes"]
                if limit is not None and (not isinstance(limit, int) or limit < 0):
                    raise ValueError("bytes must be a whole number, 0 or more, or null")
            except (ValueError, KeyError, TypeError) as exc:
                return _json(start_response, "400 Bad Request", {"error": f"{type(exc).__name__}: {exc}"})
            with self._lock:
                if limit is None:
                    self._quotas.pop(where, None)
                else:
                    self._quotas[where] = limit
            return _json(start_response, "200 OK", {"bytes": limit})
        params = urllib.parse.parse_qs(environ.get("QUERY_STRING", ""))
        where = (params.get("bucket", [""])[0], params.get("prefix", [""])[0])
        moto_bucket = _moto_bucket(where[0])
        return _json(start_response, "200 OK", {"bytes": self._quotas.get(where),
                                                "used_bytes": _used(moto_bucket, where[1]) if moto_bucket else 0})


def _json(start_response: Callable[..., Any], status: str, body: dict[str, Any]) -> list[bytes]:
    data = json.dumps(body).encode()
    start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
    return [data]


def _drain(environ: dict[str, Any]) -> bytes:
    """The request's body, read to its end (a refusal still reads it: the connection serves the next request)."""
    return bytes(environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0)))


# moto's S3 state, read in process: a usage count over HTTP would list every object at every write.
def _moto_bucket(name: str) -> Any | None:
    from moto.s3.models import s3_backends

    where = s3_backends.bucket_accounts.get(name)
    if where is None:
        return None
    partition, account_id = where
    return s3_backends[account_id][partition].buckets.get(name)


def _used(bucket: Any, prefix: str) -> int:
    objects = sum(getattr(key, "size", 0) for name, key in bucket.keys.items() if name.startswith(prefix))
    parts = sum(part.size for upload in list(bucket.multiparts.values()) if upload.key_name.startswith(prefix)
                for part in list(upload.parts.values()))
    return int(objects + parts)


def _replaced(bucket: Any, key: str, upload_id: str, part: str) -> int:
    """What the write replaces: the part of that number of the upload, or the object of that key."""
    if upload_id:
        upload = bucket.multiparts.get(upload_id)
        held = upload.parts.get(int(part)) if upload is not None and part.isdigit() else None
    else:
        held = bucket.keys.get(key)
    return int(getattr(held, "size", 0) or 0)


def _incoming(environ: dict[str, Any]) -> int:
    """The bytes a write stores: its body (decoded, for aws-chunked bodies), or what it copies."""
    source = environ.get("HTTP_X_AMZ_COPY_SOURCE")
    if source is None:
        stated = environ.get("HTTP_X_AMZ_DECODED_CONTENT_LENGTH") or environ.get("CONTENT_LENGTH")
        if stated:
            return int(stated)
        # A chunked body states no length: it is read (werkzeug ends the stream at its last chunk) and counted.
        body = environ["wsgi.input"].read() if environ.get("wsgi.input_terminated") else b""
        environ["wsgi.input"], environ["CONTENT_LENGTH"] = io.BytesIO(body), str(len(body))
        return len(body)
    copied = environ.get("HTTP_X_AMZ_COPY_SOURCE_RANGE", "")
    if copied.startswith("bytes="):
        first, _, last = copied.removeprefix("bytes=").partition("-")
        return int(last) - int(first) + 1
    source_bucket, _, source_key = urllib.parse.unquote(source.split("?", 1)[0]).lstrip("/").partition("/")
    found = _moto_bucket(source_bucket)
    held = found.keys.get(source_key) if found is not None else None
    return int(getattr(held, "size", 0) or 0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agent.devcloud.s3server",
                                     description="moto's S3 and IAM in server mode, IAM auth on, checksums verified")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: a free port (printed in the readiness line)")
    args = parser.parse_args(argv)

    import boto3
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # not a line per request
    quota_token = secrets.token_hex(16)
    # The checksum first: a body it refuses is no write for the quota to count.
    app = ChecksumVerifier(QuotaEnforcer(DomainDispatcherApplication(create_backend_app), quota_token))
    server = make_server(args.host, args.port, app, threaded=True, request_handler=MotoRequestHandler)
    endpoint = f"http://{args.host}:{server.server_port}"

    def stop(_signum: int, _frame: FrameType | None) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    thread = threading.Thread(target=server.serve_forever, name="s3server", daemon=True)
    thread.start()
    # moto starts with authentication off: create the administrator, then switch it on for every later request.
    dummy = {"aws_access_key_id": "bootstrap", "aws_secret_access_key": "bootstrap", "region_name": REGION}
    iam = boto3.client("iam", endpoint_url=endpoint, **dummy)  # type: ignore[call-overload]
    iam.create_user(UserName=ADMIN_USER)
    iam.put_user_policy(UserName=ADMIN_USER, PolicyName="all", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
    key = iam.create_access_key(UserName=ADMIN_USER)["AccessKey"]
    import urllib.request

    request = urllib.request.Request(  # noqa: S310 - our own server, plain HTTP
        f"{endpoint}/moto-api/reset-auth", data=b"0", method="POST", headers={"Content-Type": "text/plain"})
    with urllib.request.urlopen(request, timeout=10) as answer:  # noqa: S310 - our own server, plain HTTP
        answer.read()
    print(json.dumps({"endpoint": endpoint, "region": REGION, "access_key_id": key["AccessKeyId"],
                      "secret_access_key": key["SecretAccessKey"], "quota_token": quota_token,
                      "pid": os.getpid()}), flush=True)
    try:
        # Run until SIGTERM or until the parent closes our stdin (a devcloud killed with SIGKILL).
        sys.stdin.read()
    finally:
        server.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
