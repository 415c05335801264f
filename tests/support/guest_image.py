"""The real Linux test guest: Debian's kernel and a busybox initramfs.

Build it (idempotent; only Debian's package registry is contacted)::

    python -m tests.support.guest_image            # into var/guest-image/
    BERTH_GUEST_IMAGE_DIR=/some/dir python -m tests.support.guest_image

The directory then holds ``vmlinuz``, ``initrd.gz`` and ``manifest.json``
(the package versions and the init script's digest; a build whose inputs are
unchanged is skipped).  Tests find it with `find_image` (the ``real_guest``
fixture) and skip, saying how to build it, where it is missing.

The guest's ``/init`` (busybox sh):

* mounts proc, sys, dev (devtmpfs) and a tmpfs on /run;
* prints ``TICK <n> <uptime>`` on the serial console every 50 ms (n counts
  from 1 at boot; it goes on, never reset, across save, restore and
  migration, since it lives in the guest's memory);
* with ``berth.dirty=<MiB>`` on the kernel command line, rewrites a file of
  that size (96 is what the tests use; give the guest 256 MiB) on a tmpfs in
  a loop, one MiB of random bytes at a time, so memory keeps changing under a
  migration;
* keeps a marker in memory that is written nowhere: ``BERTH-MARKER-`` and
  the SHA-256 (hex) of the ``berth.seed=<seed>`` word, computed in the
  guest and held in a shell variable and a tmpfs file - the seed is on the
  command line (so on disk, in the run directory's meta.json), the marker is
  not, and a test that knows the seed computes it (`marker_for`);
* offers a shell on the console (``/bin/sh`` on ttyS0, respawned).

The kernel parameters with a dot are not passed to init by Linux (they look
like module options), so /init reads them from /proc/cmdline.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ENV = "BERTH_GUEST_IMAGE_DIR"
DEFAULT_DIR = ROOT / "var" / "guest-image"
MARKER_PREFIX = "BERTH-MARKER-"
BUILD_HINT = "python -m tests.support.guest_image (or scripts/guest-image.sh)"

INIT = r"""#!/bin/sh
# Berth's test guest (tests/support/guest_image.py).
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs -o size=8m run /run
arg() { for w in $(cat /proc/cmdline); do case "$w" in "$1="*) echo "${w#*=}";; esac; done; }
seed=$(arg berth.seed)
dirty=$(arg berth.dirty)
# The marker is computed here and written nowhere but to memory.
MARKER="BERTH-MARKER-$(echo -n "${seed:-none}" | sha256sum | cut -d' ' -f1)"
echo "$MARKER$MARKER$MARKER$MARKER" > /run/marker
export MARKER
echo "berth guest up: seed=${seed:-none} dirty=${dirty:-0}" > /dev/ttyS0
if [ -n "$dirty" ] && [ "$dirty" -gt 0 ]; then
    mkdir -p /dirty
    mount -t tmpfs -o size=$((dirty + 2))m dirty /dirty
    (
        dd if=/dev/urandom of=/dirty/block bs=1M count=1 2>/dev/null
        while :; do
            i=0
            while [ "$i" -lt "$dirty" ]; do
                dd if=/dirty/block of=/dirty/file bs=1M seek="$i" count=1 conv=notrunc \
                    2>/dev/null
                i=$((i + 1))
            done
        done
    ) &
fi
(
    n=0
    while :; do
        n=$((n + 1))
        read up rest < /proc/uptime
        echo "TICK $n $up"
        usleep 50000
    done
) > /dev/ttyS0 2>&1 &
while :; do
    setsid cttyhack sh -i < /dev/ttyS0 > /dev/ttyS0 2>&1
done
"""


@dataclass(frozen=True)
class GuestImage:
    kernel: Path
    initrd: Path

    def config(self, *, seed: str = "", dirty_mib: int = 0, **extra) -> dict:
        """The QEMU guest config keys (docs/qemu.md) that boot this guest."""
        append = "console=ttyS0 quiet loglevel=3 panic=-1"
        if seed:
            append += f" berth.seed={seed}"
        if dirty_mib:
            append += f" berth.dirty={dirty_mib}"
        return {"kernel": str(self.kernel), "initrd": str(self.initrd), "append": append,
                **extra}


def marker_for(seed: str) -> bytes:
    """The marker the guest keeps in memory for ``berth.seed=<seed>``."""
    return (MARKER_PREFIX + hashlib.sha256(seed.encode()).hexdigest()).encode()


def image_dir() -> Path:
    return Path(os.environ.get(ENV) or DEFAULT_DIR)


def find_image(directory: Path | None = None) -> GuestImage | None:
    directory = directory or image_dir()
    kernel, initrd = directory / "vmlinuz", directory / "initrd.gz"
    if kernel.is_file() and initrd.is_file() and (directory / "manifest.json").is_file():
        return GuestImage(kernel, initrd)
    return None


# -- building -------------------------------------------------------------------
class BuildError(Exception):
    pass


def _run(argv: list[str], cwd: Path | None = None) -> str:
    try:
        done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise BuildError(f"{argv[0]} is not installed (a Debian system is needed)") from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise BuildError(f"{' '.join(argv[:3])} failed: {last}")
    return done.stdout


def _kernel_package() -> tuple[str, str]:
    """The versioned kernel image package linux-image-amd64 depends on, and its
    version (apt-get update once if the package lists are empty)."""
    for attempt in range(2):
        try:
            depends = _run(["apt-cache", "depends", "linux-image-amd64"])
            for line in depends.splitlines():
                word = line.strip().removeprefix("|")
                if word.startswith("Depends: linux-image-") and "amd64" in word:
                    package = word.split()[1]
                    return package, _version(package)
        except BuildError:
            pass
        if attempt == 0:
            _run(["apt-get", "update", "-qq"])
    raise BuildError("apt-cache does not know linux-image-amd64 (not a Debian amd64 system?)")


def _version(package: str) -> str:
    for line in _run(["apt-cache", "policy", package]).splitlines():
        if line.strip().startswith("Candidate:"):
            return line.split(":", 1)[1].strip()
    raise BuildError(f"apt-cache has no candidate for {package}")


def _download(packages: list[str], into: Path) -> dict[str, Path]:
    _run(["apt-get", "download", "-qq", *packages], cwd=into)
    found = {}
    for package in packages:
        debs = sorted(into.glob(f"{package}_*.deb"))
        if not debs:
            raise BuildError(f"apt-get download left no .deb for {package}")
        found[package] = debs[-1]
    return found


def _extract(deb: Path, members: list[str], into: Path) -> None:
    """``dpkg -x`` restricted to ``members`` (the kernel package's modules are
    hundreds of MB that the guest does not need)."""
    tar = subprocess.Popen(["tar", "-x", "-C", str(into), "--wildcards", *members],
                           stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    dpkg = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=tar.stdin,
                          stderr=subprocess.PIPE, check=False)
    tar.stdin.close()
    err = tar.stderr.read().decode(errors="replace").strip()
    if tar.wait() != 0 or dpkg.returncode != 0:
        raise BuildError(f"cannot extract {members} from {deb.name}: {err or 'dpkg-deb failed'}")


def newc(entries: list[tuple]) -> bytes:
    """A cpio archive in the "newc" format the kernel unpacks as initramfs:
    (path, mode, data[, (rdev major, minor)]) - data is a symlink's target
    for S_IFLNK."""
    out = io.BytesIO()

    def pad(n: int) -> None:
        out.write(b"\0" * (-n % 4))

    for ino, (name, mode, data, *dev) in enumerate([*entries, ("TRAILER!!!", 0, b"")],
                                                  start=1):
        raw = name.encode() + b"\0"
        nlink = 2 if mode & 0o170000 == 0o040000 else 1
        major, minor = dev[0] if dev else (0, 0)
        fields = (ino, mode, 0, 0, nlink, 0, len(data), 0, 0, major, minor, len(raw), 0)
        out.write(b"070701" + b"".join(b"%08X" % f for f in fields))
        out.write(raw)
        pad(110 + len(raw))
        out.write(data)
        pad(len(data))
    return out.getvalue()


def initramfs(busybox: bytes) -> bytes:
    dirs = ["bin", "dev", "proc", "sys", "run", "tmp"]
    entries = [(d, 0o040755, b"") for d in dirs]
    # The kernel opens /dev/console for init before devtmpfs is mounted.
    entries.append(("dev/console", 0o020600, b"", (5, 1)))
    entries += [("bin/busybox", 0o100755, busybox), ("init", 0o100755, INIT.encode())]
    entries += [(f"bin/{applet}", 0o120777, b"busybox") for applet in APPLETS]
    return gzip.compress(newc(entries), compresslevel=6, mtime=0)


APPLETS = ("sh", "mount", "cat", "echo", "sha256sum", "cut", "dd", "mkdir", "usleep", "sleep",
           "setsid", "cttyhack", "ls", "ps", "free", "uptime", "grep", "sync", "poweroff",
           "halt", "reboot", "kill", "top", "head", "tail", "wc", "date", "dmesg", "uname",
           "hexdump", "md5sum", "rm", "cp", "mv", "ln", "stty", "true", "false", "test", "[",
           "yes", "tr", "seq")


def build(directory: Path | None = None, *, quiet: bool = False) -> GuestImage:
    directory = directory or image_dir()
    directory.mkdir(parents=True, exist_ok=True)
    kernel_pkg, kernel_version = _kernel_package()
    busybox_version = _version("busybox-static")
    manifest = {"kernel_package": kernel_pkg, "kernel_version": kernel_version,
                "busybox_version": busybox_version,
                "init_sha256": hashlib.sha256(INIT.encode() + "\0".join(APPLETS).encode()
                                              ).hexdigest()}
    try:
        known = json.loads((directory / "manifest.json").read_text())
    except (OSError, ValueError):
        known = None
    if known == manifest and find_image(directory):
        if not quiet:
            print(f"guest image up to date in {directory}")
        return find_image(directory)
    with tempfile.TemporaryDirectory(prefix="berth-guest-image-") as tmp:
        work = Path(tmp)
        debs = _download([kernel_pkg, "busybox-static"], work)
        _extract(debs[kernel_pkg], ["./boot/vmlinuz-*"], work)
        _extract(debs["busybox-static"], ["./bin/busybox"], work)
        kernels = sorted((work / "boot").glob("vmlinuz-*"))
        if not kernels:
            raise BuildError(f"{debs[kernel_pkg].name} holds no /boot/vmlinuz-*")
        busybox = (work / "bin" / "busybox").read_bytes()
        for name, write in (("vmlinuz", lambda p: shutil.copyfile(kernels[-1], p)),
                            ("initrd.gz", lambda p: p.write_bytes(initramfs(busybox)))):
            tmp_path = directory / f".{name}.tmp"
            write(tmp_path)
            os.replace(tmp_path, directory / name)
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    if not quiet:
        print(f"guest image built in {directory}: {kernels[-1].name}, "
              f"busybox {busybox_version}")
    return find_image(directory)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the real Linux test guest.")
    parser.add_argument("--dir", type=Path, default=None,
                        help=f"output directory (default ${ENV} or var/guest-image)")
    args = parser.parse_args(argv)
    try:
        build(args.dir)
    except (BuildError, OSError) as exc:
        print(f"guest image: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
