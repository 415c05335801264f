"""The host agent: one outbound WebSocket to the portal, jobs in threads.

The contract is ``docs/agent-protocol.md``; running an agent is
``docs/agent.md``.  In short:

* `Agent.run` boots the config's guests, then keeps a connection to
  ``<portal>/ws/agent/`` (``Authorization: Host <credential>``): ``hello``
  first, then ``inventory`` on change and every 10 s, ``job.event`` and
  ``job.result`` as jobs progress.  Any close or error - including a refused
  handshake, which an operator may fix - is followed by a reconnection with
  exponential back-off and jitter.
* Commands start jobs in threads (driver calls and HTTP block), one per
  guest at a time.  Jobs do not depend on the connection: their results go
  to the `Outbox` and are sent again in every ``hello`` until acknowledged.

Everything touching the connection runs on the agent's event loop; job
threads hand messages over with ``call_soon_threadsafe``.

Django-free.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import random
import re
import signal
import ssl
import threading
import time
from functools import partial
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus, WebSocketException

from migrator.hypervisor.base import (
    GuestNotFound,
    GuestSpec,
    HypervisorDriver,
    HypervisorError,
)
from migrator.hypervisor.sim import SimDriver

from .config import AgentConfig, HostConfig, RelocationConfig
from .indoubt import KEEP, InDoubtBook, holding, settle
from .jobs import ACTIONS, BadCommand, Job, _uuid, guest_json, result_message
from .migrate import MigrateJob, RelocationEndpoint
from .outbox import HostState, Outbox, RefusalReports, RevocationList, ensure_state_dir

COMMANDS = {**ACTIONS, "migrate": MigrateJob}

AGENT_VERSION = "0.1"
PROTOCOL = 1
MAX_QUEUED_EVENTS = 1000  # a slow portal loses progress events, never results
REFUSED = "relocation.refused"

log = logging.getLogger("berth.agent")


class _Redact(logging.Filter):
    """Safety net: websockets logs handshake headers and frames at DEBUG, and
    commands carry job credentials.  Secrets never reach a log line."""

    SECRET = re.compile(r"(?i)(authorization:\s*\w+\s+|x-berth-host-credential:\s*"
                        r"|\"credential\"\s*:\s*\")[^\s\"']+")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if self.SECRET.search(message):
            record.msg, record.args = self.SECRET.sub(r"\1[redacted]", message), ()
        return True


_WS_LOG = logging.getLogger("berth.agent.websocket")
for _logger in (log, _WS_LOG):
    _logger.addFilter(_Redact())


def make_driver(host: HostConfig, relocation: RelocationConfig | None = None
                ) -> HypervisorDriver:
    """The hypervisor driver the config names: ``sim`` or ``qemu`` (whose
    guests live in ``state_dir/qemu`` and migrate with the relocation
    certificate)."""
    if host.driver == "sim":
        return SimDriver(host.name, host.memory_mib, arch=host.arch,
                         virt_features=host.virt_extensions)
    if host.driver == "qemu":
        from migrator.hypervisor.qemu import QemuDriver, TlsFiles

        tls = (TlsFiles(relocation.cert, relocation.key, relocation.ca)
               if relocation is not None and relocation.cert else None)
        return QemuDriver(host.name, host.memory_mib, host.state_dir / "qemu", arch=host.arch,
                          virt_features=host.virt_extensions, tls=tls)
    raise ValueError(f"unknown driver {host.driver!r}")


def _report(message: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in message.items() if k != "type"}


class Backoff:
    """1 s, 2 s, 4 s ... capped, each +-20 %: a fleet of agents whose portal
    restarts must not all knock at the same instant."""

    def __init__(self, first: float = 1.0, cap: float = 30.0, jitter: float = 0.2):
        self.first, self.cap, self.jitter = first, cap, jitter
        self._n = 0

    def next(self) -> float:
        delay = min(self.cap, self.first * 2 ** min(self._n, 30))
        self._n += 1
        return delay * (1 + self.jitter * (2 * random.random() - 1))

    def reset(self) -> None:
        self._n = 0


class Agent:
    """One host's agent.  Construct, then `run()` (blocking) or `start()`
    (background thread, for tests) and `stop()`."""

    def __init__(self, config: AgentConfig, driver: HypervisorDriver | None = None, *,
                 backoff: tuple[float, float] = (1.0, 30.0), stable_after: float = 60.0,
                 heartbeat: float = 10.0, poll: float = 0.5, resend_after: float = 30.0,
                 transfer_timeout: float = 60.0, shutdown_timeout: float = 10.0):
        self.config = config
        ensure_state_dir(config.host.state_dir)
        self.driver = (driver if driver is not None
                       else make_driver(config.host, config.relocation))
        self._own_driver = driver is None
        self.outbox = Outbox(config.host.state_dir)
        self.refusals = RefusalReports()  # the relocation port's, for the portal's audit
        self.state = HostState(config.host.state_dir)
        self.in_doubt = InDoubtBook(config.host.state_dir)
        self.revocations = RevocationList(config.host.state_dir)
        self._backoff, self._stable_after = backoff, stable_after
        self._heartbeat, self._poll, self._resend_after = heartbeat, poll, resend_after
        self._transfer_timeout, self._shutdown_timeout = transfer_timeout, shutdown_timeout
        self._lock = threading.Lock()  # jobs, busy guests
        self._jobs: dict[str, Job] = {}
        self._threads: dict[str, threading.Thread] = {}
        self._busy: dict[str, str] = {}  # guest uuid -> job id
        self._finished: collections.deque[str] = collections.deque(maxlen=1000)
        self._results_posted = 0  # counts _finish calls; see _ticker
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._ws: ClientConnection | None = None
        self._queue: asyncio.Queue[dict[str, Any]] | None = None
        self._sent_at: dict[str, float] = {}
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stop_requested = threading.Event()  # stop() before the loop exists
        self.connected = threading.Event()  # set while a connection is up (tests wait on it)
        self.relocation: RelocationEndpoint | None = None  # started with the loop
        self.attempts = 0      # connection attempts so far
        self.connections = 0   # successful handshakes so far

    def __repr__(self) -> str:
        return f"<Agent {self.config.host.name} -> {self.config.portal.url}>"

    # -- lifecycle -------------------------------------------------------------
    def run(self, *, handle_signals: bool = False) -> None:
        """Boot guests, serve until `stop()` (or SIGINT/SIGTERM when
        ``handle_signals``), then abort and wait for running jobs."""
        asyncio.run(self._main(handle_signals))

    def start(self) -> Agent:
        """Run in a background thread; returns once the config's guests are booted."""
        self._thread = threading.Thread(target=self.run, name=f"agent-{self.config.host.name}",
                                        daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("agent did not start")
        return self

    def stop(self, timeout: float | None = 30.0) -> None:
        """Thread-safe.  Ask the agent to stop; wait for `start()`'s thread."""
        self._stop_requested.set()
        loop, stop_event = self._loop, self._stop_event
        if loop is not None and stop_event is not None:
            with contextlib.suppress(RuntimeError):  # loop already closed
                loop.call_soon_threadsafe(stop_event.set)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    async def _main(self, handle_signals: bool) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        if self._stop_requested.is_set():
            self._stop_event.set()
        if handle_signals:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._loop.add_signal_handler(sig, self._stop_event.set)
        log.info("agent %s starting: portal %s, driver %s, %d config guest(s), state in %s",
                 self.config.host.name, self.config.portal.ws_url, self.config.host.driver,
                 len(self.config.guests), self.config.host.state_dir)
        try:
            try:
                await asyncio.to_thread(self.boot_guests)
                await asyncio.to_thread(self._start_relocation)
            finally:
                self._ready.set()  # start() returns with the guests booted
            await self._serve()
        finally:
            await asyncio.to_thread(self._shutdown)
            self._loop = None

    def _start_relocation(self) -> None:
        """Listen on the relocation port when the config names a certificate."""
        if not self.config.relocation.cert:
            log.info("no relocation certificate configured: live migration to %s is off",
                     self.config.host.name)
            return
        self.relocation = RelocationEndpoint(self.config, self.driver, self._event,
                                             self.in_doubt, on_refused=self.refusals.add)
        # What the portal last said, kept on disk: refused from the first connection on.
        self.relocation.server.revoked_serials = self.revocations.serials
        self.relocation.start()

    @property
    def revoked_serials(self) -> frozenset[int]:
        return self.revocations.serials

    def _revocations(self, message: dict[str, Any]) -> None:
        """Certificates the portal revoked (the whole list, in every ``welcome`` and
        pushed as ``revocations`` when it changes): kept on disk, and refused on the
        relocation port from the next handshake on, without a restart."""
        serials = message.get("revoked_serials")
        if not isinstance(serials, list):
            return
        told = frozenset(s for s in serials if isinstance(s, int) and not isinstance(s, bool))
        if self.relocation is not None:
            # Before the disk: the port must not wait for an fsync to refuse.
            self.relocation.server.revoked_serials = self.revocations.serials | told
        before = len(self.revocations.serials)
        revoked = self.revocations.add(told)
        if self.relocation is not None:
            self.relocation.server.revoked_serials = revoked
        if len(revoked) != before:
            log.info("the portal revoked host certificates: %d refused on the relocation "
                     "port now", len(revoked))

    def _shutdown(self) -> None:
        """Abort running jobs (a save resumes its guest) so their results are
        in the outbox before the process ends."""
        if self.relocation is not None:
            self.relocation.stop()
        with self._lock:
            jobs, threads = list(self._jobs.values()), list(self._threads.values())
        for job in jobs:
            log.info("stopping: aborting job %s (%s)", job.id, job.action)
            job.abort()
        deadline = time.monotonic() + self._shutdown_timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        if self._own_driver:
            self.driver.close()
        log.info("agent %s stopped", self.config.host.name)

    # -- guests ----------------------------------------------------------------
    def boot_guests(self) -> None:
        """Start the config's guests that are not running yet.  A guest that
        left this host (saved into the vault) is not booted again."""
        leaving = {r["guest"] for r in self.in_doubt.records() if r["role"] == "source"}
        for guest in self.config.guests:
            uuid = guest.uuid or self.state.uuid_for(guest.name)
            if self.state.is_departed(uuid):
                log.info("not booting guest %s (%s): it was saved off this host", guest.name,
                         uuid)
                continue
            if uuid in leaving:  # committed to leaving: a fresh copy here would be a second
                log.warning("not booting guest %s (%s): its migration away is in doubt",
                            guest.name, uuid)
                continue
            try:
                self.driver.get(uuid)
                continue
            except GuestNotFound:
                pass
            try:
                info = self.driver.create(GuestSpec(guest.name, guest.memory_mib, guest.vcpus,
                                                    guest.driver_config(), uuid=uuid))
            except HypervisorError as exc:
                log.error("cannot boot guest %s: %s", guest.name, exc)
                continue
            log.info("booted guest %s (%s) as domain %d", info.name, info.uuid, info.domid)

    def capacity(self) -> dict[str, int]:
        cap = self.driver.capacity()
        return {"memory_mib": cap.total_mib, "used_mib": cap.used_mib,
                "reserved_mib": cap.reserved_mib, "disk_gib": self.config.host.disk_gib}

    def guests(self) -> list[dict[str, Any]]:
        return [guest_json(info) for info in self.driver.list()]

    def hello(self) -> dict[str, Any]:
        """The first message of every connection."""
        host, info = self.config.host, self.driver.host_info()
        with self._lock:
            jobs = [{"job": job_id, "state": "running"} for job_id in self._jobs]
        return {"type": "hello", "protocol": PROTOCOL, "host": host.name,
                "agent_version": AGENT_VERSION, "driver": info.driver, "arch": info.arch,
                "virt_extensions": list(info.virt_features), "capacity": self.capacity(),
                "subnet": host.subnet, "storage": list(host.storage),
                "relocation": {"address": self.config.relocation.address,
                               "port": self.config.relocation.port},
                "guests": self.guests(), "jobs": jobs, "results": self.outbox.pending(),
                "in_doubt": [{**r, **holding(self.driver, r["guest"])}
                             for r in self.in_doubt.records()]}

    def inventory(self) -> dict[str, Any]:
        return {"type": "inventory", "capacity": self.capacity(), "guests": self.guests()}

    # -- connection --------------------------------------------------------------
    async def _serve(self) -> None:
        assert self._stop_event is not None
        backoff = Backoff(*self._backoff)
        while not self._stop_event.is_set():
            up_for, problem = await self._connect_once()
            if self._stop_event.is_set():
                break
            if up_for >= self._stable_after:
                backoff.reset()
            delay = backoff.next()
            log.log(logging.ERROR if problem.startswith("refused") else logging.WARNING,
                    "portal connection %s; retrying in %.1f s", problem, delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop_event.wait(), delay)

    async def _connect_once(self) -> tuple[float, str]:
        """One connection, raced against `stop()`: (seconds up, what ended it)."""
        assert self._stop_event is not None
        started: list[float] = []
        session = asyncio.create_task(self._session(started))
        stopping = asyncio.create_task(self._stop_event.wait())
        await asyncio.wait({session, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if not session.done():
            if self._ws is not None:  # say goodbye properly, briefly
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._ws.close(1001, "agent stopping"), 3)
            session.cancel()
        try:
            problem = await session
        except asyncio.CancelledError:
            problem = "closed: agent stopping"
        except InvalidStatus as exc:
            problem = self._refusal(exc.response.status_code)
        except (OSError, TimeoutError, WebSocketException) as exc:
            problem = f"failed: {exc or type(exc).__name__}"
        except Exception as exc:  # never let a bug turn into a crash loop
            log.exception("portal connection: unexpected error")
            problem = f"failed: {type(exc).__name__}: {exc}"
        up_for = time.monotonic() - started[0] if started else 0.0
        return up_for, problem

    def _refusal(self, status: int) -> str:
        if status in (401, 403):
            where = self.config.source or "the config"
            return (f"refused (HTTP {status}): the portal does not accept this host's "
                    f"credential (missing, unknown or revoked) - check [portal] credential "
                    f"in {where}")
        return f"refused (HTTP {status})"

    async def _session(self, started: list[float]) -> str:
        self.attempts += 1
        portal = self.config.portal
        extra: dict[str, Any] = {}
        if portal.ws_url.startswith("wss:"):
            extra["ssl"] = ssl.create_default_context(cafile=portal.ca or None)
        async with connect(portal.ws_url, additional_headers={
                "Authorization": f"Host {portal.credential}"},
                user_agent_header=f"berth-agent/{AGENT_VERSION}", proxy=None,
                open_timeout=10, ping_interval=20, ping_timeout=20, close_timeout=5,
                max_size=4 * 1024 * 1024, logger=_WS_LOG, **extra) as ws:
            started.append(time.monotonic())
            self.connections += 1
            log.info("connected to the portal at %s", portal.ws_url)
            self._ws, self._queue, self._sent_at = ws, asyncio.Queue(), {}
            try:
                hello = await asyncio.to_thread(self.hello)
                await ws.send(json.dumps(hello))
                self._mark_sent(hello["results"])
                self.connected.set()
                await self._pump(ws, {"type": "inventory", "capacity": hello["capacity"],
                                      "guests": hello["guests"]})
            finally:
                self.connected.clear()
                self._requeue_refusals()
                self._ws, self._queue = None, None
            return f"closed (code {ws.close_code}{self._close_note(ws)})"

    @staticmethod
    def _close_note(ws: ClientConnection) -> str:
        if ws.close_code == 4001:
            return ": another connection of this host replaced this one"
        if ws.close_code == 4003:
            return ": the portal revoked this host"
        return f": {ws.close_reason}" if ws.close_reason else ""

    async def _pump(self, ws: ClientConnection, inventory: dict[str, Any]) -> None:
        """Reader, writer and ticker until the connection ends."""
        tasks = [asyncio.create_task(coro) for coro in
                 (self._reader(ws), self._writer(ws), self._ticker(inventory))]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for task in done:
            task.result()  # re-raise what ended the connection, if anything

    async def _reader(self, ws: ClientConnection) -> None:
        async for raw in ws:
            try:
                message = json.loads(raw)
                if not isinstance(message, dict):
                    raise ValueError("not an object")
            except ValueError:
                log.warning("ignoring a malformed message from the portal")
                continue
            await self._on_message(message)

    async def _writer(self, ws: ClientConnection) -> None:
        assert self._queue is not None
        while True:
            message = await self._queue.get()
            try:
                await ws.send(json.dumps(message))
            except BaseException:
                if message["type"] == REFUSED:  # not sent: counted again for the next one
                    self.refusals.put_back([_report(message)])
                raise
            if message["type"] == "job.result":
                self._mark_sent([message])

    def _requeue_refusals(self) -> None:
        """Refusal reports still queued when a connection ends wait for the next one."""
        queue = self._queue
        while queue is not None and not queue.empty():
            message = queue.get_nowait()
            if message["type"] == REFUSED:
                self.refusals.put_back([_report(message)])

    async def _ticker(self, last: dict[str, Any]) -> None:
        """Inventory when something changed (polled) and as a heartbeat;
        unacknowledged results again now and then.  ``last`` is what hello said."""
        last_sent = time.monotonic()
        while True:
            posted = self._results_posted
            inventory = await asyncio.to_thread(self.inventory)
            now = time.monotonic()
            # A job that ended while the view was taken has posted its result already:
            # the view may predate that result and, sent after it, would put the guest
            # back where it was at the portal. Take a fresh view next time instead.
            stale = posted != self._results_posted
            if not stale and (inventory != last or now - last_sent >= self._heartbeat):
                self._enqueue(inventory)
                last, last_sent = inventory, now
            for result in self.outbox.pending():
                if now - self._sent_at.get(result["job"], now) >= self._resend_after:
                    self._enqueue(result)
            for report in self.refusals.take():  # bounded: aggregated per stage and peer
                self._enqueue({"type": REFUSED, **report})
            await asyncio.sleep(self._poll)

    def _mark_sent(self, results: list[dict[str, Any]]) -> None:
        now = time.monotonic()
        for result in results:
            self._sent_at[result["job"]] = now

    # -- messages between threads ------------------------------------------------
    def _post(self, message: dict[str, Any]) -> None:
        """Thread-safe send; dropped while offline (results are in the outbox)."""
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closing
                loop.call_soon_threadsafe(self._enqueue, message)

    def _enqueue(self, message: dict[str, Any]) -> None:  # loop thread only
        queue = self._queue
        if queue is None:
            return
        if message["type"] == "job.event" and queue.qsize() >= MAX_QUEUED_EVENTS:
            return
        queue.put_nowait(message)

    async def _on_message(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "welcome":
            log.info("the portal welcomed host %s", message.get("host"))
            await asyncio.to_thread(self._revocations, message)
        elif kind == "revocations":
            await asyncio.to_thread(self._revocations, message)
        elif kind == "ack":
            job_id = str(message.get("job"))
            if await asyncio.to_thread(self.outbox.ack, job_id):
                self._sent_at.pop(job_id, None)
                log.info("the portal recorded the result of job %s", job_id)
        elif kind == "command":
            await asyncio.to_thread(self.handle_command, message)
        else:
            log.warning("ignoring a message of unknown type %r from the portal", kind)

    # -- jobs --------------------------------------------------------------------
    def handle_command(self, command: dict[str, Any]) -> None:
        """Start (or refuse, or abort) a job.  Any thread."""
        job_id, action = command.get("job"), command.get("action")
        if not isinstance(job_id, str) or not job_id:
            log.warning("ignoring a %s command without a job id", action)
            return
        if action == "abort":
            self.abort(job_id, command.get("reason"))
            return
        if action == "migrate.expect":
            self._expect(job_id, command)
            return
        if action in ("migrate.query", "migrate.resolve"):
            self._in_doubt_command(job_id, action, command)
            return
        if self._is_known(job_id):
            return
        try:
            cls = COMMANDS.get(str(action))
            if cls is None:
                raise BadCommand(f"unknown action {action!r}")
            job = cls(job_id, command, driver=self.driver, host=self.config.host,
                      emit=partial(self._event, job_id), ca=self.config.portal.ca,
                      portal_url=self.config.portal.url, timeout=self._transfer_timeout,
                      host_credential=self.config.portal.credential)
            job.relocation = self.config.relocation
            job.revoked_serials = self.revoked_serials
            job.in_doubt = self.in_doubt
        except BadCommand as exc:
            log.warning("job %s refused: %s", job_id, exc)
            self._finish(job_id, result_message(job_id, "failed", error=str(exc)))
            return
        self._start(job)

    def _expect(self, job_id: str, command: dict[str, Any]) -> None:
        """The destination's half of a migration: accept one ticketed guest.
        The job's result comes from the source; a refusal here fails it."""
        try:
            if self.relocation is None:
                raise BadCommand(f"host {self.config.host.name} has no relocation port")
            self.relocation.expect(job_id, command)
        except (BadCommand, ValueError) as exc:
            log.warning("migration %s refused on %s: %s", job_id, self.config.host.name, exc)
            self._finish(job_id, result_message(job_id, "failed", error=str(exc)))

    def _in_doubt_command(self, job_id: str, action: str, command: dict[str, Any]) -> None:
        """The portal settling an in-doubt migration: ``migrate.query`` asks
        what this host holds of the guest; ``migrate.resolve`` says which side
        keeps it.  Only a guest this agent itself recorded as in doubt is ever
        destroyed or resumed here; anything else is answered, not acted on."""
        try:
            guest = _uuid(command.get("guest"), "guest")
        except BadCommand as exc:
            log.warning("%s of job %s refused: %s", action, job_id, exc)
            return
        record = self.in_doubt.get(job_id)
        if record is not None and record["guest"] != guest:
            log.warning("%s of job %s names guest %s, the record says %s", action, job_id,
                        guest, record["guest"])
            return
        with self._lock:
            running = job_id in self._jobs
        answer: dict[str, Any] = {"guest": guest, "in_doubt": record is not None,
                                  "job_running": running}
        if action == "migrate.resolve":
            answer.update(self._resolve_in_doubt(job_id, record, command.get("keep")))
        self._event(job_id, {"kind": "holding" if action == "migrate.query" else "resolved",
                             **answer, **holding(self.driver, guest)})

    def _resolve_in_doubt(self, job_id: str, record: dict[str, Any] | None,
                          keep: Any) -> dict[str, Any]:
        if keep not in KEEP:
            return {"error": f"keep must be one of {', '.join(KEEP)}"}
        if record is None:
            return {"keep": keep, "note": "nothing was in doubt here"}
        server = self.relocation.server if self.relocation is not None else None
        try:
            settle(record, keep, self.driver, server)
        except (HypervisorError, KeyError, ValueError) as exc:
            log.error("job %s: could not settle the in-doubt guest %s: %s", job_id,
                      record["guest"], exc)
            return {"keep": keep, "error": str(exc)}
        self.in_doubt.remove(job_id)
        if record["role"] == "source" and keep == "destination":
            self.state.set_departed(record["guest"], True)
        log.info("job %s: in-doubt guest %s settled: kept on the %s", job_id, record["guest"],
                 keep)
        return {"keep": keep, "in_doubt": False, "role": record["role"]}

    def _is_known(self, job_id: str) -> bool:
        """A repeated command (the portal may resend after a reconnect) does
        not start the job twice; a finished one gets its result again."""
        with self._lock:
            running = job_id in self._jobs
        pending = self.outbox.get(job_id)
        if pending is not None:
            self._post(pending)
        if running or pending is not None or job_id in self._finished:
            log.info("job %s is already known here; not starting it again", job_id)
            return True
        return False

    def _start(self, job: Job) -> None:
        with self._lock:
            holder = self._busy.get(job.guest_uuid)
            if holder is None:
                self._busy[job.guest_uuid] = job.id
                self._jobs[job.id] = job
                thread = threading.Thread(target=self._run_job, args=(job,), daemon=True,
                                          name=f"job-{job.action}-{job.id[:8]}")
                self._threads[job.id] = thread
        if holder is not None:
            busy = self._jobs.get(holder)
            reason = (f"guest {job.guest_uuid} is busy: {busy.action if busy else 'another'} "
                      f"job {holder} is running on host {self.config.host.name}")
            log.warning("job %s refused: %s", job.id, reason)
            self._finish(job.id, result_message(job.id, "failed", error=reason))
            return
        log.info("job %s: %s of guest %s started", job.id, job.action, job.guest_uuid)
        thread.start()

    def _run_job(self, job: Job) -> None:
        result = job.run()
        if result["state"] == "succeeded":  # where the guest now lives
            self.state.set_departed(job.guest_uuid, job.action in ("save", "migrate"))
        if result["state"] != "in_doubt":
            # A migration's commit record (MigrateJob._committing) has done its work:
            # the outcome is known, and a departure is on disk (just above).
            self.in_doubt.remove(job.id)
        log.info("job %s: %s %s%s", job.id, job.action, result["state"],
                 f" ({result['error']})" if result["error"] else "")
        self._finish(job.id, result, job)

    def _finish(self, job_id: str, result: dict[str, Any], job: Job | None = None) -> None:
        # Outbox first: a hello in between must list the job as running or
        # as a result, never as neither (the portal would call it lost).
        self.outbox.add(result)
        with self._lock:
            if job is not None:
                self._jobs.pop(job_id, None)
                self._threads.pop(job_id, None)
                if self._busy.get(job.guest_uuid) == job_id:
                    del self._busy[job.guest_uuid]
            self._finished.append(job_id)
            self._results_posted += 1
        self._post(result)

    def _event(self, job_id: str, event: dict[str, Any]) -> None:
        self._post({"type": "job.event", "job": job_id, "event": event})

    def abort(self, job_id: str, reason: str | None = None) -> bool:
        """Abort a running job; False (and a log line) if it is not running."""
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            log.warning("abort: job %s is not running on this host", job_id)
            return False
        log.info("job %s: abort requested%s", job_id, f" ({reason})" if reason else "")
        job.abort(reason if isinstance(reason, str) else None)
        return True

    def running_jobs(self) -> list[str]:
        with self._lock:
            return list(self._jobs)

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Wait until no job runs (tests)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                threads = list(self._threads.values())
            if not threads:
                return True
            threads[0].join(max(0.0, min(0.5, deadline - time.monotonic())))
        return False
