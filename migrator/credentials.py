"""Secrets for hosts and jobs: issued once, stored only as SHA-256 digests.

Both are long random strings, so a fast hash is enough: there is nothing to
brute-force (unlike passwords, which get Argon2).

A job credential is bound to one job, one direction (upload or download), for a
download one image, and one host: the agent presents it with its own host
credential (``X-Berth-Host-Credential``), so a credential that reached another
host (or anyone else) is refused. It is single-use: the first presentation spends
it, whatever the outcome, so two requests can never both use it.
"""
import hashlib
import hmac
import secrets
from datetime import timedelta

from django.conf import settings
from django.utils import timezone
from rest_framework import exceptions
from rest_framework.authentication import BaseAuthentication, get_authorization_header

from migrator.models import Host, JobCredential
from portal import audit
from portal.models import ActorKind, Outcome

HOST_PREFIX = "hc_"
JOB_PREFIX = "jc_"
JOB_CREDENTIAL_TTL = timedelta(hours=1)
HOST_HEADER = "X-Berth-Host-Credential"


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_host_credential():
    """(secret, digest) for a host; the secret goes into the agent's config only."""
    secret = HOST_PREFIX + secrets.token_urlsafe(32)
    return secret, digest(secret)


def host_for_credential(secret: str):
    """The enrolled, unrevoked host this credential belongs to, or None."""
    if not secret or not secret.startswith(HOST_PREFIX):
        return None
    host = Host.objects.filter(credential_digest=digest(secret)).first()
    if host is None or host.revoked or not hmac.compare_digest(host.credential_digest,
                                                               digest(secret)):
        return None
    return host


AGENT_CONNECT = "host.connect"


def authenticate_agent(authorization: str, source_ip):
    """The host an agent's ``Authorization: Host <credential>`` names, or None; audited.

    Refused attempts are counted per source address (`audit.record_refusal`: the first
    of an interval is a record, the rest one aggregate). Beyond
    ``AGENT_CONNECT_FAILURE_LIMIT`` refusals in the interval, the address is refused at
    once, without looking at its credential, until the interval ends: a flood of bad
    handshakes costs one counter update each, and never grows the audit trail.
    """
    source = source_ip or "unknown address"
    limit = settings.AGENT_CONNECT_FAILURE_LIMIT
    if audit.refusals_from(AGENT_CONNECT, source) >= limit:
        _refuse_agent(source, source_ip, f"more than {limit} refused attempts from this "
                      "address in the interval: refused without checking the credential")
        return None
    scheme, _, secret = authorization.partition(" ")
    host = host_for_credential(secret.strip()) if scheme == "Host" else None
    if host is None:
        _refuse_agent(source, source_ip, "missing, unknown or revoked host credential")
        return None
    audit.record(AGENT_CONNECT, actor=audit.Actor(ActorKind.HOST, f"host:{host.name}"),
                 target=f"host:{host.name}", outcome=Outcome.ALLOWED, source_ip=source_ip)
    return host


def _refuse_agent(source, source_ip, reason):
    audit.record_refusal(AGENT_CONNECT, actor=audit.Actor(ActorKind.ANONYMOUS, "unknown agent"),
                         source=source, target="agent-endpoint", source_ip=source_ip,
                         details={"reason": reason})


def issue_job_credential(job, purpose, image_id=None) -> str:
    """A credential for the agent of the host that runs ``job``, for one transfer."""
    secret = JOB_PREFIX + secrets.token_urlsafe(32)
    JobCredential.objects.create(digest=digest(secret), job=job, purpose=purpose,
                                 image_id=image_id, host=job.host,
                                 expires_at=timezone.now() + JOB_CREDENTIAL_TTL)
    return secret


class JobCredentialAuthentication(BaseAuthentication):
    """``Authorization: Job <secret>`` with ``X-Berth-Host-Credential: <host secret>``:
    acts for the job's requester, for one transfer, from the job's host only."""

    keyword = b"job"

    def authenticate(self, request):
        parts = get_authorization_header(request).split()
        if not parts or parts[0].lower() != self.keyword:
            return None
        if len(parts) != 2:
            raise exceptions.AuthenticationFailed("Invalid job credential header.")
        credential = (JobCredential.objects.select_related("job", "job__requester", "host")
                      .filter(digest=digest(parts[1].decode("latin-1"))).first())
        if credential is None or credential.used_at or credential.expires_at < timezone.now():
            raise exceptions.AuthenticationFailed("Invalid, used or expired job credential.")
        if credential.job.transfers_closed or credential.job.requester is None:
            raise exceptions.AuthenticationFailed("The job this credential belongs to is over.")
        presenter = host_for_credential(request.META.get("HTTP_X_BERTH_HOST_CREDENTIAL", ""))
        if credential.host_id is None or presenter is None or presenter.id != credential.host_id:
            _refuse_presenter(request, credential, presenter)
        # Spent now, atomically: a second request with it, even a concurrent one, fails.
        if not consume(credential):
            raise exceptions.AuthenticationFailed("Invalid, used or expired job credential.")
        return credential.job.requester, credential

    def authenticate_header(self, request):
        return "Job"


def _refuse_presenter(request, credential, presenter):
    """The credential came without its host's credential, or from another host."""
    issued_to = credential.host.name if credential.host_id else None
    reason = (f"job credential of {issued_to or 'no host'} presented by "
              f"{presenter.name if presenter else 'no authenticated host'}")
    # A refused presentation does not spend the credential, so it can be repeated at
    # will: aggregated per presenter like every refusal an outsider can repeat.
    address = request.META.get("REMOTE_ADDR") or None
    audit.record_refusal("job.credential_refused", actor=audit.Actor(
        ActorKind.HOST if presenter else ActorKind.ANONYMOUS,
        f"host:{presenter.name}" if presenter else "unknown agent"),
        source=f"host:{presenter.name}" if presenter else address,
        target=f"job:{credential.job_id}", source_ip=address,
        details={"reason": reason, "purpose": credential.purpose})
    raise exceptions.AuthenticationFailed(
        f"This job credential was issued to another host; present it with that host's "
        f"credential ({HOST_HEADER}).")


def consume(credential) -> bool:
    """Mark a credential used: single use, whatever the outcome of the transfer.
    True if this call spent it (it was unused)."""
    return bool(JobCredential.objects.filter(digest=credential.digest,
                                             used_at__isnull=True).update(
        used_at=timezone.now()))
