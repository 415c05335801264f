"""What a simulated guest contains and does: initial memory and vCPU content,
workload profiles, and the thread that makes the guest write memory.

Initial memory is deterministic from a seed and looks like a real guest's:
mostly zero pages, text-like pages (log lines, partly filled) and random
(compressed/encrypted-looking) pages, in configurable fractions.

A workload writes pages at a target rate (pages/s) with a hot working set: a
fixed random subset of pages that receives most writes, the way a web server
keeps rewriting its buffers or a database its hot tables.  How fast and how
concentrated the writes are decides how well live pre-copy converges, which
is the point of having several profiles.

Django-free.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Protocol

import numpy as np

PAGE_SIZE = 4096
RECORD = 64                    # bytes stamped by one page write
SLOTS = PAGE_SIZE // RECORD    # where in the page a write lands
_LANE = np.arange(RECORD, dtype=np.intp)
# Odd 64-bit constants so the pattern words differ for every counter value.
_MIX = np.array([0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9,
                 0xD6E8FEB86659FD93, 0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53],
                dtype=np.uint64)


# --------------------------------------------------------------------------
# what a guest's memory and vCPUs contain when built
# vCPU register file: VCPU_REGS little-endian u64 per vCPU.
VCPU_REGS = 32
REG_ICOUNT, REG_RIP, REG_RSP, REG_RFLAGS = 0, 1, 2, 3
REG_CR0, REG_CR3, REG_CR4, REG_EFER = 4, 5, 6, 7
REG_GPR0 = 8            # rax..r15 in slots 8..23
REG_WRITES, REG_LAST_PAGE = 24, 25
_KERNEL_TEXT = 0xFFFFFFFF81000000
_INSNS_PER_WRITE = 1_000  # instructions retired per page write, for icount

DEFAULT_CONTENT = {"zero": 0.60, "text": 0.25, "random": 0.15}

_WORDS = ("GET POST PUT /index.html /api/v1/items /static/app.js 200 204 301 404 "
          "500 user session commit rollback select insert update from where "
          "worker cache miss hit latency ms request response upstream timeout "
          "connection accepted closed kernel eth0 link up down memory page "
          "scheduler tick nginx postgres redis cron sshd systemd").split()


def _text_corpus(rng: np.random.Generator, size: int = 1 << 18) -> np.ndarray:
    """Log-file-like ASCII, the stuff page caches and heaps are full of."""
    nlines = size // 40
    nums = rng.integers(0, 1 << 30, size=(nlines, 6))
    words = rng.integers(0, len(_WORDS), size=(nlines, 6))
    lines = [
        f"2025-{1 + n[0] % 12:02d}-{1 + n[1] % 28:02d}T{n[2] % 24:02d}:"
        f"{n[3] % 60:02d}:{n[4] % 60:02d} host{n[5] % 16} "
        f"{_WORDS[w[0]]}[{n[5] % 32768}]: {' '.join(_WORDS[i] for i in w[1:])}\n"
        for n, w in zip(nums.tolist(), words.tolist(), strict=True)
    ]
    return np.frombuffer("".join(lines).encode("ascii"), dtype=np.uint8)


def build_memory(npages: int, seed: int, text: float = 0.25,
                 random: float = 0.15) -> np.ndarray:
    """Deterministic guest memory; the rest (default 60 %) are zero pages."""
    rng = np.random.default_rng([seed, 0x3E3])
    memory = np.zeros(npages * PAGE_SIZE, dtype=np.uint8)
    pages = memory.reshape(npages, PAGE_SIZE)
    order = rng.permutation(npages)
    n_text = min(npages, round(npages * text))
    n_rand = min(npages - n_text, round(npages * random))
    corpus = _text_corpus(rng)
    windows = np.lib.stride_tricks.sliding_window_view(corpus, PAGE_SIZE)
    lane = np.arange(PAGE_SIZE)
    # Chunks keep temporary arrays small even for multi-GiB guests.
    for chunk in np.array_split(np.sort(order[:n_text]), max(1, n_text // 1024)):
        block = windows[rng.integers(0, len(windows), len(chunk))].copy()
        used = rng.integers(PAGE_SIZE // 4, PAGE_SIZE + 1, len(chunk))
        block[lane[None, :] >= used[:, None]] = 0  # partly filled pages
        pages[chunk] = block
    for chunk in np.array_split(np.sort(order[n_text:n_text + n_rand]),
                                max(1, n_rand // 1024)):
        pages[chunk] = np.frombuffer(rng.bytes(len(chunk) * PAGE_SIZE),
                                     dtype=np.uint8).reshape(-1, PAGE_SIZE)
    return memory


def initial_vcpus(vcpus: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, 0xC9])
    regs = np.zeros((vcpus, VCPU_REGS), dtype="<u8")
    # Canonical kernel addresses exceed int64: build them in uint64.
    rip = (rng.integers(0, 1 << 24, vcpus) & ~0xF).astype(np.uint64)
    regs[:, REG_RIP] = rip + np.uint64(_KERNEL_TEXT)
    rsp = (rng.integers(0, 1 << 30, vcpus) * 16).astype(np.uint64)
    regs[:, REG_RSP] = rsp + np.uint64(0xFFFFC90000000000)
    regs[:, REG_RFLAGS] = 0x202
    regs[:, REG_CR0] = 0x80050033
    regs[:, REG_CR3] = rng.integers(1, 1 << 20) * PAGE_SIZE
    regs[:, REG_CR4] = 0x3606E0
    regs[:, REG_EFER] = 0xD01
    regs[:, REG_GPR0:REG_GPR0 + 16] = rng.integers(0, 1 << 62, (vcpus, 16))
    return regs


def retire(regs: np.ndarray, indices: np.ndarray) -> None:
    """Advance one vCPU's registers for a batch of writes it 'executed', so
    the register file changes as the guest runs (and a restore can be
    checked against it)."""
    n = len(indices)
    regs[REG_ICOUNT] += n * _INSNS_PER_WRITE
    regs[REG_RIP] = _KERNEL_TEXT + (int(regs[REG_ICOUNT]) * 0x9E37 & 0xFFFFF0)
    regs[REG_GPR0] = int(indices[-1])
    regs[REG_WRITES] += n
    regs[REG_LAST_PAGE] = int(indices[-1])


# --------------------------------------------------------------------------
# what it does while running
@dataclass(frozen=True)
class WorkloadProfile:
    name: str
    rate: float          # page writes per second at full speed
    hot_fraction: float  # share of memory in the hot working set
    hot_share: float     # probability that a write lands in the hot set


PROFILES: dict[str, WorkloadProfile] = {
    "idle": WorkloadProfile("idle", rate=20.0, hot_fraction=0.005, hot_share=0.95),
    "web": WorkloadProfile("web", rate=2_000.0, hot_fraction=0.03, hot_share=0.90),
    "db": WorkloadProfile("db", rate=10_000.0, hot_fraction=0.15, hot_share=0.80),
}
MAX_RATE = 1_000_000.0


def resolve_profile(spec: str | Mapping[str, Any] | None) -> WorkloadProfile:
    """A profile from a config value: ``"web"`` or ``{"profile": "web",
    "rate": 5000, "hot_fraction": 0.05, "hot_share": 0.9}``.  Raises
    ValueError on an unknown profile or an out-of-range parameter."""
    if spec is None:
        spec = {}
    if isinstance(spec, str):
        spec = {"profile": spec}
    if not isinstance(spec, Mapping):
        raise ValueError("workload must be a profile name or an object")
    unknown = set(spec) - {"profile", "rate", "hot_fraction", "hot_share"}
    if unknown:
        raise ValueError(f"unknown workload parameters: {sorted(unknown)}")
    name = spec.get("profile", "idle")
    if name not in PROFILES:
        raise ValueError(f"unknown workload profile {name!r} (known: {sorted(PROFILES)})")
    overrides = {k: float(spec[k]) for k in ("rate", "hot_fraction", "hot_share")
                 if k in spec}
    profile = replace(PROFILES[name], **overrides)
    if not 0 <= profile.rate <= MAX_RATE:
        raise ValueError(f"workload rate must be in 0..{MAX_RATE:.0f} pages/s")
    if not 0 < profile.hot_fraction <= 1 or not 0 <= profile.hot_share <= 1:
        raise ValueError("hot_fraction must be in (0, 1] and hot_share in [0, 1]")
    return profile


def complete_config(config: Mapping[str, Any], default_seed: int) -> dict[str, Any]:
    """A deep copy of a guest config with every default made explicit (seed,
    workload, memory content), so what is stored and saved is what runs.
    Raises ValueError on anything unusable."""
    try:
        cfg = json.loads(json.dumps(config))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"config must be JSON-serialisable: {exc}") from exc
    if not isinstance(cfg, dict):
        raise ValueError("config must be an object")
    seed = cfg.setdefault("seed", default_seed)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError("config.seed must be a non-negative integer")
    workload = cfg.setdefault("workload", {"profile": "idle"})
    if isinstance(workload, str):
        cfg["workload"] = workload = {"profile": workload}
    try:
        resolve_profile(workload)
    except ValueError as exc:
        raise ValueError(f"config.workload: {exc}") from exc
    cfg["memory_content"] = _content_fractions(cfg.get("memory_content", {}))
    return cfg


def _content_fractions(given: Any) -> dict[str, float]:
    error = ValueError("config.memory_content: zero/text/random fractions in "
                       "[0, 1] summing to 1 (zero defaults to the remainder)")
    if not isinstance(given, dict) or set(given) - set(DEFAULT_CONTENT):
        raise error
    if not all(isinstance(v, int | float) and not isinstance(v, bool)
               for v in given.values()):
        raise error
    content = {**DEFAULT_CONTENT, **given}
    if "zero" not in given:
        content["zero"] = 1.0 - content["text"] - content["random"]
    if any(not 0 <= v <= 1 for v in content.values()) or \
            abs(sum(content.values()) - 1.0) > 1e-6:
        raise error
    return content


def stamp_pages(pages: np.ndarray, indices: np.ndarray, first_counter: int) -> None:
    """Write one 64-byte record into each listed page (2-D uint8 view).

    Record = counter, page index, six mixed words.  The counter is unique per
    write, so every write really changes its page; the slot moves with the
    counter so repeated writes spread over the page like real data would.
    """
    n = len(indices)
    ctr = np.arange(first_counter, first_counter + n, dtype=np.uint64)
    idx = indices.astype(np.uint64)
    rec = np.empty((n, RECORD // 8), dtype="<u8")
    rec[:, 0] = ctr
    rec[:, 1] = idx
    rec[:, 2:] = ctr[:, None] * _MIX[None, :]  # wraps mod 2**64 by design
    slots = ((idx * np.uint64(7) + ctr) % np.uint64(SLOTS)).astype(np.intp) * RECORD
    rows = indices.astype(np.intp)[:, None]
    pages[rows, slots[:, None] + _LANE] = rec.view(np.uint8)


class PagePicker:
    """Chooses which pages the next writes hit."""

    def __init__(self, npages: int, profile: WorkloadProfile, seed: int, position: int):
        hot_n = max(1, min(npages, round(npages * profile.hot_fraction)))
        # The hot set depends on the seed only, so a restored or migrated
        # guest keeps the same working set.
        self.hot = np.random.default_rng([seed, 0x407]).choice(
            npages, hot_n, replace=False).astype(np.int64)
        self._rng = np.random.default_rng([seed, position])
        self._npages, self._hot_share = npages, profile.hot_share

    def pick(self, n: int) -> np.ndarray:
        in_hot = self._rng.random(n) < self._hot_share
        hot = self.hot[self._rng.integers(0, len(self.hot), n)]
        cold = self._rng.integers(0, self._npages, n, dtype=np.int64)
        return np.where(in_hot, hot, cold)


class TokenBucket:
    """Rate control in batches: sleeping once per page cannot reach tens of
    thousands of pages/s, so tokens accumulate and are spent ~100 times/s."""

    BATCHES_PER_S = 100.0
    MAX_SLEEP = 0.05

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self.reset()

    def reset(self) -> None:
        """Forget accrued time (after a pause, writes must not burst)."""
        self._last: float | None = None
        self._tokens = 0.0

    def take(self, rate: float) -> tuple[int, float]:
        """Return (pages to write now, 0) or (0, seconds to wait)."""
        now = self._clock()
        if self._last is None:
            self._last = now
        self._tokens += (now - self._last) * rate
        self._last = now
        if rate <= 0:
            self._tokens = 0.0
            return 0, self.MAX_SLEEP
        target = max(1.0, rate / self.BATCHES_PER_S)
        # A starved thread may catch up a little, never flood.
        self._tokens = min(self._tokens, 4 * target)
        if self._tokens >= target:
            n = int(self._tokens)
            self._tokens -= n
            return n, 0.0
        wait = (target - self._tokens) / rate
        return 0, min(max(wait, 0.0005), self.MAX_SLEEP)


class WorkloadTarget(Protocol):
    """What a guest offers its workload thread."""

    throttle_factor: float

    def wait_active(self, timeout: float) -> bool:
        """Block until the vCPUs run (True) or the timeout passes (False)."""

    def workload_write(self, indices: np.ndarray) -> bool:
        """Write the pages atomically with the dirty log; False if paused."""


class WorkloadRunner:
    """The thread that executes a profile against a guest."""

    def __init__(self, target: WorkloadTarget, profile: WorkloadProfile,
                 npages: int, seed: int, position: int, name: str):
        self.profile = profile
        self._target = target
        self._picker = PagePicker(npages, profile, seed, position)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"workload-{name}",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _run(self) -> None:
        bucket = TokenBucket()
        while not self._stop.is_set():
            if not self._target.wait_active(0.1):
                bucket.reset()
                continue
            n, delay = bucket.take(self.profile.rate * self._target.throttle_factor)
            if n == 0:
                self._stop.wait(delay)
                continue
            if not self._target.workload_write(self._picker.pick(n)):
                bucket.reset()
