"""The scopes an API token may carry. A token never exceeds its user's role."""
SCOPES = {
    "images:read": "list and view saved images and their metadata",
    "images:write": "upload images into the vault",
    "images:download": "download image content",
    "images:restore": "restore images onto hosts",
    "images:delete": "delete images",
    "guests:read": "list hosts and guests",
    "guests:save": "save running guests into the vault",
    "guests:migrate": "live-migrate guests between hosts",
    "jobs:read": "read job state and progress",
    "audit:read": "read the audit trail",
}


def invalid_scopes(scopes):
    return sorted(set(scopes) - set(SCOPES))


# The most each role may put on a token: a token never exceeds its user's role,
# and the role checks still apply when the token is used. Keys are role names
# (portal.roles); None is a user without a role, whose grants decide per image.
ROLE_SCOPES = {
    "admin": frozenset(SCOPES),
    "auditor": frozenset({"audit:read", "images:read", "jobs:read", "guests:read"}),
    None: frozenset({"images:read", "images:download", "images:restore", "jobs:read"}),
}


def scopes_for_role(role) -> frozenset:
    return ROLE_SCOPES.get(role, ROLE_SCOPES[None])
