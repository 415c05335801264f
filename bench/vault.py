"""Vault benchmark: a memory-like image through the real HTTP endpoints of a real server.

Measures, in one run: upload and download MB/s of image through uvicorn, the
server's peak RSS, the stored size; raw in-process AES-256-GCM as the ceiling;
and, where installed, `restic backup` of the same file as the peer.

    python bench/vault.py [--gib 1] [--big-gib 4]

Results go to bench/results/vault-<timestamp>.json; docs/performance.md keeps the table.
"""
import argparse
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.server import PortalServer, manage  # noqa: E402

MiB = 1024 * 1024
PAGE = 4096


def memory_pages(n_pages, seed):
    """Pages like a guest's memory: ~60 % zero, ~25 % text-like, ~15 % random."""
    rng = np.random.default_rng(seed)
    kinds = rng.random(n_pages)
    pages = np.zeros((n_pages, PAGE), dtype=np.uint8)
    text = np.frombuffer((b"GET /index.html HTTP/1.1 200 OK nginx cache-hit " * 90)[:PAGE],
                         dtype=np.uint8)
    text_rows = (kinds >= 0.60) & (kinds < 0.85)
    pages[text_rows] = text
    random_rows = kinds >= 0.85
    pages[random_rows] = rng.integers(0, 256, size=(int(random_rows.sum()), PAGE), dtype=np.uint8)
    return pages


def write_image(path, size, seed=7):
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for start in range(0, size, 64 * MiB):
            block = memory_pages(min(64 * MiB, size - start) // PAGE, seed + start).tobytes()
            digest.update(block)
            f.write(block)
    return digest.hexdigest()


def http_request(port, head: bytes, body_source=None, sink=None):
    """A minimal HTTP/1.1 exchange over a raw socket so the client is not the bottleneck."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(head)
        if body_source is not None:
            body_source(s)
        return _read_response(s, sink)


def _read_response(s, sink):
    buffer = bytearray()
    while b"\r\n\r\n" not in buffer:
        chunk = s.recv(65536)
        if not chunk:
            raise RuntimeError("connection closed before the response head")
        buffer += chunk
    head, _, rest = bytes(buffer).partition(b"\r\n\r\n")
    status = int(head.split()[1])
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length")))
    received = len(rest)
    if sink:
        sink(rest)
    body = bytearray() if sink else bytearray(rest)
    view = memoryview(bytearray(4 * MiB))
    while received < length:
        n = s.recv_into(view)
        if n == 0:
            raise RuntimeError("connection closed mid-body")
        received += n
        (sink or body.extend)(view[:n])
    return status, bytes(body)


def upload(port, token, path):
    size = path.stat().st_size
    head = (f"POST /api/v1/images/ HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: Token {token}\r\nContent-Type: application/octet-stream\r\n"
            f"X-Berth-Name: bench\r\nContent-Length: {size}\r\n\r\n").encode()

    def send_file(s):
        with open(path, "rb") as f:
            offset = 0
            while offset < size:
                offset += os.sendfile(s.fileno(), f.fileno(), offset, size - offset)

    started = time.perf_counter()
    status, body = http_request(port, head, send_file)
    elapsed = time.perf_counter() - started
    if status != 201:
        raise RuntimeError(f"upload failed: {status} {body[:300]!r}")
    return json.loads(body), elapsed


def upload_generated(port, token, size):
    """Upload ``size`` bytes generated on the fly (no file): for the peak-RSS run."""
    head = (f"POST /api/v1/images/ HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: Token {token}\r\nContent-Type: application/octet-stream\r\n"
            f"X-Berth-Name: bench-big\r\nContent-Length: {size}\r\n\r\n").encode()
    block = memory_pages(64 * MiB // PAGE, 99).tobytes()

    def send(s):
        sent = 0
        while sent < size:
            piece = block[: min(len(block), size - sent)]
            s.sendall(piece)
            sent += len(piece)

    started = time.perf_counter()
    status, body = http_request(port, head, send)
    if status != 201:
        raise RuntimeError(f"upload failed: {status} {body[:300]!r}")
    return json.loads(body), time.perf_counter() - started


def download(port, token, image_id):
    head = (f"GET /api/v1/images/{image_id}/content HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: Token {token}\r\n\r\n").encode()
    digest = hashlib.sha256()
    started = time.perf_counter()
    status, _ = http_request(port, head, sink=digest.update)
    elapsed = time.perf_counter() - started
    if status != 200:
        raise RuntimeError(f"download failed: {status}")
    return digest.hexdigest(), elapsed


def peak_rss_mib(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return None


DRAIN_APP = """
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    received, more = 0, True
    while more:
        message = await receive()
        received += len(message.get("body", b""))
        more = message.get("more_body", False)
    body = b'{"id": "drain", "stored_size": %d}' % received
    await send({"type": "http.response.start", "status": 201,
                "headers": [(b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
"""


def bare_uvicorn_upload(path, work):
    """The transport ceiling: the same upload into an ASGI app that only drains the body."""
    from tests.support.server import free_port

    (work / "drain_app.py").write_text(DRAIN_APP)
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "uvicorn", "drain_app:app", "--port",
                                str(port), "--log-level", "warning"], cwd=work)
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port)).close()
                break
            except OSError:
                time.sleep(0.1)
        _, elapsed = upload(port, "none", path)
        return path.stat().st_size / elapsed / 1e6
    finally:
        process.terminate()
        process.wait()


def reset_peak_rss(pid):
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def current_rss_mib(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return None


def raw_aes_gcm(path):
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    aead = AESGCM(os.urandom(32))
    data = path.read_bytes()
    started = time.perf_counter()
    for i, start in enumerate(range(0, len(data), MiB)):
        aead.encrypt(i.to_bytes(12, "big"), data[start:start + MiB], b"")
    return len(data) / (time.perf_counter() - started) / 1e6


def restic(path, workdir):
    if not shutil.which("restic"):
        return None
    repo = workdir / "restic-repo"
    env = {**os.environ, "RESTIC_PASSWORD": "bench", "RESTIC_CACHE_DIR": str(workdir / "rc")}
    subprocess.run(["restic", "init", "--repo", str(repo)], env=env, check=True,
                   capture_output=True)
    started = time.perf_counter()
    subprocess.run(["restic", "backup", "--repo", str(repo), str(path)], env=env, check=True,
                   capture_output=True)
    elapsed = time.perf_counter() - started
    stored = sum(p.stat().st_size for p in repo.rglob("*") if p.is_file())
    return {"mb_per_s": path.stat().st_size / elapsed / 1e6, "stored_bytes": stored}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--big-gib", type=float, default=4.0,
                        help="size of the peak-RSS run (0 to skip)")
    args = parser.parse_args()
    size = int(args.gib * 1024) * MiB
    with tempfile.TemporaryDirectory(prefix="berth-bench-") as tmp:
        work = Path(tmp)
        image = work / "image.bin"
        sha = write_image(image, size)
        data_dir = work / "data"
        data_dir.mkdir()
        server = PortalServer(data_dir, {"BERTH_LOG_LEVEL": "WARNING"}).start()
        try:
            out = manage("tokens", "issue", "admin", "--scope", "images:write", "--scope",
                         "images:download", env=server.env).stdout
            token = out.split("token: ")[1].split()[0]
            idle_rss = current_rss_mib(server.process.pid)
            # Start-up peaks (an Argon2 hash takes ~100 MiB) are not streaming memory.
            reset_peak_rss(server.process.pid)
            record, up_s = upload(server.port, token, image)
            got_sha, down_s = download(server.port, token, record["id"])
            assert got_sha == sha, "downloaded image differs"
            big = None
            if args.big_gib:
                big_size = int(args.big_gib * 1024) * MiB
                big_record, big_s = upload_generated(server.port, token, big_size)
                _, big_down_s = download(server.port, token, big_record["id"])
                big = {"bytes": big_size, "upload_mb_s": big_size / big_s / 1e6,
                       "download_mb_s": big_size / big_down_s / 1e6}
            rss = peak_rss_mib(server.process.pid)
        finally:
            server.stop()
        result = {
            "when": datetime.now(UTC).isoformat(timespec="seconds"),
            "image_bytes": size,
            "upload_mb_s": size / up_s / 1e6,
            "download_mb_s": size / down_s / 1e6,
            "stored_bytes": record["stored_size"],
            "stored_ratio": record["stored_size"] / size,
            "server_peak_rss_mib": rss,
            "server_idle_rss_mib": idle_rss,
            "bare_uvicorn_upload_mb_s": bare_uvicorn_upload(image, work),
            "big_run": big,
            "raw_aes_gcm_mb_s": raw_aes_gcm(image),
            "restic": restic(image, work),
            "cpus": os.cpu_count(),
        }
    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    (out_dir / f"vault-{stamp}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
