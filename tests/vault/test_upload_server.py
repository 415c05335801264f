"""Uploads through the portal as it is served, where the body is read straight off the socket."""
import os
import socket
import time
from pathlib import Path

import httpx

MiB = 1024 * 1024


def upload_head(portal, token, length, extra=""):
    return (f"POST /api/v1/images/ HTTP/1.1\r\nHost: 127.0.0.1:{portal.port}\r\n"
            f"Authorization: Token {token}\r\nContent-Type: application/octet-stream\r\n"
            f"X-Berth-Name: interrupted\r\nContent-Length: {length}\r\n{extra}\r\n").encode()


def partials(portal):
    return list(Path(portal.env["BERTH_DATA_DIR"]).rglob("*.partial-*"))


def wait_for(condition, what, seconds=15):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def images(portal, token):
    response = httpx.get(f"{portal.url}/api/v1/images/",
                         headers={"Authorization": f"Token {token}"})
    assert response.status_code == 200, response.text
    return response.json()["results"]


def test_client_dropping_mid_body_leaves_no_object_and_no_row(real_portal):
    portal, _ = real_portal
    token = portal.issue_token("admin", "images:write", "images:read")
    with socket.create_connection(("127.0.0.1", portal.port)) as sock:
        sock.sendall(upload_head(portal, token, 64 * MiB) + os.urandom(8 * MiB))
        wait_for(lambda: partials(portal), "the upload never started writing")
    wait_for(lambda: not partials(portal), "the partial object outlived the client")
    assert images(portal, token) == []


def test_upload_waiting_for_100_continue_is_stored(real_portal):
    portal, _ = real_portal
    token = portal.issue_token("admin", "images:write", "images:read")
    body = os.urandom(3 * MiB)
    with socket.create_connection(("127.0.0.1", portal.port)) as sock:
        sock.sendall(upload_head(portal, token, len(body), "Expect: 100-continue\r\n"))
        assert sock.recv(1024).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        sock.sendall(body)
        answer = b""
        while b"\r\n\r\n" not in answer:
            answer += sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 201 ")
    assert [image["plaintext_size"] for image in images(portal, token)] == [len(body)]


def test_client_sending_half_a_body_and_closing_is_audited(real_portal):
    """Issue 14, 5: an interrupted upload left no audit row."""
    portal, _ = real_portal
    token = portal.issue_token("admin", "images:write", "images:read", "audit:read")
    with socket.create_connection(("127.0.0.1", portal.port)) as sock:
        sock.sendall(upload_head(portal, token, 16 * MiB) + os.urandom(8 * MiB))
        wait_for(lambda: partials(portal), "the upload never started writing")
    wait_for(lambda: upload_records(portal, token), "the interrupted upload was not audited")
    [entry] = upload_records(portal, token)
    assert (entry["outcome"], entry["details"]["error"]) == ("failed", "interrupted")
    assert entry["details"]["declared_size"] == 16 * MiB
    assert entry["actor"].startswith("admin:token:")
    assert images(portal, token) == []


def upload_records(portal, token):
    response = httpx.get(f"{portal.url}/api/v1/audit/", params={"action": "image.upload"},
                         headers={"Authorization": f"Token {token}"})
    assert response.status_code == 200, response.text
    return response.json()["results"]
