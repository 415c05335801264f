"""Vault benchmark: a memory-like image through the real HTTP endpoints of a real server.

Measures, in one run: upload and download MB/s of image through uvicorn (best
and median of --repeat rounds), CPU seconds of server and client per round,
the server's peak RSS, the stored size; and the peers on the same machine in
the same run: uvicorn alone draining the same body, raw in-process AES-256-GCM,
one core's SHA-256, and, where installed, `restic backup` of the same image.

The image lives only in the client's memory (plaintext never touches disk): a
raw-socket client sends it with ``sendall`` of a memoryview and receives the
download into a preallocated buffer, compared byte for byte after the clock
stops, so the client costs little CPU on the two shared cores.

    python bench/vault.py [--gib 1] [--big-gib 4] [--repeat 3]

Results go to bench/results/vault-<timestamp>.json; docs/performance.md keeps the table.
"""
import argparse
import hashlib
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.server import PortalServer, free_port, manage  # noqa: E402

MiB = 1024 * 1024
PAGE = 4096
BLOCK = 64 * MiB


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


def memory_image(size, seed=7) -> bytearray:
    """The whole image in memory, built 64 MiB at a time."""
    image = bytearray(size)
    for start in range(0, size, BLOCK):
        block = memory_pages(min(BLOCK, size - start) // PAGE, seed + start)
        image[start:start + block.nbytes] = block.reshape(-1).data
    return image


# --- a minimal HTTP/1.1 client over a raw socket -------------------------------------------

def cpu_seconds(pid=None):
    """CPU seconds (user + system) of this process, or of ``pid`` with all its threads."""
    if pid is None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _read_head(s):
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
    return status, length, rest


def _read_body(s, length, rest):
    body = bytearray(rest)
    while len(body) < length:
        chunk = s.recv(min(65536, length - len(body)))
        if not chunk:
            raise RuntimeError("connection closed mid-body")
        body += chunk
    return bytes(body)


class Timed:
    """Wall time and CPU seconds of the client and the server around a transfer."""

    def __init__(self, server_pid):
        self.server_pid = server_pid

    def __enter__(self):
        self.wall = time.perf_counter()
        self.client, self.server = cpu_seconds(), cpu_seconds(self.server_pid)
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.wall
        self.client = cpu_seconds() - self.client
        self.server = cpu_seconds(self.server_pid) - self.server

    def figures(self, size):
        return {"mb_s": size / self.wall / 1e6, "seconds": self.wall,
                "client_cpu_s": self.client, "server_cpu_s": self.server}


def upload(port, token, pieces, size, name, server_pid):
    """POST ``size`` bytes, given as an iterable of buffers, to the upload endpoint."""
    head = (f"POST /api/v1/images/ HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: Token {token}\r\nContent-Type: application/octet-stream\r\n"
            f"X-Berth-Name: {name}\r\nContent-Length: {size}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", port)) as s, Timed(server_pid) as timed:
        s.sendall(head)
        for piece in pieces:
            s.sendall(piece)
        status, length, rest = _read_head(s)
        body = _read_body(s, length, rest)
    if status != 201:
        raise RuntimeError(f"upload failed: {status} {body[:300]!r}")
    return json.loads(body), timed.figures(size)


def download(port, token, image_id, into, server_pid, check=None):
    """GET the image into the buffer ``into`` (a ring if smaller than the image).

    ``check(view, offset)`` sees each filled ring; with no ring the caller
    compares ``into`` once the clock has stopped.
    """
    head = (f"GET /api/v1/images/{image_id}/content HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: Token {token}\r\n\r\n").encode()
    view = memoryview(into)
    with socket.create_connection(("127.0.0.1", port)) as s, Timed(server_pid) as timed:
        s.sendall(head)
        status, length, rest = _read_head(s)
        if status != 200:
            raise RuntimeError(f"download failed: {status} {_read_body(s, length, rest)[:300]!r}")
        view[:len(rest)] = rest
        done, fill = len(rest), len(rest)
        while done < length:
            n = s.recv_into(view[fill:min(len(view), fill + length - done)])
            if n == 0:
                raise RuntimeError("connection closed mid-body")
            done, fill = done + n, fill + n
            if fill == len(view) or done == length:
                if check:
                    check(view[:fill], done - fill)
                fill = 0
    return length, timed.figures(length)


def delete(port, token, image_id):
    head = (f"DELETE /api/v1/images/{image_id} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: Token {token}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(head)
        status, length, rest = _read_head(s)
        if status != 204:
            raise RuntimeError(f"delete failed: {status} {_read_body(s, length, rest)[:300]!r}")


# --- peers ---------------------------------------------------------------------------------

DRAIN_APP = """
import sys
sys.path.insert(0, {root!r})
from portal.malloc import tune_for_streaming

tune_for_streaming()  # the same process settings as the portal's


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    received, more = 0, True
    while more:
        message = await receive()
        received += len(message.get("body", b""))
        more = message.get("more_body", False)
    body = b'{{"id": "drain", "stored_size": %d}}' % received
    await send({{"type": "http.response.start", "status": 201,
                "headers": [(b"content-length", str(len(body)).encode())]}})
    await send({{"type": "http.response.body", "body": body}})
"""


def bare_uvicorn_upload(view, work, repeat):
    """The transport ceiling: the same upload into an ASGI app that only drains the body."""
    (work / "drain_app.py").write_text(DRAIN_APP.format(root=str(ROOT)))
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
        return [upload(port, "none", [view], len(view), "drain", process.pid)[1]
                for _ in range(repeat)]
    finally:
        process.terminate()
        process.wait()


def raw_aes_gcm(view):
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    aead = AESGCM(os.urandom(32))
    started = time.perf_counter()
    for i, start in enumerate(range(0, len(view), MiB)):
        aead.encrypt(i.to_bytes(12, "big"), view[start:start + MiB], b"")
    return len(view) / (time.perf_counter() - started) / 1e6


def encoder_alone(view):
    """The vault's own work without a network: vault.format's encoder over the image
    in 4 MiB pieces, as the upload feeds it (hashing on a second thread)."""
    from vault import format as vformat

    encoder = vformat.ChunkEncoder(os.urandom(32), "00000000-0000-0000-0000-000000000001")
    started, cpu = time.perf_counter(), cpu_seconds()
    for start in range(0, len(view), 4 * MiB):
        encoder.feed(view[start:start + 4 * MiB])
    encoder.finish()
    elapsed = time.perf_counter() - started
    return {"mb_s": len(view) / elapsed / 1e6, "cpu_s": cpu_seconds() - cpu}


def one_core_sha256(view):
    digest = hashlib.sha256()
    started = time.perf_counter()
    for start in range(0, len(view), MiB):
        digest.update(view[start:start + MiB])
    return len(view) / (time.perf_counter() - started) / 1e6


def restic(view, workdir):
    """`restic backup` of the same image, read from stdin so it never touches disk."""
    if not shutil.which("restic"):
        return None
    repo = workdir / "restic-repo"
    env = {**os.environ, "RESTIC_PASSWORD": "bench", "RESTIC_CACHE_DIR": str(workdir / "rc")}
    subprocess.run(["restic", "init", "--repo", str(repo)], env=env, check=True,
                   capture_output=True)
    started = time.perf_counter()
    backup = subprocess.Popen(["restic", "backup", "--repo", str(repo), "--stdin",
                               "--stdin-filename", "image.bin"], env=env,
                              stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
    _, err = backup.communicate(view)
    elapsed = time.perf_counter() - started
    if backup.returncode:
        raise RuntimeError(f"restic backup failed: {err.decode(errors='replace')[:300]}")
    stored = sum(p.stat().st_size for p in repo.rglob("*") if p.is_file())
    return {"mb_per_s": len(view) / elapsed / 1e6, "stored_bytes": stored}


# --- the runs ------------------------------------------------------------------------------

def rss_mib(pid, field):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return None


def summary(runs):
    rates = [r["mb_s"] for r in runs]
    return {"best_mb_s": max(rates), "median_mb_s": statistics.median(rates), "runs": runs}


def round_trips(server, token, image, repeat):
    """A first round, then ``repeat`` measured ones; every download byte-compared.

    Each round deletes its image afterwards, so the next one writes into page
    cache the kernel has used before. On this VM a page of guest memory touched
    for the first time costs ~10 us in the host, which the first round pays for
    its ~0.4 GB of ciphertext; it is reported apart as ``first_round``.
    """
    ups, downs, record = [], [], None
    received = bytearray(len(image))
    received[:] = image  # touch every page now, not on the clock
    for i in range(repeat + 1):
        received[:1] = b"\xff" if image[:1] != b"\xff" else b"\x00"
        record, up = upload(server.port, token, [memoryview(image)], len(image), f"bench-{i}",
                            server.process.pid)
        _, down = download(server.port, token, record["id"], received, server.process.pid)
        if received != image:
            raise RuntimeError("downloaded image differs from the uploaded one")
        delete(server.port, token, record["id"])
        ups.append(up)
        downs.append(down)
    first = {"upload": ups.pop(0), "download": downs.pop(0)}
    return record, first, summary(ups), summary(downs)


def big_run(server, token, size):
    """A ``size`` image streamed from one repeated 64 MiB block, down into a 64 MiB ring."""
    block = memory_pages(BLOCK // PAGE, 99).tobytes()
    pieces = [block] * (size // BLOCK) + [block[:size % BLOCK]]
    expected = hashlib.sha256()
    for piece in pieces:
        expected.update(piece)
    record, up = upload(server.port, token, pieces, size, "bench-big", server.process.pid)
    if record["sha256"] != expected.hexdigest():
        raise RuntimeError("the server recorded another SHA-256 for the big image")

    ring = bytearray(BLOCK)

    def check(view, offset):
        # bytearray == bytes compares with memcmp; memoryview == is per item, 20x slower.
        same = ring == block if len(view) == BLOCK else ring[:len(view)] == block[:len(view)]
        if not same:
            raise RuntimeError(f"big download differs near offset {offset}")

    _, down = download(server.port, token, record["id"], ring, server.process.pid, check)
    return {"bytes": size, "upload": up, "download": down}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--big-gib", type=float, default=4.0,
                        help="size of the peak-RSS run (0 to skip)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds of each measure")
    args = parser.parse_args()
    size = int(args.gib * 1024) * MiB
    image = memory_image(size)
    view = memoryview(image)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="berth-bench-") as tmp:
        work = Path(tmp)
        data_dir = work / "data"
        data_dir.mkdir()
        server = PortalServer(data_dir, {"BERTH_LOG_LEVEL": "WARNING"}).start()
        try:
            out = manage("tokens", "issue", "admin", "--scope", "images:write", "--scope",
                         "images:download", "--scope", "images:delete", env=server.env).stdout
            token = out.split("token: ")[1].split()[0]
            idle_rss = rss_mib(server.process.pid, "VmRSS")
            # Start-up peaks (an Argon2 hash takes ~100 MiB) are not streaming memory.
            Path(f"/proc/{server.process.pid}/clear_refs").write_text("5")
            record, first, ups, downs = round_trips(server, token, image, args.repeat)
            big = big_run(server, token, int(args.big_gib * 1024) * MiB) if args.big_gib else None
            rss = rss_mib(server.process.pid, "VmHWM")
        finally:
            server.stop()
        result = {
            "when": datetime.now(UTC).isoformat(timespec="seconds"),
            "image_bytes": size,
            "upload_mb_s": ups["best_mb_s"],
            "download_mb_s": downs["best_mb_s"],
            "upload": ups,
            "download": downs,
            "first_round": first,
            "stored_bytes": record["stored_size"],
            "stored_ratio": record["stored_size"] / size,
            "server_peak_rss_mib": rss,
            "server_idle_rss_mib": idle_rss,
            "big_run": big,
            "bare_uvicorn_upload": summary(bare_uvicorn_upload(view, work, args.repeat)),
            "raw_aes_gcm_mb_s": raw_aes_gcm(view),
            "encoder_alone": encoder_alone(view),
            "one_core_sha256_mb_s": one_core_sha256(view),
            "restic": restic(view, work),
            "cpus": os.cpu_count(),
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
        }
    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    (out_dir / f"vault-{stamp}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
