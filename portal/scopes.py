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
