"""Vault fixtures: a private vault and keyring per test, and a way to store images."""
import os

import pytest
from django.test import RequestFactory

from tests.support.server import PortalServer
from vault import service


@pytest.fixture(autouse=True)
def _vault_for_every_test(private_vault):
    """Every vault test gets the private vault (fixture in tests/conftest.py)."""
    return private_vault


@pytest.fixture
def real_portal(tmp_path):
    """The portal served as `make demo` serves it, with a temp directory of its own:
    (server, that temp directory)."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    (tmp_path / "data").mkdir()
    portal = PortalServer(tmp_path / "data", {"TMPDIR": str(temp)}).start()
    yield portal, temp
    portal.stop()


def request_as(user, path="/", verified=True):
    """A request by ``user``; ``verified`` stands for a session past its second factor."""
    request = RequestFactory().get(path, REMOTE_ADDR="127.0.0.1")
    request.user = user
    if user.is_authenticated:
        user.is_verified = lambda: verified
    return request


def store_image(user, data: bytes, name="etch", **meta):
    """Store ``data`` as an image created by ``user``, as an upload would."""
    sink = service.ImageSink()
    for start in range(0, len(data), 3 * 1024 * 1024):
        sink.write(data[start:start + 3 * 1024 * 1024])
    stats = sink.finish()
    return service.register_image(request_as(user), sink, stats, {"name": name, **meta})


def memory_like(size, seed=1):
    """Bytes shaped like guest memory: zero pages, text pages, random pages."""
    import random

    rng = random.Random(seed)
    pages = []
    for _ in range(size // 4096 + 1):
        kind = rng.random()
        if kind < 0.6:
            pages.append(bytes(4096))
        elif kind < 0.85:
            pages.append((b"GET /index.html HTTP/1.1 200 " * 200)[:4096])
        else:
            pages.append(os.urandom(4096))
    return b"".join(pages)[:size]


@pytest.fixture(scope="session")
def s3_endpoint():
    """An S3 server (moto) on 127.0.0.1 on a free port, for the whole run; stopped at the end."""
    import socket

    from moto.server import ThreadedMotoServer

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint, monkeypatch):
    """A fresh bucket on the test S3 server, with dummy credentials in the environment."""
    import uuid

    import boto3

    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    bucket = f"berth-test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    return bucket
