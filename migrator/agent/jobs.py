"""Save and restore jobs, as the agent runs them (one thread each).

A job turns one portal ``command`` into driver calls and HTTP transfers and
ends in exactly one ``job.result`` message; `Job.run` never raises.  The
invariants the protocol promises are kept here:

* Save: the guest keeps running unless the image was stored (HTTP 201).  Any
  failure or abort puts it back the way it was before the save.
* Restore: a guest appears only after the whole download verified; a failed,
  short or tampered download leaves nothing behind.
* Image bytes flow driver -> socket and socket -> driver in pieces: never
  whole in memory, never on disk.

Django-free.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
import uuid as uuidlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from migrator.hypervisor.base import (
    GuestExists,
    GuestInfo,
    GuestState,
    HypervisorDriver,
    HypervisorError,
    InsufficientMemory,
)
from migrator.hypervisor.savestream import SaveStreamError

from . import transfer
from .config import HostConfig

log = logging.getLogger("berth.agent")

EVENTS_PER_SECOND = 10
Emit = Callable[[dict[str, Any]], None]


class BadCommand(ValueError):
    """The command is malformed; the job fails at once with this reason."""


class JobFailed(Exception):
    """The job cannot go on; the message is the reason shown to the operator."""


class JobAborted(Exception):
    """An abort command arrived; the job stopped at a safe point."""


class JobInDoubt(Exception):
    """A migration whose outcome this host cannot know (its copy is kept
    paused until the portal resolves it); ``result`` is the engine's record."""

    def __init__(self, reason: str, result: dict[str, Any]):
        super().__init__(reason)
        self.result = result


def guest_json(info: GuestInfo) -> dict[str, Any]:
    """A guest as the protocol's GUEST object."""
    cfg = info.config
    return {"uuid": info.uuid, "name": info.name, "domain_id": info.domid,
            "memory_mib": info.memory_mib, "vcpus": info.vcpus,
            "state": GuestState(info.state).value, "active": info.active,
            "config": {"kernel": cfg.get("kernel", ""), "ip": cfg.get("ip", ""),
                       "storage": list(cfg.get("storage", [])),
                       "workload": cfg.get("workload", {})}}


class Progress:
    """Byte progress of one stage, at most `EVENTS_PER_SECOND` events, the
    last one always sent so the portal sees 100 %."""

    def __init__(self, emit: Emit, stage: str, total: int | None,
                 clock: Callable[[], float] = time.monotonic):
        self._emit, self.stage, self.total, self._clock = emit, stage, total, clock
        self.done, self._last, self._sent = 0, float("-inf"), -1

    def add(self, n: int) -> None:
        self.done += n
        now = self._clock()
        if now - self._last >= 1.0 / EVENTS_PER_SECOND or self.done == self.total:
            self._last = now
            self._send()

    def finish(self) -> None:
        if self._sent != self.done:
            self._send()

    def _send(self) -> None:
        self._sent = self.done
        self._emit({"kind": "progress", "stage": self.stage, "done_bytes": self.done,
                    "total_bytes": self.total})


# --------------------------------------------------------------------------
class Job:
    """Base class: abort handling, stage events, the result message."""

    action = ""

    def __init__(self, job_id: str, command: dict[str, Any], *, driver: HypervisorDriver,
                 host: HostConfig, emit: Emit, ca: str = "", portal_url: str = "",
                 timeout: float = transfer.DEFAULT_TIMEOUT, host_credential: str = ""):
        self.id = job_id
        # Image bytes go only here (the bundle's portal URL): see `transfer.portal_target`.
        self.portal_url = portal_url
        # A job credential is good only with this host's own credential beside it.
        self._host_credential = host_credential
        self.driver, self.host, self._emit = driver, host, emit
        self.ca, self.timeout = ca, timeout
        self.guest_uuid = ""  # the guest this job holds; set by subclasses
        self.aborted = threading.Event()
        self.abort_reason = "aborted on request"  # until the portal says who asked
        self.cancel = transfer.Cancel()
        self.parse(command)

    def __repr__(self) -> str:  # no credentials: they live in private fields
        return f"<{type(self).__name__} {self.id} guest={self.guest_uuid}>"

    def credential_headers(self, job_credential: str) -> dict[str, str]:
        return {"Authorization": f"Job {job_credential}",
                "X-Berth-Host-Credential": self._host_credential}

    def parse(self, command: dict[str, Any]) -> None:
        raise NotImplementedError

    def execute(self) -> dict[str, Any]:
        raise NotImplementedError

    def _portal_target(self, url: str, where: str) -> str:
        try:
            return transfer.portal_target(self.portal_url, url)
        except transfer.TransferError as exc:
            raise BadCommand(f"{where}.url: {exc}") from None

    def abort(self, reason: str | None = None) -> None:
        """Thread-safe; the job stops at its next piece (or its blocked
        socket is shut down so it notices at once). ``reason`` is who or what
        asked (the portal says), reported as the job's error."""
        if reason:
            self.abort_reason = str(reason)[:300]
        self.aborted.set()
        self.cancel.cancel()

    def check_abort(self) -> None:
        if self.aborted.is_set():
            raise JobAborted(self.abort_reason)

    def emit(self, event: dict[str, Any]) -> None:
        try:
            self._emit(event)
        except Exception:  # progress is best effort; it must never stop a job
            log.exception("job %s: could not queue an event", self.id)

    def stage(self, name: str) -> None:
        self.emit({"kind": "stage", "stage": name})

    def run(self) -> dict[str, Any]:
        """Execute and return the ``job.result`` message.  Never raises."""
        try:
            return result_message(self.id, "succeeded", result=self.execute())
        except JobAborted as exc:
            return result_message(self.id, "aborted", error=str(exc) or self.abort_reason)
        except JobInDoubt as exc:
            return result_message(self.id, "in_doubt", error=str(exc), result=exc.result)
        except Exception as exc:
            if self.aborted.is_set():  # the abort broke a transfer: say so, not "reset"
                return result_message(self.id, "aborted", error=self.abort_reason)
            reason = self.explain(exc)
            log.warning("job %s (%s) failed: %s", self.id, self.action, reason)
            return result_message(self.id, "failed", error=reason)

    def explain(self, exc: Exception) -> str:
        if isinstance(exc, JobFailed | HypervisorError):
            return str(exc)
        log.error("job %s (%s): unexpected error", self.id, self.action, exc_info=exc)
        return f"unexpected error on {self.host.name}: {type(exc).__name__}: {exc}"


def result_message(job_id: str, state: str, *, error: str = "",
                   result: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"type": "job.result", "job": job_id, "state": state, "error": error,
            "result": result or {}}


# -- command fields -------------------------------------------------------------
def _table(command: dict[str, Any], key: str) -> dict[str, Any]:
    value = command.get(key)
    if not isinstance(value, dict):
        raise BadCommand(f"{command.get('action')} command without a {key!r} object")
    return value


def _text(table: dict[str, Any], key: str, where: str, *, required: bool = True) -> str:
    value = table.get(key, "")
    if not isinstance(value, str) or (required and not value):
        raise BadCommand(f"{where}.{key} must be a non-empty string")
    return value


def _uuid(value: Any, where: str) -> str:
    try:
        return str(uuidlib.UUID(str(value)))
    except ValueError:
        raise BadCommand(f"{where} is not a UUID: {value!r}") from None


# --------------------------------------------------------------------------
class SaveJob(Job):
    """``xm save``: pause, measure, upload, destroy (or put back)."""

    action = "save"

    def parse(self, command: dict[str, Any]) -> None:
        self.guest_uuid = _uuid(command.get("guest"), "guest")
        upload = _table(command, "upload")
        self.url = self._portal_target(_text(upload, "url", "upload"), "upload")
        self._credential = _text(upload, "credential", "upload")
        self.image_name = _text(upload, "name", "upload", required=False)

    def execute(self) -> dict[str, Any]:
        d, uuid = self.driver, self.guest_uuid
        info = d.get(uuid)
        if info.state not in (GuestState.RUNNING, GuestState.PAUSED):
            raise JobFailed(f"guest {info.name} is {info.state.value}: only a running "
                            "or paused guest can be saved")
        self.stage("pausing")
        d.pause(uuid)
        try:
            # Recorded so anyone can check a restore against the paused original.
            memory_sha256 = d.memory_digest(uuid)
            self.check_abort()
            # A stream that can be produced only once (QEMU's) goes up in one
            # pass, chunked; the vault computes its digest itself.
            length, digest = (self._measure() if getattr(d, "replayable_save", True)
                              else (None, None))
            image = self._upload(info, length, digest)
        except BaseException as exc:
            self._put_back(info, exc)
            raise
        self.stage("destroying")
        try:
            d.destroy(uuid)
        except HypervisorError as exc:  # the image is safe; report it anyway
            log.error("job %s: image %s stored but guest %s not removed: %s",
                      self.id, image, info.name, exc)
        return {"image": image, "memory_sha256": memory_sha256}

    def _measure(self) -> tuple[int, str]:
        """Pass 1: length and SHA-256 of the stream, nothing stored.  The
        guest is paused, so pass 2 produces the very same bytes."""
        self.stage("measuring")
        digest, length = hashlib.sha256(), 0
        with self.driver.save_stream(self.guest_uuid) as stream:
            for piece in stream:
                self.check_abort()
                digest.update(piece)
                length += len(piece)
        return length, digest.hexdigest()

    def _upload(self, info: GuestInfo, length: int | None, digest: str | None) -> str:
        """Pass 2: stream the save straight from the driver into the socket."""
        self.stage("saving")
        progress = Progress(self.emit, "saving", length)
        stream = self.driver.save_stream(self.guest_uuid)
        try:
            _, answer = transfer.upload(
                self.url, self._pieces(stream, progress), headers=self._headers(info, digest),
                length=length, ca=self.ca, timeout=self.timeout, cancel=self.cancel)
        except transfer.HttpError as exc:
            raise JobFailed(f"the portal refused the upload: {exc}") from None
        except transfer.TransferError as exc:
            raise JobFailed(f"upload failed: {exc}") from None
        finally:
            stream.close()  # before any resume: an open stream blocks it
        progress.finish()
        image = answer.get("id") if isinstance(answer, dict) else None
        if not image:
            raise JobFailed("the portal accepted the upload but returned no image id")
        return str(image)

    def _pieces(self, stream: Iterable[bytes], progress: Progress) -> Iterator[bytes]:
        for piece in stream:
            self.check_abort()
            yield piece
            progress.add(len(piece))

    def _headers(self, info: GuestInfo, digest: str | None) -> dict[str, str]:
        host = self.driver.host_info()
        name = self.image_name or f"{info.name} {time.strftime('%Y-%m-%d %H:%M:%S')}"
        return {
            **self.credential_headers(self._credential),
            "Content-Type": "application/octet-stream",
            **({"X-Berth-SHA256": digest} if digest else {}),
            "X-Berth-Name": name,
            "X-Berth-Guest-UUID": info.uuid,
            "X-Berth-Guest-Name": info.name,
            "X-Berth-Source-Host": self.host.name,
            "X-Berth-Memory-MiB": str(info.memory_mib),
            "X-Berth-VCPUs": str(info.vcpus),
            "X-Berth-Architecture": host.arch,
            "X-Berth-Virt-Extensions": ",".join(host.virt_features),
        }

    def _put_back(self, before: GuestInfo, exc: BaseException) -> None:
        """Undo the pause: streams are closed by now, so the guest is PAUSED or
        (if a pass completed) SAVED.  A SAVED guest is returned to PAUSED by
        opening and closing a stream - the driver's documented way back."""
        d, uuid = self.driver, self.guest_uuid
        try:
            if d.get(uuid).state is GuestState.SAVED:
                d.save_stream(uuid).close()
            if before.active:
                self.stage("resuming")
                d.resume(uuid)
        except HypervisorError as err:
            log.error("job %s: guest %s could not be put back after a failed save: %s",
                      self.id, before.name, err)
            raise JobFailed(f"{self._reason(exc)}; and guest {before.name} could not be "
                            f"resumed: {err}") from None

    def _reason(self, exc: BaseException) -> str:
        if isinstance(exc, JobAborted):
            return self.abort_reason
        return self.explain(exc) if isinstance(exc, Exception) else type(exc).__name__


# --------------------------------------------------------------------------
class RestoreJob(Job):
    """``xm restore``: download into the driver; the guest appears verified."""

    action = "restore"

    def parse(self, command: dict[str, Any]) -> None:
        image = _table(command, "image")
        self.image_id = _text(image, "id", "image")
        self.guest_uuid = _uuid(image.get("guest_uuid"), "image.guest_uuid")
        self.sha256 = str(image.get("sha256") or "").lower()
        self.size = image.get("plaintext_size")
        self.memory_mib = image.get("memory_mib")
        for key, value in (("plaintext_size", self.size), ("memory_mib", self.memory_mib)):
            if value is not None and (not isinstance(value, int) or value < 0):
                raise BadCommand(f"image.{key} must be a non-negative integer")
        download = _table(command, "download")
        self.url = self._portal_target(_text(download, "url", "download"), "download")
        self._credential = _text(download, "credential", "download")

    def execute(self) -> dict[str, Any]:
        self.stage("checking")
        self._precheck()
        self.check_abort()
        self.stage("restoring")
        try:
            with transfer.download(self.url, headers=self.credential_headers(self._credential),
                                   ca=self.ca, timeout=self.timeout, cancel=self.cancel) as dl:
                progress = Progress(self.emit, "restoring", dl.length or self.size)
                info = self.driver.restore_stream(self._verified(dl, progress), start=False)
                progress.finish()
        except transfer.HttpError as exc:
            if exc.code == transfer.INTEGRITY_ERROR:
                raise JobFailed(f"image {self.image_id} failed its integrity check: the portal "
                                f"refused to send it (HTTP {exc.status}); nothing was "
                                "restored") from None
            raise JobFailed(f"the portal refused the download: {exc}") from None
        except transfer.ShortDownload as exc:
            raise JobFailed(f"{exc}: the connection broke, or a chunk of image "
                            f"{self.image_id} failed its integrity check at the portal; "
                            "nothing was restored") from None
        except transfer.TransferError as exc:
            raise JobFailed(str(exc)) from None
        except SaveStreamError as exc:
            raise JobFailed(f"image {self.image_id} is damaged or not a save stream "
                            f"({type(exc).__name__}): {exc}") from None
        # The digest of the memory as restored, before the workload touches it.
        memory_sha256 = self.driver.memory_digest(info.uuid)
        self.driver.resume(info.uuid)
        return {"guest": guest_json(self.driver.get(info.uuid)), "memory_sha256": memory_sha256}

    def _precheck(self) -> None:
        """Refuse before downloading what the driver would refuse anyway
        (it checks again, atomically, when the stream header arrives)."""
        try:
            existing = self.driver.get(self.guest_uuid)
        except HypervisorError:
            existing = None
        if existing is not None:
            raise GuestExists(f"guest {existing.name} ({self.guest_uuid}) is already on "
                              f"host {self.host.name} as domain {existing.domid}")
        if self.memory_mib:
            free = self.driver.capacity().free_mib
            if self.memory_mib > free:
                raise InsufficientMemory(f"host {self.host.name} cannot fit "
                                         f"{self.memory_mib} MiB: {free} MiB free")

    def _verified(self, pieces: Iterable[bytes], progress: Progress) -> Iterator[bytes]:
        """Pass the download through, and fail before its end (so before the
        driver registers the guest) if it is not the image the portal named."""
        digest, size = hashlib.sha256(), 0
        for piece in pieces:
            self.check_abort()
            digest.update(piece)
            size += len(piece)
            yield piece
            progress.add(len(piece))
        if self.size is not None and size != self.size:
            raise JobFailed(f"download of image {self.image_id} is {size} bytes, "
                            f"expected {self.size}")
        if self.sha256 and digest.hexdigest() != self.sha256:
            raise JobFailed(f"download of image {self.image_id} does not match its SHA-256")


ACTIONS: dict[str, type[Job]] = {"save": SaveJob, "restore": RestoreJob}
