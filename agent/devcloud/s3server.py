"""The devcloud's S3-compatible object store: moto in server mode, as a process of its own, with IAM auth on.

``python -m agent.devcloud.s3server --port 0`` starts moto's server app, creates an administrator (an IAM user
with an access key allowed everything), switches moto's IAM authentication on (every later request must be
signed by a live access key and allowed by its user's policies; a deleted key is refused with
``InvalidAccessKeyId``), and then prints one JSON line on stdout, its readiness signal::

    {"endpoint": "http://127.0.0.1:PORT", "region": "us-east-1", "access_key_id": ..., "secret_access_key": ...}

moto accepts any ``x-amz-checksum-sha256``, ``Content-MD5`` or ``x-amz-content-sha256`` without comparing it
with the body (a TODO in moto 5), where S3 refuses a mismatch. The one thing added around moto here is that
comparison, answered as S3 does (400 ``BadDigest`` / ``InvalidDigest`` / ``XAmzContentSHA256Mismatch``), so
that an upload's checksum is verified by the server as it would be by a real store.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import io
import json
import logging
import os
import signal
import sys
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
        xml = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{escape(message)}'
               f"</Message></Error>").encode()
        start_response("400 Bad Request", [("Content-Type", "application/xml"), ("Content-Length", str(len(xml)))])
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
    app = ChecksumVerifier(DomainDispatcherApplication(create_backend_app))
    server = make_server(args.host, args.port, app, threaded=True, request_handler=MotoRequestHandler)
    endpoint = f"http://{args.host}:{server.server_port}"

    def stop(_signum: int, _frame: FrameType | None) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    import threading

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
                      "secret_access_key": key["SecretAccessKey"], "pid": os.getpid()}), flush=True)
    try:
        # Run until SIGTERM or until the parent closes our stdin (a devcloud killed with SIGKILL).
        sys.stdin.read()
    finally:
        server.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
