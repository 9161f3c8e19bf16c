"""A real S3 server (moto in server mode) on 127.0.0.1 for store and flow tests."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "sd2-test",
    "AWS_SECRET_ACCESS_KEY": "sd2-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@contextmanager
def s3_server(bucket: str) -> Iterator[str]:
    """Start moto's S3 server on a free loopback port, create `bucket`, point the env at it."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in [*S3_ENV, "AWS_ENDPOINT_URL_S3"]}
    os.environ.update(S3_ENV)
    os.environ["AWS_ENDPOINT_URL_S3"] = endpoint
    try:
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
        yield endpoint
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
