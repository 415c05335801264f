"""The migrator's one access-control helper: pages, API and consumers ask here.

- admins operate (save, restore, migrate, abort, resolve a migration in doubt,
  settle a job whose outcome is unknown) and see every job;
- auditors see every job, host and guest, and operate nothing;
- anyone else sees only the jobs they requested (e.g. a restore they were granted);
- a token request is further limited to its scopes.
"""
from migrator.models import Job
from portal import roles

OPERATE_SCOPES = {"save": "guests:save", "migrate": "guests:migrate",
                  "restore": "images:restore", "abort": "guests:save",
                  "resolve": "guests:migrate", "resolve_claim": "guests:migrate",
                  "settle": "guests:save"}


def can_see_all(user) -> bool:
    return roles.can_read_audit(user)


def can_read_inventory(request) -> bool:
    return can_see_all(request.user) and roles.token_allows(request, "guests:read")


def visible_jobs(request):
    user = request.user
    if not user.is_authenticated or not roles.token_allows(request, "jobs:read"):
        return Job.objects.none()
    jobs = Job.objects.select_related("source_host", "destination_host", "requester")
    return jobs if can_see_all(user) else jobs.filter(requester=user)


def can_view_job(user, job) -> bool:
    return user.is_authenticated and (can_see_all(user) or job.requester_id == user.id)


def can_operate(request, action) -> bool:
    """Save, migrate, abort, settling an unknown job and resolving (an in-doubt
    migration, a claim conflict) are admin actions; restore is checked per image."""
    if action != "restore" and not roles.acts_as_admin(request):
        return False
    return roles.token_allows(request, OPERATE_SCOPES[action])
