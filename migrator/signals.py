"""Tie vault transfers made with job credentials back to their jobs."""
from django.dispatch import receiver

from migrator import credentials
from migrator.models import Job, JobCredential, JobKind
from vault.signals import StoreRefused, image_download_started, image_stored, upload_started


def _job_credential(request):
    auth = getattr(request, "auth", None)
    return auth if isinstance(auth, JobCredential) else None


def image_metadata(job):
    """What a save's image records, from the job alone: the guest it saved, the host
    it ran on, and what the portal knew of them when it issued the save."""
    known = (job.parameters or {}).get("image") or {}
    return {"name": known.get("name") or f"{job.guest_name} {job.created_at:%Y-%m-%d %H:%M:%S}",
            "guest_uuid": str(job.guest_uuid), "guest_name": job.guest_name,
            "source_host": job.source_host.name if job.source_host else "",
            "memory_mib": known.get("memory_mib"), "vcpus": known.get("vcpus"),
            "architecture": known.get("architecture", ""),
            "virt_extensions": known.get("virt_extensions", "")}


def _differs(field, sent, recorded):
    if field == "virt_extensions":
        return set(str(sent).split(",")) - {""} != set(str(recorded).split(",")) - {""}
    return sent != recorded


@receiver(upload_started)
def impose_job_metadata(sender, request, meta, **kwargs):
    """A job's upload carries the job's metadata, never its headers': headers that say
    otherwise refuse it (409 ``metadata_mismatch``; the vault audits it)."""
    credential = _job_credential(request)
    if credential is None:
        return None
    job = Job.objects.select_related("source_host").get(id=credential.job_id)
    if job.kind != JobKind.SAVE or credential.purpose != JobCredential.UPLOAD:
        raise StoreRefused(403, "permission_denied", "This credential is not for an upload.")
    recorded = image_metadata(job)
    wrong = [f"{field} {meta[field]!r} (the job's: {recorded[field]!r})"
             for field in sorted(recorded) if field in meta and recorded[field] is not None
             and _differs(field, meta[field], recorded[field])]
    if wrong:
        raise StoreRefused(409, "metadata_mismatch", f"The upload's headers contradict its "
                           f"job {job.id}: {'; '.join(wrong)}. Nothing was stored.")
    return recorded


@receiver(image_stored)
def link_saved_image(sender, image, request, **kwargs):
    credential = _job_credential(request)
    if credential is None:
        return
    credentials.consume(credential)
    # Under the job's row lock: the portal may have ended the job (its agent
    # presumed gone) while the body was arriving. Stored now, the image would
    # belong to a failed save, and the guest, resumed by the agent, would run on.
    job = Job.objects.select_for_update(of=("self",)).get(id=credential.job_id)
    if job.transfers_closed:
        raise StoreRefused(409, "job_over", f"The job this upload belongs to is {job.state}: "
                           f"{job.error or 'over'}. Nothing was stored.")
    job.image = image
    job.save(update_fields=["image"])


@receiver(image_download_started)
def consume_download_credential(sender, image, request, **kwargs):
    credential = _job_credential(request)
    if credential is not None:
        credentials.consume(credential)
