"""Tie vault transfers made with job credentials back to their jobs."""
from django.dispatch import receiver

from migrator import credentials
from migrator.models import Job, JobCredential
from vault.signals import image_download_started, image_stored


def _job_credential(request):
    auth = getattr(request, "auth", None)
    return auth if isinstance(auth, JobCredential) else None


@receiver(image_stored)
def link_saved_image(sender, image, request, **kwargs):
    credential = _job_credential(request)
    if credential is None:
        return
    credentials.consume(credential)
    Job.objects.filter(id=credential.job_id).update(image=image)


@receiver(image_download_started)
def consume_download_credential(sender, image, request, **kwargs):
    credential = _job_credential(request)
    if credential is not None:
        credentials.consume(credential)
