"""Enrolling and revoking hosts: credential, certificate, and the agent's config bundle."""
import json
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from migrator import credentials, pki, tls
from migrator.models import Host, JobCredential
from portal import audit


class EnrollmentError(Exception):
    """A request to enrol or revoke that cannot be honoured, with the reason."""


@dataclass
class HostSpec:
    name: str
    address: str = "127.0.0.1"
    relocation_port: int = 8002
    driver: str = "sim"
    arch: str = "x86_64"
    virt_extensions: list = field(default_factory=lambda: ["vmx"])
    memory_mib: int = 4096
    disk_gib: int = 100
    subnet: str = "192.168.1.0/24"
    storage: list = field(default_factory=list)
    hosts_allow: list = field(default_factory=list)
    guests: list = field(default_factory=list)


def certificate_authority():
    return pki.CertificateAuthority.load_or_create(settings.PKI_DIR)


def bundle_dir(name) -> Path:
    return settings.AGENTS_DIR / name


def enroll(spec: HostSpec, *, actor=None, portal_url=None) -> Path:
    """Create the host, its credential and certificate; write its bundle.

    Returns the path of the agent's config file."""
    try:
        pki.validate_host_name(spec.name)
    except (pki.PKIError, ValueError) as exc:
        raise EnrollmentError(str(exc)) from None
    for pattern in spec.hosts_allow:
        try:
            tls.compile_pattern(pattern)
        except ValueError as exc:  # the agent would refuse its bundle: refuse it here
            raise EnrollmentError(f"--hosts-allow: {exc}") from None
    if Host.objects.filter(name=spec.name).exists():
        raise EnrollmentError(f"host {spec.name} is already enrolled")
    ca = certificate_authority()
    issued = ca.issue_host_certificate(spec.name, addresses=[spec.address])
    secret, digest = credentials.new_host_credential()
    with transaction.atomic():
        Host.objects.create(
            name=spec.name, address=spec.address, relocation_port=spec.relocation_port,
            driver=spec.driver, arch=spec.arch, virt_extensions=spec.virt_extensions,
            memory_mib=spec.memory_mib, disk_gib=spec.disk_gib, subnet=spec.subnet,
            storage=spec.storage, credential_digest=digest, cert_serial=str(issued.serial),
            cert_fingerprint=issued.fingerprint_sha256)
        path = _write_bundle(spec, secret, issued, ca, portal_url or settings.PORTAL_URL)
        audit.record("host.enroll", actor=actor or audit.Actor.system(),
                     target=f"host:{spec.name}",
                     details={"address": spec.address, "relocation_port": spec.relocation_port,
                              "certificate": issued.fingerprint_sha256})
    return path


def _write_private(path: Path, data: bytes, mode=0o600):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)


def _write_bundle(spec, secret, issued, ca, portal_url) -> Path:
    directory = bundle_dir(spec.name)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    _write_private(directory / "cert.pem", issued.cert_pem)
    _write_private(directory / "key.pem", issued.key_pem)
    _write_private(directory / "ca.pem", ca.ca_cert_pem())
    config = {
        "host": {"name": spec.name, "driver": spec.driver, "arch": spec.arch,
                 "virt_extensions": spec.virt_extensions, "memory_mib": spec.memory_mib,
                 "disk_gib": spec.disk_gib, "subnet": spec.subnet, "storage": spec.storage,
                 "state_dir": str(directory / "state")},
        "portal": {"url": portal_url, "credential": secret, "ca": ""},
        "relocation": {"address": spec.address, "port": spec.relocation_port,
                       "hosts_allow": spec.hosts_allow, "cert": str(directory / "cert.pem"),
                       "key": str(directory / "key.pem"), "ca": str(directory / "ca.pem")},
    }
    path = directory / "agent.toml"
    _write_private(path, to_toml(config, spec.guests).encode())
    return path


def set_portal_url(name, portal_url) -> bool:
    """Point an existing bundle at ``portal_url`` (the demo serves where it is
    told, and its agents send image bytes only to their bundle's URL).
    Returns whether the file changed."""
    path = bundle_dir(name) / "agent.toml"
    data = tomllib.loads(path.read_text())
    if data.get("portal", {}).get("url") == portal_url:
        return False
    data.setdefault("portal", {})["url"] = portal_url
    guests = data.pop("guests", [])
    _write_private(path, to_toml(data, guests).encode())
    return True


def to_toml(config: dict, guests: list) -> str:
    """Just enough TOML for the agent config: tables of scalars and lists."""
    lines = ["# Berth host agent configuration, written by `manage.py hosts enroll`.",
             "# It holds this host's credential: keep it 0600.", ""]
    for table, values in config.items():
        lines.append(f"[{table}]")
        lines += [f"{key} = {_value(value)}" for key, value in values.items()]
        lines.append("")
    for guest in guests:
        lines.append("[[guests]]")
        lines += [f"{key} = {_value(value)}" for key, value in guest.items()]
        lines.append("")
    return "\n".join(lines)


def _value(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_value(v)}" for k, v in value.items()) + " }"
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def revoke(name, *, actor=None):
    """Cut a host off: its credential, its certificate, its open agent socket.

    The one way to revoke (the `hosts revoke` command calls it). It only writes:
    the certificate to the CA's list (for CRLs), the host's row, and the end of
    its unused job credentials (no image moves for it any more). The portal
    processes read the row (migrator.revocation): they close the host's socket,
    refuse what it sends and tell every other agent, whether or not this runs
    in a process that shares their channel layer."""
    host = Host.objects.filter(name=name).first()
    if host is None:
        raise EnrollmentError(f"no host named {name}")
    if host.revoked:
        raise EnrollmentError(f"host {name} is already revoked")
    if host.cert_serial:
        certificate_authority().revoke(int(host.cert_serial))
    now = timezone.now()
    with transaction.atomic():
        host.revoked_at, host.online = now, False
        host.save(update_fields=["revoked_at", "online"])
        ended = JobCredential.objects.filter(
            Q(job__source_host=host) | Q(job__destination_host=host),
            used_at__isnull=True, expires_at__gt=now).update(expires_at=now)
        audit.record("host.revoke", actor=actor or audit.Actor.system(), target=f"host:{name}",
                     details={"certificate_serial": host.cert_serial,
                              "job_credentials_ended": ended})
    return host
