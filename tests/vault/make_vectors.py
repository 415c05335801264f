"""Regenerate the committed test vectors of docs/vault-format.md.

    .venv/bin/python tests/vault/make_vectors.py

Every input is fixed (keys, image id, nonce prefix, envelope nonce, plaintext),
so the output only changes if the format or the zstd library changes. Each
vector NAME is four files in tests/vault/vectors/: NAME.json (inputs and
expected digests), NAME.plain (plaintext), NAME.img (data file), NAME.key
(key envelope).
"""
import hashlib
import json
import struct
import sys
import uuid
from pathlib import Path

import zstandard

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from vault import format as vf  # noqa: E402

VECTORS = Path(__file__).resolve().parent / "vectors"
PAGE = vf.PAGE_SIZE


def stream(label: str, n: int) -> bytes:
    """Deterministic incompressible bytes: SHA-256 in counter mode."""
    out = b"".join(hashlib.sha256(f"{label}:{i}".encode()).digest()
                   for i in range((n + 31) // 32))
    return out[:n]


def text(n: int) -> bytes:
    line = b"Berth test vector: the quick brown fox jumps over the lazy dog.\n"
    return (line * (n // len(line) + 1))[:n]


def mixed_plaintext() -> bytes:
    """30000 bytes, chunk size 8192: a compressible chunk, an incompressible
    chunk, an all-zero chunk, and a final partial chunk ending in a partial page."""
    chunk0 = text(PAGE) + bytes(PAGE)
    chunk1 = stream("mixed", 2 * PAGE)
    chunk2 = bytes(2 * PAGE)
    final = text(3000) + bytes(PAGE - 3000) + text(30000 - 3 * 2 * PAGE - PAGE)
    return chunk0 + chunk1 + chunk2 + final


def pages_plaintext() -> bytes:
    """16384 bytes, chunk size 8192: two full chunks (one zero page each), so the
    final chunk is empty."""
    return stream("pages-a", PAGE) + bytes(PAGE) + bytes(PAGE) + stream("pages-b", PAGE)


SPECS = [
    {"name": "empty-aes256gcm", "description": "0-byte image: one empty final chunk",
     "algorithm": vf.ALG_AES_256_GCM, "chunk_size": 4096, "compress": False,
     "plaintext": b""},
    {"name": "mixed-aes256gcm-zstd",
     "description": "compressed, raw, all-zero and partial chunks; partial last page",
     "algorithm": vf.ALG_AES_256_GCM, "chunk_size": 8192, "compress": True,
     "plaintext": mixed_plaintext()},
    {"name": "pages-chacha20poly1305",
     "description": "ChaCha20-Poly1305, zero pages, size a multiple of the chunk size",
     "algorithm": vf.ALG_CHACHA20_POLY1305, "chunk_size": 8192, "compress": False,
     "plaintext": pages_plaintext()},
]


def fixed(value: bytes):
    """A random source that returns ``value`` once, of exactly the length asked."""
    def source(n: int) -> bytes:
        assert n == len(value), (n, len(value))
        return value
    return source


def inputs(index: int) -> dict:
    return {
        "dek": bytes(range(0x20 * index, 0x20 * index + 32)).hex(),
        "kek": hashlib.sha256(f"berth test master key {index}".encode()).hexdigest(),
        "key_version": 7,
        "image_id": str(uuid.UUID(int=0x0123456789ABCDEF0011223344556600 + index)),
        "nonce_prefix": bytes([0xA0 + index] * 7).hex(),
        "envelope_nonce": bytes([0xE0 + index] * 12).hex(),
    }


def encode(spec: dict, params: dict) -> tuple[bytes, bytes]:
    """(data file, envelope) for a vector; shared with the tests."""
    encoder = vf.ChunkEncoder(
        bytes.fromhex(params["dek"]), uuid.UUID(params["image_id"]),
        chunk_size=spec["chunk_size"], algorithm=spec["algorithm"], compress=spec["compress"],
        allow_small_chunks=True, _test_random=fixed(bytes.fromhex(params["nonce_prefix"])))
    image = b"".join([encoder.header, *encoder.feed(spec["plaintext"]), *encoder.finish()])
    envelope = vf.wrap_data_key(bytes.fromhex(params["kek"]), params["key_version"],
                                bytes.fromhex(params["dek"]), encoder.header,
                                _test_random=fixed(bytes.fromhex(params["envelope_nonce"])))
    return image, envelope


def records(image: bytes) -> list[dict]:
    """Offsets and lengths of each record, for readers checking an implementation."""
    out, pos = [], vf.HEADER_SIZE
    while pos < len(image):
        (n,) = struct.unpack_from(">I", image, pos)
        out.append({"offset": pos, "ciphertext_length": n})
        pos += 4 + n
    return out


def main() -> None:
    VECTORS.mkdir(exist_ok=True)
    for index, spec in enumerate(SPECS):
        params = inputs(index)
        image, envelope = encode(spec, params)
        name = spec["name"]
        doc = {
            "description": spec["description"],
            "algorithm": spec["algorithm"], "chunk_size": spec["chunk_size"],
            "compress": spec["compress"], **params,
            "plaintext_file": f"{name}.plain", "image_file": f"{name}.img",
            "envelope_file": f"{name}.key",
            "plaintext_size": len(spec["plaintext"]),
            "plaintext_sha256": hashlib.sha256(spec["plaintext"]).hexdigest(),
            "image_sha256": hashlib.sha256(image).hexdigest(),
            "envelope_sha256": hashlib.sha256(envelope).hexdigest(),
            "header_hex": image[:vf.HEADER_SIZE].hex(),
            "envelope_hex": envelope.hex(),
            "records": records(image),
            "zstd_library": ".".join(map(str, zstandard.ZSTD_VERSION)),
        }
        (VECTORS / f"{name}.plain").write_bytes(spec["plaintext"])
        (VECTORS / f"{name}.img").write_bytes(image)
        (VECTORS / f"{name}.key").write_bytes(envelope)
        (VECTORS / f"{name}.json").write_text(json.dumps(doc, indent=2) + "\n")
        print(f"{name}: {len(spec['plaintext'])} -> {len(image)} bytes, "
              f"{len(doc['records'])} chunks")


if __name__ == "__main__":
    main()
