"""The authorisation matrix: every route × every kind of caller → the exact outcome.

Written by hand, never derived from the code it checks: a reviewer reads a row and
sees who may do what. tests/test_authorization_matrix.py replays every cell and fails
when a route (URL, the raw upload route, or WebSocket) has no row.

Adding a route: add its request to OPERATIONS and one row to each table below.

Outcomes
  200 201 202 204 400 401 403 404 ...  that status code
  200-  200, but the route's object is not in the answer (a listing filtered to nothing)
  in    302 to the sign-in page
  go    302 elsewhere, without an error message (the page moved on; the action was done)
  err   302 elsewhere with an error message (refused or failed, and told why)
  acc   WebSocket accepted (for job sockets: the job is in the first snapshot)
  acc-  WebSocket accepted, but the job is not in the snapshot
  rej   WebSocket handshake refused (closed before accept: the server answers 403)

Callers
  anon   no credentials                      admin  an admin whose session passed 2FA
  no2fa  an admin signed in without 2FA      audit  an auditor
  outs   a user with no role ("outsider")    host   an enrolled host's agent credential
  i:r … a:r  an admin's API token with only that scope (i = images, g = guests,
             j = jobs, a = audit; r read, w write, dl download, rs restore, del delete,
             sv save, mg migrate), so the scope is all that limits it
  exp / rev  an admin's token with every scope, expired / revoked
  jup / jdn  a host agent's single-use job credential: upload (a save job's) /
             download (a restore of the matrix's image)

Refusals (in 401 403 err rej) on routes with an ``audit`` target must leave a
"denied" audit record on that target: every refused access to an image is recorded.
"""
from dataclasses import dataclass, field

IMAGE = "image:{image}"


@dataclass(frozen=True)
class Operation:
    path: str
    data: dict = field(default_factory=dict)
    json: bool = False  # send ``data`` as JSON (the API) rather than a form (pages)
    probe: str | None = None  # what a 200 / acc must contain, e.g. the listed object's id
    audit: str | None = None  # the audit target every refusal must be recorded on
    transport: str = "http"  # "http" (Django), "asgi" (the raw upload app) or "ws"


def api(path, data=None, **kwargs):
    return Operation(path, data or {}, json=True, **kwargs)


GRANT = {"user": "ada", "permission": "view"}

# (route name, method) → the request the matrix sends. WebSocket routes are named by
# their pattern in portal/routing.py; the raw upload route by its URL name's POST.
OPERATIONS = {
    ("dashboard", "GET"): Operation("/", probe="{guest}"),
    ("login", "GET"): Operation("/login/"),
    ("login", "POST"): Operation("/login/"),
    ("logout", "POST"): Operation("/logout/"),
    ("2fa-verify", "GET"): Operation("/login/verify/"),
    ("2fa-setup", "GET"): Operation("/account/2fa/"),
    ("audit", "GET"): Operation("/audit/"),
    ("audit-verify", "POST"): Operation("/audit/verify"),
    ("audit-export", "GET"): Operation("/audit/export.jsonl"),
    ("people", "GET"): Operation("/people/"),
    ("people", "POST"): Operation("/people/", {"username": "newcomer", "role": "auditor",
                                               "password": "a long enough passphrase"}),
    ("tokens", "GET"): Operation("/tokens/"),
    ("tokens", "POST"): Operation("/tokens/", {"name": "matrix", "scopes": ["jobs:read"],
                                               "days": 1, "images": ""}),
    ("token-revoke", "POST"): Operation("/tokens/{token}/revoke"),
    ("vault", "GET"): Operation("/vault/", probe="{image}", audit="vault"),
    ("vault-upload", "GET"): Operation("/vault/upload/", audit="vault"),
    ("vault-image", "GET"): Operation("/vault/{image}/", audit=IMAGE),
    ("vault-image-grant", "POST"): Operation("/vault/{image}/grants",
                                             {"holder": "ada", "kind": "user",
                                              "permission": "view"}, audit=IMAGE),
    ("vault-image-verify", "POST"): Operation("/vault/{image}/verify", audit=IMAGE),
    ("vault-image-delete", "GET"): Operation("/vault/{image}/delete", audit=IMAGE),
    ("vault-image-delete", "POST"): Operation("/vault/{image}/delete", audit=IMAGE),
    ("jobs", "GET"): Operation("/jobs/", probe="{job}"),
    ("job", "GET"): Operation("/jobs/{job}/"),
    ("job-abort", "POST"): Operation("/jobs/{job}/abort"),
    ("job-resolve", "POST"): Operation("/jobs/{doubtful}/resolve", {"keep": "destination"}),
    ("job-settle", "POST"): Operation("/jobs/{unknown}/settle", {"state": "failed"}),
    ("guest", "GET"): Operation("/jobs/guests/{guest}/"),
    ("guest-save", "POST"): Operation("/jobs/guests/{guest}/save"),
    ("guest-conflict", "POST"): Operation("/jobs/guests/{conflicted}/resolve-conflict",
                                          {"decision": "refuse"}),
    ("guest-migrate", "GET"): Operation("/jobs/guests/{guest}/migrate"),
    ("guest-migrate", "POST"): Operation("/jobs/guests/{guest}/migrate",
                                         {"destination": "{hostc}", "live": "1"}),
    ("image-restore", "POST"): Operation("/jobs/restore/{image}", {"host": "{hostc}"},
                                         audit=IMAGE),
    ("api-audit", "GET"): api("/api/v1/audit/"),
    ("api-tokens", "GET"): api("/api/v1/tokens/"),
    ("api-tokens", "POST"): api("/api/v1/tokens/", {"name": "matrix", "scopes": ["jobs:read"],
                                                    "days": 1}),
    ("api-token", "DELETE"): api("/api/v1/tokens/{token}"),
    ("api-images", "GET"): api("/api/v1/images/", probe="{image}", audit="vault"),
    ("api-images", "POST"): api("/api/v1/images/", audit="vault", transport="asgi"),
    ("api-image", "GET"): api("/api/v1/images/{image}", audit=IMAGE),
    ("api-image", "DELETE"): api("/api/v1/images/{image}", audit=IMAGE),
    ("api-image-content", "GET"): api("/api/v1/images/{image}/content", audit=IMAGE),
    ("api-image-verify", "POST"): api("/api/v1/images/{image}/verify", audit=IMAGE),
    ("api-image-grants", "GET"): api("/api/v1/images/{image}/grants", audit=IMAGE),
    ("api-image-grants", "POST"): api("/api/v1/images/{image}/grants", GRANT, audit=IMAGE),
    ("api-image-grants", "DELETE"): api("/api/v1/images/{image}/grants", GRANT, audit=IMAGE),
    ("api-hosts", "GET"): api("/api/v1/hosts/"),
    ("api-guests", "GET"): api("/api/v1/guests/"),
    ("api-guest", "GET"): api("/api/v1/guests/{guest}"),
    ("api-guest-save", "POST"): api("/api/v1/guests/{guest}/save"),
    ("api-guest-conflict", "POST"): api(
        "/api/v1/guests/{conflicted}/resolve-conflict", {"decision": "refuse"}),
    ("api-guest-migrate", "POST"): api("/api/v1/guests/{guest}/migrate",
                                       {"destination": "{hostc}"}),
    ("api-image-restore", "POST"): api("/api/v1/images/{image}/restore", {"host": "{hostc}"},
                                       audit=IMAGE),
    ("api-jobs", "GET"): api("/api/v1/jobs/", probe="{job}"),
    ("api-job", "GET"): api("/api/v1/jobs/{job}"),
    ("api-job-abort", "POST"): api("/api/v1/jobs/{job}/abort"),
    ("api-job-resolve", "POST"): api("/api/v1/jobs/{doubtful}/resolve",
                                     {"keep": "destination"}),
    ("api-job-settle", "POST"): api("/api/v1/jobs/{unknown}/settle", {"state": "failed"}),
    ("schema", "GET"): api("/api/schema/"),
    ("api-docs", "GET"): Operation("/api/docs/"),
    ("ws/agent/", "WS"): Operation("/ws/agent/", audit="agent-endpoint", transport="ws"),
    ("ws/jobs/", "WS"): Operation("/ws/jobs/", probe="{job}", transport="ws"),
    ("ws/jobs/<uuid:job_id>/", "WS"): Operation("/ws/jobs/{job}/", probe="{job}",
                                                transport="ws"),
}

# People (signed-in sessions, or nobody), dead tokens, and what a host's agent holds.
# Pages take sessions only: a caller with just a credential header is sent to sign in.
WHO = """
route                  method  anon  admin no2fa audit outs  exp   rev   host  jup   jdn
dashboard              GET     in    200   200   200   200-  in    in    in    in    in
login                  GET     200   go    go    go    go    200   200   200   200   200
login                  POST    200   go    go    go    go    200   200   200   200   200
logout                 POST    in    in    in    in    in    in    in    in    in    in
2fa-verify             GET     in    200   go    go    go    in    in    in    in    in
2fa-setup              GET     in    200   200   200   200   in    in    in    in    in
audit                  GET     in    200   200   200   403   in    in    in    in    in
audit-verify           POST    in    200   200   200   403   in    in    in    in    in
audit-export           GET     in    200   200   200   403   in    in    in    in    in
people                 GET     in    200   200   403   403   in    in    in    in    in
people                 POST    in    go    403   403   403   in    in    in    in    in
tokens                 GET     in    200   200   200   200   in    in    in    in    in
tokens                 POST    in    200   403   200   200   in    in    in    in    in
token-revoke           POST    in    go    403   404   404   in    in    in    in    in
vault                  GET     in    200   200   200   200-  in    in    in    in    in
vault-upload           GET     in    200   403   403   403   in    in    in    in    in
vault-image            GET     in    200   200   200   403   in    in    in    in    in
vault-image-grant      POST    in    go    err   err   err   in    in    in    in    in
vault-image-verify     POST    in    go    go    go    403   in    in    in    in    in
vault-image-delete     GET     in    200   403   403   403   in    in    in    in    in
vault-image-delete     POST    in    go    403   403   403   in    in    in    in    in
jobs                   GET     in    200   200   200   200-  in    in    in    in    in
job                    GET     in    200   200   200   404   in    in    in    in    in
job-abort              POST    in    go    err   err   404   in    in    in    in    in
job-resolve            POST    in    go    err   err   404   in    in    in    in    in
job-settle             POST    in    go    err   err   404   in    in    in    in    in
guest                  GET     in    200   200   200   403   in    in    in    in    in
guest-save             POST    in    go    err   err   err   in    in    in    in    in
guest-conflict         POST    in    go    err   err   err   in    in    in    in    in
guest-migrate          GET     in    200   200   200   403   in    in    in    in    in
guest-migrate          POST    in    go    err   err   403   in    in    in    in    in
image-restore          POST    in    go    err   err   err   in    in    in    in    in
api-audit              GET     401   200   200   200   403   401   401   401   403   403
api-tokens             GET     401   200   200   200   200   401   401   401   403   403
api-tokens             POST    401   201   403   201   201   401   401   401   403   403
api-token              DELETE  401   204   403   404   404   401   401   401   403   403
api-images             GET     401   200   200   200   200-  401   401   401   200-  200-
api-images             POST    401   201   403   403   403   401   401   401   201   403
api-image              GET     401   200   200   200   403   401   401   401   403   403
api-image              DELETE  401   204   403   403   403   401   401   401   403   403
api-image-content      GET     401   200   403   403   403   401   401   401   403   200
api-image-verify       POST    401   200   200   200   403   401   401   401   403   403
api-image-grants       GET     401   200   200   200   403   401   401   401   403   403
api-image-grants       POST    401   201   403   403   403   401   401   401   403   403
api-image-grants       DELETE  401   200   403   403   403   401   401   401   403   403
api-hosts              GET     401   200   200   200   403   401   401   401   403   403
api-guests             GET     401   200   200   200   403   401   401   401   403   403
api-guest              GET     401   200   200   200   403   401   401   401   403   403
api-guest-save         POST    401   202   403   403   403   401   401   401   403   403
api-guest-conflict     POST    401   200   403   403   403   401   401   401   403   403
api-guest-migrate      POST    401   202   403   403   403   401   401   401   403   403
api-image-restore      POST    401   202   403   403   403   401   401   401   403   403
api-jobs               GET     401   200   200   200   200-  401   401   401   200-  200-
api-job                GET     401   200   200   200   404   401   401   401   404   404
api-job-abort          POST    401   202   403   403   404   401   401   401   404   404
api-job-resolve        POST    401   202   403   403   404   401   401   401   404   404
api-job-settle         POST    401   202   403   403   404   401   401   401   404   404
schema                 GET     401   200   200   200   200   401   401   401   200   200
api-docs               GET     in    200   200   200   200   in    in    in    in    in
ws/agent/              WS      rej   rej   rej   rej   rej   rej   rej   acc   rej   rej
ws/jobs/               WS      rej   acc   acc   acc   acc-  rej   rej   rej   rej   rej
ws/jobs/<uuid:job_id>/ WS      rej   acc   acc   acc   rej   rej   rej   rej   rej   rej
"""

# An admin's API tokens, one scope each. Aborting or settling a job needs both
# jobs:read (to see it) and guests:save, resolving one jobs:read and guests:migrate:
# no single scope may.
SCOPES = """
route                  method  i:r   i:w   i:dl  i:rs  i:del g:r   g:sv  g:mg  j:r   a:r
dashboard              GET     in    in    in    in    in    in    in    in    in    in
login                  GET     200   200   200   200   200   200   200   200   200   200
login                  POST    200   200   200   200   200   200   200   200   200   200
logout                 POST    in    in    in    in    in    in    in    in    in    in
2fa-verify             GET     in    in    in    in    in    in    in    in    in    in
2fa-setup              GET     in    in    in    in    in    in    in    in    in    in
audit                  GET     in    in    in    in    in    in    in    in    in    in
audit-verify           POST    in    in    in    in    in    in    in    in    in    in
audit-export           GET     in    in    in    in    in    in    in    in    in    in
people                 GET     in    in    in    in    in    in    in    in    in    in
people                 POST    in    in    in    in    in    in    in    in    in    in
tokens                 GET     in    in    in    in    in    in    in    in    in    in
tokens                 POST    in    in    in    in    in    in    in    in    in    in
token-revoke           POST    in    in    in    in    in    in    in    in    in    in
vault                  GET     in    in    in    in    in    in    in    in    in    in
vault-upload           GET     in    in    in    in    in    in    in    in    in    in
vault-image            GET     in    in    in    in    in    in    in    in    in    in
vault-image-grant      POST    in    in    in    in    in    in    in    in    in    in
vault-image-verify     POST    in    in    in    in    in    in    in    in    in    in
vault-image-delete     GET     in    in    in    in    in    in    in    in    in    in
vault-image-delete     POST    in    in    in    in    in    in    in    in    in    in
jobs                   GET     in    in    in    in    in    in    in    in    in    in
job                    GET     in    in    in    in    in    in    in    in    in    in
job-abort              POST    in    in    in    in    in    in    in    in    in    in
job-resolve            POST    in    in    in    in    in    in    in    in    in    in
job-settle             POST    in    in    in    in    in    in    in    in    in    in
guest                  GET     in    in    in    in    in    in    in    in    in    in
guest-save             POST    in    in    in    in    in    in    in    in    in    in
guest-conflict         POST    in    in    in    in    in    in    in    in    in    in
guest-migrate          GET     in    in    in    in    in    in    in    in    in    in
guest-migrate          POST    in    in    in    in    in    in    in    in    in    in
image-restore          POST    in    in    in    in    in    in    in    in    in    in
api-audit              GET     403   403   403   403   403   403   403   403   403   200
api-tokens             GET     200   200   200   200   200   200   200   200   200   200
api-tokens             POST    403   403   403   403   403   403   403   403   403   403
api-token              DELETE  403   403   403   403   403   403   403   403   403   403
api-images             GET     200   200-  200-  200-  200-  200-  200-  200-  200-  200-
api-images             POST    403   201   403   403   403   403   403   403   403   403
api-image              GET     200   403   403   403   403   403   403   403   403   403
api-image              DELETE  403   403   403   403   204   403   403   403   403   403
api-image-content      GET     403   403   200   403   403   403   403   403   403   403
api-image-verify       POST    200   403   403   403   403   403   403   403   403   403
api-image-grants       GET     200   403   403   403   403   403   403   403   403   403
api-image-grants       POST    403   403   403   403   403   403   403   403   403   403
api-image-grants       DELETE  403   403   403   403   403   403   403   403   403   403
api-hosts              GET     403   403   403   403   403   200   403   403   403   403
api-guests             GET     403   403   403   403   403   200   403   403   403   403
api-guest              GET     403   403   403   403   403   200   403   403   403   403
api-guest-save         POST    403   403   403   403   403   403   202   403   403   403
api-guest-conflict     POST    403   403   403   403   403   403   403   200   403   403
api-guest-migrate      POST    403   403   403   403   403   403   403   202   403   403
api-image-restore      POST    403   403   403   202   403   403   403   403   403   403
api-jobs               GET     200-  200-  200-  200-  200-  200-  200-  200-  200   200-
api-job                GET     404   404   404   404   404   404   404   404   200   404
api-job-abort          POST    404   404   404   404   404   404   404   404   403   404
api-job-resolve        POST    404   404   404   404   404   404   404   404   403   404
api-job-settle         POST    404   404   404   404   404   404   404   404   403   404
schema                 GET     200   200   200   200   200   200   200   200   200   200
api-docs               GET     in    in    in    in    in    in    in    in    in    in
ws/agent/              WS      rej   rej   rej   rej   rej   rej   rej   rej   rej   rej
ws/jobs/               WS      rej   rej   rej   rej   rej   rej   rej   rej   rej   rej
ws/jobs/<uuid:job_id>/ WS      rej   rej   rej   rej   rej   rej   rej   rej   rej   rej
"""

CALLERS = {
    "anon": "anonymous", "admin": "admin", "no2fa": "admin-no-2fa", "audit": "auditor",
    "outs": "outsider", "host": "host credential",
    "i:r": "token images:read", "i:w": "token images:write",
    "i:dl": "token images:download", "i:rs": "token images:restore",
    "i:del": "token images:delete", "g:r": "token guests:read", "g:sv": "token guests:save",
    "g:mg": "token guests:migrate", "j:r": "token jobs:read", "a:r": "token audit:read",
    "exp": "expired token", "rev": "revoked token",
    "jup": "job upload credential", "jdn": "job download credential",
}
REFUSALS = {"in", "401", "403", "err", "rej"}


def parse(table):
    """{(route, method): {caller: outcome}} from one of the tables above."""
    lines = [line.split() for line in table.strip().splitlines() if line.strip()]
    header, rows = lines[0], lines[1:]
    assert header[:2] == ["route", "method"], header
    callers = [CALLERS[column] for column in header[2:]]
    parsed = {}
    for row in rows:
        key = (row[0], row[1])
        assert len(row) == len(header), f"{key}: {len(row) - 2} cells for {len(callers)} callers"
        assert key not in parsed, f"{key} appears twice"
        parsed[key] = dict(zip(callers, row[2:], strict=True))
    return parsed


def matrix():
    """Both tables joined: {(route, method): {caller: outcome}} for every caller."""
    sessions, tokens = parse(WHO), parse(SCOPES)
    assert sessions.keys() == tokens.keys(), sorted(sessions.keys() ^ tokens.keys())
    return {key: {**sessions[key], **tokens[key]} for key in sessions}
