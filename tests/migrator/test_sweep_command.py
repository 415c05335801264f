"""manage.py sweep: the timer's way to give up on jobs whose agent went away."""
from datetime import timedelta

import pytest
from django.core.management import call_command
from django.utils import timezone

from migrator.models import Host, Job, JobKind, JobState


@pytest.fixture
def jobs(enrolled, admin_user):
    """A queued save on hostb, silent for 2 minutes, and one on hostc, which is online."""
    long_ago = timezone.now() - timedelta(minutes=2)
    Host.objects.filter(name="hostb").update(online=False, last_seen=long_ago)
    Host.objects.filter(name="hostc").update(online=True, last_seen=timezone.now())
    made = {}
    for name in ("hostb", "hostc"):
        made[name] = Job.objects.create(
            kind=JobKind.SAVE, requester=admin_user, source_host=Host.objects.get(name=name),
            guest_uuid="7a1c0e8e-3b5c-4e0e-9a57-1f2d3c4b5a69", guest_name="debian_etch")
    return made


def test_sweep_makes_only_the_jobs_of_an_agent_gone_past_the_timeout_unknown(jobs, settings,
                                                                           capsys):
    settings.JOB_AGENT_TIMEOUT_SECONDS = 60
    call_command("sweep")
    assert "1 stale job(s) given up on" in capsys.readouterr().out
    gone, alive = (Job.objects.get(id=jobs[name].id) for name in ("hostb", "hostc"))
    assert gone.state == JobState.UNKNOWN and "went away" in gone.error
    assert "went away" in gone.result["unknown"]["reason"]
    assert alive.state == JobState.QUEUED


def test_sweep_leaves_a_job_whose_agent_is_within_the_timeout(jobs, settings, capsys):
    settings.JOB_AGENT_TIMEOUT_SECONDS = 600
    call_command("sweep")
    assert "0 stale job(s) given up on" in capsys.readouterr().out
    assert Job.objects.get(id=jobs["hostb"].id).state == JobState.QUEUED


def test_sweep_fails_a_job_a_connected_agent_never_started(jobs, settings, capsys,
                                                           monkeypatch,
                                                           django_capture_on_commit_callbacks):
    settings.JOB_AGENT_TIMEOUT_SECONDS, settings.JOB_START_TIMEOUT_SECONDS = 600, 30
    sent = []
    monkeypatch.setattr("migrator.progress.send_to_host", lambda host, p: sent.append((host, p)))
    lost = jobs["hostc"]
    Job.objects.filter(id=lost.id).update(created_at=timezone.now() - timedelta(minutes=1))
    with django_capture_on_commit_callbacks(execute=True):
        call_command("sweep")
    assert "1 stale job(s) given up on" in capsys.readouterr().out
    lost.refresh_from_db()
    assert lost.state == JobState.FAILED and "did not start the job within 30 s" in lost.error
    # A command that was only late must not run now; the agent will say why it stopped.
    assert sent == [("hostc", {"type": "command", "job": str(lost.id), "action": "abort",
                               "reason": f"the portal had already ended the job: {lost.error}"})]


def test_sweep_leaves_a_running_job_of_a_connected_agent(jobs, settings):
    settings.JOB_START_TIMEOUT_SECONDS = 30
    running = jobs["hostc"]
    Job.objects.filter(id=running.id).update(created_at=timezone.now() - timedelta(minutes=5),
                                             state=JobState.RUNNING)
    call_command("sweep")
    assert Job.objects.get(id=running.id).state == JobState.RUNNING
