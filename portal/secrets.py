"""Secrets that Berth generates once and keeps under the data directory, and the
atomic file replacement that key and state files share.

Django-free on purpose: settings.py imports it before Django is configured.
"""
import os
import secrets
import threading
from pathlib import Path


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) readable by the owner only."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def load_or_create(path: Path, nbytes: int = 32) -> str:
    """Return the hex secret stored at ``path``, creating it (mode 0600) if absent.

    O_EXCL makes concurrent first starts agree on a single secret: the loser
    of the race reads what the winner wrote.
    """
    ensure_private_dir(path.parent)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _read_when_written(path)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(nbytes) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return _read_when_written(path)


def _read_when_written(path: Path) -> str:
    for _ in range(100):
        value = path.read_text().strip()
        if value:
            return value
        # The creator has the file open but has not written yet.
        import time

        time.sleep(0.01)
    raise RuntimeError(f"secret file {path} is empty")


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data``: readers see the old or the new file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    # The rename itself must survive a crash too.
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
