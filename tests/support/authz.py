"""The authorisation matrix's world, identities and ways of sending a request.

The world holds the objects the matrix's requests name (an image, a guest, a job,
a token of someone else's). Each is made on first use, so a cell pays only for what
its request needs. Identities are the callers of tests/authz_matrix.py, built with
the shared fixtures of tests/conftest.py where there is one.
"""
import json
import string
import uuid
from datetime import timedelta
from functools import cached_property
from urllib.parse import urlencode

from asgiref.sync import async_to_sync
from django.contrib.messages import constants as message_levels
from django.contrib.messages import get_messages
from django.http import HttpRequest
from django.middleware.csrf import get_token
from django.test import Client
from django.utils import timezone

from migrator import credentials
from migrator.models import Guest, Host, Job, JobCredential, JobKind, JobState
from portal.accounts import create_user, revoke_token
from portal.models import APIToken
from portal.scopes import SCOPES
from tests.conftest import PASSWORD
from tests.support.channels_testing import WebsocketCommunicator
from tests.vault.conftest import memory_like, store_image

OWNER = "ada"  # an admin who made the world's image, job and token; never a caller


def _host(name, **fields):
    secret, digest = credentials.new_host_credential()
    Host.objects.create(
        name=name, address=f"{name}.test", arch="x86_64", virt_extensions=["vmx"],
        memory_mib=4096, subnet="192.168.1.0/24", storage=["hosta:/xen-storage"],
        credential_digest=digest, online=True, last_seen=timezone.now(), **fields)
    return secret


class World:
    """Placeholders of the matrix's paths and bodies, e.g. ``{image}``, made on demand.

    Two online hosts; ``guest`` runs on hostb; ``image`` is another guest's saved image
    that fits hostc (so an allowed restore starts a job); ``job`` is a running save of a
    third guest on hostb; ``doubtful`` a migration in doubt; ``unknown`` a restore the
    portal gave up on while hostc's agent was away; ``conflicted`` a guest on hostb that
    hostc claims; ``token`` is the owner's API token prefix.
    """

    @cached_property
    def owner(self):
        return create_user(OWNER, "admin", PASSWORD)[0]

    @cached_property
    def hostb(self):
        self.host_secret = _host("hostb")
        return "hostb"

    @cached_property
    def hostc(self):
        self.hostc_secret = _host("hostc")
        return "hostc"

    @cached_property
    def guest(self):
        guest = Guest.objects.create(
            uuid=uuid.uuid4(), name="debian_etch", host=Host.objects.get(name=self.hostb),
            domain_id=1, memory_mib=128, state="running", active=True,
            config={"ip": "192.168.1.110", "storage": ["hosta:/xen-storage"]})
        return str(guest.uuid)

    @cached_property
    def conflicted(self):
        """A guest on hostb that hostc also claims: an open claim conflict."""
        from migrator.models import ClaimConflict

        guest = Guest.objects.create(
            uuid=uuid.uuid4(), name="sarge", host=Host.objects.get(name=self.hostb),
            domain_id=3, memory_mib=128, state="running", active=True)
        ClaimConflict.objects.create(guest=guest, claimant=Host.objects.get(name=self.hostc),
                                     recorded_host="hostb", reason="the portal places the "
                                     "guest on hostb", report={
                                         "uuid": str(guest.uuid), "name": "sarge",
                                         "domain_id": 4, "memory_mib": 128, "vcpus": 1,
                                         "state": "running", "active": True, "config": {}})
        return str(guest.uuid)

    @cached_property
    def image_object(self):
        return store_image(self.owner, memory_like(64 * 1024), name="fuwa-saved",
                           guest_uuid=str(uuid.uuid4()), guest_name="ubuntu_fuwa",
                           memory_mib=256, architecture="x86_64", virt_extensions="vmx")

    @cached_property
    def image(self):
        return str(self.image_object.id)

    @cached_property
    def job_object(self):
        return Job.objects.create(
            kind=JobKind.SAVE, state=JobState.RUNNING, requester=self.owner,
            guest_uuid=uuid.uuid4(), guest_name="squeeze",
            source_host=Host.objects.get(name=self.hostb), total_bytes=1 << 20)

    @cached_property
    def job(self):
        return str(self.job_object.id)

    @cached_property
    def doubtful(self):
        """A live migration left in doubt that an admin may settle: both sides paused."""
        return str(Job.objects.create(
            kind=JobKind.MIGRATE, state=JobState.IN_DOUBT, requester=self.owner,
            guest_uuid=uuid.uuid4(), guest_name="lenny",
            source_host=Host.objects.get(name=self.hostb),
            destination_host=Host.objects.get(name=self.hostc),
            resolution={"state": "undecided", "answers": {"source": {"holds": "paused"},
                                                          "destination": {"holds": "paused"}}},
        ).id)

    @cached_property
    def unknown(self):
        """A restore onto hostc whose outcome is unknown: an admin may settle it."""
        job = Job.objects.create(
            kind=JobKind.RESTORE, state=JobState.RUNNING, requester=self.owner,
            guest_uuid=uuid.uuid4(), guest_name="wheezy",
            destination_host=Host.objects.get(name=self.hostc))
        job.give_up("the agent on hostc went away")
        job.save()
        return str(job.id)

    @cached_property
    def token(self):
        instance, _ = APIToken.objects.create(user=self.owner, scopes=["images:read"])
        return instance.token_key

    def fill(self, template):
        """``template`` with its placeholders replaced, making what they name."""
        names = {name for _, name, _, _ in string.Formatter().parse(template) if name}
        return template.format(**{name: getattr(self, name) for name in names})

    def fill_data(self, data):
        return {key: self.fill(value) if isinstance(value, str) else value
                for key, value in data.items()}

    def restore_credential(self):
        """A download credential, as a restore of ``image`` onto hostc hands its agent."""
        image = self.image_object
        job = Job.objects.create(
            kind=JobKind.RESTORE, state=JobState.RUNNING, requester=self.owner,
            guest_uuid=image.guest_uuid, guest_name=image.guest_name, image=image,
            destination_host=Host.objects.get(name=self.hostc), total_bytes=image.plaintext_size)
        return credentials.issue_job_credential(job, JobCredential.DOWNLOAD, image.id)

    def save_credential(self):
        """An upload credential, as the save ``job`` hands hostb's agent."""
        return credentials.issue_job_credential(self.job_object, JobCredential.UPLOAD)


# --- identities -------------------------------------------------------------------

SESSION_FIXTURES = {"admin": "admin_client", "admin-no-2fa": "unverified_admin_client",
                    "auditor": "auditor_client", "outsider": "outsider_client"}


def _token_client(user, scopes, expiry=timedelta(days=1), revoked=False):
    instance, secret = APIToken.objects.create(user=user, scopes=sorted(scopes), expiry=expiry)
    if revoked:
        revoke_token(instance.token_key)
    return Client(HTTP_AUTHORIZATION=f"Token {secret}")


def client_for(identity, world, fixture):
    """A Django test client that presents ``identity``; ``fixture(name)`` gets a fixture."""
    if identity == "anonymous":
        return Client()
    if identity in SESSION_FIXTURES:
        return fixture(SESSION_FIXTURES[identity])
    if identity == "host credential":
        world.hostb  # noqa: B018  (makes hostb and its credential)
        return Client(HTTP_AUTHORIZATION=f"Host {world.host_secret}")
    # A job credential travels with the credential of the host it was issued to.
    if identity == "job upload credential":
        secret = world.save_credential()
        return Client(HTTP_AUTHORIZATION=f"Job {secret}",
                      HTTP_X_BERTH_HOST_CREDENTIAL=world.host_secret)
    if identity == "job download credential":
        secret = world.restore_credential()
        return Client(HTTP_AUTHORIZATION=f"Job {secret}",
                      HTTP_X_BERTH_HOST_CREDENTIAL=world.hostc_secret)
    admin = fixture("admin_user")  # tokens are an admin's: only the scope limits them
    if identity == "expired token":
        return _token_client(admin, SCOPES, expiry=timedelta(seconds=-1))
    if identity == "revoked token":
        return _token_client(admin, SCOPES, revoked=True)
    scope = identity.removeprefix("token ")
    assert scope in SCOPES, f"unknown identity {identity!r}"
    return _token_client(admin, [scope])


# --- sending requests -------------------------------------------------------------

def outcome_of(response, probe=None):
    """The response in the matrix's words (see tests/authz_matrix.py)."""
    status = response.status_code
    body = _body(response)
    if status == 302:
        if response["Location"].startswith("/login/"):
            return "in"
        errors = [m for m in get_messages(response.wsgi_request)
                  if m.level == message_levels.ERROR]
        return "err" if errors else "go"
    if status == 200 and probe:
        return "200" if probe.encode() in body else "200-"
    return str(status)


def _body(response):
    if not response.streaming:
        return response.content
    if response.is_async:
        async def collect():
            return b"".join([chunk async for chunk in response.streaming_content])
        return async_to_sync(collect)()
    return b"".join(response.streaming_content)


def send(client, method, path, data=None, as_json=False):
    if method == "GET":
        return client.get(path)
    if as_json:
        return client.generic(method, path, json.dumps(data or {}),
                              content_type="application/json")
    return client.generic(method, path, urlencode(data or {}, doseq=True),
                          content_type="application/x-www-form-urlencoded")


class Reply:
    """An ASGI response, shaped enough like a Django one for ``outcome_of``."""

    streaming = False

    def __init__(self, status, content):
        self.status_code, self.content = status, content


def credential_headers(client):
    """The Authorization header and cookies a Django test client would send."""
    headers = []
    authorization = client.defaults.get("HTTP_AUTHORIZATION")
    if authorization:
        headers.append((b"authorization", authorization.encode()))
    host_credential = client.defaults.get("HTTP_X_BERTH_HOST_CREDENTIAL")
    if host_credential:
        headers.append((b"x-berth-host-credential", host_credential.encode()))
    session = client.cookies.get("sessionid")
    if session:
        # A browser sends the CSRF cookie and header with an unsafe request.
        request = HttpRequest()
        masked = get_token(request)
        headers.append((b"cookie", f"sessionid={session.value}; "
                                   f"csrftoken={request.META['CSRF_COOKIE']}".encode()))
        headers.append((b"x-csrftoken", masked.encode()))
    return headers


def asgi_upload(client, path):
    """POST an image body through the raw ASGI upload route, as uvicorn would."""
    from vault import upload

    body = memory_like(16 * 1024)
    # A job's upload is named by its job; anyone else names it.
    by_job = client.defaults.get("HTTP_AUTHORIZATION", "").startswith("Job ")
    headers = [(b"host", b"127.0.0.1"), (b"content-type", b"application/octet-stream"),
               (b"content-length", str(len(body)).encode()),
               *([] if by_job else [(b"x-berth-name", b"matrix")]),
               *credential_headers(client)]
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(),
             "query_string": b"", "root_path": "", "headers": headers,
             "client": ("127.0.0.1", 40000), "server": ("127.0.0.1", 80)}
    incoming = [{"type": "http.request", "body": body, "more_body": False}]
    sent = []

    async def receive():
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send_message(message):
        sent.append(message)

    async def not_the_upload(scope, receive, send):
        raise AssertionError(f"{path} did not reach the upload route")

    async_to_sync(upload.route(not_the_upload))(scope, receive, send_message)
    start = next(m for m in sent if m["type"] == "http.response.start")
    content = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return Reply(start["status"], content)


async def websocket_outcome(path, client, probe=None, browser=True):
    """Open the socket as ``client``'s identity: "acc" / "acc-" (accepted, with or without
    ``probe`` in the first message) or "rej" (the handshake refused)."""
    from portal.routing import websocket_application

    headers = list(credential_headers(client))
    headers = [(k, v) for k, v in headers if k != b"x-csrftoken"]
    if browser:
        headers.append((b"origin", b"http://127.0.0.1"))
    socket = WebsocketCommunicator(websocket_application, path, headers=headers)
    connected, _ = await socket.connect(timeout=5)
    if not connected:
        return "rej"
    try:
        if probe is None:
            return "acc"
        first = await socket.receive_from(timeout=5)
        return "acc" if probe in first else "acc-"
    finally:
        await socket.disconnect()

