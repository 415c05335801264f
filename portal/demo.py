"""Setting up the demo: accounts whose passwords are generated once and kept under var/."""
import json
import os

from django.conf import settings
from django.contrib.auth import get_user_model

from portal import roles
from portal.accounts import create_user, generate_password

DEMO_ACCOUNTS = (("admin", roles.ADMIN), ("auditor", roles.AUDITOR))


def credentials_path():
    return settings.DATA_DIR / "demo-credentials.json"


def load_credentials():
    path = credentials_path()
    return json.loads(path.read_text()) if path.exists() else {}


def save_credentials(credentials):
    path = credentials_path()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(credentials, f, indent=2)
    os.chmod(path, 0o600)


def ensure_demo_accounts():
    """Create the demo admin and auditor once; return {username: password}.

    A password comes from BERTH_DEMO_<NAME>_PASSWORD when set, otherwise it is
    generated on first run and stored (0600) so later runs reuse it.
    """
    roles.ensure_groups()
    stored = load_credentials()
    User = get_user_model()
    for username, role in DEMO_ACCOUNTS:
        wanted = os.environ.get(f"BERTH_DEMO_{username.upper()}_PASSWORD")
        user = User.objects.filter(username=username).first()
        if user is None:
            password = wanted or stored.get(username) or generate_password()
            create_user(username, role, password)
            stored[username] = password
        elif wanted and not user.check_password(wanted):
            user.set_password(wanted)
            user.save(update_fields=["password"])
            stored[username] = wanted
    save_credentials(stored)
    return {name: stored.get(name, "(set elsewhere)") for name, _ in DEMO_ACCOUNTS}
