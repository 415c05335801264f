"""Start the real portal (uvicorn, as `make demo` does) on a free loopback port.

With ``DATABASE_URL`` set (the scale-out pass, PostgreSQL), each server gets a
database of its own unless the test passes one, as portals sharing a database do.
"""
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psycopg
from psycopg import sql

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def manage(*args, env, check=True, timeout=120):
    return subprocess.run([sys.executable, "manage.py", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, check=check)


class PostgresDatabase:
    """A fresh, empty PostgreSQL database beside the one ``DATABASE_URL`` names."""

    def __init__(self):
        self.base_url = os.environ["DATABASE_URL"]
        self.name = f"berth_t{secrets.token_hex(6)}"
        self.url = database_url_named(self.name)
        self._execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.name)))

    def _execute(self, statement):
        with psycopg.connect(self.base_url, autocommit=True) as connection:
            connection.execute(statement)

    def drop(self):
        # FORCE: a portal that was killed may leave connections behind.
        self._execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
            sql.Identifier(self.name)))


def database_url_named(name):
    """``DATABASE_URL`` with another database name, e.g. pytest-django's test_berth."""
    return os.environ["DATABASE_URL"].rsplit("/", 1)[0] + "/" + name


def on_postgresql() -> bool:
    return os.environ.get("DATABASE_URL", "").startswith(("postgres://", "postgresql://"))


class PortalServer:
    """A portal process with its own data directory; stop() ends only it.

    ``extra_env`` may carry ``DATABASE_URL`` and ``BERTH_REDIS_PREFIX`` so that several
    servers share them; otherwise, on PostgreSQL, the server gets its own database, and
    its own Redis key prefix.
    """

    def __init__(self, data_dir: Path, extra_env=None, agents=False):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.agents = agents
        self.env = {**os.environ, "BERTH_DATA_DIR": str(data_dir), "BERTH_PORTAL_URL": self.url,
                    **(extra_env or {})}
        self.env.pop("DJANGO_SETTINGS_MODULE", None)
        # Its own Redis keys too, unless it shares them: no stale groups from other tests.
        self.env.setdefault("BERTH_REDIS_PREFIX", f"berth-t{secrets.token_hex(4)}")
        self.database = None
        if on_postgresql() and "DATABASE_URL" not in (extra_env or {}):
            self.database = PostgresDatabase()
            self.env["DATABASE_URL"] = self.database.url
        self.process = None
        self.log = data_dir / "server.log"

    def start(self, timeout=60):
        manage("migrate", "--noinput", env=self.env)
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "manage.py", "demo", "--port", str(self.port),
                 *([] if self.agents else ["--no-agents"])],
                cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"portal exited early:\n{self.log.read_text()}")
            try:
                httpx.get(f"{self.url}/login/", timeout=1)
                return
            except httpx.TransportError:
                time.sleep(0.2)
        raise RuntimeError(f"portal did not start:\n{self.log.read_text()}")

    def issue_token(self, username, *scopes):
        """A new API token for ``username`` with ``scopes``, issued by `manage.py tokens`."""
        args = [arg for scope in scopes for arg in ("--scope", scope)]
        out = manage("tokens", "issue", username, *args, env=self.env).stdout
        return out.split("token: ")[1].split()[0]

    def restart(self, timeout=60):
        """Stop the process and start it again on the same port, with the same data."""
        self._end_process()
        return self.start(timeout)

    def stop(self):
        """End the process, and drop the server's private database if it has one."""
        self._end_process()
        if self.database is not None:
            self.database.drop()
            self.database = None

    def _end_process(self):
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
