"""A fake portal for agent tests: a WebSocket server for /ws/agent/ and a tiny
threaded HTTP server for image upload and download, both on loopback, both
stopped after each test.  With both, the image server is the portal's one
address (it passes /ws/agent/ upgrades through to the WebSocket server), as an
agent sends image bytes only to the portal URL it is enrolled with.  Agents
under test run in-process with a real sim driver and small guests."""
import asyncio
import hashlib
import json
import socket
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from websockets.asyncio.server import serve

from migrator.agent import Agent, parse_config
from migrator.hypervisor import SimDriver

HOST_CREDENTIAL = "hc_test-host-credential-0123456789"
JOB_CREDENTIAL = "jc_test-job-credential-9876543210"
IDLE = {"profile": "idle", "rate": 0}  # memory does not change: "intact" is checkable
BUSY = {"profile": "web", "rate": 20000, "hot_pages": 256}


class FakeWsPortal:
    """Accepts agents presenting ``Host <credential>``; records every message."""

    def __init__(self, credential=HOST_CREDENTIAL):
        self.credential = credential
        self.auto_ack = True
        self.messages = []          # every message received, in order
        self.refused = 0            # handshakes refused with 403
        self.connections = 0
        self._cond = threading.Condition()
        self._ws = None
        self._loop = None
        self._server = None
        self._thread = None
        self.port = 0
        self.front = None           # a FakeImages serving as this portal's one address

    # -- lifecycle --------------------------------------------------------
    def start(self, port=0):
        ready = threading.Event()

        async def main():
            self._loop = asyncio.get_running_loop()
            self._stopping = asyncio.Event()
            async with serve(self._handler, "127.0.0.1", port,
                             process_request=self._check) as server:
                self._server = server
                self.port = server.sockets[0].getsockname()[1]
                ready.set()
                await self._stopping.wait()

        self._thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
        self._thread.start()
        assert ready.wait(10), "fake portal did not start"
        return self

    def stop(self):
        if self._thread is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
            self._thread.join(10)
            self._thread = None

    @property
    def url(self):
        return self.front.url if self.front is not None else f"http://127.0.0.1:{self.port}"

    # -- server side ------------------------------------------------------
    def _check(self, connection, request):
        if request.path != "/ws/agent/":
            return connection.respond(404, "Not Found\n")
        if request.headers.get("Authorization") != f"Host {self.credential}":
            self.refused += 1
            return connection.respond(403, "Forbidden\n")
        return None

    async def _handler(self, ws):
        self._ws = ws
        self.connections += 1
        try:
            async for raw in ws:
                message = json.loads(raw)
                with self._cond:
                    self.messages.append(message)
                    self._cond.notify_all()
                await self._reply(ws, message)
        finally:
            if self._ws is ws:
                self._ws = None

    async def _reply(self, ws, message):
        if message["type"] == "hello":
            await ws.send(json.dumps({"type": "welcome", "host": message["host"],
                                      "server_time": "now"}))
            if self.auto_ack:
                for result in message["results"]:
                    await ws.send(json.dumps({"type": "ack", "job": result["job"]}))
        elif message["type"] == "job.result" and self.auto_ack:
            await ws.send(json.dumps({"type": "ack", "job": message["job"]}))

    # -- test side --------------------------------------------------------
    def wait_for(self, predicate, timeout=15.0, after=0):
        """The first message (from index ``after``) matching ``predicate``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for message in self.messages[after:]:
                    if predicate(message):
                        return message
                left = deadline - time.monotonic()
                assert left > 0, f"no matching message; got {[m['type'] for m in self.messages]}"
                self._cond.wait(left)

    def hello(self, after=0, timeout=15.0):
        return self.wait_for(lambda m: m["type"] == "hello", timeout, after)

    def result(self, job, timeout=20.0):
        return self.wait_for(lambda m: m["type"] == "job.result" and m["job"] == job, timeout)

    def send(self, message):
        ws = self._ws
        assert ws is not None, "no agent connected"
        asyncio.run_coroutine_threadsafe(ws.send(json.dumps(message)), self._loop).result(5)

    def drop(self, code=1011):
        ws = self._ws
        if ws is not None:
            asyncio.run_coroutine_threadsafe(ws.close(code), self._loop).result(5)


class FakeImages:
    """POST /api/v1/images/ and GET /api/v1/images/<id>/content, in memory.

    ``mode`` for uploads: "ok" (201), "refuse" (422 with a JSON detail after
    reading the body), "drop" (close the connection mid-body), "stall" (read a
    little, then wait for ``release`` before going on as "ok").  A download in
    "stall" mode sends half the image, then waits for ``release``; in "integrity"
    mode it is refused as the portal refuses an image that fails its integrity check."""

    def __init__(self, websocket=None):
        self.websocket = websocket  # a FakeWsPortal to pass /ws/agent/ upgrades to
        self.mode = "ok"
        self.images = {}          # id -> bytes
        self.uploads = []         # (headers, body) of completed uploads
        self.on_upload = None     # called with the headers before the body is read
        self.release = threading.Event()
        self.stalled = threading.Event()
        self.truncate = None      # serve only this many bytes of a download
        images = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                images._post(self)

            def do_GET(self):
                if images.websocket is not None and self.path == "/ws/agent/":
                    images._pass_through(self)
                else:
                    images._get(self)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()

    def _answer(self, handler, status, payload):
        body = json.dumps(payload).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    def _post(self, h):
        if h.headers.get("Authorization") != f"Job {JOB_CREDENTIAL}":
            return self._answer(h, 401, {"error": "not_authenticated", "detail": "bad job"})
        length = int(h.headers["Content-Length"])  # required: KeyError fails the test
        if self.on_upload:
            self.on_upload(dict(h.headers))
        if self.mode == "drop":
            h.rfile.read(min(length, 64 * 1024))
            h.close_connection = True
            h.connection.shutdown(2)
            return None
        head = b""
        if self.mode == "stall":
            head = h.rfile.read(min(length, 64 * 1024))
            self.stalled.set()
            self.release.wait(20)
        body = head + self._read(h, length - len(head))
        if self.mode == "refuse":
            return self._answer(h, 422, {"error": "digest_mismatch",
                                         "detail": "The body does not match X-Berth-SHA256."})
        if hashlib.sha256(body).hexdigest() != h.headers["X-Berth-SHA256"]:
            return self._answer(h, 422, {"error": "digest_mismatch", "detail": "real mismatch"})
        image = str(uuid.uuid4())
        self.images[image] = body
        self.uploads.append((dict(h.headers), body))
        return self._answer(h, 201, {"id": image, "name": h.headers["X-Berth-Name"]})

    @staticmethod
    def _read(h, length):
        parts = []
        while length > 0:
            piece = h.rfile.read(min(length, 1 << 20))
            if not piece:
                break
            parts.append(piece)
            length -= len(piece)
        return b"".join(parts)

    def _pass_through(self, h):
        """Relay a WebSocket upgrade, then its bytes both ways, to the fake portal."""
        h.close_connection = True
        try:
            upstream = socket.create_connection(("127.0.0.1", self.websocket.port), timeout=5)
        except OSError:
            return  # the fake portal is down: the agent sees its connection close
        upstream.settimeout(None)
        head = f"GET {h.path} HTTP/1.1\r\n" + "".join(
            f"{k}: {v}\r\n" for k, v in h.headers.items()) + "\r\n"
        upstream.sendall(head.encode("latin-1"))
        client = h.connection

        def pump(src, dst):
            try:
                while data := src.recv(65536):
                    dst.sendall(data)
            except OSError:
                pass
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        back = threading.Thread(target=pump, args=(upstream, client), daemon=True)
        back.start()
        pump(client, upstream)
        back.join(10)
        upstream.close()

    def _get(self, h):
        if h.headers.get("Authorization") != f"Job {JOB_CREDENTIAL}":
            return self._answer(h, 403, {"error": "permission_denied",
                                         "detail": "You may not download this image."})
        image = h.path.split("/")[-2]
        data = self.images.get(image)
        if data is None:
            return self._answer(h, 404, {"error": "not_found", "detail": "No such image."})
        if self.mode == "integrity":  # as the portal answers for a swapped or altered object
            return self._answer(h, 409, {"error": "integrity_error",
                                         "detail": f"Image {image} failed its integrity check."})
        h.send_response(200)
        h.send_header("Content-Type", "application/octet-stream")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if self.mode == "stall":  # half the image, then wait
            h.wfile.write(data[:len(data) // 2])
            h.wfile.flush()
            self.stalled.set()
            self.release.wait(20)
            return None
        h.wfile.write(data[:self.truncate] if self.truncate is not None else data)
        if self.truncate is not None:
            h.close_connection = True

    def add_image(self, data):
        image = str(uuid.uuid4())
        self.images[image] = data
        return image


def agent_config(tmp_path, portal_url, *, name="hostb", guests=(), memory_mib=256,
                 credential=HOST_CREDENTIAL):
    return parse_config({
        "host": {"name": name, "driver": "sim", "arch": "x86_64", "virt_extensions": ["vmx"],
                 "memory_mib": memory_mib, "disk_gib": 100, "subnet": "192.168.1.0/24",
                 "storage": ["hosta:/xen-storage"], "state_dir": str(tmp_path / "state")},
        "portal": {"url": portal_url, "credential": credential, "ca": ""},
        "relocation": {"address": "127.0.0.1", "port": 8002, "hosts_allow": ["hostc"]},
        "guests": list(guests),
    }, source="test.toml")


def guest(name, memory_mib=8, workload=None, **extra):
    return {"name": name, "memory_mib": memory_mib, "vcpus": 1,
            "kernel": "/boot/vmlinuz-2.6.16.38-xenU", "ip": "192.168.1.110",
            "storage": [], "workload": workload or IDLE, **extra}


@pytest.fixture
def portal():
    fake = FakeWsPortal().start()
    yield fake
    fake.stop()


@pytest.fixture
def images(portal):
    fake = FakeImages(websocket=portal)
    portal.front = fake
    yield fake
    portal.front = None
    fake.stop()


@pytest.fixture
def make_agent(tmp_path):
    """Start in-process agents with fast reconnection; stop them all after."""
    started = []

    def make(portal_url, guests=(), driver=None, **kw):
        config = agent_config(tmp_path, portal_url, guests=guests,
                              **{k: kw.pop(k) for k in ("name", "memory_mib", "credential")
                                 if k in kw})
        driver = driver or SimDriver(config.host.name, config.host.memory_mib)
        agent = Agent(config, driver, backoff=kw.pop("backoff", (0.05, 0.2)), poll=0.1,
                      heartbeat=kw.pop("heartbeat", 10.0), transfer_timeout=10.0, **kw)
        started.append(agent)
        return agent.start()

    yield make
    for agent in started:
        agent.stop()
        agent.driver.close()


def save_command(guest_uuid, images, job=None):
    return {"type": "command", "job": job or str(uuid.uuid4()), "action": "save",
            "guest": guest_uuid,
            "upload": {"url": f"{images.url}/api/v1/images/", "credential": JOB_CREDENTIAL,
                       "name": "etch test image"}}


def restore_command(image_id, data, guest_uuid, images, job=None, **image_extra):
    return {"type": "command", "job": job or str(uuid.uuid4()), "action": "restore",
            "image": {"id": image_id, "sha256": hashlib.sha256(data).hexdigest(),
                      "plaintext_size": len(data), "guest_uuid": guest_uuid, **image_extra},
            "download": {"url": f"{images.url}/api/v1/images/{image_id}/content",
                         "credential": JOB_CREDENTIAL}}
