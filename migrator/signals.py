"""Tie vault transfers made with job credentials back to their jobs."""
from django.dispatch import receiver

from migrator import credentials
from migrator.models import Job, JobCredential
from vault.signals import StoreRefused, image_download_started, image_stored


def _job_credential(request):
    auth = getattr(request, "auth", None)
    return auth if isinstance(auth, JobCredential) else None


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
