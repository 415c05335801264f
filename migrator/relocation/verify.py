"""What the two ends of a migration compare at commitment (stage 5).

Both ends compute `commit_digests` once the guest is paused and the vCPU
state is across - the source over its paused guest, the destination over
its complete copy - and the destination commits only if every value agrees.
Besides that, the destination checks that every page of memory arrived at
least once (`server.py`), and TLS 1.3 authenticates every byte in transit.

Verification modes (``MigrationSettings.verify``), cheapest first:

* ``sampled`` (default): fingerprints of `SAMPLE_PAGES` pages of *actual
  memory* picked from the per-migration seed (all pages of a small guest).
  Costs a few milliseconds inside the downtime, nothing during pre-copy;
  finds a fault that touches many pages (a dirty log that misses writes, a
  misplaced batch) almost surely, a single bad page only if it is sampled.
* ``incremental``: a table of fingerprints of every page each end sent or
  applied, compared as one root: page for page, what the destination holds
  is what the source last read (not whether that was the last write).
  Costs a fingerprint per page sent on both ends during pre-copy (≈0.25
  CPU-s per GiB each on this machine).
* ``full``: SHA-256 of all memory on both ends, inside the downtime
  (≈0.8 s per GiB here): proves the two memories equal.

Django-free; byte-level definitions in ``docs/relocation-protocol.md``.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Any

import numpy as np

from migrator.hypervisor.base import PAGE_SIZE, HypervisorDriver

from .protocol import Fingerprints

VERIFY_MODES = ("sampled", "incremental", "full")
SAMPLE_PAGES = 1024  # 4 MiB: a few ms per end, inside the downtime
_SAMPLE_BATCH = 16   # pages gathered at a time (64 KiB)
_SAMPLE_DOMAIN = b"berth-relocation-sample-v1"


def sample_indices(seed: bytes, npages: int, count: int = SAMPLE_PAGES) -> np.ndarray:
    """The pages ``sampled`` compares, sorted and distinct: every page of a
    guest of at most ``count`` pages, else SHAKE-256 of the seed read as
    ``count`` little-endian u64 taken modulo ``npages`` (duplicates dropped) -
    the same on both ends whatever their numpy version."""
    if npages <= count:
        return np.arange(npages, dtype=np.int64)
    raw = hashlib.shake_256(_SAMPLE_DOMAIN + seed).digest(8 * count)
    return np.unique(np.frombuffer(raw, dtype="<u8") % np.uint64(npages)).astype(np.int64)


class SampledCheck:
    """The ``sampled`` check of one migration.  Built before the pause - the
    page list, the keys, a buffer already touched, the fingerprint code run
    once (its first call cost ~15 ms in a fresh process) - so that only
    gathering and fingerprinting the pages happen inside the downtime."""

    def __init__(self, seed: bytes, npages: int):
        self.indices = sample_indices(seed, npages)
        self._fingerprints = Fingerprints(seed, 0)
        # Gathered a few pages at a time into one small buffer, never into
        # fresh megabytes: a first touch costs ~10 µs per page in a nested VM
        # (8 MiB fresh took 40 ms, more than everything else in the downtime).
        self._buf = np.ones((_SAMPLE_BATCH, PAGE_SIZE), dtype=np.uint8)
        self._fingerprints.of(self._buf)

    def digest(self, driver: HypervisorDriver, uuid: str) -> str:
        """SHA-256 over the sampled pages' indices and fingerprints."""
        idx = self.indices
        h = hashlib.sha256(_SAMPLE_DOMAIN)
        h.update(struct.pack("<Q", len(idx)))
        h.update(idx.astype("<u8").tobytes())
        h.update(self._page_fingerprints(driver, uuid).astype("<u8", copy=False).tobytes())
        return h.hexdigest()

    def _page_fingerprints(self, driver: HypervisorDriver, uuid: str) -> np.ndarray:
        memory, idx = driver.map_memory(uuid), self.indices
        out = np.empty(len(idx), dtype=np.uint64)
        for start in range(0, len(idx), _SAMPLE_BATCH):
            part = idx[start:start + _SAMPLE_BATCH]
            pages = self._buf[:len(part)]
            if memory is not None:
                np.take(memory, part, axis=0, out=pages)
            else:
                driver.read_pages_into(uuid, part, pages)
            out[start:start + len(part)] = self._fingerprints.of(pages)
        return out


def prepare(mode: str, seed: bytes, npages: int) -> tuple[Fingerprints | None,
                                                         SampledCheck | None]:
    """What a mode needs during pre-copy (the fingerprint table of
    ``incremental``) and for its digest (``sampled``); made before the pause."""
    return (Fingerprints(seed, npages) if mode == "incremental" else None,
            SampledCheck(seed, npages) if mode == "sampled" else None)


def commit_digests(mode: str, driver: HypervisorDriver, uuid: str, vcpu: bytes,
                   fingerprints: Fingerprints | None,
                   sample: SampledCheck | None) -> dict[str, Any]:
    """The values both ends compare; those of other modes are None."""
    return {
        "vcpu_sha256": hashlib.sha256(vcpu).hexdigest(),
        "sample_digest": sample.digest(driver, uuid) if sample is not None else None,
        "fingerprint_root": fingerprints.root() if fingerprints is not None else None,
        "memory_sha256": driver.memory_digest(uuid) if mode == "full" else None,
    }
