"""A browser's view of a real portal over the network: a session cookie and job sockets."""
import contextlib
import json
import re
import threading
import time

import httpx
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect


def sign_in(portal_url, username, password) -> str:
    """Sign in through the login form, as a browser does; return the session cookie."""
    with httpx.Client(base_url=portal_url, follow_redirects=False, timeout=30) as client:
        page = client.get("/login/")
        csrf = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text).group(1)
        response = client.post("/login/", data={"username": username, "password": password,
                                                 "csrfmiddlewaretoken": csrf},
                               headers={"Referer": f"{portal_url}/login/"})
        assert response.status_code == 302, response.text[:300]
        return client.cookies["sessionid"]


class JobSocket:
    """``/ws/jobs/`` or ``/ws/jobs/<id>/`` on one portal, read in a thread, kept in order."""

    def __init__(self, portal_url, session, job_id=None):
        path = f"/ws/jobs/{job_id}/" if job_id else "/ws/jobs/"
        self._resources = contextlib.ExitStack()
        self.socket = self._resources.enter_context(connect(
            portal_url.replace("http://", "ws://", 1) + path, origin=portal_url, proxy=None,
            additional_headers={"Cookie": f"sessionid={session}"}))
        self.messages = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        try:
            for raw in self.socket:
                with self._changed:
                    self.messages.append(json.loads(raw))
                    self._changed.notify_all()
        except ConnectionClosed:
            pass

    def events_of(self, job_id):
        """The job's events in arrival order (snapshots excluded)."""
        with self._changed:
            return [m for m in self.messages
                    if m.get("type") != "snapshot" and m.get("job", {}).get("id") == job_id]

    def snapshot_of(self, job_id):
        with self._changed:
            for message in self.messages:
                for job in message.get("jobs", []) if message.get("type") == "snapshot" else []:
                    if job["id"] == job_id:
                        return job
        return None

    def wait_for_seq(self, job_id, seq, timeout=60):
        """Wait until the job's event number ``seq`` has arrived; return its events."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not any(e.get("seq") == seq for e in self.events_of(job_id)):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"event {seq} of job {job_id} never arrived; got "
                                         f"{[e.get('seq') for e in self.events_of(job_id)]}")
                self._changed.wait(min(left, 0.5))
        return self.events_of(job_id)

    def close(self):
        self._resources.close()
        self._reader.join(timeout=10)
