"""Start the real portal (uvicorn, as `make demo` does) on a free loopback port."""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def manage(*args, env, check=True, timeout=120):
    return subprocess.run([sys.executable, "manage.py", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, check=check)


class PortalServer:
    """A portal process with its own data directory; stop() ends only it."""

    def __init__(self, data_dir: Path, extra_env=None, agents=False):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.agents = agents
        self.env = {**os.environ, "BERTH_DATA_DIR": str(data_dir), "BERTH_PORTAL_URL": self.url,
                    **(extra_env or {})}
        self.env.pop("DJANGO_SETTINGS_MODULE", None)
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

    def stop(self):
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
